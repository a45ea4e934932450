"""para_vector_gen: PARA's prompt-pooled vector generator, fused (gather, down projection,
activation, up projection, bias) forward and backward.

    pooled[b] = h[b, pool_index[b]]                                   [B, d]
    out       = act(pooled @ w_down) @ w_up + b_up                    [B, n_out]

Shapes: h [B, T, d] (any strides), pool_index [B] int64 in [0, T), w_down [d, r], w_up [r, n_out],
b_up [n_out]. The kernel backends run 1 <= r <= 64; automatic selection takes the reference for a
larger rank, an explicit kernel backend raises.

Dtype rule (shared with :mod:`red_kernels.ops.gathered_para_vector_gen`): the three weights share
one dtype W, which may differ from h's dtype (fp32 generator weights on bf16/fp16 activations,
mixed precision). Arithmetic is in fp32, or fp64 when h or W is fp64; the output vectors and the
weight gradients are in W, grad_h in h's dtype.

Backward, with g = grad_out [B, n_out], z = pooled @ w_down, a = act(z)::

    grad_b_up   = sum_b g[b]                      grad_w_up = a^T g
    gz          = (g @ w_up^T) * act'(z)          grad_w_down = pooled^T gz
    grad_h[b, pool_index[b]] = gz[b] @ w_down^T, zero elsewhere

The weight gradients are sums over the batch in a fixed order (deterministic, no atomics). grad_h
is dense: the CPU kernel writes zeros and the B pooled rows in one pass over a fresh tensor advised
onto huge pages (GPU: a memset, then the B rows).

Why not a sparse grad_h (tried, issue 3): a sparse COO gradient of the B pooled rows, which
autograd adds into the residual stream's dense gradient, made the op's forward+backward ~15x faster
than the dense one on a leaf h here (1.5 ms vs 22-26 ms, single thread, B=8, T=512, d=4096), but
``torch.compile(fullgraph=True)`` fails on it ("Operator does not support running with fake
tensors"), a leaf h would get a sparse ``.grad``, and the custom op's fake impl cannot describe a
sparse output. It is not kept. The dense path is already below the cost of ``torch.zeros_like(h)``.

This module also hosts the custom ops shared with ``gathered_para_vector_gen`` (one kernel family:
the plain op is the one-tenant case without tenant ids), so the two public ops cannot drift apart.

Two ways in. The op is microseconds of work (B rows through a rank-12 bottleneck), so per-call
overhead decides its speed: an eager call on the ``cpu``/``cuda`` backends goes straight to the C++
op ``red_kernels_C::para_vector_gen``, whose autograd is registered in C++ (~3 us of overhead,
against ~30 us for a Python custom op with autograd). Under ``torch.compile`` and on the
``reference``/``triton`` backends the call goes through the custom op ``red_kernels::para_vector_gen``
(backend chosen when the graph runs). Both reach the same kernels, and the C++ ops have fake impls
here, so they pass ``torch.library.opcheck`` too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from red_kernels._backend import AUTO, requested_backend, resolve, when_extension_loads
from red_kernels.ops._activations import ACTIVATIONS, activation_backward, activation_code, apply_activation
from red_kernels.ops._common import (
    EXT_BACKENDS,
    call_backward,
    check_floating,
    check_same_device,
    check_tensor_args,
    goes_straight_to_ext,
    index_bounds,
)

OP = "para_vector_gen"
MAX_RANK = 64  # kParaMaxRank in csrc/para/para_vector_gen.h


def _acc(h: Tensor, w: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (h.dtype, w.dtype) else torch.float32


def para_vector_gen_reference(
    h: Tensor, pool_index: Tensor, w_down: Tensor, w_up: Tensor, b_up: Tensor, activation: str = "gelu"
) -> Tensor:
    """Eager, differentiable ground truth: ``act(h[b, pool_index[b]] @ w_down) @ w_up + b_up``
    computed in fp32 (fp64 when h or the weights are fp64), returned in the weights' dtype."""
    acc = _acc(h, w_up)
    pooled = h[torch.arange(h.shape[0], device=h.device), pool_index].to(acc)
    mid = apply_activation(pooled @ w_down.to(acc), activation)
    return (mid @ w_up.to(acc) + b_up.to(acc)).to(w_up.dtype)


