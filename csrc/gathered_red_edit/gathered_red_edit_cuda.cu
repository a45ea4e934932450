// gathered_red_edit CUDA kernels. The element math is red_edit.h's, the row -> tenant mapping and
// the backward plan are gathered_red_edit.h's / gathered_red_edit.cpp's (shared with the CPU
// kernels, tested there); this file holds the launch geometry and the two-stage reduction.
//
// The tenant ids are copied to the host and checked there before any kernel reads memory through
// them (one small copy and a sync per call: the price of never reading out of bounds).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "common/column_sum.cuh"
#include "gathered_red_edit/gathered_red_edit.h"

namespace red_kernels {
namespace {

constexpr int kFwdThreads = 256;
constexpr int kBwdCols = 32;  // columns per block: one warp reads 32 consecutive elements
constexpr int kBwdLanes = 8;  // row lanes per block, reduced in shared memory

// One block walks whole rows (grid-stride over rows), threads stride over the columns; each row
// reads its tenant's vectors (the ones/zeros rows for unedited rows).
template <typename T, typename A>
__global__ void gathered_fwd_kernel(const T* __restrict__ h, int64_t h_stride,
                                    const int64_t* __restrict__ ids, int64_t rows_per_unit,
                                    const A* __restrict__ scales, int64_t s_ts,
                                    const A* __restrict__ biases, int64_t b_ts,
                                    const A* __restrict__ ones, const A* __restrict__ zeros,
                                    T* __restrict__ out, int64_t m, int64_t d) {
  for (int64_t r = blockIdx.x; r < m; r += gridDim.x) {
    const int64_t t = ids[gathered_unit_of_row(r, rows_per_unit)];
    const A* sr = t < 0 ? ones : scales + t * s_ts;
    const A* br = t < 0 ? zeros : biases + t * b_ts;
    const T* hr = h + r * h_stride;
    T* orow = out + r * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      orow[j] = static_cast<T>(red_edit_apply<A>(static_cast<A>(hr[j]), sr[j], br[j]));
    }
  }
}

// Stage 1: block (kBwdCols, kBwdLanes) owns kBwdCols columns of one chunk of the plan (rows of one
// tenant); writes grad_h there and, for tenant chunks, one partial column sum per output.
template <typename T, typename A, bool NH, bool NS, bool NB>
__global__ void gathered_bwd_kernel(
    const T* __restrict__ g, int64_t g_stride, const T* __restrict__ h, int64_t h_stride,
    const A* __restrict__ scales, int64_t s_ts, const int64_t* __restrict__ order,
    const int64_t* __restrict__ chunk_tenant, const int64_t* __restrict__ chunk_begin,
    const int64_t* __restrict__ chunk_end, int64_t rows_per_unit, T* __restrict__ grad_h,
    A* __restrict__ part_gh, A* __restrict__ part_g, int64_t d) {
  __shared__ A sh_gh[kBwdLanes][kBwdCols + 1];
  __shared__ A sh_g[kBwdLanes][kBwdCols + 1];
  const int64_t c = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kBwdCols + threadIdx.x;
  const int64_t t = chunk_tenant[c];
  if (t < 0 && !NH) return;  // unedited rows only have a grad_h (block-uniform exit)
  A acc_gh = 0;
  A acc_g = 0;
  if (j < d) {
    const A sj = t < 0 ? A(1) : scales[t * s_ts + j];
    for (int64_t p = chunk_begin[c] + threadIdx.y; p < chunk_end[c]; p += kBwdLanes) {
      const int64_t r = gathered_sorted_row(order, p, rows_per_unit);
      const A gv = static_cast<A>(g[r * g_stride + j]);
      if (NH) grad_h[r * d + j] = static_cast<T>(red_edit_grad_h<A>(gv, sj));
      if (NS) acc_gh += red_edit_grad_scale_term<A>(gv, static_cast<A>(h[r * h_stride + j]));
      if (NB) acc_g += gv;
    }
  }
  if (t < 0) return;  // block-uniform: no partial sums for unedited rows
  sh_gh[threadIdx.y][threadIdx.x] = acc_gh;
  sh_g[threadIdx.y][threadIdx.x] = acc_g;
  __syncthreads();
  if (threadIdx.y == 0 && j < d) {
    A t_gh = 0;
    A t_g = 0;
    for (int k = 0; k < kBwdLanes; ++k) {
      t_gh += sh_gh[k][threadIdx.x];
      t_g += sh_g[k][threadIdx.x];
    }
    if (NS) part_gh[c * d + j] = t_gh;
    if (NB) part_g[c * d + j] = t_g;
  }
}

template <typename T, typename A>
void launch_fwd(const T* h, int64_t hs, const int64_t* ids, int64_t rpu, const A* s, int64_t s_ts,
                const A* b, int64_t b_ts, const A* ones, const A* zeros, T* out, int64_t m,
                int64_t d, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>(m, 65535LL * 16);
  gathered_fwd_kernel<T, A><<<static_cast<unsigned>(blocks), kFwdThreads, 0, stream>>>(
      h, hs, ids, rpu, s, s_ts, b, b_ts, ones, zeros, out, m, d);
}

// Device pointers into the plan table (layout in gathered_red_edit.h).
using PlanPtrs = GatheredPlanPtrs<const int64_t*>;

template <typename T, typename A, bool NH, bool NS, bool NB>
void launch_bwd_flags(const T* g, int64_t gs, const T* h, int64_t hs, const A* s, int64_t s_ts,
                      const PlanPtrs& pp, int64_t nchunks, int64_t rpu, T* gh, A* pgh, A* pg,
                      int64_t d, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(nchunks), static_cast<unsigned>(ceil_div(d, kBwdCols)));
  const dim3 block(kBwdCols, kBwdLanes);
  gathered_bwd_kernel<T, A, NH, NS, NB><<<grid, block, 0, stream>>>(
      g, gs, h, hs, s, s_ts, pp.order, pp.tenant, pp.begin, pp.end, rpu, gh, pgh, pg, d);
}

