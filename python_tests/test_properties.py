"""Property-based tests (hypothesis) of every public op on every kernel backend that runs here, against
an independent fp64 truth: red_edit, seq_scale (dense and packed), gathered_red_edit,
para_vector_gen, gathered_para_vector_gen and last_token_index.

What hand-picked grids miss (DESIGN.md, Tests): random shapes down to d = 1 and empty dims (B, T, N,
K, d = 0), views of every tensor argument -- index tensors and the incoming gradient too --
(transposed, leading dims swapped, sliced with gaps, expanded with stride 0 in the first or the last
dim, storage offset), every activation/parameter dtype mix the API accepts (all 16 pairs of fp32,
fp16, bf16 and fp64 are accepted), NaN and +-inf, every gradient (each input needs one or not, at
random), double backward (which must either be right or raise, never be silently wrong), and that no
input (nor the incoming gradient) is written to.

The memory a view skips (the gaps of a sliced view, the elements before an offset view) holds poison:
NaN in float tensors, the dtype's largest value in index tensors. A kernel that reads outside the view
then gives a wrong value or reads far out of bounds, instead of passing by luck.

How a case runs. Hypothesis draws a *case*: a plain dict (op, backend, shapes, dtypes, layouts, the
index values, a seed for the float values), so a failure prints as a small example that can be rerun
in-process::

    cd python_tests && TRITON_INTERPRET=1 ../.venv/bin/python -c "import test_properties as t; t.run_case({...})"

The case runs in a worker process, never in the pytest process: a kernel that segfaults or hangs on
some view becomes a failing example ("worker killed by SIGSEGV", with the worker's stderr) that
hypothesis shrinks, not a dead test session. Workers are forked from a zygote process that has
imported torch, triton and red_kernels but has run no tensor op (a child forked after OpenMP has
started its threads hangs in its first parallel region), so a crash costs a fork, not a new
interpreter; a worker serves cases until it dies. Three cases in four run single-threaded (OpenMP
barriers cost milliseconds on a loaded machine), one in four on every thread.

Truth and tolerance. Outputs and gradients are computed in fp64 by plain PyTorch formulas written
here (gradients by autograd through them) from the same rounded inputs. :func:`error_bound` allows
``2 * terms * eps`` of the accumulation dtype (fp32, or fp64 where the op computes in fp64), with
``terms`` the number of rounded operations a result goes through (the summed terms of a reduction),
times the magnitude of the computation (the same sums over absolute values), plus one ulp of the
output dtype (a rounding, or the Triton interpreter's truncating bf16 store) and its smallest normal
number. Where the truth is NaN or +-inf the result must be the same non-finite value.

Profiles (conftest.py): "ci" (the default: 200 examples per test, derandomized) and "deep" (2000,
random), chosen with ``RED_KERNELS_HYPOTHESIS_PROFILE=deep``.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.nn.functional as F
from _helpers import cpu_backends
from hypothesis import given
from hypothesis import strategies as st

import red_kernels as rk

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(rk.__file__)))  # the workers import this copy
# The reference is the package's own truth; the kernel backends are what these tests check.
KERNEL_BACKENDS = [b for b in cpu_backends() if b != "reference"]
FLOAT_DTYPES = ["float32", "float16", "bfloat16", "float64"]
ACTIVATIONS = ["gelu", "gelu_tanh", "relu", "silu"]
CASE_TIMEOUT_S = 120.0  # a tiny case takes well under a second; longer than this is a hang


# ================================================================================================
# Worker side: build a case's tensors, run the op, compare with the fp64 truth.
# ================================================================================================


class CaseFailure(AssertionError):
    """A mismatch found by :func:`run_case`; ``kind`` says which check (forward, grad_h, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"[{kind}] {message}")
        self.kind = kind


def _layout(shape: tuple[int, ...], layout: str):
    """(shape of the base allocation, function base -> view with the logical ``shape``)."""
    nd = len(shape)
    if layout == "transposed" and nd >= 2:  # every stride reversed: the last dim is the slowest
        return tuple(reversed(shape)), lambda b: b.permute(*reversed(range(nd)))
    if layout == "transposed":  # 1-D: a column of a row-major [n, 3] matrix (stride 3, offset 1)
        return (shape[0], 3), lambda b: b[:, 1]
    if layout == "swapped":  # leading dims swapped (h.transpose(0, 1)); 2-D: a plain transpose
        return (shape[1], shape[0]) + shape[2:], lambda b: b.transpose(0, 1)
    if layout == "sliced":  # every other element of every dim, from the second: gaps everywhere
        return tuple(2 * s + 1 for s in shape), lambda b: b[tuple(slice(1, None, 2) for _ in shape)]
    if layout == "expanded":  # stride 0 in the first dim
        return (1,) + shape[1:], lambda b: b.expand(shape)
    if layout == "expanded_last":  # stride 0 in the last dim
        return shape[:-1] + (1,), lambda b: b.expand(shape)
    if layout == "offset":  # contiguous, but 3 elements into its storage
        return (math.prod(shape) + 3,), lambda b: b[3:].view(shape)
    assert layout == "contiguous", layout
    return shape, lambda b: b


def _poison(dtype: torch.dtype):
    if dtype.is_floating_point:
        return float("nan")
    if dtype == torch.bool:
        return True
    return torch.iinfo(dtype).max


