"""seq_scale on every backend that runs here against the eager reference: forward and both gradients,
dense and packed (sorted and unsorted indices), dtypes, awkward widths, strides, empty inputs,
gradcheck, opcheck, compile and bad input."""

from __future__ import annotations

import pytest
import torch
from _helpers import ISA_ENVS, assert_close, assert_sum_close, cpu_backends, gpu_backends, run_cpu_probe

import red_kernels as rk
from red_kernels.ops.seq_scale import _seq_scale_backward_op, _seq_scale_op

BACKENDS = cpu_backends()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
WIDTHS = [1, 7, 64, 4097]
LENGTHS = [1, 5, 300]
BATCHES = [1, 3]
FORMS = ["dense", "packed", "packed_unsorted"]


def _vec_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _seq_index(form, b, t, device="cpu"):
    """Packed index for b sequences of about t tokens: sorted (uneven lengths) or shuffled."""
    if form == "packed":
        return torch.sort(torch.randint(0, b, (b * t,), device=device)).values
    return torch.randint(0, b, (b * t,), device=device)


def _inputs(form, b, t, n, dtype, vec_dtype=None, device="cpu"):
    vec_dtype = vec_dtype or _vec_dtype(dtype)
    idx = None if form == "dense" else _seq_index(form, b, t, device)
    shape = (b, t, n) if idx is None else (b * t, n)
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    vec = (1 + 0.5 * torch.randn(b, n, device=device)).to(vec_dtype).requires_grad_()
    return x, vec, idx


def _per_seq_sum(t, idx, num_seqs):
    """sum over each sequence's rows of t (dense [B, T, n] or packed [N, n]), in t's dtype."""
    if idx is None:
        return t.sum(1)
    return torch.zeros(num_seqs, t.shape[-1], dtype=t.dtype, device=t.device).index_add_(0, idx, t)


def _check_against_reference(backend, x, vec, idx, grad=None):
    """Forward and both gradients of seq_scale(backend) vs the fp32/fp64 reference."""
    if grad is None:
        grad = torch.randn(x.shape, dtype=torch.float32, device=x.device).to(x.dtype)
    out = rk.seq_scale(x, vec, idx, backend=backend)
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
    gx, gv = torch.autograd.grad(out, (x, vec), grad)
    assert gx.dtype == x.dtype and gv.dtype == vec.dtype

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xu, vu = (t.detach().to(acc).requires_grad_() for t in (x, vec))
    ref = rk.seq_scale_reference(xu, vu, idx)
    rgx, rgv = torch.autograd.grad(ref, (xu, vu), grad.to(acc))

    eager_out = eager_gx = None
    if x.dtype in (torch.float16, torch.bfloat16):  # the error eager PyTorch makes in x's dtype
        vl = vec.detach().to(x.dtype)
        vl = vl[:, None, :] if idx is None else vl[idx]
        eager_out, eager_gx = x.detach() * vl, grad * vl
    assert_close(out, ref, eager_out, f"{backend} forward")
    assert_close(gx, rgx, eager_gx, f"{backend} grad_x")
    abs_terms = _per_seq_sum(grad.to(acc).abs() * x.detach().to(acc).abs(), idx, vec.shape[0])
    assert_sum_close(gv, rgv, abs_terms, f"{backend} grad_vec")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("form", FORMS)
