// seq_scale CUDA kernels. The element math, row addressing and the backward work plan are
// seq_scale.h / seq_scale.cpp's (shared with the CPU kernels); this file holds only the launch
// geometry and the two-stage per-sequence reduction of the backward pass.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "seq_scale/seq_scale.h"

namespace red_kernels {
namespace {

constexpr int kFwdThreads = 256;
constexpr int kBwdCols = 32;  // columns per block: one warp reads 32 consecutive elements
constexpr int kBwdLanes = 8;  // row lanes per block, reduced in shared memory
constexpr int kSumThreads = 256;
constexpr int64_t kMaxChunks = 256;  // chunk count target of the plan (about 2 per SM)
constexpr int64_t kMinChunkRows = 16;

// out[r] = src[r] * vec[seq(r)]: one block walks whole rows (grid-stride), threads stride over
// the columns. Forward pass, and grad_x = g * vec when grad_vec is not needed.
template <typename T, typename A>
__global__ void seq_scale_rows_kernel(StridedRows<const T> src,
                                      const int64_t* __restrict__ seq_index,
                                      const A* __restrict__ vec, T* __restrict__ out, int64_t m,
                                      int64_t n) {
  for (int64_t r = blockIdx.x; r < m; r += gridDim.x) {
    const T* srow = src.row(r);
    const A* v = vec + seq_scale_seq_of_row(r, src.t_len, seq_index) * n;
    T* orow = out + r * n;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      orow[j] = static_cast<T>(seq_scale_apply<A>(static_cast<A>(srow[j]), v[j]));
    }
  }
}

// Stage 1: block (kBwdCols, kBwdLanes) owns kBwdCols columns of chunk blockIdx.x = positions
// [begin, end) of sequence b. Writes grad_x (NX) and the chunk's partial sum of g * x per column.
template <typename T, typename A, bool NX>
__global__ void seq_scale_bwd_kernel(StridedRows<const T> g, StridedRows<const T> x,
                                     const int64_t* __restrict__ perm,
                                     const int64_t* __restrict__ chunks, const A* __restrict__ vec,
                                     T* __restrict__ grad_x, A* __restrict__ part, int64_t n) {
  __shared__ A sh[kBwdLanes][kBwdCols + 1];
  const int64_t k = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kBwdCols + threadIdx.x;
  const int64_t b = chunks[3 * k], begin = chunks[3 * k + 1], end = chunks[3 * k + 2];
  A acc = 0;
  if (j < n) {
    const A vj = vec[b * n + j];
    for (int64_t p = begin + threadIdx.y; p < end; p += kBwdLanes) {
      const int64_t r = perm != nullptr ? perm[p] : p;
      const A gv = static_cast<A>(g.row(r)[j]);
      if (NX) grad_x[r * n + j] = static_cast<T>(seq_scale_grad_x<A>(gv, vj));
      acc += seq_scale_grad_vec_term<A>(gv, static_cast<A>(x.row(r)[j]));
    }
  }
  sh[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < n) {
    A total = 0;
    for (int l = 0; l < kBwdLanes; ++l) total += sh[l][threadIdx.x];
    part[k * n + j] = total;
  }
}

// Stage 2: out[b, j] = sum of sequence b's chunk partials in chunk order (deterministic).
template <typename A>
__global__ void segment_sum_kernel(const A* __restrict__ part,
                                   const int64_t* __restrict__ chunk_off, A* __restrict__ out,
                                   int64_t n) {
  const int64_t b = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  A total = 0;
  for (int64_t k = chunk_off[b]; k < chunk_off[b + 1]; ++k) total += part[k * n + j];
  out[b * n + j] = total;
}

template <typename T, typename A>
void launch_rows(StridedRows<const T> src, const int64_t* idx, const A* vec, T* out, int64_t m,
                 int64_t n, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>(m, 65535LL * 16);
  seq_scale_rows_kernel<T, A>
      <<<static_cast<unsigned>(blocks), kFwdThreads, 0, stream>>>(src, idx, vec, out, m, n);
}

template <typename T, typename A>
void launch_bwd(bool need_x, StridedRows<const T> g, StridedRows<const T> x, const int64_t* perm,
                const int64_t* chunks, const A* vec, T* grad_x, A* part, int64_t num_chunks,
                int64_t n, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(num_chunks), static_cast<unsigned>(ceil_div(n, kBwdCols)));
  const dim3 block(kBwdCols, kBwdLanes);
  if (need_x) {
    seq_scale_bwd_kernel<T, A, true>
        <<<grid, block, 0, stream>>>(g, x, perm, chunks, vec, grad_x, part, n);
  } else {
    seq_scale_bwd_kernel<T, A, false>
        <<<grid, block, 0, stream>>>(g, x, perm, chunks, vec, grad_x, part, n);
  }
}

