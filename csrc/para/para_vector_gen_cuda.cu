// para_vector_gen CUDA kernels (plain and multi-tenant). The math is para_vector_gen.h's (shared
// with the CPU kernels); this file holds the launch geometry and the block reductions.
//
// Forward: one kernel. Block (tile, b) reduces row b's bottleneck z = x @ w_down[k] over d
// (strided per thread, then a fixed-order warp/shared-memory tree), applies the activation, and
// writes its tile of columns b_up[k] + a @ w_up[k]. Each column tile recomputes the bottleneck
// (d * r multiply-adds, w_down read from L2): cheaper than a second launch at r <= 64.
// Backward: a row kernel (z, a, gz and grad_h's pooled row, into a zeroed grad_h), then two
// tenant kernels for the weight gradients, one thread per output column summing its tenant's rows
// in batch order. Every reduction has a fixed order: the results are deterministic.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "para/para_vector_gen.h"

namespace red_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kColsPerBlock =
    1024;  // forward tile: bottleneck recomputed once per 1024 columns

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum each of the first r entries of every thread's v[] over the block into out[] (shared),
// in a fixed order. Ends with __syncthreads(), so out[] is visible to all threads.
template <typename A>
__device__ void block_sum_r(const A* v, int r, A (*part)[kParaMaxRank], A* out) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int c = 0; c < r; ++c) {
    const A s = warp_sum(v[c]);
    if (lane == 0) part[warp][c] = s;
  }
  __syncthreads();
  if (threadIdx.x < r) {
    A s = 0;
    for (int w = 0; w < kWarps; ++w) s += part[w][threadIdx.x];
    out[threadIdx.x] = s;
  }
  __syncthreads();
}

// z (and a = act(z)) of row b with generator k, into shared z_out / a_out.
template <typename T, typename W, typename A>
__device__ void block_bottleneck(const ParaArgs<T, W>& p, int64_t b, int64_t k,
                                 A (*part)[kParaMaxRank], A* z_out, A* a_out) {
  A z[kParaMaxRank];
  for (int c = 0; c < p.r; ++c) z[c] = 0;
  para_down_partial<T, W, A>(p.pooled_row(b), p.sd, p.wd + k * p.d * p.r, p.r, threadIdx.x, p.d,
                             kThreads, z);
  block_sum_r<A>(z, p.r, part, z_out);
  if (threadIdx.x == 0) para_activate<A>(p.act, p.r, z_out, a_out);
  __syncthreads();
}

template <typename T, typename W, typename A>
__global__ void __launch_bounds__(kThreads)
    para_fwd_kernel(const ParaArgs<T, W> p, W* __restrict__ out) {
  __shared__ A part[kWarps][kParaMaxRank];
  __shared__ A z[kParaMaxRank];
  __shared__ A a[kParaMaxRank];
  const int64_t b = blockIdx.y;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kColsPerBlock;
  const int64_t j1 = j0 + kColsPerBlock < p.n ? j0 + kColsPerBlock : p.n;
  W* orow = out + b * p.n;
  const int64_t k = para_tenant(p.tenant_ids, b);
  if (k < 0) {  // uniform over the block: no generator, all-ones vector
    for (int64_t j = j0 + threadIdx.x; j < j1; j += kThreads) orow[j] = static_cast<W>(1);
    return;
  }
  block_bottleneck<T, W, A>(p, b, k, part, z, a);
  const W* wu = p.wu + k * p.r * p.n;
  const W* bu = p.bu + k * p.n;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += kThreads) {
    A v;
    para_up_block<W, A>(a, wu, bu, p.r, p.n, j, j + 1, &v);
    orow[j] = static_cast<W>(v);
  }
}

