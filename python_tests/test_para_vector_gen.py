"""para_vector_gen on every backend that runs here against the eager reference: forward and all four
gradients, dtypes (incl. fp32 weights on bf16/fp16 h), awkward sizes, activations, strides, empty
batches, gradcheck, opcheck, compile, determinism, bad input, and the PARAVectorGenerator module."""

from __future__ import annotations

import pytest
import torch
from _helpers import ISA_ENVS, cpu_backends, gpu_backends, run_cpu_probe
from _para_helpers import check_against_reference, close, make_inputs

import red_kernels as rk
from red_kernels.ops.para_vector_gen import _para_backward_op, _para_op

BACKENDS = cpu_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ACTIVATIONS = ["gelu", "gelu_tanh", "relu", "silu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [7, 64, 4097])
@pytest.mark.parametrize("r", [1, 12, 33])
@pytest.mark.parametrize("t", [1, 5, 300])
def test_sizes(backend, d, r, t):
    check_against_reference(backend, *make_inputs(3, t, d, r, 37, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mixed", [True, False], ids=["fp32-weights", "same-dtype-weights"])
@pytest.mark.parametrize("d", [64, 4097])
def test_dtypes(backend, dtype, mixed, d):
    if not mixed and dtype in (torch.float32, torch.float64):
        pytest.skip("same as mixed for fp32/fp64")
    wdtype = None if mixed else dtype
    check_against_reference(backend, *make_inputs(4, 6, d, 12, 300, dtype, wdtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_weights_on_fp32_h(backend):
    check_against_reference(backend, *make_inputs(3, 4, 33, 5, 17, torch.float32, torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hdtype", DTYPES, ids=str)
@pytest.mark.parametrize("wdtype", DTYPES, ids=str)
def test_every_dtype_mix(backend, hdtype, wdtype):
    """Every (h, weights) dtype pair the API accepts, fp64 with bf16/fp16 either way included (the
    Triton kernels once converted fp64 <-> bf16 directly: NaN outputs and zero gradients)."""
    check_against_reference(backend, *make_inputs(3, 4, 33, 5, 17, hdtype, wdtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations(backend, activation):
    # Larger bottleneck values so relu's kink and the tails of gelu/silu are all exercised.
    h, p, wd, wu, bu = make_inputs(5, 4, 48, 12, 70, torch.float32)
    wd = (wd.detach() * 3).requires_grad_()
    check_against_reference(backend, h, p, wd, wu, bu, activation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_like_widths(backend):
    """n_out = n_q + n_v + n_u at a small scale, r = 64 (the kernels' largest rank)."""
    check_against_reference(backend, *make_inputs(2, 9, 256, 64, 2 * 256 + 688, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_non_contiguous_h(backend, layout):
    d = 37
    if layout == "transposed":  # last-dim stride != 1
        base = torch.randn(d, 6, 3).permute(2, 1, 0)
    elif layout == "sliced":  # rows with a gap, sequences with a gap
        base = torch.randn(3, 12, d + 11)[:, ::2, :d]
    else:  # zero-stride batch dim
        base = torch.randn(1, 6, d).expand(3, 6, d)
    assert not base.is_contiguous()
    h = base.detach().requires_grad_()
    _, p, wd, wu, bu = make_inputs(3, 6, d, 4, 19, torch.float32)
    check_against_reference(backend, h, p, wd, wu, bu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_weights(backend):
    h, p, wd, wu, bu = make_inputs(3, 4, 20, 6, 30, torch.float32)
    wd_t = wd.detach().T.contiguous().T.requires_grad_()  # [d, r] stored column-major
    wu_s = torch.randn(6, 60)[:, ::2].contiguous()[:, :30].clone().T.contiguous().T.requires_grad_()
    check_against_reference(backend, h, p, wd_t, wu_s, bu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    h, p, wd, wu, bu = make_inputs(0, 5, 16, 4, 9, torch.float32)
    out = rk.para_vector_gen(h, p, wd, wu, bu, backend=backend)
    assert out.shape == (0, 9)
    out.sum().backward()
    for t in (wd, wu, bu):
        assert torch.equal(t.grad, torch.zeros_like(t))
    assert h.grad.shape == h.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_h_only_at_pooled_rows(backend):
    h, p, wd, wu, bu = make_inputs(4, 7, 16, 3, 10, torch.float32)
    p = torch.tensor([6, 0, 3, 3])
    out = rk.para_vector_gen(h, p, wd, wu, bu, backend=backend)
    (gh,) = torch.autograd.grad(out.square().sum(), h)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[torch.arange(4), p] = True
    assert torch.count_nonzero(gh[~mask]) == 0
    assert bool((gh[mask].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["weights_only", "h_only", "w_up_only"])
def test_partial_requires_grad(backend, which):
    h, p, wd, wu, bu = make_inputs(3, 5, 24, 4, 11, torch.float32)
    if which == "weights_only":  # frozen backbone below the first PARA layer
        h = h.detach()
    elif which == "h_only":
        wd, wu, bu = wd.detach(), wu.detach(), bu.detach()
    else:
        h, wd, bu = h.detach(), wd.detach(), bu.detach()
    out = rk.para_vector_gen(h, p, wd, wu, bu, backend=backend)
    ref = rk.para_vector_gen_reference(h, p, wd, wu, bu)
    params = [t for t in (h, wd, wu, bu) if t.requires_grad]
    got = torch.autograd.grad(out.square().sum(), params)
    want = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(got, want):
        close(a, b, None, which)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_deterministic(backend):
    h, p, wd, wu, bu = make_inputs(9, 33, 515, 12, 1031, torch.float32)
    g = torch.randn(9, 1031)
    first = torch.autograd.grad(rk.para_vector_gen(h, p, wd, wu, bu, backend=backend), (h, wd, wu, bu), g)
    for _ in range(2):
        again = torch.autograd.grad(rk.para_vector_gen(h, p, wd, wu, bu, backend=backend), (h, wd, wu, bu), g)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_saves_no_activation_sized_copies():
    """Autograd keeps the inputs (h by reference) and nothing new of h's size."""
    h, p, wd, wu, bu = make_inputs(3, 64, 128, 4, 20, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rk.para_vector_gen(h, p, wd, wu, bu, backend="reference" if "cpu" not in BACKENDS else "cpu")
    big = [t for t in saved if t.numel() >= h.numel()]
    assert len(big) == 1 and big[0].data_ptr() == h.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(backend, activation):
    h, p, wd, wu, bu = make_inputs(2, 3, 4, 2, 3, torch.float64)
    p = torch.tensor([2, 0])
    assert torch.autograd.gradcheck(
        lambda *a: rk.para_vector_gen(a[0], p, *a[1:], activation, backend=backend), (h, wd, wu, bu)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradgradcheck(backend, activation):
    """Double backward (create_graph=True: gradient penalties, Hessian-vector products) is correct on
    every backend: the backward then computes differentiable formulas instead of calling the
    kernels, whose results autograd cannot see through (cpu returned zero second derivatives with a
    warning, the Python backends raised)."""
    h, p, wd, wu, bu = make_inputs(2, 3, 4, 2, 3, torch.float64)
    p = torch.tensor([2, 0])
    assert torch.autograd.gradgradcheck(
        lambda *a: rk.para_vector_gen(a[0], p, *a[1:], activation, backend=backend), (h, wd, wu, bu)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    h, p, wd, wu, bu = make_inputs(3, 4, 16, 5, 12, torch.float32)
    torch.library.opcheck(_para_op, (h, p, wd, wu, bu, None, "gelu", backend))
    torch.library.opcheck(_para_op, (h.detach(), p, wd, wu, bu, None, "silu", backend))
    hb, pb, wdb, wub, bub = make_inputs(3, 4, 16, 5, 12, torch.bfloat16)
    torch.library.opcheck(_para_op, (hb, pb, wdb, wub, bub, None, "relu", backend))
    g = torch.randn(3, 12)
    det = [t.detach() for t in (h, wd, wu, bu)]
    torch.library.opcheck(_para_backward_op, (g, det[0], p, *det[1:], None, "gelu", True, True, backend))
    torch.library.opcheck(_para_backward_op, (g, det[0], p, *det[1:], None, "gelu", False, True, backend))
    torch.library.opcheck(_para_backward_op, (g, det[0], p, *det[1:], None, "gelu", True, False, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()

    def f(h, p, wd, wu, bu):
        vec = rk.para_vector_gen(h * 2, p, wd, wu, bu, backend=backend)
        l_q, l_v = vec.split([8, 8], dim=-1)
        return (h * l_q[:, None, :]).sum() + l_v.square().sum()

    h, p, wd, wu, bu = make_inputs(3, 5, 8, 4, 16, torch.float32)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    got = compiled(h, p, wd, wu, bu)
    got_grads = torch.autograd.grad(got, (h, wd, wu, bu))
    want = f(h, p, wd, wu, bu)
    want_grads = torch.autograd.grad(want, (h, wd, wu, bu))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


# --- NaN and inf ----------------------------------------------------------------------------------


def _nan_inf_inputs(where, dtype):
    """Four rows: a NaN, a +inf and a -inf reach the bottleneck through ``where`` (h's pooled rows,
    or entries of w_down or w_up), and row 3 stays finite when they are in h. r = 8 runs the AVX2
    down projection for fp32."""
    h, _, wd, wu, bu = (t.detach() for t in make_inputs(4, 3, 5, 8, 6, dtype))
    p = torch.tensor([1, 0, 2, 1])
    specials = (float("nan"), float("inf"), float("-inf"))
    for i, v in enumerate(specials):
        if where == "h":
            h[i, p[i], i] = v
        elif where == "w_down":
            wd[i, i] = v
        else:
            wu[i, 2 * i] = v
    return h, p, wd, wu, bu


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpu")])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("where", ["h", "w_down", "w_up"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nan_inf_like_reference(backend, activation, where, dtype):
    """NaN and +-inf come out of the forward and every gradient exactly where the reference (autograd
    through para_vector_gen_reference) puts them; relu must not turn NaN into 0 (the C++ kernels
    did: relu(NaN) = 0, and relu'(NaN) = 0 where torch passes the gradient). The reference runs in
    fp64: torch's vectorised fp32 GELU returns NaN for +inf, its scalar path and fp64 return +inf."""
    h, p, wd, wu, bu = _nan_inf_inputs(where, dtype)
    params = [t.requires_grad_() for t in (h, wd, wu, bu)]
    g = torch.randn(4, 6, dtype=dtype)
    out = rk.para_vector_gen(h, p, wd, wu, bu, activation, backend=backend)
    grads = torch.autograd.grad(out, params, g)
    ups = [t.detach().double().requires_grad_() for t in params]
    ref = rk.para_vector_gen_reference(ups[0], p, *ups[1:], activation)
    ref_grads = torch.autograd.grad(ref, ups, g.double())
    assert not ref.isfinite().all(), "the inputs should reach the output"
    names = ("out", "grad_h", "grad_w_down", "grad_w_up", "grad_b_up")
    for name, got, want in zip(names, (out, *grads), (ref, *ref_grads)):
        where = f"{backend} {name}"
        torch.testing.assert_close(
            got.double(), want, rtol=1e-4, atol=1e-4, equal_nan=True, msg=lambda m, w=where: f"{w}: {m}"
        )


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    h, p, wd, wu, bu = (t.detach() for t in make_inputs(3, 5, 8, 4, 6, torch.float32))
    cases = [
        ((h, torch.tensor([0, 5, 1]), wd, wu, bu), "pool_index"),  # == T
        ((h, torch.tensor([0, -1, 1]), wd, wu, bu), "pool_index"),  # negative
        ((h, p.to(torch.int32), wd, wu, bu), "pool_index"),
        ((h, p[:2], wd, wu, bu), "pool_index"),
        ((h, p.view(3, 1), wd, wu, bu), "pool_index"),
        ((h, p.to("meta"), wd, wu, bu), "pool_index"),
        ((h[0], p, wd, wu, bu), "'h'"),
        ((h.to(torch.int32), p, wd, wu, bu), "'h'"),
        ((h, p, wd[:7], wu, bu), "w_down"),
        ((h, p, wd[None], wu, bu), "w_down"),
        ((h, p, wd, wu[:3], bu), "w_up"),
        ((h, p, wd, wu, bu[:5]), "b_up"),
        ((h, p, wd, wu.double(), bu), "w_up"),
        ((h, p, wd, wu, bu.to("meta")), "b_up"),
        ((h, p, wd.to(torch.int64), wu, bu), "w_down"),
    ]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            rk.para_vector_gen(*args, backend=backend)
    with pytest.raises(ValueError, match="activation"):
        rk.para_vector_gen(h, p, wd, wu, bu, "tanh", backend=backend)
    with pytest.raises(ValueError, match="pool_index"):  # T = 0: no valid position
        rk.para_vector_gen(torch.randn(3, 0, 8), p, wd, wu, bu, backend=backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_rank_limit_of_kernels(backend):
    """An explicit kernel backend cannot run a rank above 64: a RuntimeError naming the op, the
    argument and the limit, whichever way the backend was chosen."""
    h, p, wd, wu, bu = (t.detach() for t in make_inputs(2, 3, 8, 65, 6, torch.float32))
    with pytest.raises(RuntimeError, match=r"red_kernels\.para_vector_gen: .*'w_down' of rank 65.*1\.\.64"):
        rk.para_vector_gen(h, p, wd, wu, bu, backend=backend)
    with pytest.raises(RuntimeError, match=r"red_kernels\.gathered_para_vector_gen: .*rank 65"):
        rk.gathered_para_vector_gen(
            h, p, wd[None], wu[None], bu[None], torch.zeros(2, dtype=torch.int64), backend=backend
        )
    with rk.use_backend(backend), pytest.raises(RuntimeError, match="rank 65"):
        rk.para_vector_gen(h, p, wd, wu, bu)
    rk.para_vector_gen(h, p, wd, wu, bu, backend="reference")  # the reference has no limit


@pytest.mark.parametrize("backend", [None, "auto"])
def test_automatic_choice_runs_any_rank(backend):
    """Automatic selection falls back to a backend that runs the rank (the reference) instead of
    picking a kernel backend that would refuse it; forward and gradients match the reference."""
    check_against_reference(backend, *make_inputs(3, 4, 16, 100, 9, torch.float32))
    h, p, wd, wu, bu = make_inputs(3, 4, 16, 65, 9, torch.float32, k=2)
    check_against_reference(backend, h, p, wd, wu, bu, "gelu", torch.tensor([1, -1, 0]))


def test_module_with_a_rank_above_the_kernels():
    """PARAVectorGenerator(rank=100) trains under automatic backend selection."""
    gen = rk.nn.PARAVectorGenerator(16, (4, 6), rank=100)
    with torch.no_grad():
        gen.w_up.normal_()
    h = torch.randn(2, 5, 16, requires_grad=True)
    a, b = gen(h, torch.tensor([4, 1]))
    assert a.shape == (2, 4) and b.shape == (2, 6)
    (a.sum() + b.square().sum()).backward()
    assert gen.w_down.grad.abs().sum() > 0 and h.grad.abs().sum() > 0


def test_cpp_checks_name_the_op_and_argument():
    """The compiled ops check their arguments and index values too (C++ callers skip Python); every
    message reads "red_kernels.<op>: argument '<name>' ...", with the public op's name (the plain
    or the multi-tenant generator, as the Python checks say it)."""
    if "cpu" not in BACKENDS:
        pytest.skip("compiled extension not built")
    op = torch.ops.red_kernels_C.para_vector_gen
    h, p, wd, wu, bu = (t.detach() for t in make_inputs(3, 5, 8, 4, 6, torch.float32))
    plain, gathered = r"^red_kernels\.para_vector_gen: argument", r"^red_kernels\.gathered_para_vector_gen: argument"
    with pytest.raises(ValueError, match=f"{plain} 'pool_index' values must lie in"):
        op(h, torch.tensor([0, 7, 1]), wd, wu, bu, None, 0)
    with pytest.raises(ValueError, match=f"{gathered} 'tenant_ids' values must lie in"):
        op(h, p, wd[None], wu[None], bu[None], torch.tensor([0, 1, 0]), 0)
    with pytest.raises(ValueError, match=f"{plain} 'w_down' must be"):
        op(h, p, torch.stack([wd, wd]), wu, bu, None, 0)  # K = 2 without tenant ids
    with pytest.raises(ValueError, match=f"{plain} 'w_up' has shape"):
        op(h, p, wd, wu[:3], bu, None, 0)
    with pytest.raises(ValueError, match=f"{plain} 'b_up' has shape"):
        op(h, p, wd, wu, bu[:5], None, 0)
    with pytest.raises(ValueError, match=f"{plain} 'activation' has unknown activation code 9"):
        op(h, p, wd, wu, bu, None, 9)
    with pytest.raises(ValueError, match=f"{plain} 'w_down' must be float32.*Float8"):
        rk.para_vector_gen(h, p, *(w.to(torch.float8_e4m3fn) for w in (wd, wu, bu)), backend="cpu")
    with pytest.raises(ValueError, match=r"^red_kernels\.para_vector_gen_bwd: argument 'grad_out' must have shape"):
        torch.ops.red_kernels_C.para_vector_gen_bwd(torch.randn(3, 5), h, p, wd, wu, bu, None, 0, True, True)


# --- Triton kernels compiled for a GPU (no GPU needed) ---------------------------------------------

_GPU_COMPILE_PROBE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from red_kernels.triton import para_vector_gen as m

ACC = {"a_ptr", "gz_ptr"}
IDX = {"pidx_ptr", "tid_ptr", "rows_ptr", "off_ptr"}
MIXES = [("fp32", "fp32", 0), ("bf16", "fp32", 1), ("fp64", "bf16", 0), ("bf16", "fp64", 1), ("fp16", "fp64", 0)]
for kernel in (m._fwd_kernel, m._bwd_rows_kernel, m._bwd_w_up_kernel, m._bwd_w_down_kernel):
    for hdt, wdt, act in MIXES:
        fp64 = "fp64" in (hdt, wdt)
        sig, consts = {}, {}
        for p in kernel.params:
            if p.is_constexpr:
                sig[p.name] = "constexpr"
                flags = {"ACT": act, "FP64": fp64, "BLOCK_R": 16}
                consts[p.name] = flags.get(p.name, 64 if p.name.startswith("BLOCK") else True)
            elif p.name in IDX:
                sig[p.name] = "*i64"
            elif p.name in ACC:
                sig[p.name] = "*fp64" if fp64 else "*fp32"
            elif p.name.endswith("_ptr"):
                sig[p.name] = "*" + (hdt if p.name in ("h_ptr", "gh_ptr") else wdt)
            else:
                sig[p.name] = "i64"
        triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
print("ok")
"""


def test_triton_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter runs code that compiled Triton rejects (plain float globals in @jit code once
    kept every para kernel from compiling): lower each kernel to a cubin for sm_90 over the dtype
    mixes that convert through fp32 and both GELUs, in a process without TRITON_INTERPRET. No GPU needed (ptxas ships
    with the triton wheel)."""
    import os
    import shutil
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    if not shutil.which("ptxas") and not os.path.exists(
        os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    ):
        pytest.skip("no ptxas for the nvidia backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _GPU_COMPILE_PROBE], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# --- module ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_init_is_identity_and_trains(backend):
    torch.manual_seed(1)
    gen = rk.nn.PARAVectorGenerator(32, (16, 8, 40), rank=12, backend=backend)
    assert gen.w_down.shape == (32, 12) and gen.w_up.shape == (12, 64) and gen.b_up.shape == (64,)
    assert torch.equal(gen.w_up, torch.zeros_like(gen.w_up)) and torch.equal(gen.b_up, torch.ones_like(gen.b_up))
    assert abs(gen.w_down.std().item() - 0.02) < 0.005
    h = torch.randn(3, 7, 32, requires_grad=True)
    p = torch.tensor([6, 2, 0])
    l_q, l_v, l_u = gen(h, p)
    assert (l_q.shape, l_v.shape, l_u.shape) == ((3, 16), (3, 8), (3, 40))
    for v in (l_q, l_v, l_u):
        assert torch.equal(v, torch.ones_like(v))  # the model is unchanged at step 0
    (l_q.sum() + 2 * l_v.sum() + 3 * l_u.sum()).backward()
    assert gen.w_up.grad.abs().sum() > 0 and gen.b_up.grad.abs().sum() > 0
    # w_up = 0 at init: no gradient reaches w_down or h yet (exactly as in the paper's set-up)
    assert torch.count_nonzero(gen.w_down.grad) == 0


def test_module_bf16_activations_fp32_params():
    gen = rk.nn.PARAVectorGenerator(16, (4, 4), rank=3)
    with torch.no_grad():
        gen.w_up.normal_()
    h = torch.randn(2, 3, 16).bfloat16()
    a, b = gen(h, torch.tensor([1, 2]))
    assert a.dtype == torch.float32 and b.shape == (2, 4)
    ref = rk.para_vector_gen_reference(h, torch.tensor([1, 2]), gen.w_down, gen.w_up, gen.b_up)
    torch.testing.assert_close(torch.cat([a, b], -1), ref)


def test_module_bad_config():
    with pytest.raises(ValueError, match="out_sizes"):
        rk.nn.PARAVectorGenerator(16, ())
    with pytest.raises(ValueError, match="activation"):
        rk.nn.PARAVectorGenerator(16, (4,), activation="tanh")


# --- GPU ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 7, 1, 5), (3, 300, 4097, 12, 1000), (8, 17, 64, 33, 19200)])
def test_gpu_backends_match_reference(dtype, shape):
    for backend in gpu_backends():
        check_against_reference(backend, *make_inputs(*shape, dtype, device="cuda"))


@pytest.mark.gpu
def test_gpu_deterministic():
    h, p, wd, wu, bu = make_inputs(16, 40, 4096, 12, 19200, torch.bfloat16, device="cuda")
    g = torch.randn(16, 19200, device="cuda")
    for backend in gpu_backends():
        first = torch.autograd.grad(rk.para_vector_gen(h, p, wd, wu, bu, backend=backend), (h, wd, wu, bu), g)
        again = torch.autograd.grad(rk.para_vector_gen(h, p, wd, wu, bu, backend=backend), (h, wd, wu, bu), g)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# --- CPU code paths chosen at run time -------------------------------------------------------------

_PATH_PROBE = r"""
import torch, red_kernels as rk
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    w = torch.float64 if dtype == torch.float64 else torch.float32
    h = torch.randn(4, 130, 1031).to(dtype).requires_grad_()  # grad_h large enough for huge pages
    p = torch.tensor([129, 0, 64, 7])
    wd = (torch.randn(1031, 12, dtype=w) / 32).requires_grad_()
    wu = torch.randn(12, 777, dtype=w).requires_grad_()
    bu = torch.randn(777, dtype=w).requires_grad_()
    g = torch.randn(4, 777, dtype=w)
    out = rk.para_vector_gen(h, p, wd, wu, bu, backend="cpu")
    got = torch.autograd.grad(out, (h, wd, wu, bu), g)
    ref = rk.para_vector_gen_reference(h, p, wd, wu, bu)
    want = torch.autograd.grad(ref, (h, wd, wu, bu), g)
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4), dtype
    for a, b in zip(got, want):
        assert torch.allclose(a.to(w), b.to(w), rtol=tol, atol=tol * b.abs().max().item()), dtype
# NaN, +inf, -inf in the pooled rows (r = 8 and n = 16 fill the AVX2 tiles): as in the fp64 reference.
for act in ("gelu", "gelu_tanh", "relu", "silu"):
    h = torch.randn(3, 2, 20)
    h[:, 1, 0] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    p = torch.ones(3, dtype=torch.int64)
    args = [t.requires_grad_() for t in (h, torch.randn(20, 8), torch.randn(8, 16), torch.randn(16))]
    g = torch.randn(3, 16)
    out = rk.para_vector_gen(args[0], p, *args[1:], act, backend="cpu")
    got = [out, *torch.autograd.grad(out, args, g)]
    ups = [t.detach().double().requires_grad_() for t in args]
    ref = rk.para_vector_gen_reference(ups[0], p, *ups[1:], act)
    for a, b in zip(got, [ref, *torch.autograd.grad(ref, ups, g.double())]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, equal_nan=True, msg=act)
print("ok")
"""


@pytest.mark.parametrize("env", [*ISA_ENVS, {"RED_KERNELS_NO_HUGE_PAGES": "1"}, {}], ids=str)
def test_cpu_runtime_paths(env):
    """Every build of the loops this CPU can run (base, avx2, avx512) and the allocation without
    huge-page advice compute the same as the default path."""
    if "cpu" not in BACKENDS:
        pytest.skip("compiled extension not built")
    run_cpu_probe(_PATH_PROBE, env)