template <typename A>
void launch_segment_sum(const A* part, const int64_t* chunk_off, A* out, int64_t num_seqs,
                        int64_t n, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(num_seqs), static_cast<unsigned>(ceil_div(n, kSumThreads)));
  segment_sum_kernel<A><<<grid, kSumThreads, 0, stream>>>(part, chunk_off, out, n);
}

// out = src * vec[seq] over all rows (forward, and grad_x without grad_vec). seq_index validated.
void scale_all_rows(const at::Tensor& src, const at::Tensor& vec, const at::Tensor* seq_index,
                    at::Tensor& out) {
  const bool packed = seq_index != nullptr;
  const SeqRows rows = seq_scale_rows(src, packed);
  const at::Tensor v = seq_scale_vec_acc(vec, src);
  const at::Tensor idx = packed ? seq_index->contiguous() : at::Tensor();
  const int64_t n = src.size(-1);
  const int64_t m = src.numel() / n;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, src.scalar_type(), "seq_scale_cuda", [&] {
        using A = acc_t<scalar_t>;
        launch_rows<scalar_t, A>(
            strided<scalar_t>(rows), packed ? idx.const_data_ptr<int64_t>() : nullptr,
            v.const_data_ptr<A>(), out.mutable_data_ptr<scalar_t>(), m, n, stream);
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor seq_scale_fwd_cuda(const at::Tensor& x, const at::Tensor& vec,
                              const c10::optional<at::Tensor>& seq_index) {
  seq_scale_check("seq_scale", x, vec, seq_index);
  const c10::cuda::CUDAGuard guard(x.device());
  if (seq_index.has_value())
    seq_index_host("seq_scale", *seq_index, vec.size(0));  // one sync, before any read
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  scale_all_rows(x, vec, seq_index.has_value() ? &*seq_index : nullptr, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> seq_scale_bwd_cuda(const at::Tensor& grad_out,
                                                      const c10::optional<at::Tensor>& x,
                                                      const at::Tensor& vec,
                                                      const c10::optional<at::Tensor>& seq_index,
                                                      bool need_x, bool need_vec) {
  seq_scale_bwd_check(grad_out, x, vec, seq_index, need_vec);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const bool packed = seq_index.has_value();
  const int64_t num_seqs = vec.size(0), n = vec.size(1);
  const int64_t m = seq_scale_num_rows(grad_out, packed);
  const auto opts = grad_out.options();
  const auto acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_x =
      need_x ? at::empty(grad_out.sizes(), opts.memory_format(at::MemoryFormat::Contiguous))
             : at::empty({0}, opts);
  if (!need_vec) {
    if (packed) seq_index_host("seq_scale_bwd", *seq_index, num_seqs);
    if (need_x && grad_x.numel() > 0)
      scale_all_rows(grad_out, vec, packed ? &*seq_index : nullptr, grad_x);
    return {grad_x, at::empty({0}, opts.dtype(vec.scalar_type()))};
  }

  // The plan is built on the host (the index is validated there) and copied to the device.
  const SeqScalePlan plan = seq_scale_plan(seq_index, num_seqs, packed ? 0 : grad_out.size(1), m,
                                           kMaxChunks, kMinChunkRows);
  at::Tensor sum = at::zeros({num_seqs, n}, opts.dtype(acc));
  if (plan.num_chunks == 0 || n == 0) return {grad_x, sum.to(vec.scalar_type())};
  const at::Tensor chunks = plan.chunks.to(grad_out.device());
  const at::Tensor chunk_off = plan.chunk_off.to(grad_out.device());
  const at::Tensor perm = plan.perm.defined() ? plan.perm.to(grad_out.device()) : at::Tensor();
  at::Tensor part = at::empty({plan.num_chunks, n}, opts.dtype(acc));
  const SeqRows g_rows = seq_scale_rows(grad_out, packed);
  const SeqRows x_rows = seq_scale_rows(*x, packed);
  const at::Tensor v = seq_scale_vec_acc(vec, grad_out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_out.scalar_type(), "seq_scale_bwd_cuda", [&] {
        using A = acc_t<scalar_t>;
        launch_bwd<scalar_t, A>(need_x, strided<scalar_t>(g_rows), strided<scalar_t>(x_rows),
                                perm.defined() ? perm.const_data_ptr<int64_t>() : nullptr,
                                chunks.const_data_ptr<int64_t>(), v.const_data_ptr<A>(),
                                need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
                                part.mutable_data_ptr<A>(), plan.num_chunks, n, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launch_segment_sum<A>(part.const_data_ptr<A>(), chunk_off.const_data_ptr<int64_t>(),
                              sum.mutable_data_ptr<A>(), num_seqs, n, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_x, sum.to(vec.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(red_kernels_C, CUDA, m) {
  m.impl("seq_scale", &seq_scale_fwd_cuda);
  m.impl("seq_scale_bwd", &seq_scale_bwd_cuda);
}

}  // namespace red_kernels
