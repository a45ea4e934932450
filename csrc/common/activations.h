// Activations of the PARA bottleneck and their derivatives, as host/device inline functions so the
// CPU and CUDA kernels share them. Codes match red_kernels/ops/_activations.py.
#pragma once

#include <cmath>

#include "common/common.h"

namespace red_kernels {

enum ActivationCode : int { kGelu = 0, kGeluTanh = 1, kRelu = 2, kSilu = 3 };

template <typename A>
RK_HD A act_forward(int code, A x) {
  constexpr A kInvSqrt2 = A(0.70710678118654752440);
  constexpr A kSqrt2OverPi = A(0.79788456080286535588);
  constexpr A kCoef = A(0.044715);
  switch (code) {
    case kGelu:
      return A(0.5) * x * (A(1) + erf(x * kInvSqrt2));
    case kGeluTanh:
      return A(0.5) * x * (A(1) + tanh(kSqrt2OverPi * (x + kCoef * x * x * x)));
    case kRelu:
      // Not `x > 0 ? x : 0`, which turns NaN into 0: torch.relu(NaN) is NaN.
      return x <= A(0) ? A(0) : x;
    default:  // kSilu
      return x / (A(1) + exp(-x));
  }
}

// d act(x) / dx.
template <typename A>
RK_HD A act_derivative(int code, A x) {
  constexpr A kInvSqrt2 = A(0.70710678118654752440);
  constexpr A kInvSqrt2Pi = A(0.39894228040143267794);
  constexpr A kSqrt2OverPi = A(0.79788456080286535588);
  constexpr A kCoef = A(0.044715);
  switch (code) {
    case kGelu:
      return A(0.5) * (A(1) + erf(x * kInvSqrt2)) + x * kInvSqrt2Pi * exp(A(-0.5) * x * x);
    case kGeluTanh: {
      const A t = tanh(kSqrt2OverPi * (x + kCoef * x * x * x));
      return A(0.5) * (A(1) + t) +
             A(0.5) * x * (A(1) - t * t) * kSqrt2OverPi * (A(1) + A(3) * kCoef * x * x);
    }
    case kRelu:
      return x <= A(0) ? A(0) : A(1);  // 1 at NaN, where act_backward passes g
    default: {                         // kSilu
      const A s = A(1) / (A(1) + exp(-x));
      return s * (A(1) + x * (A(1) - s));
    }
  }
}

// g * act'(x): the gradient through the activation, with NaN and inf where torch's autograd puts
// them. torch's relu backward selects (threshold_backward: 0 where x <= 0, g elsewhere, at NaN
// too) instead of multiplying by a 0/1 derivative, so a NaN or inf g is dropped where x <= 0;
// the other activations multiply g by the derivative, as torch does.
template <typename A>
RK_HD A act_backward(int code, A x, A g) {
  if (code == kRelu) return x <= A(0) ? A(0) : g;
  return g * act_derivative(code, x);
}

}  // namespace red_kernels
