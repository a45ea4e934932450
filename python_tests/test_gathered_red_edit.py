"""gathered_red_edit on every backend that runs here against a reference that loops over tenants
(red_edit_reference on each tenant's sub-batch): forward and all three gradients, tenant mixes
(absent tenants, one tenant, all unedited, K = 1 and 64), per-sequence and per-token ids, dtypes,
odd sizes, strides, empty inputs, ablations, determinism, gradcheck, opcheck, compile, bad input."""

from __future__ import annotations

import pytest
import torch
from _helpers import ISA_ENVS, assert_close, assert_sum_close, cpu_backends, gpu_backends, run_cpu_probe

import red_kernels as rk
from red_kernels.ops.gathered_red_edit import _gathered_red_edit_backward_op, _gathered_red_edit_op

BACKENDS = cpu_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _per_row(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    t = h[..., 0].numel() // max(ids.numel(), 1) if ids.numel() else 0
    return ids.reshape(-1, 1).expand(-1, t).reshape(-1)


def loop_reference(h, scales, biases, ids):
    """Independent ground truth: for each tenant, index its rows, red_edit_reference, write back."""
    d = h.shape[-1]
    rows = h.reshape(-1, d)
    tenant = _per_row(h, ids)
    out = rows.clone()
    for k in torch.unique(tenant[tenant >= 0]).tolist():
        sel = (tenant == k).nonzero().squeeze(1)
        edited = rk.red_edit_reference(
            rows[sel], scales[k] if scales is not None else None, biases[k] if biases is not None else None
        )
        out = out.index_copy(0, sel, edited)
    return out.reshape(h.shape)


def _inputs(shape, dtype, k, ids, param_dtype=None, with_scales=True, with_biases=True, device="cpu"):
    d = shape[-1]
    param_dtype = param_dtype or (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    h = torch.randn(shape, device=device).to(dtype).requires_grad_()
    scales = (1 + 0.5 * torch.randn(k, d, device=device)).to(param_dtype).requires_grad_() if with_scales else None
    biases = (0.5 * torch.randn(k, d, device=device)).to(param_dtype).requires_grad_() if with_biases else None
    return h, scales, biases, torch.as_tensor(ids, dtype=torch.int64, device=device)


def _check_against_reference(backend, h, scales, biases, ids):
    """Forward and every gradient of gathered_red_edit(backend) vs the fp32/fp64 tenant loop."""
    grad = torch.randn(h.shape, dtype=torch.float32, device=h.device).to(h.dtype)
    out = rk.gathered_red_edit(h, scales, biases, ids, backend=backend)
    assert out.dtype == h.dtype and out.shape == h.shape and out.is_contiguous()
    params = [t for t in (h, scales, biases) if t is not None]
    grads = torch.autograd.grad(out, params, grad) if out.numel() else [torch.zeros_like(p) for p in params]

    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    ups = [t.detach().to(acc).requires_grad_() for t in params]
    it = iter(ups)
    h_up = next(it)
    s_up = next(it) if scales is not None else None
    b_up = next(it) if biases is not None else None
    ref = loop_reference(h_up, s_up, b_up, ids)
    ref_grads = (
        torch.autograd.grad(ref, ups, grad.to(acc), allow_unused=True, materialize_grads=True)
        if ref.numel()
        else [torch.zeros_like(u) for u in ups]
    )

    # Eager PyTorch in h's dtype (vectors cast to it) sets the low-precision error bound.
    eager_out = eager_gh = None
    d = h.shape[-1]
    tenant = _per_row(h, ids)
    if h.dtype in (torch.float16, torch.bfloat16):

        def rows_of(table, fill):
            full = torch.cat([torch.full((1, d), fill, device=h.device), table.detach().float()])
            return full.to(h.dtype)[tenant + 1].reshape(h.shape)

        s_rows = rows_of(scales, 1.0) if scales is not None else None
        b_rows = rows_of(biases, 0.0) if biases is not None else None
        hc = h.detach()
        eager_out = (hc * s_rows if s_rows is not None else hc) + (b_rows if b_rows is not None else 0)
        eager_gh = grad * s_rows if s_rows is not None else grad
    assert_close(out, ref, eager_out, f"{backend} forward")

    gi = iter(zip(grads, ref_grads))
    g_h, r_h = next(gi)
    assert_close(g_h, r_h, eager_gh, f"{backend} grad_h")
    # Per-tenant sums of absolute terms bound the fp32 accumulation error.
    k = (scales if scales is not None else biases).shape[0]
    g2 = grad.to(acc).reshape(-1, d).abs()
    slot = (tenant + 1).clamp_min(0)

    def tenant_abs_sum(x):
        return torch.zeros(k + 1, d, dtype=acc, device=h.device).index_add_(0, slot, x)[1:]

    present = torch.zeros(k, dtype=torch.bool, device=h.device)
    present[tenant[tenant >= 0]] = True
    if scales is not None:
        g_s, r_s = next(gi)
        assert g_s.dtype == scales.dtype and g_s.shape == scales.shape
        assert_sum_close(
            g_s, r_s, tenant_abs_sum(g2 * h.detach().to(acc).reshape(-1, d).abs()), f"{backend} grad_scales"
        )
        assert bool((g_s[~present] == 0).all()), f"{backend}: absent tenants must get zero grad_scales"
    if biases is not None:
        g_b, r_b = next(gi)
        assert g_b.dtype == biases.dtype and g_b.shape == biases.shape
        assert_sum_close(g_b, r_b, tenant_abs_sum(g2), f"{backend} grad_biases")
        assert bool((g_b[~present] == 0).all()), f"{backend}: absent tenants must get zero grad_biases"


# Tenants 1 and 4 of K = 6 are absent; -1 rows are unedited.
MIXED_SEQ = [0, 2, -1, 2, 5, 3, 0]


def _mixed_tokens(n, k=6):
    ids = torch.randint(-1, k, (n,))
    ids[(ids == 1) | (ids == 4)] = 0
    return ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 7, 1023])
