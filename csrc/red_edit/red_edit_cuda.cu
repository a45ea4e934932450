// red_edit CUDA kernels. The element math is red_edit.h's (shared with the CPU kernels); this file
// holds only the launch geometry and the two-stage column reduction of the backward pass.
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
#include "red_edit/red_edit.h"

namespace red_kernels {
namespace {

constexpr int kFwdThreads = 256;
constexpr int kBwdCols = 32;  // columns per block: one warp reads 32 consecutive elements
constexpr int kBwdLanes = 8;  // row lanes per block, reduced in shared memory

// One block walks whole rows (grid-stride over rows), threads stride over the columns.
template <typename T, typename A>
__global__ void red_edit_fwd_kernel(const T* __restrict__ h, int64_t h_stride,
                                    const A* __restrict__ scale, const A* __restrict__ bias,
                                    T* __restrict__ out, int64_t m, int64_t d) {
  for (int64_t r = blockIdx.x; r < m; r += gridDim.x) {
    const T* hr = h + r * h_stride;
    T* orow = out + r * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      orow[j] = static_cast<T>(red_edit_apply<A>(static_cast<A>(hr[j]), scale[j], bias[j]));
    }
  }
}

// Stage 1: block (kBwdCols, kBwdLanes) owns kBwdCols columns of one block of rows; writes grad_h
// and one partial sum per column for that row block.
template <typename T, typename A, bool NH, bool NS, bool NB>
__global__ void red_edit_bwd_kernel(const T* __restrict__ g, int64_t g_stride,
                                    const T* __restrict__ h, int64_t h_stride,
                                    const A* __restrict__ scale, T* __restrict__ grad_h,
                                    A* __restrict__ part_gh, A* __restrict__ part_g, int64_t m,
                                    int64_t d, int64_t rows_per_block) {
  __shared__ A sh_gh[kBwdLanes][kBwdCols + 1];
  __shared__ A sh_g[kBwdLanes][kBwdCols + 1];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kBwdCols + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < m ? r0 + rows_per_block : m;
  A acc_gh = 0;
  A acc_g = 0;
  if (j < d) {
    const A sj = scale[j];
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kBwdLanes) {
      const A gv = static_cast<A>(g[r * g_stride + j]);
      if (NH) grad_h[r * d + j] = static_cast<T>(red_edit_grad_h<A>(gv, sj));
      if (NS) acc_gh += red_edit_grad_scale_term<A>(gv, static_cast<A>(h[r * h_stride + j]));
      if (NB) acc_g += gv;
    }
  }
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
    if (NS) part_gh[blockIdx.y * d + j] = t_gh;
    if (NB) part_g[blockIdx.y * d + j] = t_g;
  }
}

template <typename T, typename A>
void launch_fwd(const T* h, int64_t h_stride, const A* s, const A* b, T* out, int64_t m, int64_t d,
                cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>(m, 65535LL * 16);
  red_edit_fwd_kernel<T, A>
      <<<static_cast<unsigned>(blocks), kFwdThreads, 0, stream>>>(h, h_stride, s, b, out, m, d);
}

template <typename T, typename A, bool NH, bool NS, bool NB>
void launch_bwd_flags(const T* g, int64_t gs, const T* h, int64_t hs, const A* s, T* gh, A* pgh,
                      A* pg, int64_t m, int64_t d, int64_t rpb, int64_t nblocks,
                      cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(d, kBwdCols)), static_cast<unsigned>(nblocks));
  const dim3 block(kBwdCols, kBwdLanes);
  red_edit_bwd_kernel<T, A, NH, NS, NB>
      <<<grid, block, 0, stream>>>(g, gs, h, hs, s, gh, pgh, pg, m, d, rpb);
}