def gathered_para_vector_gen_reference(
    h: Tensor,
    pool_index: Tensor,
    w_down: Tensor,
    w_up: Tensor,
    b_up: Tensor,
    tenant_ids: Tensor,
    activation: str = "gelu",
) -> Tensor:
    """Eager, differentiable ground truth of the multi-tenant generator: a loop over the tenants
    present in the batch, each running :func:`para_vector_gen_reference` on its rows; rows of
    tenant -1 get ones and read no weights (K may be 0).

    The ones start out joined to the graph through an empty slice of every input (a sum of no
    elements: exactly 0, and no arithmetic on any value, so an inf weight cannot leak a NaN), so
    backward works and gives zero gradients even when no row has a tenant or the batch is empty."""
    anchor = sum(t[..., :0].sum().to(w_up.dtype) for t in (h, w_down, w_up, b_up))
    out = torch.ones(h.shape[0], w_up.shape[-1], dtype=w_up.dtype, device=h.device) + anchor
    for k in tenant_ids.unique().tolist():
        if k < 0:
            continue
        rows = (tenant_ids == k).nonzero().squeeze(1)
        vec = para_vector_gen_reference(h[rows], pool_index[rows], w_down[k], w_up[k], b_up[k], activation)
        out = out.index_put((rows,), vec)
    return out


# --- checks ------------------------------------------------------------------------------------


def _check_index(idx: Tensor, name: str, batch: int, h: Tensor, op: str) -> None:
    if not isinstance(idx, Tensor):
        raise TypeError(f"red_kernels.{op}: argument '{name}' must be a Tensor, got {type(idx).__name__}")
    if idx.dtype != torch.int64:
        raise ValueError(f"red_kernels.{op}: argument '{name}' must be int64, got {idx.dtype}")
    if idx.dim() != 1 or idx.shape[0] != batch:
        raise ValueError(
            f"red_kernels.{op}: argument '{name}' must have shape [{batch}] (one per sequence of 'h'), "
            f"got {list(idx.shape)}"
        )
    check_same_device(h, "h", idx, name, op)


def _check_range(idx: Tensor, name: str, lo: int, hi: int, what: str, op: str) -> None:
    """Values of ``idx`` in [lo, hi), read on the host (one sync on GPU) before any kernel runs."""
    if idx.numel() == 0:
        return
    mn, mx = index_bounds(idx)
    if mn < lo or mx >= hi:
        raise ValueError(
            f"red_kernels.{op}: argument '{name}' values must lie in [{lo}, {hi}) ({what}), got min {mn} and max {mx}"
        )