def build(spec: dict | None, seed: int, requires_grad: bool = False) -> torch.Tensor | None:
    """The tensor a spec describes: logical shape, dtype and values, laid out in memory as
    ``spec["layout"]`` says, with poison in the memory the view skips. Float values are standard
    normal (from ``seed``) rounded to the dtype, with NaN/inf at a few places when ``spec["special"]``
    says so; integer and bool tensors carry their values in ``spec["values"]``."""
    if spec is None:
        return None
    dtype = getattr(torch, spec["dtype"])
    shape = tuple(spec["shape"])
    base_shape, view_of = _layout(shape, spec["layout"])
    base = torch.full(base_shape, _poison(dtype), dtype=dtype)
    view = view_of(base)
    if "values" in spec:
        values = torch.tensor(spec["values"], dtype=dtype).reshape(shape)
    else:
        gen = torch.Generator().manual_seed(seed)
        values = torch.randn(shape, generator=gen, dtype=torch.float64)
        special = spec.get("special")
        if special and values.numel():
            flat = values.view(-1)
            count = int(torch.randint(1, 4, (1,), generator=gen))
            pos = torch.randint(0, flat.numel(), (count,), generator=gen)
            pick = {"nan": [math.nan], "inf": [math.inf], "-inf": [-math.inf]}.get(
                special, [math.nan, math.inf, -math.inf]
            )
            for i, p in enumerate(pos.tolist()):
                flat[p] = pick[i % len(pick)]
        values = values.to(dtype)
    if spec["layout"] == "expanded":
        if shape[0]:
            base.copy_(values[:1])
    elif spec["layout"] == "expanded_last":
        if shape[-1]:
            base.copy_(values[..., :1])
    else:
        view.copy_(values)
    out = view.detach()  # a leaf with the view's strides and storage offset
    return out.requires_grad_() if requires_grad else out


def error_bound(
    out_dtype: torch.dtype, acc_dtype: torch.dtype, terms: int, ref: torch.Tensor, mag: torch.Tensor
) -> torch.Tensor:
    """Largest allowed ``|out - ref|`` per element, for a result accumulated over ``terms`` rounded
    operations in ``acc_dtype`` and stored in ``out_dtype``. ``mag`` is the magnitude of the
    computation: the same formula over absolute values (e.g. ``sum |g| * |h|`` for ``sum g * h``),
    which bounds every partial sum. Terms: ``2 * terms * eps(acc) * mag`` (twice the classical
    ``terms * u`` bound of a recursive sum; u = eps / 2, so this is 4x it), plus one ulp of the
    output (``eps(out) * |ref|``: rounding or truncation to the stored dtype), plus the output's
    smallest normal number (flushed subnormals)."""
    mag = torch.nan_to_num(mag, nan=math.inf)  # 0 * inf in a magnitude: no bound there
    return (
        2 * terms * torch.finfo(acc_dtype).eps * mag
        + torch.finfo(out_dtype).eps * ref.abs()
        + torch.finfo(out_dtype).tiny
    )


def _where(mask: torch.Tensor, limit: int = 4) -> list[tuple[int, ...]]:
    return [tuple(i) for i in mask.nonzero()[:limit].tolist()]


def check_close(kind: str, out, ref, mag, terms: int, acc: torch.dtype, inf_may_be_nan: bool = False) -> None:
    """``out`` (any dtype) vs the fp64 truth ``ref``, within :func:`error_bound`; non-finite truth
    (after rounding to out's dtype, which may overflow) must be matched exactly, except that with
    ``inf_may_be_nan`` a NaN may stand for +-inf: in a chain of products (PARA's act(z) @ w_up, or
    (g @ w_up^T) * act'(z) @ w_down^T) a factor that is tiny in fp64 can underflow to 0 in fp32
    (gelu'(z) for z < -13, or tanh saturating to -1), and 0 * inf is NaN."""
    if tuple(out.shape) != tuple(ref.shape):
        raise CaseFailure(kind, f"shape {list(out.shape)}, expected {list(ref.shape)}")
    if out.numel() == 0:
        return
    out64 = out.detach().to(torch.float64)
    ref = ref.detach()
    expect = ref.to(out.dtype).to(torch.float64)
    nonfinite = ~torch.isfinite(expect)
    same = (out64 == expect) | (out64.isnan() & (expect.isnan() | (inf_may_be_nan & expect.isinf())))
    bound = error_bound(out.dtype, acc, terms, ref, mag.detach())
    ok = torch.where(nonfinite, same, (out64 - ref).abs() <= bound)
    if not bool(ok.all()):
        bad = _where(~ok)
        rows = "; ".join(
            f"at {list(i)}: got {out64[i].item():.9g}, expected {ref[i].item():.9g} "
            + ("(non-finite: must match)" if nonfinite[i] else f"(bound {bound[i].item():.3g})")
            for i in bad
        )
        raise CaseFailure(kind, f"{int((~ok).sum())} of {ok.numel()} elements wrong ({out.dtype}); {rows}")


