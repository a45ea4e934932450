// RED edit, y = h * scale + bias over the last dim. The per-element math lives here as
// host/device inline functions so the CPU kernels (tested here) and the CUDA kernels (compiled
// here, run on a GPU) execute the same arithmetic.
#pragma once

#include "common/common.h"

namespace red_kernels {

// Forward element: computed in the accumulation type A, stored by the caller in h's dtype.
template <typename A>
RK_HD A red_edit_apply(A h, A scale, A bias) {
  return h * scale + bias;
}

// Backward element: grad_h = g * scale; the column sums add g * h (grad_scale) and g (grad_bias).
template <typename A>
RK_HD A red_edit_grad_h(A g, A scale) {
  return g * scale;
}
template <typename A>
RK_HD A red_edit_grad_scale_term(A g, A h) {
  return g * h;
}

// Row blocking of the deterministic column reduction: a function of the row count only, so the
// partial sums (and the bits of the result) do not depend on the thread or SM count.
RK_HD int64_t red_edit_rows_per_block(int64_t rows, int64_t max_blocks, int64_t min_rows) {
  const int64_t by_count = ceil_div(rows, max_blocks);
  return by_count > min_rows ? by_count : min_rows;
}

}  // namespace red_kernels

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace red_kernels {
// Host helpers shared by the CPU and CUDA entry points (defined in red_edit.cpp).
void red_edit_check(const at::Tensor& h, const c10::optional<at::Tensor>& scale,
                    const c10::optional<at::Tensor>& bias);
// `op` names the calling backward op in error messages (gathered_red_edit_bwd shares this check).
void red_edit_bwd_check(const char* op, const at::Tensor& grad_out,
                        const c10::optional<at::Tensor>& h, const c10::optional<at::Tensor>& scale,
                        bool need_scale);
at::Tensor red_edit_param(const c10::optional<at::Tensor>& p, int64_t d, const at::Tensor& like,
                          double fill);
}  // namespace red_kernels