template <typename T, typename A>
void launch_bwd(bool nh, bool ns, bool nb, const T* g, int64_t gs, const T* h, int64_t hs,
                const A* s, T* gh, A* pgh, A* pg, int64_t m, int64_t d, int64_t rpb,
                int64_t nblocks, cudaStream_t st) {
  dispatch_bool(nh, [&](auto NH) {
    dispatch_bool(ns, [&](auto NS) {
      dispatch_bool(nb, [&](auto NB) {
        launch_bwd_flags<T, A, decltype(NH)::value, decltype(NS)::value, decltype(NB)::value>(
            g, gs, h, hs, s, gh, pgh, pg, m, d, rpb, nblocks, st);
      });
    });
  });
}

at::Tensor red_edit_fwd_cuda(const at::Tensor& h, const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& bias) {
  red_edit_check(h, scale, bias);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t d = h.size(-1);
  at::Tensor out = at::empty(h.sizes(), h.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor rows = as_rows(h);
  const at::Tensor s = red_edit_param(scale, d, h, 1.0);
  const at::Tensor b = red_edit_param(bias, d, h, 0.0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "red_edit_fwd_cuda", [&] {
        using A = acc_t<scalar_t>;
        launch_fwd<scalar_t, A>(rows.const_data_ptr<scalar_t>(), rows.stride(0),
                                s.const_data_ptr<A>(), b.const_data_ptr<A>(),
                                out.mutable_data_ptr<scalar_t>(), rows.size(0), d, stream);
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> red_edit_bwd_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& h,
    const c10::optional<at::Tensor>& scale, bool need_h, bool need_scale, bool need_bias,
    at::ScalarType param_dtype) {
  red_edit_bwd_check("red_edit_bwd", grad_out, h, scale, need_scale);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t d = grad_out.size(-1);
  const auto acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = grad_out.options();
  at::Tensor grad_h =
      need_h ? at::empty(grad_out.sizes(), opts.memory_format(at::MemoryFormat::Contiguous))
             : at::empty({0}, opts);
  const at::Tensor g = as_rows(grad_out);
  const int64_t m = g.size(0);
  const int64_t rpb = red_edit_rows_per_block(m, 256, 16);
  const int64_t nblocks = m == 0 ? 0 : ceil_div(m, rpb);
  at::Tensor part_gh = at::empty({need_scale ? nblocks : 0, d}, opts.dtype(acc));
  at::Tensor part_g = at::empty({need_bias ? nblocks : 0, d}, opts.dtype(acc));
  at::Tensor sum_gh = at::zeros({need_scale ? d : 0}, opts.dtype(acc));
  at::Tensor sum_g = at::zeros({need_bias ? d : 0}, opts.dtype(acc));
  if (m > 0 && d > 0 && (need_h || need_scale || need_bias)) {
    const at::Tensor hr = need_scale ? as_rows(*h) : at::Tensor();
    const at::Tensor s = red_edit_param(scale, d, grad_out, 1.0);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, grad_out.scalar_type(), "red_edit_bwd_cuda", [&] {
          using A = acc_t<scalar_t>;
          launch_bwd<scalar_t, A>(
              need_h, need_scale, need_bias, g.const_data_ptr<scalar_t>(), g.stride(0),
              need_scale ? hr.const_data_ptr<scalar_t>() : nullptr, need_scale ? hr.stride(0) : 0,
              s.const_data_ptr<A>(), need_h ? grad_h.mutable_data_ptr<scalar_t>() : nullptr,
              need_scale ? part_gh.mutable_data_ptr<A>() : nullptr,
              need_bias ? part_g.mutable_data_ptr<A>() : nullptr, m, d, rpb, nblocks, stream);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (need_scale)
            launch_column_sum<A>(part_gh.const_data_ptr<A>(), sum_gh.mutable_data_ptr<A>(), nblocks,
                                 d, stream);
          if (need_bias)
            launch_column_sum<A>(part_g.const_data_ptr<A>(), sum_g.mutable_data_ptr<A>(), nblocks,
                                 d, stream);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return {grad_h, sum_gh.to(param_dtype), sum_g.to(param_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(red_kernels_C, CUDA, m) {
  m.impl("red_edit", &red_edit_fwd_cuda);
  m.impl("red_edit_bwd", &red_edit_bwd_cuda);
}

}  // namespace red_kernels