@pytest.mark.parametrize("layout", ["per_sequence", "per_token"])
def test_matches_reference(backend, dtype, d, layout):
    if layout == "per_sequence":
        shape, ids = (len(MIXED_SEQ), 5, d), MIXED_SEQ
    else:
        shape, ids = (37, d), _mixed_tokens(37)
    _check_against_reference(backend, *_inputs(shape, dtype, 6, ids))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mix", ["one_tenant", "all_unedited", "k1", "k64_per_token", "k64_per_sequence"])
def test_tenant_mixes(backend, dtype, mix):
    if mix == "one_tenant":
        args = ((4, 6, 33), dtype, 5, [3, 3, 3, 3])
    elif mix == "all_unedited":
        args = ((4, 6, 33), dtype, 5, [-1] * 4)
    elif mix == "k1":
        args = ((50, 33), dtype, 1, torch.randint(-1, 1, (50,)))
    elif mix == "k64_per_token":
        args = ((300, 65), dtype, 64, torch.randint(-1, 64, (300,)))
    else:
        args = ((40, 3, 65), dtype, 64, torch.randint(-1, 64, (40,)))
    h, scales, biases, ids = _inputs(*args)
    _check_against_reference(backend, h, scales, biases, ids)
    if mix == "all_unedited":
        assert torch.equal(rk.gathered_red_edit(h, scales, biases, ids, backend=backend), h.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_ids_on_3d(backend):
    """ids [B, T] on h [B, T, d]: one tenant per token of a padded batch."""
    _check_against_reference(backend, *_inputs((3, 8, 17), torch.float32, 4, torch.randint(-1, 4, (3, 8))))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_scales,with_biases", [(True, False), (False, True)])
def test_ablations(backend, dtype, with_scales, with_biases):
    args = _inputs((7, 5, 33), dtype, 6, MIXED_SEQ, with_scales=with_scales, with_biases=with_biases)
    _check_against_reference(backend, *args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_same_dtype_vectors(backend, dtype):
    """Vectors in the activations' dtype (a model cast wholesale to bf16)."""
    _check_against_reference(backend, *_inputs((40, 65), dtype, 6, _mixed_tokens(40), param_dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "row_slice", "expanded"])
def test_non_contiguous(backend, layout):
    d = 37
    if layout == "transposed":  # last-dim stride != 1
        base = torch.randn(d, 6, 7).permute(2, 1, 0)
    elif layout == "row_slice":  # rows with a gap between them
        base = torch.randn(7, 6, d + 11)[..., :d]
    else:  # zero-stride leading dim
        base = torch.randn(1, 6, d).expand(7, 6, d)
    assert not base.is_contiguous()
    h = base.requires_grad_() if base.is_leaf else base.detach().requires_grad_()
    _, scales, biases, ids = _inputs((1, d), torch.float32, 6, MIXED_SEQ)
    _check_against_reference(backend, h, scales, biases, ids)
    # Per-token ids over the same strided rows.
    _check_against_reference(backend, h, scales, biases, torch.randint(-1, 6, (7, 6)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,ids", [((0, 8), []), ((3, 0, 8), [0, 1, -1]), ((4, 0), [0, 1, 1, -1]), ((0, 5, 8), [])])
def test_empty(backend, shape, ids):
    h, scales, biases, ids = _inputs(shape, torch.float32, 3, ids)
    out = rk.gathered_red_edit(h, scales, biases, ids, backend=backend)
    assert out.shape == h.shape
    out.sum().backward()
    assert torch.equal(scales.grad, torch.zeros_like(scales))
    assert torch.equal(biases.grad, torch.zeros_like(biases))
    assert h.grad.shape == h.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_requires_grad(backend):
    """Only the vectors train (the frozen-model case): no grad_h is computed or returned."""
    h, scales, biases, ids = _inputs((30, 40), torch.float32, 6, _mixed_tokens(30))
    h = h.detach()
    out = rk.gathered_red_edit(h, scales, biases, ids, backend=backend)
    out.square().sum().backward()
    su, bu = scales.detach().requires_grad_(), biases.detach().requires_grad_()
    loop_reference(h, su, bu, ids).square().sum().backward()
    torch.testing.assert_close(scales.grad, su.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(biases.grad, bu.grad, rtol=1e-5, atol=1e-5)
    # And only h trains (the tenants' vectors frozen).
    h2 = h.clone().requires_grad_()
    g = torch.randn(h.shape)
    got = torch.autograd.grad(rk.gathered_red_edit(h2, scales.detach(), biases.detach(), ids, backend=backend), h2, g)
    want = torch.autograd.grad(loop_reference(h2, scales.detach(), biases.detach(), ids), h2, g)
    torch.testing.assert_close(got[0], want[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_deterministic(backend):
    h, scales, biases, ids = _inputs((1031, 300), torch.float32, 8, torch.randint(-1, 8, (1031,)))
    g = torch.randn(h.shape)
    first = torch.autograd.grad(rk.gathered_red_edit(h, scales, biases, ids, backend=backend), (h, scales, biases), g)
    for _ in range(2):
        again = torch.autograd.grad(
            rk.gathered_red_edit(h, scales, biases, ids, backend=backend), (h, scales, biases), g
        )
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_h(backend):
    """Autograd keeps h, the [K, d] tables and the ids alive, nothing else of h's size (the cpu
    backend's autograd is C++'s)."""
    h, scales, biases, ids = _inputs((64, 128), torch.float32, 4, torch.randint(-1, 4, (64,)))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rk.gathered_red_edit(h, scales, biases, ids, backend=backend)
    big = [t for t in saved if t.numel() > scales.numel()]
    assert len(big) == 1 and big[0].data_ptr() == h.data_ptr()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rk.gathered_red_edit(h, scales.detach(), biases, ids, backend=backend)
    assert all(t.data_ptr() != h.data_ptr() for t in saved), "h saved although scales need no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    for h, scales, biases, ids in (
        _inputs((4, 3, 5), torch.float64, 3, [2, -1, 0, 2]),
        _inputs((9, 4), torch.float64, 3, [0, 2, 2, -1, 0, 0, 2, -1, 0]),
    ):
        assert torch.autograd.gradcheck(
            lambda a, b, c, i=ids: rk.gathered_red_edit(a, b, c, i, backend=backend), (h, scales, biases)
        )
        assert torch.autograd.gradcheck(
            lambda a, b, i=ids: rk.gathered_red_edit(a, b, None, i, backend=backend), (h, scales)
        )
        assert torch.autograd.gradcheck(
            lambda a, c, i=ids: rk.gathered_red_edit(a, None, c, i, backend=backend), (h, biases)
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck(backend):
    """Double backward (create_graph=True: gradient penalties, Hessian-vector products) is correct on
    every backend: the backward then computes differentiable formulas instead of calling the
    kernels, whose results autograd cannot see through (cpu returned zero second derivatives with a
    warning, the Python backends raised)."""
    for h, scales, biases, ids in (
        _inputs((4, 3, 5), torch.float64, 3, [2, -1, 0, 2]),
        _inputs((9, 4), torch.float64, 3, [0, 2, 2, -1, 0, 0, 2, -1, 0]),
    ):
        assert torch.autograd.gradgradcheck(
            lambda a, b, c, i=ids: rk.gathered_red_edit(a, b, c, i, backend=backend), (h, scales, biases)
        )
        assert torch.autograd.gradgradcheck(
            lambda a, c, i=ids: rk.gathered_red_edit(a, None, c, i, backend=backend), (h, biases)
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    h, scales, biases, ids = _inputs((4, 3, 16), torch.float32, 3, [1, -1, 1, 0])
    torch.library.opcheck(_gathered_red_edit_op, (h, scales, biases, ids, backend))
    torch.library.opcheck(_gathered_red_edit_op, (h.detach(), None, biases.detach(), ids, backend))
    hb, sb, bb, idb = _inputs((6, 16), torch.bfloat16, 3, [0, 2, -1, 2, 2, 0])
    torch.library.opcheck(_gathered_red_edit_op, (hb, sb, bb, idb, backend))
    g = torch.randn(4, 3, 16)
    torch.library.opcheck(
        _gathered_red_edit_backward_op,
        (g, h.detach(), scales.detach(), ids, 3, True, True, True, torch.float32, backend),
    )
    torch.library.opcheck(
        _gathered_red_edit_backward_op, (g, None, None, ids, 3, True, False, True, torch.float32, backend)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()

    def f(h, scales, biases, ids):
        return rk.gathered_red_edit(h * 2, scales, biases, ids, backend=backend).square().sum()

    h, scales, biases, ids = _inputs((4, 6, 32), torch.float32, 3, [2, -1, 0, 2])
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    got = compiled(h, scales, biases, ids)
    got_grads = torch.autograd.grad(got, (h, scales, biases))
    want = f(h, scales, biases, ids)
    want_grads = torch.autograd.grad(want, (h, scales, biases))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_auto_picks_cpu_kernels_when_built():
    from red_kernels._backend import resolve
    from red_kernels.ops.gathered_red_edit import IMPLEMENTED

    expected = "cpu" if "cpu" in BACKENDS else "reference"
    assert resolve("auto", torch.device("cpu"), "gathered_red_edit", IMPLEMENTED) == expected


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-2, 3, 1 << 40])
@pytest.mark.parametrize("layout", ["per_sequence", "per_token"])
def test_bad_ids(backend, bad, layout):
    k, d = 3, 8
    h = torch.randn((4, 5, d) if layout == "per_sequence" else (20, d), requires_grad=True)
    ids = torch.zeros(h.shape[0], dtype=torch.int64)
    ids[-1] = bad
    s, b = torch.ones(k, d, requires_grad=True), torch.zeros(k, d, requires_grad=True)
    with pytest.raises(ValueError, match=rf"tenant_ids.*{bad}.*\[-1, {k}\)"):
        rk.gathered_red_edit(h, s, b, ids, backend=backend)
    # The backward op checks the ids too (it may be called with ids the forward never saw).
    with pytest.raises(ValueError, match="tenant_ids"):
        _gathered_red_edit_backward_op(torch.ones_like(h), h, s, ids, k, True, True, True, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    h = torch.randn(4, 3, 8)
    s, b = torch.ones(5, 8), torch.zeros(5, 8)
    ids = torch.tensor([0, 1, -1, 4])
    cases = [
        ((h, torch.ones(5, 7), b, ids), "scales"),
        ((h, s, torch.zeros(5, 9), ids), "biases"),
        ((h, torch.ones(8), b, ids), "scales"),
        ((h, s, torch.zeros(4, 8), ids), "biases"),
        ((h, s, b.double(), ids), "biases"),
        ((h, s, b.to("meta"), ids), "biases"),
        ((h, None, None, ids), "scales"),
        ((h.to(torch.int32), s, b, ids), "'h'"),
        ((torch.randn(8), s, b, ids), "'h'"),
        ((h, torch.ones(5, 8, dtype=torch.int64), None, ids), "scales"),
        ((h, s, b, ids.to(torch.int32)), "tenant_ids"),
        ((h, s, b, ids.float()), "tenant_ids"),
        ((h, s, b, ids[:3]), "tenant_ids"),
        ((h, s, b, torch.zeros(4, 3, 8, dtype=torch.int64)), "tenant_ids"),
        ((h, s, b, ids.to("meta")), "tenant_ids"),
    ]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            rk.gathered_red_edit(*args, backend=backend)


def test_cpp_checks_name_the_op_and_argument():
    """The compiled ops check their arguments and id values too (C++ callers skip the Python layer);
    every message reads "red_kernels.<op>: argument '<name>' ...", like the Python checks'."""
    if "cpu" not in BACKENDS:
        pytest.skip("compiled extension not built")
    fwd = torch.ops.red_kernels_C.gathered_red_edit
    bwd = torch.ops.red_kernels_C.gathered_red_edit_bwd
    h, s, ids = torch.randn(4, 8), torch.ones(3, 8), torch.tensor([0, 1, 2, -1])
    op, op_bwd = r"^red_kernels\.gathered_red_edit: argument", r"^red_kernels\.gathered_red_edit_bwd: argument"
    with pytest.raises(ValueError, match=f"{op} 'scales' has 7 columns"):
        fwd(h, torch.ones(3, 7), None, ids)
    with pytest.raises(ValueError, match=f"{op} 'biases' has dtype"):
        fwd(h, s, torch.zeros(3, 8, dtype=torch.float64), ids)
    with pytest.raises(ValueError, match=f"{op} 'scales' and 'biases' are both None"):
        fwd(h, None, None, ids)
    with pytest.raises(ValueError, match=f"{op} 'tenant_ids' must be int64"):
        fwd(h, s, None, ids.int())
    with pytest.raises(ValueError, match=f"{op} 'tenant_ids' has value 3"):
        fwd(h, s, None, torch.tensor([0, 3, 0, 0]))
    with pytest.raises(ValueError, match=f"{op_bwd} 'tenant_ids' has value -5"):
        bwd(h, h, s, torch.tensor([0, -5, 0, 0]), 3, True, True, True, torch.float32)
    with pytest.raises(ValueError, match=f"{op_bwd} 'scales' has 3 tenants"):
        bwd(h, h, s, ids, 4, True, True, True, torch.float32)
    with pytest.raises(ValueError, match=f"{op_bwd} 'h' is required"):
        bwd(h, None, s, ids, 3, True, True, True, torch.float32)


# --- the Triton backend's host plan -------------------------------------------------------------------


def test_backward_plan_covers_each_tenant_once():
    pytest.importorskip("triton")
    from red_kernels.triton.gathered_red_edit import backward_plan

    k, t, rows_per_chunk = 5, 3, 4
    ids = torch.tensor([4, -1, 0, 4, 4, -1, 2, 0])
    table, tenant_chunks = backward_plan(ids, k, t, rows_per_chunk)
    units = ids.numel()
    n = (table.numel() - units - k - 1) // 3
    order, tenant, begin, end, seg = table.split([units, n, n, n, k + 1])
    assert order.tolist() == [2, 7, 6, 0, 3, 4, 1, 5]  # stable by tenant, unedited last
    assert tenant.tolist() == [0, 0, 2, 4, 4, 4, -1, -1] and tenant_chunks == 6
    assert seg.tolist() == [0, 2, 2, 3, 3, 6][: k + 1]
    covered = []
    for c in range(n):
        assert 0 < end[c] - begin[c] <= rows_per_chunk
        rows = [int(order[p // t]) * t + p % t for p in range(begin[c], end[c])]
        assert all(int(ids[r // t]) == tenant[c] for r in rows)
        covered += rows
    assert sorted(covered) == list(range(units * t))


# --- GPU --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["per_sequence", "per_token"])
@pytest.mark.parametrize("d", [1, 7, 1023, 4097])
def test_gpu_backends_match_reference(dtype, layout, d):
    for backend in gpu_backends():
        if layout == "per_sequence":
            args = _inputs((7, 33, d), dtype, 6, MIXED_SEQ, device="cuda")
        else:
            args = _inputs((515, d), dtype, 64, torch.randint(-1, 64, (515,)), device="cuda")
        _check_against_reference(backend, *args)


@pytest.mark.gpu
def test_gpu_deterministic_and_bad_ids():
    for backend in gpu_backends():
        h, scales, biases, ids = _inputs((4099, 257), torch.float32, 16, torch.randint(-1, 16, (4099,)), device="cuda")
        g = torch.randn(h.shape, device="cuda")
        first = torch.autograd.grad(rk.gathered_red_edit(h, scales, biases, ids, backend=backend), (scales, biases), g)
        again = torch.autograd.grad(rk.gathered_red_edit(h, scales, biases, ids, backend=backend), (scales, biases), g)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        ids[7] = 16
        with pytest.raises(ValueError, match="tenant_ids"):
            rk.gathered_red_edit(h, scales, biases, ids, backend=backend)


# --- CPU code paths chosen at run time ----------------------------------------------------------

_PATH_PROBE = r"""
import torch, red_kernels as rk
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    h = torch.randn(8, 128, 4097).to(dtype).requires_grad_()  # large enough for the huge-page advice
    ids = torch.tensor([3, -1, 0, 3, 3, 1, -1, 0])
    s = torch.randn(4, 4097, requires_grad=True)
    b = torch.randn(4, 4097, requires_grad=True)
    g = torch.randn(h.shape).to(dtype)
    out = rk.gathered_red_edit(h, s, b, ids, backend="cpu")
    got = torch.autograd.grad(out, (h, s, b), g)
    hu, su, bu = (t.detach().float().requires_grad_() for t in (h, s, b))
    ref = rk.gathered_red_edit_reference(hu, su, bu, ids)
    want = torch.autograd.grad(ref, (hu, su, bu), g.float())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out.float(), ref, rtol=tol, atol=tol), dtype
    assert torch.allclose(got[0].float(), want[0], rtol=tol, atol=tol), dtype
    for a, w in zip(got[1:], want[1:]):
        assert torch.allclose(a, w, rtol=1e-4, atol=1e-3 * w.abs().max().item()), dtype
print("ok")
"""


@pytest.mark.parametrize("env", [*ISA_ENVS, {}], ids=str)
def test_cpu_runtime_paths(env):
    """Every build of the row kernels this CPU can run (base, avx2, avx512) computes the same as the
    default path."""
    if "cpu" not in BACKENDS:
        pytest.skip("compiled extension not built")
    run_cpu_probe(_PATH_PROBE, env)