def check_args(
    h: Tensor,
    pool_index: Tensor,
    w_down: Tensor,
    w_up: Tensor,
    b_up: Tensor,
    tenant_ids: Tensor | None,
    activation: str,
    values: bool = True,
) -> None:
    """Every argument of both public ops; shapes are [d, r] / [r, n] / [n] without tenant ids and
    [K, d, r] / [K, r, n] / [K, n] with them. ``values`` also checks the index values."""
    op = _op_name(tenant_ids)
    check_floating(h, "h", op)
    if h.dim() != 3:
        raise ValueError(f"red_kernels.{op}: argument 'h' must be [B, T, d], got shape {list(h.shape)}")
    batch, t, d = h.shape
    _check_index(pool_index, "pool_index", batch, h, op)
    lead = 0 if tenant_ids is None else 1
    k_txt = "" if tenant_ids is None else "K, "
    for w, name, dims in ((w_down, "w_down", "d, r"), (w_up, "w_up", "r, n_out"), (b_up, "b_up", "n_out")):
        check_floating(w, name, op)
        if w.dim() != lead + len(dims.split(",")):
            raise ValueError(f"red_kernels.{op}: argument '{name}' must be [{k_txt}{dims}], got shape {list(w.shape)}")
        check_same_device(h, "h", w, name, op)
        if w.dtype != w_down.dtype:
            raise ValueError(
                f"red_kernels.{op}: argument '{name}' has dtype {w.dtype} but 'w_down' has {w_down.dtype}; "
                "the generator's weights must share one dtype"
            )
    k = w_down.shape[0] if tenant_ids is not None else 1
    r, n = w_down.shape[-1], w_up.shape[-1]
    if w_down.shape[lead] != d:
        raise ValueError(
            f"red_kernels.{op}: argument 'w_down' has input size {w_down.shape[lead]} but the last dim of 'h' is {d}"
        )
    if r < 1:
        raise ValueError(f"red_kernels.{op}: argument 'w_down' must have rank r >= 1, got shape {list(w_down.shape)}")
    if tuple(w_up.shape[:-1]) != tuple(w_down.shape[:lead]) + (r,):
        raise ValueError(
            f"red_kernels.{op}: argument 'w_up' must be [{k_txt}r={r}, n_out] to match 'w_down', got {list(w_up.shape)}"
        )
    if tuple(b_up.shape) != tuple(w_down.shape[:lead]) + (n,):
        raise ValueError(
            f"red_kernels.{op}: argument 'b_up' must be [{k_txt}{n}] to match 'w_up', got {list(b_up.shape)}"
        )
    activation_code(activation, op)
    if tenant_ids is not None:
        _check_index(tenant_ids, "tenant_ids", batch, h, op)
    if values:
        _check_range(pool_index, "pool_index", 0, t, "the sequence length of 'h'", op)
        if tenant_ids is not None:
            _check_range(tenant_ids, "tenant_ids", -1, k, "-1 = no generator, K = w_down.shape[0]", op)


# --- backend implementations -------------------------------------------------------------------
# Each takes the caller's weights (plain [d, r], [r, n], [n] without tenant ids; [K, d, r],
# [K, r, n], [K, n] with them) and the activation's integer code, and returns the weight
# gradients in the shapes it was given or in the gathered form (the custom op views them back).


def _act_name(code: int) -> str:
    for name, value in ACTIVATIONS.items():
        if value == code:
            return name
    raise ValueError(f"red_kernels.{OP}: argument 'activation': unknown activation code {code}")


def _gathered_form(w_down, w_up, b_up, tenant_ids):
    if tenant_ids is None:
        return w_down.unsqueeze(0), w_up.unsqueeze(0), b_up.unsqueeze(0)
    return w_down, w_up, b_up


def _fwd_reference(h, pool_index, wd, wu, bu, tenant_ids, act):
    name = _act_name(act)
    if tenant_ids is None:
        return para_vector_gen_reference(h, pool_index, wd, wu, bu, name).contiguous()
    return gathered_para_vector_gen_reference(h, pool_index, wd, wu, bu, tenant_ids, name).contiguous()