template <typename T, typename A>
void launch_bwd(bool nh, bool ns, bool nb, const T* g, int64_t gs, const T* h, int64_t hs,
                const A* s, int64_t s_ts, const PlanPtrs& pp, int64_t nchunks, int64_t rpu, T* gh,
                A* pgh, A* pg, int64_t d, cudaStream_t st) {
  dispatch_bool(nh, [&](auto NH) {
    dispatch_bool(ns, [&](auto NS) {
      dispatch_bool(nb, [&](auto NB) {
        launch_bwd_flags<T, A, decltype(NH)::value, decltype(NS)::value, decltype(NB)::value>(
            g, gs, h, hs, s, s_ts, pp, nchunks, rpu, gh, pgh, pg, d, st);
      });
    });
  });
}

at::Tensor gathered_red_edit_fwd_cuda(const at::Tensor& h, const c10::optional<at::Tensor>& scales,
                                      const c10::optional<at::Tensor>& biases,
                                      const at::Tensor& tenant_ids) {
  gathered_check(h, scales, biases, tenant_ids);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t K = gathered_num_tenants(scales, biases);
  const at::Tensor ids = tenant_ids.contiguous();
  gathered_check_id_values("gathered_red_edit", ids.to(at::kCPU),
                           K);  // before any kernel reads through the ids
  const int64_t d = h.size(-1);
  at::Tensor out = at::empty(h.sizes(), h.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t T = gathered_rows_per_unit(h, tenant_ids);
  const at::Tensor rows = as_rows(h);
  int64_t s_ts = 0, b_ts = 0;
  const at::Tensor S = gathered_table(scales, d, h, 1.0, &s_ts);
  const at::Tensor B = gathered_table(biases, d, h, 0.0, &b_ts);
  const at::Tensor ones = red_edit_param(c10::nullopt, d, h, 1.0);
  const at::Tensor zeros = red_edit_param(c10::nullopt, d, h, 0.0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "gathered_red_edit_fwd_cuda", [&] {
        using A = acc_t<scalar_t>;
        launch_fwd<scalar_t, A>(
            rows.const_data_ptr<scalar_t>(), rows.stride(0), ids.const_data_ptr<int64_t>(), T,
            S.const_data_ptr<A>(), s_ts, B.const_data_ptr<A>(), b_ts, ones.const_data_ptr<A>(),
            zeros.const_data_ptr<A>(), out.mutable_data_ptr<scalar_t>(), rows.size(0), d, stream);
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gathered_red_edit_bwd_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& h,
    const c10::optional<at::Tensor>& scales, const at::Tensor& tenant_ids, int64_t num_tenants,
    bool need_h, bool need_scales, bool need_biases, at::ScalarType param_dtype) {
  gathered_bwd_check(grad_out, h, scales, tenant_ids, num_tenants, need_scales);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t K = num_tenants;
  const at::Tensor ids_cpu = tenant_ids.to(at::kCPU).contiguous();
  gathered_check_id_values("gathered_red_edit_bwd", ids_cpu, K);
  const int64_t d = grad_out.size(-1);
  const auto acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = grad_out.options();
  GatheredGrads out = gathered_bwd_outputs(grad_out, K, need_h, need_scales, need_biases);
  if (out.empty_work) return out.finish(param_dtype);
  at::Tensor& grad_h = out.grad_h;
  at::Tensor& sum_gh = out.sum_gh;
  at::Tensor& sum_g = out.sum_g;
  const at::Tensor g = as_rows(grad_out);
  const int64_t m = g.size(0);
  const int64_t T = gathered_rows_per_unit(grad_out, tenant_ids);
  const GatheredPlan plan = gathered_plan(ids_cpu, K, T, red_edit_rows_per_block(m, 256, 16));
  const at::Tensor table = plan.table.to(grad_out.device());  // one host -> device copy
  const PlanPtrs pp = plan.ptrs(table.const_data_ptr<int64_t>());
  at::Tensor part_gh = at::empty({need_scales ? plan.tenant_chunks : 0, d}, opts.dtype(acc));
  at::Tensor part_g = at::empty({need_biases ? plan.tenant_chunks : 0, d}, opts.dtype(acc));
  const at::Tensor hr = need_scales ? as_rows(*h) : at::Tensor();
  int64_t s_ts = 0;
  const at::Tensor S = gathered_table(scales, d, grad_out, 1.0, &s_ts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_out.scalar_type(), "gathered_red_edit_bwd_cuda", [&] {
        using A = acc_t<scalar_t>;
        if (plan.nchunks > 0) {
          launch_bwd<scalar_t, A>(
              need_h, need_scales, need_biases, g.const_data_ptr<scalar_t>(), g.stride(0),
              need_scales ? hr.const_data_ptr<scalar_t>() : nullptr, need_scales ? hr.stride(0) : 0,
              S.const_data_ptr<A>(), s_ts, pp, plan.nchunks, T,
              need_h ? grad_h.mutable_data_ptr<scalar_t>() : nullptr,
              need_scales ? part_gh.mutable_data_ptr<A>() : nullptr,
              need_biases ? part_g.mutable_data_ptr<A>() : nullptr, d, stream);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        // Stage 2: tenant t sums its chunks seg[t] .. seg[t + 1] - 1 (absent tenants: zero).
        if (need_scales)
          launch_segmented_column_sum<A>(part_gh.const_data_ptr<A>(), pp.seg,
                                         sum_gh.mutable_data_ptr<A>(), K, d, stream);
        if (need_biases)
          launch_segmented_column_sum<A>(part_g.const_data_ptr<A>(), pp.seg,
                                         sum_g.mutable_data_ptr<A>(), K, d, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out.finish(param_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(red_kernels_C, CUDA, m) {
  m.impl("gathered_red_edit", &gathered_red_edit_fwd_cuda);
  m.impl("gathered_red_edit_bwd", &gathered_red_edit_bwd_cuda);
}

}  // namespace red_kernels
