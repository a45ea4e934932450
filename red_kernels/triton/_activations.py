"""Triton activations of the PARA bottleneck and their derivatives (codes: ops/_activations.py).

tanh is written with sigmoid so the same code runs under the interpreter and on GPUs.
"""

import triton
import triton.language as tl

# constexpr: compiled Triton refuses plain module globals inside @jit code (the interpreter does not).
# Each one multiplies a tensor on its left: under the interpreter, constexpr * tensor stays a
# constexpr wrapping the tensor and breaks the next operation.
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_COEF = tl.constexpr(0.044715)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def act_forward(x, ACT: tl.constexpr):
    if ACT == 0:
        y = 0.5 * x * (1.0 + tl.math.erf(x * _INV_SQRT2))
    elif ACT == 1:
        y = 0.5 * x * (1.0 + _tanh((x + x * x * x * _COEF) * _SQRT_2_OVER_PI))
    elif ACT == 2:
        y = tl.where(x <= 0.0, 0.0, x)  # NaN stays NaN (tl.maximum may return 0 for it on GPUs)
    else:
        y = x * tl.sigmoid(x)
    return y


@triton.jit
def act_backward(x, ACT: tl.constexpr):
    """d act(x) / dx."""
    if ACT == 0:
        dy = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT2)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    elif ACT == 1:
        t = _tanh((x + x * x * x * _COEF) * _SQRT_2_OVER_PI)
        dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + x * x * (3.0 * _COEF))
    elif ACT == 2:
        dy = tl.where(x > 0.0, 1.0, 0.0)
    else:
        s = tl.sigmoid(x)
        dy = s * (1.0 + x * (1.0 - s))
    return dy


@triton.jit
def act_grad(g, x, ACT: tl.constexpr):
    """``g * d act(x) / dx`` with torch's NaN/inf behaviour: relu's backward selects (0 where
    x <= 0, else g, also at NaN x), so an inf or NaN g is dropped where x <= 0; the others multiply."""
    if ACT == 2:
        gx = tl.where(x <= 0.0, 0.0, g)
    else:
        gx = g * act_backward(x, ACT)
    return gx
