// Second stage of the deterministic two-stage column reduction: out[j] = sum_b part[b, j], summed
// in a fixed order so the result has the same bits on every run.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace red_kernels {

template <typename A>
__global__ void column_sum_kernel(const A* __restrict__ part, A* __restrict__ out, int64_t nblocks,
                                  int64_t d) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  A total = 0;
  for (int64_t b = 0; b < nblocks; ++b) total += part[b * d + j];
  out[j] = total;
}

template <typename A>
void launch_column_sum(const A* part, A* out, int64_t nblocks, int64_t d, cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t blocks = (d + threads - 1) / threads;
  if (blocks == 0) return;
  column_sum_kernel<A>
      <<<static_cast<unsigned>(blocks), threads, 0, stream>>>(part, out, nblocks, d);
}

}  // namespace red_kernels
