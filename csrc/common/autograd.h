// Autograd of the compiled ops, registered in C++ at the Autograd dispatch key (the pattern of
// torchvision's C++ ops). An eager call with autograd recording then costs one dispatcher call
// (~3 us) instead of the ~30 us of a Python custom op with autograd, which is more than the
// kernels themselves at decode sizes. Each op's torch::autograd::Function lives in its <op>.cpp;
// these are the pieces they share.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
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

// needs_input_grad for the forward argument that is the `position`-th tensor actually passed
// (absent optional tensors have no autograd edge, so later ones shift down); false if absent.
inline bool needs_grad(AutogradContext* ctx, bool present, int64_t position) {
  return present && ctx->needs_input_grad(static_cast<size_t>(position));
}

}  // namespace red_kernels