def test_matches_reference(backend, dtype, n, t, b, form):
    _check_against_reference(backend, *_inputs(form, b, t, n, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_same_dtype_vectors(backend, dtype):
    """Vectors in the activations' dtype (a model cast wholesale to bf16)."""
    _check_against_reference(backend, *_inputs("dense", 3, 9, 65, dtype, vec_dtype=dtype))
    _check_against_reference(backend, *_inputs("packed_unsorted", 3, 9, 65, dtype, vec_dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_with_empty_and_long_sequences(backend):
    """Sequences of very different lengths, one with no token (zero gradient), interleaved."""
    lengths = [0, 1, 257, 3, 0, 40]
    idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    idx = idx[torch.randperm(idx.numel())]
    x = torch.randn(idx.numel(), 33, requires_grad=True)
    vec = torch.randn(len(lengths), 33, requires_grad=True)
    _check_against_reference(backend, x, vec, idx)
    gv = torch.autograd.grad(rk.seq_scale(x, vec, idx, backend=backend).sum(), vec)[0]
    assert torch.equal(gv[0], torch.zeros(33)) and torch.equal(gv[4], torch.zeros(33))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["x", "grad_out"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_packed_nonfinite_stays_in_its_sequence(backend, where, bad):
    """A NaN/Inf in one sequence's rows (of x or of grad_out) makes that sequence's grad_vec row
    non-finite and leaves every other sequence's row as it was (the reference's one-hot matmul
    spread it: 0 * NaN = NaN)."""
    x, vec, idx = _inputs("packed_unsorted", 4, 30, 16, torch.float32)
    g = torch.randn(x.shape)
    poisoned = int(idx[5])
    if where == "x":
        x = x.detach().index_put((torch.tensor(5), torch.tensor(3)), torch.tensor(bad)).requires_grad_()
    else:
        g[5, 3] = bad
    (gv,) = torch.autograd.grad(rk.seq_scale(x, vec, idx, backend=backend), (vec,), g)
    clean = [b for b in range(4) if b != poisoned]
    assert torch.isfinite(gv[clean]).all()
    want = torch.stack([(g[idx == b] * x.detach()[idx == b]).sum(0) for b in clean])
    torch.testing.assert_close(gv[clean], want, rtol=1e-5, atol=1e-5)
    assert not torch.isfinite(gv[poisoned, 3])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unsorted_bits_equal_sorted(backend, dtype):
    """The kernels reduce each sequence's rows in token order whatever the interleaving: an unsorted
    index gives the bits of the same rows sorted stably by sequence."""
    x, vec, idx = _inputs("packed_unsorted", 4, 150, 70, dtype)
    g = torch.randn(x.shape).to(dtype)
    order = torch.sort(idx, stable=True).indices
    got = torch.autograd.grad(rk.seq_scale(x, vec, idx, backend=backend), (x, vec), g)
    xs = x.detach()[order].requires_grad_()
    want = torch.autograd.grad(rk.seq_scale(xs, vec, idx[order], backend=backend), (xs, vec), g[order])
    assert torch.equal(got[0][order], want[0])
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_equals_packed(backend):
    """The dense form is the packed form with seq_index = [0]*T + [1]*T + ...: same values."""
    x, vec, _ = _inputs("dense", 3, 20, 48, torch.float32)
    idx = torch.arange(3).repeat_interleave(20)
    g = torch.randn(x.shape)
    dense = torch.autograd.grad(rk.seq_scale(x, vec, backend=backend), (x, vec), g)
    xp = x.detach().reshape(60, 48).requires_grad_()
    packed = torch.autograd.grad(rk.seq_scale(xp, vec, idx, backend=backend), (xp, vec), g.reshape(60, 48))
    torch.testing.assert_close(dense[0].reshape(60, 48), packed[0], rtol=0, atol=0)
    torch.testing.assert_close(dense[1], packed[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["batch_major_view", "transposed_last", "row_slice", "expanded", "packed_slice"])
def test_non_contiguous(backend, layout):
    n, b, t = 37, 3, 6
    idx = None
    if layout == "batch_major_view":  # [T, B, n] storage viewed as [B, T, n]
        base = torch.randn(t, b, n).transpose(0, 1)
    elif layout == "transposed_last":  # last-dim stride != 1
        base = torch.randn(n, t, b).permute(2, 1, 0)
    elif layout == "row_slice":  # rows with a gap between them
        base = torch.randn(b, t, n + 11)[..., :n]
    elif layout == "expanded":  # zero-stride token dim
        base = torch.randn(b, 1, n).expand(b, t, n)
    else:  # packed rows with a gap, every other row
        base = torch.randn(2 * b * t, n + 5)[::2, :n]
        idx = _seq_index("packed_unsorted", b, t)
    assert not base.is_contiguous()
    x = base.detach().requires_grad_()
    vec = torch.randn(b, n, requires_grad=True)
    _check_against_reference(backend, x, vec, idx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["dense", "packed_unsorted"])
def test_non_contiguous_grad(backend, form):
    """Autograd hands over expanded or transposed gradients (e.g. from .sum() or a transpose)."""
    x, vec, idx = _inputs(form, 3, 7, 20, torch.float32)
    expanded = torch.randn(1, 20).expand(x.shape) if idx is not None else torch.randn(3, 1, 20).expand(x.shape)
    _check_against_reference(backend, x, vec, idx, grad=expanded)
    if idx is None:
        _check_against_reference(backend, x, vec, idx, grad=torch.randn(7, 3, 20).transpose(0, 1))


def _index_view(view, b, rows):
    """A packed seq_index that is a view, not a fresh contiguous tensor."""
    if view == "sliced":  # every other entry of a longer index
        return torch.randint(0, b, (2 * rows,))[::2]
    if view == "expanded":  # one sequence for every row: stride 0 over a one-element storage
        return torch.tensor([b - 1]).expand(rows)
    if view == "offset":  # a column of an [rows, 3] table: storage offset 1, stride 3
        return torch.randint(0, b, (rows, 3))[:, 1]
    return torch.randint(0, b, (2, rows))[1]  # "row": contiguous, storage offset rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["sliced", "expanded", "offset", "row"])
def test_seq_index_views(backend, view):
    """Any view of seq_index reads the entries it shows (the Triton kernel once read the index as
    contiguous from its data pointer: wrong rows for a sliced index, a crash for an expanded one).
    Forward, both gradients, and the x-only backward (frozen vectors), which takes its own path."""
    b, rows, n = 3, 40, 24
    idx = _index_view(view, b, rows)
    assert not idx.is_contiguous() or idx.storage_offset() > 0
    x = torch.randn(rows, n, requires_grad=True)
    vec = (1 + torch.randn(b, n)).requires_grad_()
    _check_against_reference(backend, x, vec, idx)
    g = torch.randn(rows, n)
    (gx,) = torch.autograd.grad(rk.seq_scale(x, vec.detach(), idx, backend=backend), (x,), g)
    torch.testing.assert_close(gx, g * vec.detach()[idx], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "form,shape,b", [("dense", (0, 4, 8), 0), ("dense", (3, 0, 8), 3), ("dense", (3, 4, 0), 3), ("packed", (0, 8), 3)]
)
def test_empty(backend, form, shape, b):
    x = torch.randn(shape, requires_grad=True)
    vec = torch.randn(b, shape[-1], requires_grad=True)
    idx = torch.zeros(0, dtype=torch.int64) if form == "packed" else None
    out = rk.seq_scale(x, vec, idx, backend=backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert torch.equal(vec.grad, torch.zeros_like(vec))
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["dense", "packed_unsorted"])
def test_partial_requires_grad(backend, form):
    x, vec, idx = _inputs(form, 3, 11, 40, torch.float32)
    g = torch.randn(x.shape)
    vsel = vec.detach()[:, None, :] if idx is None else vec.detach()[idx]
    # Only the vectors train (frozen model below): no grad_x.
    (gv,) = torch.autograd.grad(rk.seq_scale(x.detach(), vec, idx, backend=backend), (vec,), g)
    torch.testing.assert_close(gv, _per_seq_sum(g * x.detach(), idx, 3), rtol=1e-5, atol=1e-5)
    # Only x needs a gradient (vectors frozen): no grad_vec, x is not saved.
    (gx,) = torch.autograd.grad(rk.seq_scale(x, vec.detach(), idx, backend=backend), (x,), g)
    torch.testing.assert_close(gx, g * vsel, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["dense", "packed_unsorted"])
def test_backward_deterministic(backend, form):
    x, vec, idx = _inputs(form, 3, 300, 130, torch.float32)
    g = torch.randn(x.shape)
    first = torch.autograd.grad(rk.seq_scale(x, vec, idx, backend=backend), (x, vec), g)
    for _ in range(2):
        again = torch.autograd.grad(rk.seq_scale(x, vec, idx, backend=backend), (x, vec), g)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("form", ["dense", "packed_unsorted"])
def test_saves_only_x_and_vec(form):
    """Autograd keeps x (only when vec needs a gradient), vec and seq_index; nothing larger."""
    x, vec, idx = _inputs(form, 2, 64, 128, torch.float32)
    for vec_grad, expect_x in [(True, True), (False, False)]:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            rk.seq_scale(x, vec if vec_grad else vec.detach(), idx, backend="cpu" if "cpu" in BACKENDS else None)
        big = [t for t in saved if t.numel() > vec.numel()]
        assert [t.data_ptr() for t in big] == ([x.data_ptr()] if expect_x else [])
        assert any(t.data_ptr() == vec.data_ptr() for t in saved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    x, vec, _ = _inputs("dense", 2, 3, 5, torch.float64)
    assert torch.autograd.gradcheck(lambda a, v: rk.seq_scale(a, v, backend=backend), (x, vec))
    xp, vp, idx = _inputs("packed_unsorted", 3, 3, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda a, v: rk.seq_scale(a, v, idx, backend=backend), (xp, vp))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck(backend):
    """Double backward (create_graph=True: gradient penalties, Hessian-vector products) is correct on
    every backend: the backward then computes differentiable formulas instead of calling the
    kernels, whose results autograd cannot see through (cpu returned zero second derivatives with a
    warning, the Python backends raised)."""
    x, vec, _ = _inputs("dense", 2, 3, 5, torch.float64)
    assert torch.autograd.gradgradcheck(lambda a, v: rk.seq_scale(a, v, backend=backend), (x, vec))
    xp, vp, idx = _inputs("packed_unsorted", 3, 3, 4, torch.float64)
    assert torch.autograd.gradgradcheck(lambda a, v: rk.seq_scale(a, v, idx, backend=backend), (xp, vp))
    assert torch.autograd.gradgradcheck(lambda a: rk.seq_scale(a, vp.detach(), idx, backend=backend), (xp,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, vec, _ = _inputs("dense", 2, 4, 16, torch.float32)
    torch.library.opcheck(_seq_scale_op, (x, vec, None, backend))
    xp, vp, idx = _inputs("packed_unsorted", 3, 4, 16, torch.float32)
    torch.library.opcheck(_seq_scale_op, (xp, vp, idx, backend))
    torch.library.opcheck(_seq_scale_op, (xp.detach(), vp, idx, backend))
    xb, vb, _ = _inputs("dense", 2, 3, 16, torch.bfloat16)
    torch.library.opcheck(_seq_scale_op, (xb, vb, None, backend))
    g = torch.randn(2, 4, 16)
    for need_x, need_vec in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(
            _seq_scale_backward_op, (g, x.detach() if need_vec else None, vec.detach(), None, need_x, need_vec, backend)
        )
    gp = torch.randn(12, 16)
    torch.library.opcheck(_seq_scale_backward_op, (gp, xp.detach(), vp.detach(), idx, True, True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["dense", "packed_unsorted"])
def test_compile_fullgraph(backend, form):
    torch._dynamo.reset()

    def f(x, vec, idx):
        return rk.seq_scale(x * 2, vec, idx, backend=backend).square().sum()

    x, vec, idx = _inputs(form, 3, 6, 32, torch.float32)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    got = compiled(x, vec, idx)
    got_grads = torch.autograd.grad(got, (x, vec))
    want = f(x, vec, idx)
    want_grads = torch.autograd.grad(want, (x, vec))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_auto_picks_cpu_kernels_when_built():
    from red_kernels._backend import resolve
    from red_kernels.ops.seq_scale import IMPLEMENTED

    expected = "cpu" if "cpu" in BACKENDS else "reference"
    assert resolve("auto", torch.device("cpu"), "seq_scale", IMPLEMENTED) == expected


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    x3, x2, v = torch.randn(3, 4, 8), torch.randn(12, 8), torch.randn(3, 8)
    idx = torch.zeros(12, dtype=torch.int64)
    cases = [
        ((x3, torch.randn(2, 8), None), "'vec'"),  # batch mismatch
        ((x3, torch.randn(3, 7), None), "'vec'"),  # width mismatch
        ((x3, torch.randn(8), None), "'vec'"),  # 1-D vec
        ((x2, v, None), "'x'"),  # 2-D x without seq_index
        ((x3, v, idx), "'x'"),  # 3-D x with seq_index
        ((x3.to(torch.int32), v, None), "'x'"),
        ((x3, v.to(torch.int64), None), "'vec'"),
        ((x3, v.to("meta"), None), "'vec'"),
        ((x2, v, idx.to(torch.int32)), "'seq_index'"),
        ((x2, v, idx[:11]), "'seq_index'"),
        ((x2, v, idx.reshape(3, 4)), "'seq_index'"),
        ((x2, v, idx.to("meta")), "'seq_index'"),
        ((x2, v, torch.full((12,), 3)), "'seq_index'.*entry 0 is 3"),  # == B
        ((x2, v, torch.tensor([0] * 7 + [-1] + [0] * 4)), "'seq_index'.*entry 7 is -1"),
        ((x2, v, torch.tensor([2] * 11 + [99])), "'seq_index'.*entry 11 is 99"),
    ]
    for args, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            rk.seq_scale(*args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_index_in_backward_is_caught(backend):
    """The backward op validates the index too (it reads memory through it)."""
    g, x, v = torch.randn(4, 8), torch.randn(4, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="'seq_index'"):
        _seq_scale_backward_op(g, x, v, torch.tensor([0, 1, 2, 0]), True, True, backend)
    with pytest.raises(ValueError, match="'seq_index'"):
        _seq_scale_backward_op(g, None, v, torch.tensor([0, 1, -2, 0]), True, False, backend)


def test_cpp_checks_name_the_op_and_argument():
    """The compiled ops check their arguments too (C++ callers skip the Python layer); every message
    reads "red_kernels.<op>: argument '<name>' ...", like the Python checks'."""
    if "cpu" not in BACKENDS:
        pytest.skip("compiled extension not built")
    fwd, bwd = torch.ops.red_kernels_C.seq_scale, torch.ops.red_kernels_C.seq_scale_bwd
    x2, v = torch.randn(4, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"^red_kernels\.seq_scale: argument 'seq_index' entry 2 is 5"):
        fwd(x2, v, torch.tensor([0, 1, 5, 0]))
    with pytest.raises(ValueError, match=r"^red_kernels\.seq_scale_bwd: argument 'seq_index' entry 2 is 5"):
        bwd(x2, x2, v, torch.tensor([0, 1, 5, 0]), True, True)
    with pytest.raises(ValueError, match=r"^red_kernels\.seq_scale: argument 'seq_index' must be int64"):
        fwd(x2, v, torch.tensor([0, 1, 1, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^red_kernels\.seq_scale: argument 'vec' has width 7"):
        fwd(torch.randn(2, 3, 8), torch.randn(2, 7), None)
    with pytest.raises(ValueError, match=r"^red_kernels\.seq_scale: argument 'x' must be float32.*Float8"):
        rk.seq_scale(torch.randn(2, 3, 8).to(torch.float8_e5m2), torch.randn(2, 8), backend="cpu")
    with pytest.raises(ValueError, match=r"^red_kernels\.seq_scale_bwd: argument 'x' is required"):
        bwd(x2, None, v, torch.tensor([0, 1, 1, 0]), True, True)
    with pytest.raises(ValueError, match=r"^red_kernels\.seq_scale_bwd: argument 'x' has dtype"):
        bwd(x2, x2.double(), v, torch.tensor([0, 1, 1, 0]), True, True)


# --- CPU code paths chosen at run time ----------------------------------------------------------

_PATH_PROBE = r"""
import torch, red_kernels as rk
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for idx in (None, torch.randint(0, 4, (4 * 300,))):
        x = torch.randn(4, 300, 4097) if idx is None else torch.randn(4 * 300, 4097)
        x = x.to(dtype).requires_grad_()  # large enough for the huge-page advice
        v = torch.randn(4, 4097, dtype=acc, requires_grad=True)
        g = torch.randn(x.shape).to(dtype)
        out = rk.seq_scale(x, v, idx, backend="cpu")
        got = torch.autograd.grad(out, (x, v), g)
        xu, vu = (t.detach().to(acc).requires_grad_() for t in (x, v))
        ref = rk.seq_scale_reference(xu, vu, idx)
        want = torch.autograd.grad(ref, (xu, vu), g.to(acc))
        tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
        assert torch.allclose(out.to(acc), ref, rtol=tol, atol=tol), dtype
        assert torch.allclose(got[0].to(acc), want[0], rtol=tol, atol=tol), dtype
        assert torch.allclose(got[1], want[1], rtol=1e-4, atol=1e-3 * want[1].abs().max().item()), dtype
print("ok")
"""


@pytest.mark.parametrize("env", [*ISA_ENVS, {"RED_KERNELS_NO_HUGE_PAGES": "1"}], ids=str)
def test_cpu_runtime_paths(env):
    """Every build of the row kernels this CPU can run (base, avx2, avx512) and the allocation
    without huge-page advice compute the same as the default path (which the other tests run)."""
    if "cpu" not in BACKENDS:
        pytest.skip("compiled extension not built")
    run_cpu_probe(_PATH_PROBE, env)


# --- GPU --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("b,t,n", [(1, 1, 1), (3, 5, 7), (3, 300, 4097), (8, 512, 1024), (64, 1, 4096)])
def test_gpu_backends_match_reference(dtype, form, b, t, n):
    for backend in gpu_backends():
        _check_against_reference(backend, *_inputs(form, b, t, n, dtype, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["dense", "packed_unsorted"])
def test_gpu_backward_deterministic(form):
    x, vec, idx = _inputs(form, 8, 512, 1000, torch.float32, device="cuda")
    g = torch.randn(x.shape, device="cuda")
    for backend in gpu_backends():
        first = torch.autograd.grad(rk.seq_scale(x, vec, idx, backend=backend), (x, vec), g)
        again = torch.autograd.grad(rk.seq_scale(x, vec, idx, backend=backend), (x, vec), g)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