def _bwd_reference(grad_out, h, pool_index, wd, wu, bu, tenant_ids, act, need_h, need_w):
    # The backward formulas in eager PyTorch (autograd does not run inside a custom op). The tests
    # check them against autograd through the references above. Only rows with a tenant enter:
    # a tenant -1 row reads no weights and keeps zero gradients.
    name = _act_name(act)
    wd, wu, bu = _gathered_form(wd, wu, bu, tenant_ids)
    acc = _acc(h, wu)
    batch = h.shape[0]
    ids = tenant_ids if tenant_ids is not None else torch.zeros(batch, dtype=torch.int64, device=h.device)
    rows = (ids >= 0).nonzero().squeeze(1)
    kk, pos = ids[rows], pool_index[rows]
    pooled = h[rows, pos].to(acc)  # [M, d]
    wd_rows = wd[kk].to(acc)  # [M, d, r]
    z = torch.einsum("md,mdr->mr", pooled, wd_rows)
    g = grad_out[rows].to(acc)
    gz = activation_backward(torch.einsum("mn,mrn->mr", g, wu[kk].to(acc)), z, name)
    gh = h.new_empty(0)
    if need_h:
        gh_acc = torch.zeros(h.shape, dtype=acc, device=h.device)
        gh_acc[rows, pos] = torch.einsum("mr,mdr->md", gz, wd_rows)
        gh = gh_acc.to(h.dtype)
    if not need_w:
        return gh, wu.new_empty(0), wu.new_empty(0), wu.new_empty(0)
    a = apply_activation(z, name)
    gwd = torch.zeros(wd.shape, dtype=acc, device=h.device)
    gwu = torch.zeros(wu.shape, dtype=acc, device=h.device)
    gbu = torch.zeros(bu.shape, dtype=acc, device=h.device)
    for k in kk.unique().tolist():
        sel = (kk == k).nonzero().squeeze(1)
        gwd[k] = pooled[sel].T @ gz[sel]
        gwu[k] = a[sel].T @ g[sel]
        gbu[k] = g[sel].sum(0)
    return gh, gwd.to(wd.dtype), gwu.to(wu.dtype), gbu.to(bu.dtype)


def _fwd_ext(h, pool_index, wd, wu, bu, tenant_ids, act):
    return torch.ops.red_kernels_C.para_vector_gen(h, pool_index, wd, wu, bu, tenant_ids, act)


def _bwd_ext(grad_out, h, pool_index, wd, wu, bu, tenant_ids, act, need_h, need_w):
    return torch.ops.red_kernels_C.para_vector_gen_bwd(
        grad_out, h, pool_index, wd, wu, bu, tenant_ids, act, need_h, need_w
    )


def _fwd_triton(h, pool_index, wd, wu, bu, tenant_ids, act):
    from red_kernels.triton.para_vector_gen import para_vector_gen_fwd

    return para_vector_gen_fwd(h, pool_index, *_gathered_form(wd, wu, bu, tenant_ids), tenant_ids, act)


def _bwd_triton(grad_out, h, pool_index, wd, wu, bu, tenant_ids, act, need_h, need_w):
    from red_kernels.triton.para_vector_gen import para_vector_gen_bwd

    weights = _gathered_form(wd, wu, bu, tenant_ids)
    return para_vector_gen_bwd(grad_out, h, pool_index, *weights, tenant_ids, act, need_h, need_w)


_FWD = {"reference": _fwd_reference, "cpu": _fwd_ext, "cuda": _fwd_ext, "triton": _fwd_triton}
_BWD = {"reference": _bwd_reference, "cpu": _bwd_ext, "cuda": _bwd_ext, "triton": _bwd_triton}
IMPLEMENTED = tuple(_FWD)


def _op_name(tenant_ids: Tensor | None) -> str:
    return OP if tenant_ids is None else "gathered_para_vector_gen"


def _implemented(backend: str, w_down: Tensor, op: str) -> tuple[str, ...]:
    """The backends that can run a generator of ``w_down``'s rank: every backend up to
    ``MAX_RANK`` (the kernels size their per-thread accumulators by it), only the reference
    beyond. So the automatic choice falls back to the reference for a large rank, and an explicit
    choice of a kernel backend raises, naming the reason. A rank below 1 is bad input, left to the
    argument checks."""
    rank = w_down.shape[-1] if isinstance(w_down, Tensor) and w_down.dim() > 0 else 0
    if rank <= MAX_RANK:
        return IMPLEMENTED
    if backend not in (AUTO, "reference"):
        raise RuntimeError(
            f"red_kernels.{op}: backend {backend!r} cannot run argument 'w_down' of rank {rank}: its kernels "
            f"support ranks 1..{MAX_RANK} (backend='reference' or automatic selection runs any rank)"
        )
    return ("reference",)


def _resolve(backend: str, h: Tensor, w_down: Tensor, tenant_ids: Tensor | None) -> str:
    op = _op_name(tenant_ids)
    return resolve(backend, h.device, op, _implemented(backend, w_down, op))


