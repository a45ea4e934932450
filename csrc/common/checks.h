// Host-side argument checks shared by the CPU and CUDA entry points. Every message reads
// "red_kernels.<op>: argument '<name>' ...", as the Python checks do, so a C++ caller that skips
// the Python layer still gets a clear error naming the op and the argument, never a bad read. `op`
// is the name of the op whose argument is checked: the public op for a forward ("red_edit",
// "gathered_para_vector_gen"), "<op>_bwd" for its backward op.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#define RK_CHECK_ARG(cond, op, name, ...) \
  TORCH_CHECK_VALUE(cond, "red_kernels.", op, ": argument '", name, "' ", __VA_ARGS__)

namespace red_kernels {

inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  RK_CHECK_ARG(at::isFloatingType(t.scalar_type()), op, name, "must be floating point, got ",
               t.scalar_type());
}

// A tensor the kernels read in its own dtype: one of the four they are built for. Another floating
// type (float8) would otherwise fail inside the dtype dispatch, with a message naming no argument.
inline void check_kernel_dtype(const char* op, const at::Tensor& t, const char* name) {
  const at::ScalarType s = t.scalar_type();
  RK_CHECK_ARG(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op,
               name, "must be float32, float64, float16 or bfloat16, got ", s);
}

inline void check_same_device(const char* op, const at::Tensor& a, const char* a_name,
                              const at::Tensor& b, const char* b_name) {
  RK_CHECK_ARG(a.device() == b.device(), op, b_name, "is on ", b.device(), " but '", a_name,
               "' is on ", a.device());
}

// A [d] parameter vector of an op whose activations have last dim d.
inline void check_vector(const char* op, const c10::optional<at::Tensor>& v, const char* name,
                         int64_t d, const at::Tensor& h) {
  if (!v.has_value()) return;
  RK_CHECK_ARG(v->dim() == 1, op, name, "must be a 1-D tensor of size ", d, ", got shape ",
               v->sizes());
  RK_CHECK_ARG(v->size(0) == d, op, name, "has size ", v->size(0), " but the last dim of 'h' is ",
               d);
  check_floating(op, *v, name);
  check_same_device(op, h, "h", *v, name);
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
