// Second stage of the deterministic two-stage column reduction: out[j] = sum_b part[b, j], summed
// in a fixed order so the result has the same bits on every run. The segmented form sums
// consecutive row ranges of part into one output row each (one per tenant in gathered ops).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace red_kernels {

// Rows [b0, b1) of column j of a [*, d] partial-sum buffer, in row order.
template <typename A>
__device__ __forceinline__ A column_total(const A* __restrict__ part, int64_t b0, int64_t b1,
                                          int64_t d, int64_t j) {
  A total = 0;
  for (int64_t b = b0; b < b1; ++b) total += part[b * d + j];
  return total;
}

template <typename A>
__global__ void column_sum_kernel(const A* __restrict__ part, A* __restrict__ out, int64_t nblocks,
                                  int64_t d) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  out[j] = column_total(part, 0, nblocks, d, j);
}

// out[s, j] = sum of part[seg[s] .. seg[s + 1]) in column j; an empty segment gives 0.
template <typename A>
__global__ void segmented_column_sum_kernel(const A* __restrict__ part,
                                            const int64_t* __restrict__ seg, A* __restrict__ out,
                                            int64_t nseg, int64_t d) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  for (int64_t s = blockIdx.y; s < nseg; s += gridDim.y) {
    out[s * d + j] = column_total(part, seg[s], seg[s + 1], d, j);
  }
}

template <typename A>
void launch_column_sum(const A* part, A* out, int64_t nblocks, int64_t d, cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t blocks = (d + threads - 1) / threads;
  if (blocks == 0) return;
  column_sum_kernel<A>
      <<<static_cast<unsigned>(blocks), threads, 0, stream>>>(part, out, nblocks, d);
}

// seg is a device array of nseg + 1 nondecreasing row offsets into part.
template <typename A>
void launch_segmented_column_sum(const A* part, const int64_t* seg, A* out, int64_t nseg, int64_t d,
                                 cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t blocks = (d + threads - 1) / threads;
  if (blocks == 0 || nseg == 0) return;
  const dim3 grid(static_cast<unsigned>(blocks),
                  static_cast<unsigned>(std::min<int64_t>(nseg, 65535)));
  segmented_column_sum_kernel<A><<<grid, threads, 0, stream>>>(part, seg, out, nseg, d);
}

}  // namespace red_kernels