template <typename T, typename W, typename A>
__global__ void __launch_bounds__(kThreads)
    para_bwd_rows_kernel(const ParaArgs<T, W> p, const W* __restrict__ g, A* __restrict__ a_buf,
                         A* __restrict__ gz_buf, T* __restrict__ grad_h) {
  __shared__ A part[kWarps][kParaMaxRank];
  __shared__ A z[kParaMaxRank];
  __shared__ A a[kParaMaxRank];
  __shared__ A ga[kParaMaxRank];
  __shared__ A gz[kParaMaxRank];
  const int64_t b = blockIdx.x;
  const int64_t k = para_tenant(p.tenant_ids, b);
  if (k < 0) {  // no generator: zero contributions; grad_h's rows stay zero
    if (threadIdx.x < p.r) a_buf[b * p.r + threadIdx.x] = gz_buf[b * p.r + threadIdx.x] = 0;
    return;
  }
  block_bottleneck<T, W, A>(p, b, k, part, z, a);
  const W* wu = p.wu + k * p.r * p.n;
  A ga_part[kParaMaxRank];
  for (int c = 0; c < p.r; ++c)
    ga_part[c] = para_dot_strided<W, W, A>(g + b * p.n, wu + c * p.n, threadIdx.x, p.n, kThreads);
  block_sum_r<A>(ga_part, p.r, part, ga);
  if (threadIdx.x == 0) para_grad_z<A>(p.act, p.r, z, ga, gz);
  __syncthreads();
  if (threadIdx.x < p.r) {
    a_buf[b * p.r + threadIdx.x] = a[threadIdx.x];
    gz_buf[b * p.r + threadIdx.x] = gz[threadIdx.x];
  }
  if (grad_h != nullptr) {
    T* dst = grad_h + (b * p.t + p.pool_index[b]) * p.d;
    const W* wd = p.wd + k * p.d * p.r;
    for (int64_t i = threadIdx.x; i < p.d; i += kThreads)
      dst[i] = static_cast<T>(para_grad_pooled<W, A>(wd, p.r, i, gz));
  }
}

// grad_w_up[k, :, j], grad_b_up[k, j]: thread j sums tenant k = blockIdx.y's rows in batch order.
template <typename W, typename A>
__global__ void __launch_bounds__(kThreads)
    para_bwd_w_up_kernel(const W* __restrict__ g, const A* __restrict__ a_buf,
                         const int64_t* __restrict__ rows, const int64_t* __restrict__ offsets,
                         W* __restrict__ gwu, W* __restrict__ gbu, int r, int64_t n) {
  const int64_t k = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= n) return;
  A acc[kParaMaxRank];
  for (int c = 0; c < r; ++c) acc[c] = 0;
  A accb = 0;
  for (int64_t s = offsets[k]; s < offsets[k + 1]; ++s) {
    const int64_t b = rows[s];
    para_outer_accumulate<W, A>(a_buf + b * r, r, g + b * n, j, j + 1, acc, 1);
    accb += static_cast<A>(g[b * n + j]);
  }
  for (int c = 0; c < r; ++c) gwu[(k * r + c) * n + j] = static_cast<W>(acc[c]);
  gbu[k * n + j] = static_cast<W>(accb);
}

// grad_w_down[k, i, :]: thread i sums tenant k = blockIdx.y's rows in batch order.
template <typename T, typename W, typename A>
__global__ void __launch_bounds__(kThreads)
    para_bwd_w_down_kernel(const ParaArgs<T, W> p, const A* __restrict__ gz_buf,
                           const int64_t* __restrict__ rows, const int64_t* __restrict__ offsets,
                           W* __restrict__ gwd) {
  const int64_t k = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.d) return;
  A acc[kParaMaxRank];
  for (int c = 0; c < p.r; ++c) acc[c] = 0;
  for (int64_t s = offsets[k]; s < offsets[k + 1]; ++s) {
    const int64_t b = rows[s];
    para_grad_w_down_row<A>(static_cast<A>(p.pooled_row(b)[i * p.sd]), gz_buf + b * p.r, p.r, acc);
  }
  for (int c = 0; c < p.r; ++c) gwd[(k * p.d + i) * p.r + c] = static_cast<W>(acc[c]);
}

// Launchers: kernel launches stay outside the AT_DISPATCH lambdas (nvcc cannot compile them there).
template <typename T, typename W>
void launch_fwd(const ParaArgs<T, W>& p, W* out, cudaStream_t stream) {
  using A = para_acc_t<T, W>;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n, kColsPerBlock)),
                  static_cast<unsigned>(p.batch));
  para_fwd_kernel<T, W, A><<<grid, kThreads, 0, stream>>>(p, out);
}