def _acc(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _act(x: torch.Tensor, name: str) -> torch.Tensor:
    """The activations in fp64, as torch defines them (gelu, gelu_tanh and silu backward multiply
    by act', relu's selects, like the kernels')."""
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        # torch's relu: its backward selects (where(x <= 0, 0, g)), so an inf or NaN gradient is
        # dropped where x <= 0 and passed at NaN x; the kernels and the reference do the same.
        return torch.relu(x)
    return F.silu(x)


def _fp64_leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """An fp64 copy of a float input (a leaf needing a gradient when the input does); index
    tensors as they are."""
    if t is None or not t.is_floating_point():
        return t
    return t.detach().to(torch.float64, copy=True).requires_grad_(t.requires_grad)


def _grads(out, inputs, grad):
    """Gradients of ``out`` w.r.t. the inputs that need one; an unused input's gradient is zeros."""
    want = [t for t in inputs if t is not None and t.requires_grad]
    if not want or not out.requires_grad:
        return [torch.zeros_like(t) for t in want]
    got = torch.autograd.grad(out, want, grad, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, want)]


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """Every byte of ``t``'s storage (the view's elements, its gaps and what lies before it)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).clone()


def _check_op(case, call, names, inputs, truth, magnitudes, acc, out_shape, out_dtype, inf_may_be_nan=False):
    """The shared flow of every op: run, check the output's metadata and values, then each
    gradient (or the second derivatives when ``case["double"]``), then that no input (nor the
    incoming gradient) was written to, gaps of its storage included.

    ``truth(*fp64 inputs)`` is the fp64 formula; ``magnitudes(fp64 inputs (detached), fp64 grad)``
    returns ``{"out": (magnitude, terms), "grad_<name>": (magnitude, terms)}``."""
    grad = build(case["grad"], case["seed"] + 99)
    watched = [(n, t) for n, t in zip((*names, "grad_out"), (*inputs, grad)) if t is not None]
    before = [_storage_bytes(t) for _, t in watched]
    _check_values(case, call, names, inputs, grad, truth, magnitudes, acc, out_shape, out_dtype, inf_may_be_nan)
    for (name, t), old in zip(watched, before):
        if not torch.equal(_storage_bytes(t), old):
            raise CaseFailure("mutated_input", f"the op wrote into the storage of '{name}'")


def _check_values(case, call, names, inputs, grad, truth, magnitudes, acc, out_shape, out_dtype, inf_may_be_nan):
    out = call(*inputs)
    if tuple(out.shape) != tuple(out_shape) or out.dtype != out_dtype or not out.is_contiguous():
        raise CaseFailure(
            "meta",
            f"output shape {list(out.shape)} dtype {out.dtype} contiguous {out.is_contiguous()}; expected "
            f"{list(out_shape)} {out_dtype} contiguous",
        )
    ins64 = [_fp64_leaf(t) for t in inputs]
    ref = truth(*ins64)
    with torch.no_grad():
        plain = [t.detach() if t is not None else None for t in ins64]
        mags = magnitudes(*plain, None)
    check_close("forward", out, ref, mags["out"][0], mags["out"][1], acc, inf_may_be_nan)
    if case.get("double"):
        _check_double_backward(case, out, ref, names, inputs, ins64)
        return
    diff = [(n, t, t64) for n, t, t64 in zip(names, inputs, ins64) if t is not None and t.requires_grad]
    if not diff:
        return
    if not out.requires_grad:
        raise CaseFailure("meta", f"the output does not require grad although {[n for n, _, _ in diff]} do")
    grads = _grads(out, [t for _, t, _ in diff], grad)
    ref_grads = _grads(ref, [t for _, _, t in diff], grad.to(torch.float64))
    with torch.no_grad():
        mags = magnitudes(*plain, grad.to(torch.float64))
    for (name, t, _), g, r in zip(diff, grads, ref_grads):
        kind = f"grad_{name}"
        if g.dtype != t.dtype or tuple(g.shape) != tuple(t.shape):
            raise CaseFailure(kind, f"dtype {g.dtype} shape {list(g.shape)}, expected {t.dtype} {list(t.shape)}")
        mag, terms = mags[kind]
        check_close(kind, g, r, mag, terms, acc, inf_may_be_nan)


def _check_double_backward(case, out, ref, names, inputs, ins64) -> None:
    """Second derivatives (fp64 inputs): d/d(inputs) of sum_i <grad_i, w_i> against autograd through
    the fp64 formula. A backend may refuse (a RuntimeError that says autograd/backward is not
    available for its backward), but must not return wrong numbers."""
    diff = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    if not diff or out.numel() == 0:
        return
    gen = torch.Generator().manual_seed(case["seed"] + 7)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    weights = [torch.randn(inputs[i].shape, generator=gen, dtype=torch.float64) for i in diff]

    def second(o, xs, g):
        firsts = torch.autograd.grad(o, xs, g, create_graph=True, allow_unused=True)
        s = sum((f.to(torch.float64) * w).sum() for f, w in zip(firsts, weights) if f is not None)
        if not isinstance(s, torch.Tensor) or not s.requires_grad:
            return [torch.zeros_like(x) for x in xs]
        got = torch.autograd.grad(s, xs, allow_unused=True)
        return [torch.zeros_like(x) if v is None else v for v, x in zip(got, xs)]

    want = second(ref, [ins64[i] for i in diff], grad.to(torch.float64))
    try:
        got = second(out, [inputs[i] for i in diff], grad)
    except RuntimeError as exc:
        text = str(exc).lower()
        if "autograd" in text or "backward" in text or "differentiable" in text:
            return  # refused: allowed
        raise
    for i, g, w in zip(diff, got, want):
        scale = max(w.abs().max().item() if w.numel() else 0.0, 1.0)
        err = (g.to(torch.float64) - w).abs()
        bad = ~(err <= 1e-9 * scale + 1e-7 * w.abs())
        if bool(bad.any()):
            at = _where(bad, 2)
            raise CaseFailure(
                f"double_backward_{case['op']}_{names[i]}",
                f"second derivative w.r.t. '{names[i]}' wrong at {at}: got "
                f"{[g[j].item() for j in at]}, expected {[w[j].item() for j in at]}",
            )


# --- the ops -------------------------------------------------------------------------------------


def _rg(case, i: int) -> bool:
    return bool(case["rg"][i])


def _run_red_edit(case):
    seed = case["seed"]
    h = build(case["h"], seed, _rg(case, 0))
    scale = build(case["scale"], seed + 1, _rg(case, 1))
    bias = build(case["bias"], seed + 2, _rg(case, 2))
    m, d = math.prod(h.shape[:-1]), h.shape[-1]
    acc = _acc(h.dtype)

    def truth(h, s, b):
        y = h
        if s is not None:
            y = y * s
        if b is not None:
            y = y + b
        return y

    def mags(h, s, b, g):
        out = h.abs() * (s.abs() if s is not None else 1) + (b.abs() if b is not None else 0)
        res = {"out": (out, 3)}
        if g is not None:
            g2 = g.abs().reshape(m, d)
            res["grad_h"] = (g.abs() * (s.abs() if s is not None else 1), 2)
            res["grad_scale"] = ((g2 * h.abs().reshape(m, d)).sum(0), m + 2)
            res["grad_bias"] = (g2.sum(0), m + 1)
        return res

    _check_op(
        case,
        lambda *a: rk.red_edit(*a, backend=case["backend"]),
        ("h", "scale", "bias"),
        (h, scale, bias),
        truth,
        mags,
        acc,
        h.shape,
        h.dtype,
    )


def _run_seq_scale(case):
    seed = case["seed"]
    x = build(case["x"], seed, _rg(case, 0))
    vec = build(case["vec"], seed + 1, _rg(case, 1))
    seq_index = build(case["seq_index"], seed + 2)
    acc = _acc(x.dtype)
    rows = x.shape[1] if seq_index is None else x.shape[0]

    def gather(v):
        return v[:, None, :] if seq_index is None else v[seq_index]

    def truth(x, v, _):
        return x * gather(v)

    def mags(x, v, _, g):
        res = {"out": ((x * gather(v)).abs(), 2)}
        if g is not None:
            res["grad_x"] = ((g * gather(v)).abs(), 2)
            if seq_index is None:
                gv = (g.abs() * x.abs()).sum(1)
            else:
                gv = torch.zeros(v.shape, dtype=torch.float64).index_add_(0, seq_index, g.abs() * x.abs())
            res["grad_vec"] = (gv, rows + 2)
        return res

    _check_op(
        case,
        lambda *a: rk.seq_scale(*a, backend=case["backend"]),
        ("x", "vec", "seq_index"),
        (x, vec, seq_index),
        truth,
        mags,
        acc,
        x.shape,
        x.dtype,
    )


def _row_tenants(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    per_id = math.prod(h.shape[ids.dim() : -1])
    return ids.reshape(-1, 1).expand(-1, per_id).reshape(-1)


def _run_gathered_red_edit(case):
    seed = case["seed"]
    h = build(case["h"], seed, _rg(case, 0))
    scales = build(case["scales"], seed + 1, _rg(case, 1))
    biases = build(case["biases"], seed + 2, _rg(case, 2))
    ids = build(case["tenant_ids"], seed + 3)
    d = h.shape[-1]
    m = math.prod(h.shape[:-1])
    k = (scales if scales is not None else biases).shape[0]
    tenant = _row_tenants(h, ids)
    slot = tenant + 1  # row 0 of the extended tables is the unedited row
    acc = _acc(h.dtype)

    def ext(table, fill):
        return torch.cat([torch.full((1, d), fill, dtype=table.dtype), table])

    def truth(h, s, b, _):
        y = h.reshape(m, d)
        if s is not None:
            y = y * ext(s, 1.0)[slot]
        if b is not None:
            y = y + ext(b, 0.0)[slot]
        return y.reshape(h.shape)

    def per_tenant(rows):  # [m, d] -> [K, d] sums over each tenant's rows
        edited = tenant >= 0
        return torch.zeros(k, d, dtype=torch.float64).index_add_(0, tenant[edited], rows[edited])

    def mags(h, s, b, _, g):
        hr = h.reshape(m, d).abs()
        out = hr * (ext(s.abs(), 1.0)[slot] if s is not None else 1) + (ext(b.abs(), 0.0)[slot] if b is not None else 0)
        res = {"out": (out.reshape(h.shape), 3)}
        if g is not None:
            gr = g.reshape(m, d).abs()
            gh = gr * (ext(s.abs(), 1.0)[slot] if s is not None else 1)
            res["grad_h"] = (gh.reshape(h.shape), 2)
            res["grad_scales"] = (per_tenant(gr * hr), m + 2)
            res["grad_biases"] = (per_tenant(gr), m + 1)
        return res

    def call(h_, s_, b_, i_):
        out = rk.gathered_red_edit(h_, s_, b_, i_, backend=case["backend"])
        # Unedited rows (id -1) are the base model: h itself, bit for bit.
        keep = (tenant < 0).nonzero().squeeze(1)
        got, want = out.detach().reshape(m, d)[keep], h_.detach().reshape(m, d)[keep]
        same = (got == want) | (got.isnan() & want.isnan())
        if not bool(same.all()):
            raise CaseFailure("unedited_rows", f"rows with tenant id -1 differ from h at {_where(~same)}")
        return out

    _check_op(
        case,
        call,
        ("h", "scales", "biases", "tenant_ids"),
        (h, scales, biases, ids),
        truth,
        mags,
        acc,
        h.shape,
        h.dtype,
    )


def _run_para(case):
    seed = case["seed"]
    gathered = case["op"] == "gathered_para_vector_gen"
    h = build(case["h"], seed, _rg(case, 0))
    pool_index = build(case["pool_index"], seed + 1)
    w_down = build(case["w_down"], seed + 2, _rg(case, 1))
    w_up = build(case["w_up"], seed + 3, _rg(case, 2))
    b_up = build(case["b_up"], seed + 4, _rg(case, 3))
    ids = build(case["tenant_ids"], seed + 5) if gathered else None
    act = case["activation"]
    batch, _, d = h.shape
    r, n = w_down.shape[-1], w_up.shape[-1]
    k = w_down.shape[0] if gathered else 1
    tid = ids if gathered else torch.zeros(batch, dtype=torch.int64)
    rows = (tid >= 0).nonzero().squeeze(1)  # rows with a generator; the others get ones
    kk = tid[rows]
    acc = _acc(h.dtype, w_down.dtype)

    def tables(wd, wu, bu):
        if not gathered:
            wd, wu, bu = wd[None], wu[None], bu[None]
        return wd[kk], wu[kk], bu[kk]

    def truth(h, _, wd, wu, bu, __=None):
        wd_, wu_, bu_ = tables(wd, wu, bu)
        pooled = h[rows, pool_index[rows]]
        a = _act(torch.einsum("bd,bdr->br", pooled, wd_), act)
        vec = torch.einsum("br,brn->bn", a, wu_) + bu_
        return torch.ones(batch, n, dtype=torch.float64).index_put((rows,), vec)

    def mags(h, _, wd, wu, bu, __=None, g=None):
        wd_, wu_, bu_ = tables(wd, wu, bu)
        pooled = h[rows, pool_index[rows]]
        z = torch.einsum("bd,bdr->br", pooled, wd_)
        mz = torch.einsum("bd,bdr->br", pooled.abs(), wd_.abs())
        # |a| plus how far an error in z moves it (|act'| <= 1.13 for all four activations)
        ma = _act(z, act).abs() + 1.2 * mz
        out = torch.zeros(batch, n, dtype=torch.float64)
        out[rows] = torch.einsum("br,brn->bn", ma, wu_.abs()) + bu_.abs()
        res = {"out": (out, d + r + 8)}
        if g is None:
            return res
        terms = d + r + n + batch + 8
        gr = g[rows].abs()
        zz = z.clone().requires_grad_()
        with torch.enable_grad():
            dact = torch.autograd.grad(_act(zz, act).sum(), zz)[0] if zz.numel() else torch.zeros_like(z)
        # gz = (g @ w_up^T) * act'(z); |act''| <= 0.8, so an error in z moves act' by at most that much
        mgz = torch.einsum("bn,brn->br", gr, wu_.abs()) * (dact.abs() + mz)
        gh = torch.zeros(h.shape, dtype=torch.float64)
        gh[rows, pool_index[rows]] = torch.einsum("br,bdr->bd", mgz, wd_.abs())
        gwd = torch.zeros(k, d, r, dtype=torch.float64).index_add_(0, kk, pooled.abs()[:, :, None] * mgz[:, None, :])
        gwu = torch.zeros(k, r, n, dtype=torch.float64).index_add_(0, kk, ma[:, :, None] * gr[:, None, :])
        gbu = torch.zeros(k, n, dtype=torch.float64).index_add_(0, kk, gr)
        if not gathered:
            gwd, gwu, gbu = gwd[0], gwu[0], gbu[0]
        res.update(grad_h=(gh, terms), grad_w_down=(gwd, terms), grad_w_up=(gwu, terms), grad_b_up=(gbu, terms))
        return res

    if gathered:

        def call(h_, p_, wd_, wu_, bu_, i_):
            out = rk.gathered_para_vector_gen(h_, p_, wd_, wu_, bu_, i_, act, backend=case["backend"])
            ones = out.detach()[tid < 0]
            if not bool((ones == 1).all()):
                raise CaseFailure("unedited_rows", f"rows with tenant id -1 are not all ones: {ones.tolist()}")
            return out

        names = ("h", "pool_index", "w_down", "w_up", "b_up", "tenant_ids")
        inputs = (h, pool_index, w_down, w_up, b_up, ids)
    else:

        def call(h_, p_, wd_, wu_, bu_):
            return rk.para_vector_gen(h_, p_, wd_, wu_, bu_, act, backend=case["backend"])

        names = ("h", "pool_index", "w_down", "w_up", "b_up")
        inputs = (h, pool_index, w_down, w_up, b_up)

    def mags_any(*args):
        *tensors, g = args
        return mags(*tensors, g=g)

    _check_op(case, call, names, inputs, truth, mags_any, acc, (batch, n), w_down.dtype, inf_may_be_nan=True)


def _run_last_token_index(case):
    mask = build(case["mask"], case["seed"])
    pl_spec = case["prompt_lengths"]
    if pl_spec is None:
        lengths = None
    elif isinstance(pl_spec, list):  # a Python sequence
        lengths = pl_spec
    else:
        lengths = build(pl_spec, case["seed"] + 1)
    # The rule, row by row (module docstring of red_kernels.ops.pooling). Each invalid argument is
    # an acceptable one to name when several are invalid.
    values = mask.to(torch.int64).tolist()
    wanted = None if lengths is None else (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)
    errors, want = set(), []
    if any(v not in (0, 1) for row in values for v in row) or any(not any(row) for row in values):
        errors.add("attention_mask")
    if wanted is not None and any(not isinstance(v, int) for v in wanted):
        errors.add("prompt_lengths")
    if not errors:
        for b, row in enumerate(values):
            tokens = [i for i, v in enumerate(row) if v]
            count = len(tokens) if wanted is None else wanted[b]
            if not 1 <= count <= len(tokens):
                errors.add("prompt_lengths")
                break
            want.append(tokens[count - 1])
    try:
        got = rk.last_token_index(mask, lengths)
    except ValueError as exc:
        if not errors:
            raise
        text = str(exc)
        if "red_kernels.last_token_index" not in text or not any(f"'{e}'" in text for e in errors):
            raise CaseFailure(
                "message", f"expected a message naming red_kernels.last_token_index and {errors}: {text}"
            ) from exc
        return
    if errors:
        raise CaseFailure("no_error", f"returned {got.tolist()} but {sorted(errors)} invalid")
    if got.dtype != torch.int64 or got.tolist() != want:
        raise CaseFailure("forward", f"got {got.tolist()} ({got.dtype}), expected {want} (int64)")


def _run_selftest(case):
    """Exercises the harness itself: a worker that segfaults or hangs must become a failing case."""
    if case["action"] == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif case["action"] == "hang":
        time.sleep(3600)


_RUNNERS = {
    "_selftest": _run_selftest,
    "red_edit": _run_red_edit,
    "seq_scale": _run_seq_scale,
    "gathered_red_edit": _run_gathered_red_edit,
    "para_vector_gen": _run_para,
    "gathered_para_vector_gen": _run_para,
    "last_token_index": _run_last_token_index,
}


_ALL_THREADS: list[int] = []


def run_case(case: dict) -> None:
    """Run one case in this process; raises :class:`CaseFailure` (or the op's exception).

    ``case["threads"]`` is 1 or "all" (torch's default): most cases run single-threaded, because on
    a loaded 2-core machine every OpenMP region of the C++ kernels then costs milliseconds of
    barrier wait; a quarter use every thread, so the per-thread blocks of the reductions are split
    across threads as in production."""
    if not _ALL_THREADS:
        _ALL_THREADS.append(torch.get_num_threads())
    torch.set_num_threads(1 if case.get("threads") == 1 else _ALL_THREADS[0])
    _RUNNERS[case["op"]](case)


# ================================================================================================
# The worker processes.
# ================================================================================================

_BOOT = """
import os, sys
sys.path[:0] = [{package_root!r}, {tests_dir!r}]
import torch
import torch._dynamo  # the first custom-op call imports it (2 s): pay that once, in the zygote
import red_kernels as rk
rk.backends()  # loads the compiled extension and triton: imports only, no tensor op runs here
for mod in ("red_edit", "seq_scale", "gathered_red_edit", "para_vector_gen"):
    try:
        __import__("red_kernels.triton." + mod)
    except ImportError:
        pass
import test_properties
test_properties._zygote()
"""


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by {signal.Signals(sig).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _zygote() -> None:
    """Fork a worker, wait for it, report its death and fork the next, until a worker ends
    normally (the parent closed stdin). Protocol lines on the original stdout (JSON): ``{"worker":
    pid}`` when a worker starts, ``{"died": text}`` when one dies; the worker writes one result line
    per case line it reads from stdin."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr
    while True:
        pid = os.fork()
        if pid == 0:
            _worker(proto)
        proto.write(json.dumps({"worker": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return
        proto.write(json.dumps({"died": _status_text(status)}) + "\n")


def _worker(proto) -> None:
    import faulthandler

    faulthandler.enable()  # a segfault prints the Python stack to stderr
    try:
        while True:
            line = sys.stdin.buffer.readline()
            if not line:
                break
            case = json.loads(line)
            print(f"--- case {line.decode().strip()}", file=sys.stderr, flush=True)
            try:
                run_case(case)
                result = {"ok": True}
            except CaseFailure as exc:
                result = {"ok": False, "kind": exc.kind, "message": str(exc)}
            except Exception as exc:  # the op raised
                tb = "".join(traceback.format_exception(exc)[-6:])
                result = {"ok": False, "kind": f"raised {type(exc).__name__}", "message": f"{exc}\n{tb}"}
            proto.write(json.dumps(result) + "\n")
    except BaseException:
        traceback.print_exc()
        os._exit(3)
    os._exit(0)


class WorkerPool:
    """The pytest side: a zygote process and its current worker. :meth:`run` sends one case and
    returns None (passed) or (kind, message); a worker that dies or hangs is reported as a failure
    of the case it was running and replaced."""

    def __init__(self) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix="red_kernels_properties_", suffix=".log")
        os.close(fd)
        log = open(self.log_path, "ab")  # O_APPEND: every process appends, whatever we read
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT.format(tests_dir=TESTS_DIR, package_root=PACKAGE_ROOT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=TESTS_DIR,
        )
        log.close()
        self.buf = b""
        self.worker = self._expect("worker", 300)

    def _line(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise RuntimeError(f"the property-test zygote exited:\n{self._log_tail(0)}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _expect(self, key: str, timeout: float):
        msg = self._line(timeout)
        if msg is None or key not in msg:
            raise RuntimeError(f"property-test zygote: expected {key!r}, got {msg}:\n{self._log_tail(0)}")
        return msg[key]

    def _log_tail(self, start: int, limit: int = 4000) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        return text[-limit:]

    def run(self, case: dict, timeout: float = CASE_TIMEOUT_S) -> tuple[str, str] | None:
        start = os.path.getsize(self.log_path)
        self.proc.stdin.write((json.dumps(case) + "\n").encode())
        self.proc.stdin.flush()
        msg = self._line(timeout)
        how = None
        if msg is None:  # hung: kill our worker (the zygote then reports its death)
            os.kill(self.worker, signal.SIGKILL)
            how = f"hung for more than {timeout:.0f} s (killed)"
            msg = self._line(60)
        if msg is not None and "died" in msg:
            how = how or msg["died"]
            self.worker = self._expect("worker", 60)
            return "crash", f"worker {how} running this case; its stderr:\n{self._log_tail(start)}"
        if msg is None:
            raise RuntimeError("property-test worker neither answered nor died")
        if msg["ok"]:
            return None
        return msg["kind"], msg["message"]

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        os.unlink(self.log_path)


@pytest.fixture(scope="module")
def pool():
    p = WorkerPool()
    yield p
    p.close()


_FAILURE_TYPES: dict[str, type] = {}


def check(pool: WorkerPool, case: dict) -> None:
    """Run ``case`` in a worker; a failure raises an AssertionError subclass named after its kind,
    so hypothesis reports a wrong forward, each wrong gradient and a crash as separate bugs, each
    with its own minimal example."""
    failure = pool.run(case)
    if failure is None:
        return
    kind, message = failure
    name = "".join(c if c.isalnum() else "_" for c in kind)
    cls = _FAILURE_TYPES.setdefault(kind, type(f"Failed_{name}", (AssertionError,), {}))
    raise cls(f"{case['op']} on backend {case['backend']!r}: {message}")


# ================================================================================================
# Strategies: the cases.
# ================================================================================================

# Per backend: the Triton interpreter pays ~5 ms per program, so its shapes stay tiny, now and then
# past its 64-row blocks (its column blocks cover up to 4096 columns); the C++ kernels get larger
# ones too, now and then past their block sizes (rows per task 32768 / d, column tiles of 1024, PARA
# blocks of 512 columns and 256 rows of w_down).
SIZES = {
    "cpu": dict(lead=6, d=40, big_d=1100, big_rows=700, batch=6, t=5, r=20, n=24, big_n=600, k=4),
    "triton": dict(lead=3, d=9, big_d=9, big_rows=70, batch=3, t=3, r=4, n=6, big_n=6, k=3),
}


def _layouts(ndim: int) -> list[str]:
    base = ["contiguous", "transposed", "sliced", "expanded", "offset"]
    return base + (["swapped", "expanded_last"] if ndim >= 2 else [])


@st.composite
def float_spec(draw, shape, dtype, special=True):
    layout = draw(st.sampled_from(_layouts(len(shape))), label="layout")
    kind = None
    if special and draw(st.integers(0, 3), label="special?") == 3:  # one tensor in four carries NaN/inf
        kind = draw(st.sampled_from(["nan", "inf", "-inf", "mixed"]))
    return {"shape": list(shape), "dtype": dtype, "layout": layout, "special": kind}


def _nest(flat: list, shape: tuple[int, ...]):
    if len(shape) <= 1:
        return list(flat)
    step = math.prod(shape[1:])
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


@st.composite
def index_spec(draw, shape, values, dtype="int64"):
    """An integer/bool tensor of ``shape`` with entries drawn from ``values``, in a random layout;
    an expanded layout repeats the values along its stride-0 dim (that is what it can hold)."""
    layout = draw(st.sampled_from(_layouts(len(shape))), label="layout")
    shape = tuple(shape)
    n = math.prod(shape)
    flat = draw(st.lists(values, min_size=n, max_size=n))
    if layout == "expanded" and n:
        row = math.prod(shape[1:])
        flat = flat[:row] * shape[0]
    elif layout == "expanded_last" and n:
        flat = [flat[i - i % shape[-1]] for i in range(n)]
    return {"shape": list(shape), "dtype": dtype, "layout": layout, "values": _nest(flat, shape)}


def _dtypes(draw, double: bool) -> tuple[str, str]:
    """(activation dtype, parameter dtype): every pair the API accepts; fp64 only for double backward."""
    if double:
        return "float64", "float64"
    h = draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    p = draw(st.sampled_from(["same"] + FLOAT_DTYPES), label="param_dtype")
    return h, (h if p == "same" else p)


def _size(draw, lo: int, hi: int, label: str) -> int:
    """An integer in [lo, hi]; 0 (an empty dim) in one draw of eight when lo is 0 (hypothesis
    would otherwise pick 0 so often that most cases of a many-dim op would be empty)."""
    if lo == 0 and draw(st.integers(0, 7), label=f"{label} == 0?") == 7:
        return 0
    return draw(st.integers(max(lo, 1), max(hi, 1)), label=label)


def _dim(draw, backend: str, key: str, lo: int = 0, label: str | None = None) -> int:
    size = SIZES[backend]
    value = _size(draw, lo, size[key], label)
    big = {"d": "big_d", "lead": "big_rows", "n": "big_n"}.get(key)
    if big and size[big] > size[key] and draw(st.integers(0, 15), label=f"{label}_big?") == 15:
        value = draw(st.integers(size[key], size[big]), label=label)
    return value


def _cap_rows(lead: list[int], backend: str) -> list[int]:
    """At most ``big_rows`` rows: past that, every leading dim but the largest becomes 1."""
    if math.prod(lead) <= SIZES[backend]["big_rows"]:
        return lead
    top = lead.index(max(lead))
    return [s if i == top else min(s, 1) for i, s in enumerate(lead)]


def _common(draw, op, backend, double, n_grads):
    return {
        "op": op,
        "backend": backend,
        "seed": draw(st.integers(0, 2**20), label="seed"),
        "threads": 1 if draw(st.integers(0, 3), label="threads") < 3 else "all",
        "double": double,
        # Double backward: every input needs a gradient (the second derivatives are cross terms).
        "rg": [True] * n_grads
        if double
        else draw(st.lists(st.booleans(), min_size=n_grads, max_size=n_grads), label="requires_grad"),
    }


@st.composite
def red_edit_cases(draw, backend, double=False):
    case = _common(draw, "red_edit", backend, double, 3)
    hd, pd = _dtypes(draw, double)
    ndim = draw(st.integers(1, 4), label="ndim")
    lead = [_dim(draw, backend, "lead", label=f"dim{i}") for i in range(ndim - 1)]
    lead = _cap_rows(lead, backend)
    d = _dim(draw, backend, "d", label="d")
    shape = (*lead, d)
    case["h"] = draw(float_spec(shape, hd, not double))
    case["scale"] = draw(st.none() | float_spec((d,), pd, not double), label="scale")
    case["bias"] = draw(st.none() | float_spec((d,), pd, not double), label="bias")
    case["grad"] = draw(float_spec(shape, hd, not double), label="grad")
    return case


@st.composite
def seq_scale_cases(draw, backend, packed, double=False):
    case = _common(draw, "seq_scale", backend, double, 2)
    xd, vd = _dtypes(draw, double)
    n = _dim(draw, backend, "n", label="n")
    if packed:
        rows = _dim(draw, backend, "lead", label="N")
        b = _size(draw, 1 if rows else 0, SIZES[backend]["batch"], "B")
        shape = (rows, n)
        case["seq_index"] = draw(index_spec((rows,), st.integers(0, max(b - 1, 0))), label="seq_index")
    else:
        b = _size(draw, 0, SIZES[backend]["batch"], "B")
        t = _dim(draw, backend, "lead", label="T")
        if b * t > SIZES[backend]["big_rows"]:
            b = min(b, 2)
        shape = (b, t, n)
        case["seq_index"] = None
    case["x"] = draw(float_spec(shape, xd, not double), label="x")
    case["vec"] = draw(float_spec((b, n), vd, not double), label="vec")
    case["grad"] = draw(float_spec(shape, xd, not double), label="grad")
    return case


@st.composite
def gathered_red_edit_cases(draw, backend, double=False):
    case = _common(draw, "gathered_red_edit", backend, double, 3)
    hd, pd = _dtypes(draw, double)
    ndim = draw(st.integers(2, 4), label="ndim")
    lead = [_dim(draw, backend, "lead", label=f"dim{i}") for i in range(ndim - 1)]
    lead = _cap_rows(lead, backend)
    d = _dim(draw, backend, "d", label="d")
    shape = (*lead, d)
    k = _size(draw, 0, SIZES[backend]["k"], "K")
    id_dims = draw(st.integers(1, ndim - 1), label="id_dims")
    case["tenant_ids"] = draw(index_spec(shape[:id_dims], st.integers(-1, k - 1)), label="tenant_ids")
    which = draw(st.sampled_from(["both", "scales", "biases"]), label="tables")
    case["h"] = draw(float_spec(shape, hd, not double), label="h")
    case["scales"] = draw(float_spec((k, d), pd, not double), label="scales") if which != "biases" else None
    case["biases"] = draw(float_spec((k, d), pd, not double), label="biases") if which != "scales" else None
    case["grad"] = draw(float_spec(shape, hd, not double), label="grad")
    return case


@st.composite
def para_cases(draw, backend, gathered, double=False):
    op = "gathered_para_vector_gen" if gathered else "para_vector_gen"
    case = _common(draw, op, backend, double, 4)
    hd, wd = _dtypes(draw, double)
    size = SIZES[backend]
    b = _size(draw, 0, size["batch"], "B")
    t = _size(draw, 1 if b else 0, size["t"], "T")
    d = _dim(draw, backend, "d", label="d")
    if d > 64 and b * t > 8:  # keep the fp64 truth and the h allocation small
        t = 1
    r = draw(st.integers(1, size["r"]) | st.sampled_from([1, 64]), label="r")
    n = _dim(draw, backend, "n", label="n_out")
    lead = ()
    if gathered:
        k = _size(draw, 0, size["k"], "K")
        lead = (k,)
        case["tenant_ids"] = draw(index_spec((b,), st.integers(-1, k - 1)), label="tenant_ids")
    case["activation"] = draw(st.sampled_from(ACTIVATIONS), label="activation")
    case["h"] = draw(float_spec((b, t, d), hd, not double), label="h")
    case["pool_index"] = draw(index_spec((b,), st.integers(0, max(t - 1, 0))), label="pool_index")
    case["w_down"] = draw(float_spec((*lead, d, r), wd, not double), label="w_down")
    case["w_up"] = draw(float_spec((*lead, r, n), wd, not double), label="w_up")
    case["b_up"] = draw(float_spec((*lead, n), wd, not double), label="b_up")
    case["grad"] = draw(float_spec((b, n), wd, not double), label="grad")
    return case


@st.composite
def last_token_index_cases(draw):
    b = draw(st.integers(0, 5), label="B")
    length = draw(st.integers(0, 7), label="L")
    mask_dtype = draw(st.sampled_from(["bool", "int64", "int32", "uint8", "int8", "int16"]), label="mask_dtype")
    # Mostly valid rows (at least one token); sometimes an empty row or (integer masks) a value
    # other than 0/1, which must raise.
    bad = [2] if mask_dtype == "uint8" else [2, -1]
    bits = st.integers(0, 1) if mask_dtype == "bool" else st.integers(0, 1) | st.sampled_from(bad)
    mask = draw(index_spec((b, length), bits, mask_dtype), label="mask")
    if mask_dtype == "bool":
        mask["values"] = [[bool(v) for v in row] for row in mask["values"]]
    counts = [sum(1 for v in row if v) for row in mask["values"]]
    how = draw(st.sampled_from(["none", "tensor", "list"]), label="prompt_lengths")
    lengths = None
    if how != "none":
        top = max(counts, default=0)
        values = st.integers(1, max(top, 1)) | st.integers(-2, top + 2)
        if how == "list":
            lengths = draw(st.lists(values | st.sampled_from([1.5]), min_size=b, max_size=b), label="lengths")
        else:
            pl_dtype = draw(st.sampled_from(["int64", "int32", "int16", "uint8"]), label="lengths_dtype")
            if pl_dtype == "uint8":
                values = values.filter(lambda v: v >= 0)
            lengths = draw(index_spec((b,), values, pl_dtype), label="lengths")
    return {
        "op": "last_token_index",
        "backend": "reference",
        "seed": 0,
        "mask": mask,
        "prompt_lengths": lengths,
    }


# ================================================================================================
# The tests.
# ================================================================================================


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@given(data=st.data())
def test_red_edit(pool, backend, data):
    check(pool, data.draw(red_edit_cases(backend), label="case"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@given(data=st.data())
def test_seq_scale_dense(pool, backend, data):
    check(pool, data.draw(seq_scale_cases(backend, packed=False), label="case"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@given(data=st.data())
def test_seq_scale_packed(pool, backend, data):
    check(pool, data.draw(seq_scale_cases(backend, packed=True), label="case"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@given(data=st.data())
def test_gathered_red_edit(pool, backend, data):
    check(pool, data.draw(gathered_red_edit_cases(backend), label="case"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@given(data=st.data())
def test_para_vector_gen(pool, backend, data):
    check(pool, data.draw(para_cases(backend, gathered=False), label="case"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@given(data=st.data())
def test_gathered_para_vector_gen(pool, backend, data):
    check(pool, data.draw(para_cases(backend, gathered=True), label="case"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@given(data=st.data())
def test_double_backward(pool, backend, data):
    """Every differentiable op in fp64: second derivatives right, or a clean refusal."""
    which = data.draw(st.sampled_from(["red", "dense", "packed", "gathered_red", "para", "gathered_para"]), label="op")
    strategy = {
        "red": red_edit_cases(backend, double=True),
        "dense": seq_scale_cases(backend, packed=False, double=True),
        "packed": seq_scale_cases(backend, packed=True, double=True),
        "gathered_red": gathered_red_edit_cases(backend, double=True),
        "para": para_cases(backend, gathered=False, double=True),
        "gathered_para": para_cases(backend, gathered=True, double=True),
    }[which]
    check(pool, data.draw(strategy, label="case"))


@given(case=last_token_index_cases())
def test_last_token_index(pool, case):
    check(pool, case)


def test_harness_reports_crashes_and_hangs(pool):
    """A segfault and a hang in a worker fail their own case (naming the signal, with the worker's
    stderr), and the next case runs in a fresh worker."""
    ok = {"op": "_selftest", "backend": "-", "action": "ok"}
    assert pool.run(ok) is None
    kind, message = pool.run({**ok, "action": "segfault"})
    assert kind == "crash" and "SIGSEGV" in message and "Fatal Python error" in message, message
    assert pool.run(ok) is None
    kind, message = pool.run({**ok, "action": "hang"}, timeout=2)
    assert kind == "crash" and "hung" in message, message
    assert pool.run(ok) is None
