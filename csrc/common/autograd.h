// Autograd of the compiled ops, registered in C++ at the Autograd dispatch key (the pattern of
// torchvision's C++ ops). An eager call with autograd recording then costs one dispatcher call
// (~3 us) instead of the ~30 us of a Python custom op with autograd, which is more than the
// kernels themselves at decode sizes. Each op's torch::autograd::Function lives in its <op>.cpp;
// these are the pieces they share.
//
// Double backward (create_graph=True). The _bwd kernels have no autograd of their own: gradients
// they return would be constants of the graph that create_graph builds, so second derivatives
// (gradient penalties, Hessian-vector products) would come out silently zero. Autograd runs a
// backward with grad mode on exactly when create_graph=True, so each backward asks
// create_graph_requested() and then computes the same formulas with differentiable ATen ops
// instead of the kernels (slower, and only then). The ordinary backward pays one thread-local read.
// The Python custom ops do the same (call_backward in red_kernels/ops/_common.py).
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <utility>

namespace red_kernels {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Typed handle of a registered op, e.g. rk_op<decltype(f)>("red_kernels_C::red_edit"); callers
// keep it in a function-local static so the lookup runs once.
template <typename Sig>
c10::TypedOperatorHandle<Sig> rk_op(const char* qualified_name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified_name, "").typed<Sig>();
}

// A gradient to return from backward: moved out when needed, undefined otherwise. Moving matters:
// autograd hands a gradient nobody else references straight to a leaf's .grad; one extra
// reference makes it clone the tensor (for grad_h, a copy the size of the activations).
inline at::Tensor take_grad(bool need, at::Tensor& grad) {
  return need ? std::move(grad) : at::Tensor();
}

// A saved tensor for an optional argument of a backward op: absent when it was not saved.
inline c10::optional<at::Tensor> saved_or_none(const at::Tensor& saved) {
  return saved.defined() ? c10::optional<at::Tensor>(saved) : c10::nullopt;
}

// Whether this backward runs under create_graph=True: its gradients must then be built from
// differentiable ops (see the top of this file).
inline bool create_graph_requested() { return c10::GradMode::is_enabled(); }

// Differentiable per-segment row sums for the create_graph backwards: out[k] = sum of rows[i] over
// the i with index[i] == k, for k < num_segments; rows with index -1 are dropped, NaN and all (a
// one-hot matmul would spread one row's NaN or inf to every segment as 0 * NaN). rows [M, D],
// index [M] int64 in [-1, num_segments). index_add sums in row order on CPU; on CUDA it is
// deterministic under torch.use_deterministic_algorithms.
inline at::Tensor segment_sum(const at::Tensor& rows, const at::Tensor& index,
                              int64_t num_segments) {
  return at::zeros({num_segments + 1, rows.size(1)}, rows.options())
      .index_add(0, index + 1, rows)
      .narrow(0, 1, num_segments);
}

// Sum over all dims but the last: [..., d] -> [d] (well defined for d == 0 and for 1-D t).
inline at::Tensor sum_leading(const at::Tensor& t) {
  int64_t m = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) m *= t.size(i);
  return t.reshape({m, t.size(-1)}).sum(0);
}

// needs_input_grad for the forward argument that is the `position`-th tensor actually passed
// (absent optional tensors have no autograd edge, so later ones shift down); false if absent.
inline bool needs_grad(AutogradContext* ctx, bool present, int64_t position) {
  return present && ctx->needs_input_grad(static_cast<size_t>(position));
}

}  // namespace red_kernels
