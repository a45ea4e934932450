// Second stage of the deterministic two-stage column reduction on CPU (the CUDA twin is
// column_sum.cuh): out[s, j] = sum over rows seg[s] .. seg[s + 1] - 1 of part[b, j], added in
// row order whatever the thread count, so the result has the same bits on every run. A plain
// column sum is the one-segment case seg = {0, nblocks}.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace red_kernels {

template <typename A>
void segmented_column_sum_cpu(const A* part, const int64_t* seg, int64_t nseg, int64_t d, A* out) {
  constexpr int64_t kCols = 1024;  // one column tile stays in L1 while the rows stream past
  const int64_t tiles = (d + kCols - 1) / kCols;
  at::parallel_for(0, nseg * tiles, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t s = w / tiles;
      const int64_t c0 = (w % tiles) * kCols;
      const int64_t c1 = std::min(d, c0 + kCols);
      A* o = out + s * d;
      for (int64_t j = c0; j < c1; ++j) o[j] = 0;
      for (int64_t b = seg[s]; b < seg[s + 1]; ++b) {
        const A* p = part + b * d;
        for (int64_t j = c0; j < c1; ++j) o[j] += p[j];
      }
    }
  });
}

}  // namespace red_kernels