template <typename T, typename W>
void launch_bwd(const ParaArgs<T, W>& p, const W* g, void* a_buf, void* gz_buf, T* grad_h,
                const int64_t* rows, const int64_t* offsets, W* gwd, W* gwu, W* gbu,
                int64_t k_count, bool need_w, cudaStream_t stream) {
  using A = para_acc_t<T, W>;
  A* a = static_cast<A*>(a_buf);
  A* gz = static_cast<A*>(gz_buf);
  para_bwd_rows_kernel<T, W, A>
      <<<static_cast<unsigned>(p.batch), kThreads, 0, stream>>>(p, g, a, gz, grad_h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!need_w) return;
  const dim3 grid_up(static_cast<unsigned>(ceil_div(p.n, kThreads)),
                     static_cast<unsigned>(k_count));
  if (p.n > 0)
    para_bwd_w_up_kernel<W, A>
        <<<grid_up, kThreads, 0, stream>>>(g, a, rows, offsets, gwu, gbu, p.r, p.n);
  const dim3 grid_down(static_cast<unsigned>(ceil_div(p.d, kThreads)),
                       static_cast<unsigned>(k_count));
  if (p.d > 0)
    para_bwd_w_down_kernel<T, W, A><<<grid_down, kThreads, 0, stream>>>(p, gz, rows, offsets, gwd);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor para_fwd_cuda(const at::Tensor& h, const at::Tensor& pool_index,
                         const at::Tensor& w_down, const at::Tensor& w_up, const at::Tensor& b_up,
                         const c10::optional<at::Tensor>& tenant_ids, int64_t activation) {
  const ParaInputs in = para_prepare(para_op_name(tenant_ids.has_value(), false), h, pool_index,
                                     w_down, w_up, b_up, tenant_ids, activation);
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor out = at::empty({h.size(0), in.w_up.size(2)},
                             w_up.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  para_dispatch(h.scalar_type(), w_up.scalar_type(), [&](auto* tp, auto* wp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using W = std::remove_pointer_t<decltype(wp)>;
    launch_fwd<T, W>(para_args<T, W>(h, in, activation), out.mutable_data_ptr<W>(), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> para_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& pool_index,
    const at::Tensor& w_down, const at::Tensor& w_up, const at::Tensor& b_up,
    const c10::optional<at::Tensor>& tenant_ids, int64_t activation, bool need_h, bool need_w) {
  const char* op = para_op_name(tenant_ids.has_value(), true);
  const ParaInputs in = para_prepare(op, h, pool_index, w_down, w_up, b_up, tenant_ids, activation);
  const int64_t batch = h.size(0), n = in.w_up.size(2), r = in.w_down.size(2);
  const int64_t k_count = in.w_down.size(0);
  para_check_grad_out(op, grad_out, h, w_up, batch, n);
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor g = grad_out.contiguous();
  const auto wopts = w_up.options().memory_format(at::MemoryFormat::Contiguous);
  // grad_h: a memset runs at full bandwidth on the GPU; the row kernel then writes B rows.
  at::Tensor grad_h =
      need_h ? at::zeros(h.sizes(), h.options().memory_format(at::MemoryFormat::Contiguous))
             : at::empty({0}, h.options());
  // Weight gradients (the caller's shapes): zeros where the batch is empty; otherwise every
  // element is written.
  at::Tensor gwd = need_w ? at::zeros(w_down.sizes(), wopts) : at::empty({0}, wopts);
  at::Tensor gwu = need_w ? at::zeros(w_up.sizes(), wopts) : at::empty({0}, wopts);
  at::Tensor gbu = need_w ? at::zeros(b_up.sizes(), wopts) : at::empty({0}, wopts);
  if (batch == 0 || !(need_h || need_w)) return {grad_h, gwd, gwu, gbu};
  const bool fp64 = h.scalar_type() == at::kDouble || w_up.scalar_type() == at::kDouble;
  at::Tensor a_buf = at::empty({batch, r}, h.options().dtype(fp64 ? at::kDouble : at::kFloat));
  at::Tensor gz_buf = at::empty({batch, r}, a_buf.options());
  const auto [rows, offsets] = para_segments(in.tenant_ids, batch, k_count, h);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  para_dispatch(h.scalar_type(), w_up.scalar_type(), [&](auto* tp, auto* wp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using W = std::remove_pointer_t<decltype(wp)>;
    launch_bwd<T, W>(para_args<T, W>(h, in, activation), g.const_data_ptr<W>(), a_buf.data_ptr(),
                     gz_buf.data_ptr(), need_h ? grad_h.mutable_data_ptr<T>() : nullptr,
                     rows.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
                     need_w ? gwd.mutable_data_ptr<W>() : nullptr,
                     need_w ? gwu.mutable_data_ptr<W>() : nullptr,
                     need_w ? gbu.mutable_data_ptr<W>() : nullptr, k_count, need_w, stream);
  });
  return {grad_h, gwd, gwu, gbu};
}

}  // namespace

TORCH_LIBRARY_IMPL(red_kernels_C, CUDA, m) {
  m.impl("para_vector_gen", &para_fwd_cuda);
  m.impl("para_vector_gen_bwd", &para_bwd_cuda);
}

}  // namespace red_kernels
