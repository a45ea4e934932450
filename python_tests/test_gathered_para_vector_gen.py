"""gathered_para_vector_gen (multi-tenant PARA generation) on every backend that runs here against
the reference that loops over tenants: mixed batches with absent tenants, one tenant, no tenant
(-1 everywhere), K = 1 and K = 64, dtypes, gradcheck, opcheck, compile, determinism, bad ids."""

from __future__ import annotations

import pytest
import torch
from _helpers import cpu_backends, gpu_backends
from _para_helpers import check_against_reference, make_inputs

import red_kernels as rk
from red_kernels.ops.para_vector_gen import _para_backward_op, _para_op

BACKENDS = cpu_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _check(backend, batch, t, d, r, n, k, ids, dtype=torch.float32, wdtype=None, activation="gelu"):
    h, p, wd, wu, bu = make_inputs(batch, t, d, r, n, dtype, wdtype, k=k)
    ids = torch.as_tensor(ids, dtype=torch.int64)
    out, (gh, gwd, gwu, gbu) = check_against_reference(backend, h, p, wd, wu, bu, activation, ids)
    present = set(ids.tolist())
    for kk in range(k):  # absent tenants get exactly zero gradients
        if kk not in present:
            assert not gwd[kk].any() and not gwu[kk].any() and not gbu[kk].any(), f"tenant {kk}"
    none = ids < 0  # rows without a generator: ones out, zero grad_h
    assert torch.equal(out[none], torch.ones_like(out[none]))
    assert not gh[none].any()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,r,n", [(7, 1, 5), (64, 12, 300), (4097, 33, 37)])
