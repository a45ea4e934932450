// Host-side argument checks shared by the CPU and CUDA entry points. Every message names the
// argument, so a C++ caller that skips the Python layer still gets a clear error, never a bad read.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#define RK_CHECK_ARG(cond, name, ...) \
  TORCH_CHECK_VALUE(cond, "red_kernels: argument '", name, "': ", __VA_ARGS__)

namespace red_kernels {

inline void check_floating(const at::Tensor& t, const char* name) {
  RK_CHECK_ARG(at::isFloatingType(t.scalar_type()), name, "expected a floating-point tensor, got ",
               t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  RK_CHECK_ARG(a.device() == b.device(), b_name, "is on ", b.device(), " but '", a_name, "' is on ",
               a.device());
}

// A [d] parameter vector of an op whose activations have last dim d.
inline void check_vector(const c10::optional<at::Tensor>& v, const char* name, int64_t d,
                         const at::Tensor& h) {
  if (!v.has_value()) return;
  RK_CHECK_ARG(v->dim() == 1, name, "expected a 1-D tensor of size ", d, ", got shape ",
               v->sizes());
  RK_CHECK_ARG(v->size(0) == d, name, "has size ", v->size(0), " but the last dim of 'h' is ", d);
  check_floating(*v, name);
  check_same_device(h, "h", *v, name);
}

// View x as [rows, x.size(-1)] with a unit stride in the last dim (copies only when it must).
inline at::Tensor as_rows(const at::Tensor& x) {
  const int64_t d = x.dim() == 0 ? 1 : x.size(-1);
  int64_t m = 1;  // product of the leading dims; reshape({-1, 0}) would be ambiguous
  for (int64_t i = 0; i + 1 < x.dim(); ++i) m *= x.size(i);
  at::Tensor rows = x.reshape({m, d});
  if (rows.size(1) > 1 && rows.stride(1) != 1) rows = rows.contiguous();
  return rows;
}

}  // namespace red_kernels