# --- custom ops --------------------------------------------------------------------------------


@torch.library.custom_op("red_kernels::para_vector_gen", mutates_args=())
def _para_op(
    h: Tensor,
    pool_index: Tensor,
    w_down: Tensor,
    w_up: Tensor,
    b_up: Tensor,
    tenant_ids: Tensor | None,
    activation: str,
    backend: str,
) -> Tensor:
    name = _resolve(backend, h, w_down, tenant_ids)
    # The compiled backends' C++ ops check every argument and the index values themselves (the
    # message names the argument too); checking here as well would cost a second GPU sync.
    if name not in EXT_BACKENDS:
        check_args(h, pool_index, w_down, w_up, b_up, tenant_ids, activation)
    return _FWD[name](h, pool_index, w_down, w_up, b_up, tenant_ids, activation_code(activation, _op_name(tenant_ids)))


@_para_op.register_fake
def _(h, pool_index, w_down, w_up, b_up, tenant_ids, activation, backend):
    check_args(h, pool_index, w_down, w_up, b_up, tenant_ids, activation, values=False)
    return w_up.new_empty((h.shape[0], w_up.shape[-1]))


@torch.library.custom_op("red_kernels::para_vector_gen_backward", mutates_args=())
def _para_backward_op(
    grad_out: Tensor,
    h: Tensor,
    pool_index: Tensor,
    w_down: Tensor,
    w_up: Tensor,
    b_up: Tensor,
    tenant_ids: Tensor | None,
    activation: str,
    need_h: bool,
    need_w: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    name = _resolve(backend, h, w_down, tenant_ids)
    gh, gwd, gwu, gbu = _BWD[name](
        grad_out,
        h,
        pool_index,
        w_down,
        w_up,
        b_up,
        tenant_ids,
        activation_code(activation, _op_name(tenant_ids)),
        need_h,
        need_w,
    )
    if need_w:  # back to the caller's (plain: 2-D/1-D) weight shapes
        gwd, gwu, gbu = gwd.view(w_down.shape), gwu.view(w_up.shape), gbu.view(b_up.shape)
    return gh, gwd, gwu, gbu


def _fake_backward(grad_out, h, pool_index, w_down, w_up, b_up, tenant_ids, activation, need_h, need_w, *_):
    def like(need, t):
        return t.new_empty(t.shape if need else (0,))

    return like(need_h, h), like(need_w, w_down), like(need_w, w_up), like(need_w, b_up)


_para_backward_op.register_fake(_fake_backward)


def _fake_ext_forward(h, pool_index, w_down, w_up, b_up, tenant_ids, activation):
    check_args(h, pool_index, w_down, w_up, b_up, tenant_ids, _act_name(activation), values=False)
    return w_up.new_empty((h.shape[0], w_up.shape[-1]))


def _register_ext_fakes() -> None:
    # Fake impls of the compiled backends' C++ ops, for torch.compile and opcheck. The C++ library
    # names this module as their home (set_python_module in csrc/para/para_vector_gen.cpp), so the
    # registration must be made from here.
    torch.library.register_fake("red_kernels_C::para_vector_gen")(_fake_ext_forward)
    torch.library.register_fake("red_kernels_C::para_vector_gen_bwd")(_fake_backward)


when_extension_loads(_register_ext_fakes)


def _differentiable_backward(grad_out, h, pool_index, w_down, w_up, b_up, tenant_ids, activation, need_h, need_w):
    """_para_backward_op's gradients from the reference backward's eager formulas, which autograd
    differentiates again (for create_graph=True, see call_backward)."""
    code = ACTIVATIONS[activation]
    gh, gwd, gwu, gbu = _bwd_reference(grad_out, h, pool_index, w_down, w_up, b_up, tenant_ids, code, need_h, need_w)
    if need_w:
        gwd, gwu, gbu = gwd.view(w_down.shape), gwu.view(w_up.shape), gbu.view(b_up.shape)
    return gh, gwd, gwu, gbu


def _setup_context(ctx, inputs, output):
    h, pool_index, w_down, w_up, b_up, tenant_ids, activation, backend = inputs
    ctx.need_h = ctx.needs_input_grad[0]
    ctx.need_w = any(ctx.needs_input_grad[2:5])
    ctx.activation, ctx.backend = activation, backend
    ctx.save_for_backward(h, pool_index, w_down, w_up, b_up, tenant_ids)


def _backward(ctx, grad_out):
    h, pool_index, w_down, w_up, b_up, tenant_ids = ctx.saved_tensors
    g = grad_out.contiguous()
    args = (g, h, pool_index, w_down, w_up, b_up, tenant_ids, ctx.activation, ctx.need_h, ctx.need_w)
    gh, gwd, gwu, gbu = call_backward(_para_backward_op, _differentiable_backward, args, ctx.backend)
    need = ctx.needs_input_grad
    return (
        gh if ctx.need_h else None,
        None,
        gwd if need[2] else None,
        gwu if need[3] else None,
        gbu if need[4] else None,
        None,
        None,
        None,
    )


_para_op.register_autograd(_backward, setup_context=_setup_context)


# --- public API --------------------------------------------------------------------------------


def call_para_op(h, pool_index, w_down, w_up, b_up, tenant_ids, activation: str, backend: str) -> Tensor:
    """Both public ops' entry. An eager call on a compiled backend goes straight to the C++ op,
    whose autograd is registered in C++ (about 3 us of overhead instead of the Python custom op's
    ~30 us, which at PARA sizes is as much as the kernel). Under torch.compile, and on the Python
    backends, the call goes through the custom op ``red_kernels::para_vector_gen``, which resolves
    the backend when the graph runs."""
    op = _op_name(tenant_ids)
    args = {"h": h, "pool_index": pool_index, "w_down": w_down, "w_up": w_up, "b_up": b_up}
    check_tensor_args(op, args if tenant_ids is None else {**args, "tenant_ids": tenant_ids})
    if not isinstance(activation, str):
        raise ValueError(f"red_kernels.{op}: argument 'activation' must be a string, got {activation!r}")
    if goes_straight_to_ext(backend, h, op, _implemented(backend, w_down, op)):
        code = activation_code(activation, op)
        return torch.ops.red_kernels_C.para_vector_gen(h, pool_index, w_down, w_up, b_up, tenant_ids, code)
    return _para_op(h, pool_index, w_down, w_up, b_up, tenant_ids, activation, backend)


def para_vector_gen(
    h: Tensor,
    pool_index: Tensor,
    w_down: Tensor,
    w_up: Tensor,
    b_up: Tensor,
    activation: str = "gelu",
    *,
    backend: str | None = None,
) -> Tensor:
    """PARA vector generator ``act(h[b, pool_index[b]] @ w_down) @ w_up + b_up``, fused.

    Args:
        h: a layer's input hidden states ``[B, T, d]``, fp32/fp16/bf16/fp64, any strides.
        pool_index: ``[B]`` int64 in ``[0, T)``: per sequence, the position of its last prompt
            token (see ``red_kernels.last_token_index``).
        w_down: ``[d, r]``; w_up: ``[r, n_out]``; b_up: ``[n_out]``. One dtype for all three, which
            may differ from h's (fp32 weights on bf16 activations).
        activation: ``"gelu"`` (erf, default), ``"gelu_tanh"``, ``"relu"`` or ``"silu"``.
        backend: ``"reference" | "cpu" | "triton" | "cuda" | "auto"``; None defers to
            :func:`red_kernels.use_backend` and ``RED_KERNELS_BACKEND``, else automatic.

    Returns:
        ``[B, n_out]`` in the weights' dtype, computed in fp32 (fp64 for fp64 inputs). Split it
        into the per-projection vectors (e.g. ``l_q, l_v, l_u``) with ``torch.split``.
    """
    return call_para_op(h, pool_index, w_down, w_up, b_up, None, activation, requested_backend(backend))