def test_mixed_batch_with_absent_tenants(backend, d, r, n):
    _check(backend, 7, 5, d, r, n, 6, [3, -1, 0, 3, 1, -1, 0])  # tenants 2, 4, 5 absent


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_one_tenant(backend):
    _check(backend, 5, 4, 40, 12, 70, 4, [2] * 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_no_tenant(backend):
    out = _check(backend, 4, 3, 24, 5, 19, 3, [-1] * 4)
    assert torch.equal(out, torch.ones_like(out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_bank(backend):
    """K = 0 (no tenant has a generator yet), every row -1: ones, and zero gradients of the right
    shapes; no kernel may read a weight (there is none)."""
    h, p, wd, wu, bu = make_inputs(3, 4, 16, 5, 9, torch.float32, k=0)
    out = rk.gathered_para_vector_gen(h, p, wd, wu, bu, torch.full((3,), -1), backend=backend)
    assert torch.equal(out, torch.ones(3, 9))
    out.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h))
    assert wd.grad.shape == (0, 16, 5) and wu.grad.shape == (0, 5, 9) and bu.grad.shape == (0, 9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_rows_without_tenant_read_no_weights(backend, poison):
    """Rows of tenant -1 never touch any tenant's generator: inf/NaN in the weights of a tenant
    absent from the batch (tenant 0, the one a clamp of -1 would pick) changes no output bit and no
    gradient bit, and the -1 rows get ones and exactly zero grad_h."""
    h, p, wd, wu, bu = make_inputs(5, 4, 24, 6, 11, torch.float32, k=3)
    ids = torch.tensor([2, -1, 1, -1, 2])
    g = torch.randn(5, 11)

    def run(w0):
        ws = []
        for w in (wd, wu, bu):
            w = w.detach().clone()
            w[0] = w0
            ws.append(w.requires_grad_())
        out = rk.gathered_para_vector_gen(h, p, *ws, ids, backend=backend)
        return out, torch.autograd.grad(out, (h, *ws), g)

    clean_out, clean_grads = run(0.0)
    out, grads = run(poison)
    assert torch.equal(out, clean_out) and torch.equal(out[ids < 0], torch.ones(2, 11))
    for got, want in zip(grads, clean_grads):
        assert torch.equal(got, want)
    assert not grads[0][ids < 0].any() and bool(grads[0].isfinite().all())


@pytest.mark.parametrize("batch", [0, 3])
def test_reference_without_tenant_rows_is_differentiable(batch):
    """The eager reference with no row on a generator (every id -1, or an empty batch) still
    joins the graph: backward runs and every gradient is zero, shaped like its input."""
    h, p, wd, wu, bu = make_inputs(batch, 4, 8, 3, 5, torch.float32, k=2)
    out = rk.gathered_para_vector_gen_reference(h, p, wd, wu, bu, torch.full((batch,), -1))
    assert torch.equal(out, torch.ones(batch, 5))
    (out * torch.randn(batch, 5)).sum().backward()
    for t in (h, wd, wu, bu):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_tenant_bank(backend):
    _check(backend, 4, 6, 33, 12, 50, 1, [0, -1, 0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tenants(backend):
    torch.manual_seed(3)
    ids = torch.randint(-1, 64, (40,))
    ids[:3] = torch.tensor([63, 0, 63])
    _check(backend, 40, 4, 32, 4, 24, 64, ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mixed", [True, False], ids=["fp32-weights", "same-dtype-weights"])
def test_dtypes(backend, dtype, mixed):
    if not mixed and dtype in (torch.float32, torch.float64):
        pytest.skip("same as mixed for fp32/fp64")
    _check(backend, 6, 5, 64, 12, 96, 3, [1, 0, -1, 1, 2, 1], dtype, None if mixed else dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,wdtype",
    [
        (torch.float64, torch.bfloat16),
        (torch.bfloat16, torch.float64),
        (torch.float64, torch.float16),
        (torch.float16, torch.float64),
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.float64),
    ],
    ids=str,
)
def test_dtype_mixes(backend, dtype, wdtype):
    """Activations and weights of different dtypes, fp64 with a 16-bit type either way included."""
    _check(backend, 6, 5, 40, 6, 30, 3, [1, 0, -1, 1, 2, 1], dtype, wdtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu_tanh", "relu", "silu"])
def test_activations(backend, activation):
    _check(backend, 5, 3, 30, 6, 20, 3, [2, 0, 2, -1, 1], activation=activation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_plain_op(backend):
    """K = 1 with every row on tenant 0 is the plain op: same kernels, same bits."""
    h, p, wd, wu, bu = make_inputs(5, 7, 48, 12, 64, torch.float32)
    g = torch.randn(5, 64)
    plain = rk.para_vector_gen(h, p, wd, wu, bu, backend=backend)
    gp = torch.autograd.grad(plain, (h, wd, wu, bu), g)
    gathered = rk.gathered_para_vector_gen(
        h, p, wd[None], wu[None], bu[None], torch.zeros(5, dtype=torch.int64), backend=backend
    )
    gg = torch.autograd.grad(gathered, (h, wd, wu, bu), g)
    assert torch.equal(plain, gathered)
    for a, b in zip(gp, gg):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    h, p, wd, wu, bu = make_inputs(0, 3, 16, 4, 9, torch.float32, k=3)
    out = rk.gathered_para_vector_gen(h, p, wd, wu, bu, torch.zeros(0, dtype=torch.int64), backend=backend)
    assert out.shape == (0, 9)
    out.sum().backward()
    for t in (wd, wu, bu):
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_deterministic(backend):
    h, p, wd, wu, bu = make_inputs(33, 9, 257, 12, 515, torch.float32, k=5)
    ids = torch.randint(-1, 5, (33,))
    g = torch.randn(33, 515)

    def run():
        out = rk.gathered_para_vector_gen(h, p, wd, wu, bu, ids, backend=backend)
        return torch.autograd.grad(out, (h, wd, wu, bu), g)

    first = run()
    for _ in range(2):
        for a, b in zip(first, run()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    h, p, wd, wu, bu = make_inputs(4, 3, 4, 2, 3, torch.float64, k=3)
    ids = torch.tensor([2, -1, 0, 2])
    assert torch.autograd.gradcheck(
        lambda *a: rk.gathered_para_vector_gen(a[0], p, *a[1:], ids, backend=backend), (h, wd, wu, bu)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck(backend):
    """Double backward (create_graph=True: gradient penalties, Hessian-vector products) is correct on
    every backend: the backward then computes differentiable formulas instead of calling the
    kernels, whose results autograd cannot see through (cpu returned zero second derivatives with a
    warning, the Python backends raised)."""
    h, p, wd, wu, bu = make_inputs(4, 3, 4, 2, 3, torch.float64, k=3)
    ids = torch.tensor([2, -1, 0, 2])
    assert torch.autograd.gradgradcheck(
        lambda *a: rk.gathered_para_vector_gen(a[0], p, *a[1:], ids, "silu", backend=backend), (h, wd, wu, bu)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    h, p, wd, wu, bu = make_inputs(4, 3, 16, 5, 12, torch.float32, k=3)
    ids = torch.tensor([2, -1, 0, 2])
    torch.library.opcheck(_para_op, (h, p, wd, wu, bu, ids, "gelu", backend))
    hb, pb, wdb, wub, bub = make_inputs(4, 3, 16, 5, 12, torch.bfloat16, k=3)
    torch.library.opcheck(_para_op, (hb, pb, wdb, wub, bub, ids, "silu", backend))
    g = torch.randn(4, 12)
    det = [t.detach() for t in (h, wd, wu, bu)]
    torch.library.opcheck(_para_backward_op, (g, det[0], p, *det[1:], ids, "gelu", True, True, backend))
    torch.library.opcheck(_para_backward_op, (g, det[0], p, *det[1:], ids, "relu", False, True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()

    def f(h, p, wd, wu, bu, ids):
        vec = rk.gathered_para_vector_gen(h, p, wd, wu, bu, ids, backend=backend)
        return (h * vec[:, None, :8]).sum() + vec.square().sum()

    h, p, wd, wu, bu = make_inputs(4, 5, 8, 4, 16, torch.float32, k=3)
    ids = torch.tensor([1, -1, 1, 0])
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    got = compiled(h, p, wd, wu, bu, ids)
    got_grads = torch.autograd.grad(got, (h, wd, wu, bu))
    want = f(h, p, wd, wu, bu, ids)
    want_grads = torch.autograd.grad(want, (h, wd, wu, bu))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    h, p, wd, wu, bu = (t.detach() for t in make_inputs(3, 5, 8, 4, 6, torch.float32, k=4))
    ids = torch.tensor([0, 3, -1])
    cases = [
        ((h, p, wd, wu, bu, torch.tensor([0, 4, 1])), "tenant_ids"),  # == K
        ((h, p, wd, wu, bu, torch.tensor([0, -2, 1])), "tenant_ids"),
        ((h, p, wd, wu, bu, ids.to(torch.int32)), "tenant_ids"),
        ((h, p, wd, wu, bu, ids[:2]), "tenant_ids"),
        ((h, p, wd, wu, bu, ids.to("meta")), "tenant_ids"),
        ((h, torch.tensor([0, 5, 1]), wd, wu, bu, ids), "pool_index"),
        ((h, p, wd[0], wu, bu, ids), "w_down"),  # plain-shaped weights
        ((h, p, wd, wu[:3], bu, ids), "w_up"),  # K mismatch
        ((h, p, wd, wu, bu[:, :5], ids), "b_up"),
        ((h, p, wd, wu, bu.double(), ids), "b_up"),
    ]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            rk.gathered_para_vector_gen(*args, backend=backend)
    with pytest.raises(TypeError, match="tenant_ids"):
        rk.gathered_para_vector_gen(h, p, wd, wu, bu, [0, 1, 2], backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_backends_match_reference(dtype):
    for backend in gpu_backends():
        h, p, wd, wu, bu = make_inputs(16, 40, 4096, 12, 2000, dtype, k=16, device="cuda")
        ids = torch.randint(-1, 16, (16,), device="cuda")
        check_against_reference(backend, h, p, wd, wu, bu, "gelu", ids)
