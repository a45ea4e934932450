"""red_edit on every backend that runs here against the eager reference: forward and all three
gradients, dtypes, awkward shapes, strides, empty inputs, ablations, gradcheck, opcheck, compile and
bad input."""

from __future__ import annotations

import pytest
import torch
from _helpers import ISA_ENVS, assert_close, assert_sum_close, cpu_backends, gpu_backends, run_cpu_probe

import red_kernels as rk
from red_kernels.ops.red_edit import _red_edit_backward_op, _red_edit_op

BACKENDS = cpu_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DIMS = [1, 7, 64, 1023, 4097]
LEADING = [1, 3, 257]


def _inputs(shape, dtype, param_dtype=None, with_scale=True, with_bias=True, device="cpu"):
    d = shape[-1]
    param_dtype = param_dtype or (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    h = torch.randn(shape, device=device).to(dtype).requires_grad_()
    scale = (1 + 0.5 * torch.randn(d, device=device)).to(param_dtype).requires_grad_() if with_scale else None
    bias = (0.5 * torch.randn(d, device=device)).to(param_dtype).requires_grad_() if with_bias else None
    return h, scale, bias


def _check_against_reference(backend, h, scale, bias):
    """Forward and every gradient of red_edit(backend) vs the fp32/fp64 reference."""
    grad = torch.randn(h.shape, dtype=torch.float32, device=h.device).to(h.dtype)
    out = rk.red_edit(h, scale, bias, backend=backend)
    assert out.dtype == h.dtype and out.shape == h.shape and out.is_contiguous()
    params = [t for t in (h, scale, bias) if t is not None]
    grads = torch.autograd.grad(out, params, grad) if out.numel() else [torch.zeros_like(p) for p in params]

    # Ground truth from upcast copies of the same (rounded) inputs.
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    ups = [t.detach().to(acc).requires_grad_() for t in params]
    it = iter(ups)
    h_up = next(it)
    s_up = next(it) if scale is not None else None
    b_up = next(it) if bias is not None else None
    ref = rk.red_edit_reference(h_up, s_up, b_up)
    ref_grads = torch.autograd.grad(ref, ups, grad.to(acc)) if ref.numel() else [torch.zeros_like(u) for u in ups]

    # What eager PyTorch gets in h's dtype (sets the low-precision error bound).
    eager_out = eager_gh = None
    if h.dtype in (torch.float16, torch.bfloat16):
        hc = h.detach()
        sc = scale.detach().to(h.dtype) if scale is not None else None
        bc = bias.detach().to(h.dtype) if bias is not None else None
        eager_out = (hc * sc if sc is not None else hc) + (bc if bc is not None else 0)
        eager_gh = grad * sc if sc is not None else grad
    assert_close(out, ref, eager_out, f"{backend} forward")

    gi = iter(zip(grads, ref_grads))
    g_h, r_h = next(gi)
    assert_close(g_h, r_h, eager_gh, f"{backend} grad_h")
    g2 = grad.to(acc).reshape(-1, h.shape[-1]).abs()
    if scale is not None:
        g_s, r_s = next(gi)
        assert g_s.dtype == scale.dtype
        assert_sum_close(
            g_s, r_s, (g2 * h.detach().to(acc).reshape(-1, h.shape[-1]).abs()).sum(0), f"{backend} grad_scale"
        )
    if bias is not None:
        g_b, r_b = next(gi)
        assert g_b.dtype == bias.dtype
        assert_sum_close(g_b, r_b, g2.sum(0), f"{backend} grad_bias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("lead", LEADING)
@pytest.mark.parametrize("ndim", [2, 3])
def test_matches_reference(backend, dtype, d, lead, ndim):
    shape = (lead, d) if ndim == 2 else (2, lead, d)
    _check_against_reference(backend, *_inputs(shape, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_scale,with_bias", [(True, False), (False, True), (False, False)])
def test_ablations(backend, dtype, with_scale, with_bias):
    _check_against_reference(backend, *_inputs((3, 5, 33), dtype, with_scale=with_scale, with_bias=with_bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_same_dtype_vectors(backend, dtype):
    """Vectors in the activations' dtype (a model cast wholesale to bf16)."""
    _check_against_reference(backend, *_inputs((4, 65), dtype, param_dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "row_slice", "expanded"])
def test_non_contiguous(backend, layout):
    d = 37
    if layout == "transposed":  # last-dim stride != 1
        base = torch.randn(d, 6, 5).permute(2, 1, 0)
    elif layout == "row_slice":  # rows with a gap between them
        base = torch.randn(5, 6, d + 11)[..., :d]
    else:  # zero-stride leading dim
        base = torch.randn(1, 6, d).expand(5, 6, d)
    assert not base.is_contiguous()
    h = base.requires_grad_() if base.is_leaf else base.detach().requires_grad_()
    _, scale, bias = _inputs((1, d), torch.float32)
    _check_against_reference(backend, h, scale, bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 8), (3, 0, 8), (4, 0)])
def test_empty(backend, shape):
    h, scale, bias = _inputs(shape, torch.float32)
    out = rk.red_edit(h, scale, bias, backend=backend)
    assert out.shape == h.shape
    out.sum().backward()
    assert torch.equal(scale.grad, torch.zeros_like(scale))
    assert torch.equal(bias.grad, torch.zeros_like(bias))
    assert h.grad.shape == h.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_requires_grad(backend):
    """Only the vectors train (the frozen-model case): no grad_h is computed or returned."""
    h, scale, bias = _inputs((6, 40), torch.float32)
    h = h.detach()
    out = rk.red_edit(h, scale, bias, backend=backend)
    out.square().sum().backward()
    ref_s = (2 * out.detach() * h).sum(0)
    torch.testing.assert_close(scale.grad, ref_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, (2 * out.detach()).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_deterministic(backend):
    h, scale, bias = _inputs((1031, 300), torch.float32)
    g = torch.randn(h.shape)
    first = torch.autograd.grad(rk.red_edit(h, scale, bias, backend=backend), (h, scale, bias), g)
    for _ in range(2):
        again = torch.autograd.grad(rk.red_edit(h, scale, bias, backend=backend), (h, scale, bias), g)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_h(backend):
    """Autograd keeps h (and the [d] vectors) alive, nothing of the output's size beyond that, and
    not h either when scale needs no gradient (the cpu backend's autograd is C++'s)."""
    h, scale, bias = _inputs((64, 128), torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rk.red_edit(h, scale, bias, backend=backend)
    big = [t for t in saved if t.numel() > scale.numel()]
    assert len(big) == 1 and big[0].data_ptr() == h.data_ptr()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rk.red_edit(h, scale.detach(), bias, backend=backend)
    assert all(t.data_ptr() != h.data_ptr() for t in saved), "h saved although scale needs no gradient"


@pytest.mark.parametrize(
    "backend", [b for b in BACKENDS if b != "triton"] + (["triton"] if "triton" in BACKENDS else [])
)
def test_gradcheck(backend):
    h, scale, bias = _inputs((3, 4, 5), torch.float64)
    assert torch.autograd.gradcheck(lambda *a: rk.red_edit(*a, backend=backend), (h, scale, bias))
    assert torch.autograd.gradcheck(lambda a, b: rk.red_edit(a, b, None, backend=backend), (h, scale))
    assert torch.autograd.gradcheck(lambda a, c: rk.red_edit(a, None, c, backend=backend), (h, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck(backend):
    """Double backward (create_graph=True: gradient penalties, Hessian-vector products) is correct on
    every backend: the backward then computes differentiable formulas instead of calling the
    kernels, whose results autograd cannot see through (cpu returned zero second derivatives with a
    warning, the Python backends raised)."""
    h, scale, bias = _inputs((3, 4, 5), torch.float64)
    assert torch.autograd.gradgradcheck(lambda *a: rk.red_edit(*a, backend=backend), (h, scale, bias))
    assert torch.autograd.gradgradcheck(lambda a, b: rk.red_edit(a, b, None, backend=backend), (h, scale))
    assert torch.autograd.gradgradcheck(lambda a, c: rk.red_edit(a, None, c, backend=backend), (h, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    h, scale, bias = _inputs((3, 4, 16), torch.float32)
    torch.library.opcheck(_red_edit_op, (h, scale, bias, backend))
    torch.library.opcheck(_red_edit_op, (h.detach(), None, bias.detach(), backend))
    hb, sb, bb = _inputs((5, 16), torch.bfloat16)
    torch.library.opcheck(_red_edit_op, (hb, sb, bb, backend))
    g = torch.randn(3, 4, 16)
    torch.library.opcheck(
        _red_edit_backward_op, (g, h.detach(), scale.detach(), True, True, True, torch.float32, backend)
    )
    torch.library.opcheck(_red_edit_backward_op, (g, None, None, True, False, True, torch.float32, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()

    def f(h, scale, bias):
        return rk.red_edit(h * 2, scale, bias, backend=backend).square().sum()

    h, scale, bias = _inputs((4, 6, 32), torch.float32)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    got = compiled(h, scale, bias)
    got_grads = torch.autograd.grad(got, (h, scale, bias))
    want = f(h, scale, bias)
    want_grads = torch.autograd.grad(want, (h, scale, bias))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_compile_under_context_manager(monkeypatch):
    """The backend chosen by use_backend reaches the compiled graph (the reference's kernel runs)."""
    import sys

    torch._dynamo.reset()
    module = sys.modules["red_kernels.ops.red_edit"]  # the package re-exports the function's name
    calls = []
    real = module._FWD["reference"]
    monkeypatch.setitem(module._FWD, "reference", lambda *a: calls.append(1) or real(*a))
    h, scale, bias = _inputs((2, 8), torch.float32)
    compiled = torch.compile(lambda a, b, c: rk.red_edit(a, b, c), fullgraph=True)
    with rk.use_backend("reference"):
        torch.testing.assert_close(compiled(h, scale, bias), rk.red_edit_reference(h, scale, bias))
    assert calls, "the compiled call did not run the reference backend"


# --- selection -----------------------------------------------------------------------------------


def test_selection_precedence(monkeypatch):
    from red_kernels._backend import requested_backend

    monkeypatch.setenv("RED_KERNELS_BACKEND", "reference")
    assert requested_backend() == "reference"
    with rk.use_backend("auto"):
        assert requested_backend() == "auto"
        assert requested_backend("reference") == "reference"
    monkeypatch.setenv("RED_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="RED_KERNELS_BACKEND"):
        requested_backend()


def test_selection_is_per_thread():
    """use_backend in one thread is invisible to another, and interleaved exits restore each
    thread's own selection (issue 9: the selection was a process-wide stack)."""
    import threading

    from red_kernels._backend import requested_backend

    entered, release = threading.Event(), threading.Event()
    seen = {}

    def other():
        with rk.use_backend("cpu"):
            entered.set()
            release.wait(10)
            seen["inside"] = requested_backend()
        seen["after"] = requested_backend()

    with rk.use_backend("reference"):
        t = threading.Thread(target=other)
        t.start()
        assert entered.wait(10)
        assert requested_backend() == "reference"  # not the other thread's "cpu"
        with rk.use_backend("triton"):
            release.set()  # the other thread exits its block while this one is nested
            t.join(10)
            assert requested_backend() == "triton"
        assert requested_backend() == "reference"
    assert requested_backend() == "auto"
    assert seen == {"inside": "cpu", "after": "auto"}

    fresh = {}
    with rk.use_backend("reference"):
        t = threading.Thread(target=lambda: fresh.setdefault("b", requested_backend()))
        t.start()
        t.join(10)
    assert fresh == {"b": "auto"}  # a new thread does not inherit the selection


def test_explicit_unavailable_backend_raises():
    h, scale, bias = _inputs((2, 8), torch.float32)
    unavailable = [b for b in rk.backends() if not b.available or "cpu" not in b.devices]
    assert unavailable, "expected at least one backend that cannot run CPU tensors here (cuda)"
    for b in unavailable:
        with pytest.raises(RuntimeError, match=f"backend '{b.name}'"):
            rk.red_edit(h, scale, bias, backend=b.name)
        with rk.use_backend(b.name), pytest.raises(RuntimeError, match=f"backend '{b.name}'"):
            rk.red_edit(h, scale, bias)
    with pytest.raises(ValueError, match="unknown backend"):
        rk.red_edit(h, scale, bias, backend="tpu")


def test_auto_picks_cpu_kernels_when_built():
    from red_kernels._backend import resolve
    from red_kernels.ops.red_edit import IMPLEMENTED

    expected = "cpu" if "cpu" in BACKENDS else "reference"
    assert resolve("auto", torch.device("cpu"), "red_edit", IMPLEMENTED) == expected


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    h = torch.randn(4, 8)
    s, b = torch.ones(8), torch.zeros(8)
    cases = [
        ((h, torch.ones(7), b), "scale", ValueError),
        ((h, s, torch.zeros(9)), "bias", ValueError),
        ((h, torch.ones(1, 8), b), "scale", ValueError),
        ((h, s, b.to("meta")), "bias", ValueError),
        ((h.to(torch.int32), s, b), "'h'", ValueError),
        ((h, torch.ones(8, dtype=torch.int64), None), "scale", ValueError),
        ((h, s, b.double()), "bias", ValueError),
        ((torch.tensor(1.0), None, None), "'h'", ValueError),
    ]
    for args, name, exc in cases:
        with pytest.raises(exc, match=name):
            rk.red_edit(*args, backend=backend)


def test_cpp_checks_name_the_op_and_argument():
    """The compiled ops check their arguments too (C++ callers skip the Python layer); every message
    reads "red_kernels.<op>: argument '<name>' ...", like the Python checks'."""
    if "cpu" not in BACKENDS:
        pytest.skip("compiled extension not built")
    op, bwd = torch.ops.red_kernels_C.red_edit, torch.ops.red_kernels_C.red_edit_bwd
    with pytest.raises(ValueError, match=r"^red_kernels\.red_edit: argument 'scale' has size 7"):
        op(torch.randn(4, 8), torch.ones(7), None)
    with pytest.raises(ValueError, match=r"^red_kernels\.red_edit: argument 'bias' has dtype"):
        op(torch.randn(4, 8), torch.ones(8), torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^red_kernels\.red_edit: argument 'h' must be float32"):
        op(torch.ones(4, 8, dtype=torch.int32), None, None)
    with pytest.raises(ValueError, match=r"^red_kernels\.red_edit: argument 'h' must be float32.*Float8"):
        rk.red_edit(torch.randn(4, 8).to(torch.float8_e4m3fn), torch.ones(8), None, backend="cpu")
    with pytest.raises(ValueError, match=r"^red_kernels\.red_edit_bwd: argument 'h' has shape"):
        bwd(torch.randn(4, 8), torch.randn(4, 7), torch.ones(8), True, True, True, torch.float32)


# --- GPU --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (257, 7), (3, 257, 1023), (8, 4097)])
def test_gpu_backends_match_reference(dtype, shape):
    for backend in gpu_backends():
        _check_against_reference(backend, *_inputs(shape, dtype, device="cuda"))


# --- CPU code paths chosen at run time ----------------------------------------------------------

_PATH_PROBE = r"""
import torch, red_kernels as rk
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    h = torch.randn(1024, 4097).to(dtype).requires_grad_()  # large enough for the huge-page advice
    s = torch.randn(4097, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True)
    b = torch.randn_like(s, requires_grad=True)
    g = torch.randn(h.shape).to(dtype)
    out = rk.red_edit(h, s, b, backend="cpu")
    got = torch.autograd.grad(out, (h, s, b), g)
    acc = s.dtype
    hu, su, bu = (t.detach().to(acc).requires_grad_() for t in (h, s, b))
    ref = rk.red_edit_reference(hu, su, bu)
    want = torch.autograd.grad(ref, (hu, su, bu), g.to(acc))
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
    assert torch.allclose(out.to(acc), ref, rtol=tol, atol=tol), dtype
    assert torch.allclose(got[0].to(acc), want[0], rtol=tol, atol=tol), dtype
    for a, w in zip(got[1:], want[1:]):
        assert torch.allclose(a, w, rtol=1e-4, atol=1e-3 * w.abs().max().item()), dtype
print("ok")
"""


@pytest.mark.parametrize("env", [*ISA_ENVS, {"RED_KERNELS_NO_HUGE_PAGES": "1"}, {}], ids=str)
def test_cpu_runtime_paths(env):
    """Every build of the row kernels this CPU can run (base, avx2, avx512) and the allocation
    without huge-page advice compute the same as the default path."""
    if "cpu" not in BACKENDS:
        pytest.skip("compiled extension not built")
    run_cpu_probe(_PATH_PROBE, env)
