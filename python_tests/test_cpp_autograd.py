"""The compiled backends' C++ ops carry their own autograd (csrc/common/autograd.h), and eager calls
on the cpu backend go straight to them. For each op: the public call lands on the C++ autograd
node, the C++ op passes opcheck (schema, autograd registration, fake impl, AOT dispatch) in several
argument combinations, its gradients match the custom-op path (what torch.compile uses) bit for
bit, it runs under no_grad and inference_mode, and a leaf's gradient is the tensor the backward
kernel wrote (no clone by autograd)."""

from __future__ import annotations

import pytest
import torch
from _helpers import cpu_backends

import red_kernels as rk
from red_kernels.ops.gathered_red_edit import _gathered_red_edit_op
from red_kernels.ops.para_vector_gen import _para_op
from red_kernels.ops.red_edit import _red_edit_op
from red_kernels.ops.seq_scale import _seq_scale_op

pytestmark = pytest.mark.skipif("cpu" not in cpu_backends(), reason="compiled extension not built")


def _leaf(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _red_edit_case():
    h, s, b = _leaf(3, 4, 16), _leaf(16), _leaf(16)
    return dict(
        node="REDEditFunction",
        public=lambda h, s, b: rk.red_edit(h, s, b, backend="cpu"),
        custom=lambda h, s, b: _red_edit_op(h, s, b, "cpu"),
        args=(h, s, b),
        more_args=[(_leaf(5, 16, dtype=torch.bfloat16), _leaf(16), _leaf(16))],  # mixed precision
        cpp=torch.ops.red_kernels_C.red_edit,
        cpp_args=[
            (h, s, b),
            (h, None, b),
            (h.detach(), s, None),
            (_leaf(5, 16, dtype=torch.bfloat16), _leaf(16), _leaf(16, grad=False)),
        ],
    )


def _seq_scale_case():
    x, v = _leaf(2, 5, 16), _leaf(2, 16)
    idx = torch.tensor([1, 0, 1, 1, 0, 0])
    return dict(
        node="SeqScaleFunction",
        public=lambda x, v, idx=None: rk.seq_scale(x, v, idx, backend="cpu"),
        custom=lambda x, v, idx=None: _seq_scale_op(x, v, idx, "cpu"),
        args=(x, v),
        more_args=[(_leaf(6, 16), _leaf(2, 16), idx), (_leaf(2, 5, 16, dtype=torch.bfloat16), _leaf(2, 16))],
        cpp=torch.ops.red_kernels_C.seq_scale,
        cpp_args=[(x, v, None), (_leaf(6, 16), _leaf(2, 16), idx), (x.detach(), v, None), (x, v.detach(), None)],
    )


def _gathered_red_edit_case():
    h, s, b = _leaf(4, 3, 16), _leaf(3, 16), _leaf(3, 16)
    ids = torch.tensor([1, -1, 1, 0])
    return dict(
        node="GatheredREDEditFunction",
        public=lambda h, s, b: rk.gathered_red_edit(h, s, b, ids, backend="cpu"),
        custom=lambda h, s, b: _gathered_red_edit_op(h, s, b, ids, "cpu"),
        args=(h, s, b),
        more_args=[(_leaf(4, 3, 16, dtype=torch.bfloat16), s, b)],
        cpp=torch.ops.red_kernels_C.gathered_red_edit,
        cpp_args=[
            (h, s, b, ids),
            (h, None, b, ids),
            (h.detach(), s, None, ids),
            (_leaf(6, 16), s, b, ids.repeat(2)[:6]),
        ],
    )


def _para_case():
    h, wd, wu, bu = _leaf(3, 7, 16), _leaf(16, 5), _leaf(5, 12), _leaf(12)
    p = torch.tensor([6, 0, 3])
    gh, gwd, gwu, gbu = _leaf(4, 3, 16, dtype=torch.bfloat16), _leaf(3, 16, 5), _leaf(3, 5, 12), _leaf(3, 12)
    return dict(
        node="ParaVectorGenFunction",
        public=lambda h, wd, wu, bu: rk.para_vector_gen(h, p, wd, wu, bu, backend="cpu"),
        custom=lambda h, wd, wu, bu: _para_op(h, p, wd, wu, bu, None, "gelu", "cpu"),
        args=(h, wd, wu, bu),
        more_args=[(_leaf(3, 7, 16, dtype=torch.bfloat16), wd, wu, bu)],  # fp32 weights on bf16 h
        cpp=torch.ops.red_kernels_C.para_vector_gen,
        cpp_args=[
            (h, p, wd, wu, bu, None, 0),
            (h.detach(), p, wd, wu.detach(), bu, None, 3),
            (gh, torch.tensor([2, 0, 1, 2]), gwd, gwu, gbu, torch.tensor([2, -1, 0, 2]), 1),
        ],
    )


CASES = {
    "red_edit": _red_edit_case,
    "seq_scale": _seq_scale_case,
    "gathered_red_edit": _gathered_red_edit_case,
    "para_vector_gen": _para_case,
}


@pytest.mark.parametrize("op", list(CASES))
def test_eager_call_uses_cpp_autograd(op):
    case = CASES[op]()
    out = case["public"](*case["args"])
    assert case["node"] in out.grad_fn.name()


@pytest.mark.parametrize("op", list(CASES))
def test_opcheck_cpp_op(op):
    case = CASES[op]()
    for args in case["cpp_args"]:
        torch.library.opcheck(case["cpp"], args)


@pytest.mark.parametrize("op", list(CASES))
def test_cpp_and_custom_op_paths_agree(op):
    """Same kernels, two autograd wirings: bit-equal outputs and gradients, incl. mixed precision
    (fp32 parameters on bf16 activations) and packed indices."""
    case = CASES[op]()
    for args in [case["args"], *case["more_args"]]:
        wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        out_cpp = case["public"](*args)
        out_custom = case["custom"](*args)
        assert "CppNode" not in out_custom.grad_fn.name()
        g = torch.randn_like(out_cpp)
        grads_cpp = torch.autograd.grad(out_cpp, wrt, g)
        grads_custom = torch.autograd.grad(out_custom, wrt, g)
        assert torch.equal(out_cpp, out_custom)
        for a, b in zip(grads_cpp, grads_custom):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("op", list(CASES))
def test_partial_gradients(op):
    """Only some inputs need a gradient: each gets exactly its gradient, the others none."""
    case = CASES[op]()
    full = torch.autograd.grad(case["public"](*case["args"]).sum(), case["args"])
    for i in range(len(case["args"])):
        args = [a.detach().requires_grad_(j == i) for j, a in enumerate(case["args"])]
        (got,) = torch.autograd.grad(case["public"](*args).sum(), args[i])
        assert torch.equal(got, full[i])


@pytest.mark.parametrize("op", list(CASES))
def test_without_autograd(op):
    case = CASES[op]()
    want = case["public"](*case["args"]).detach()
    with torch.no_grad():
        assert torch.equal(case["public"](*case["args"]), want)
    with torch.inference_mode():
        assert torch.equal(case["public"](*case["args"]), want)


@pytest.mark.parametrize("op", list(CASES))
def test_leaf_grad_is_not_cloned(op):
    """The gradient the backward kernel wrote becomes the leaf's .grad itself: an extra reference
    kept by the C++ backward would make autograd clone it (for grad_h, the size of the
    activations; it did, and made para_vector_gen's forward+backward 5x slower)."""
    case = CASES[op]()
    x = case["args"][0]
    seen = []
    x.register_hook(lambda g: seen.append(g.data_ptr()))
    case["public"](*case["args"]).sum().backward()
    assert seen == [x.grad.data_ptr()]


@pytest.mark.parametrize("op", list(CASES))
def test_create_graph_takes_the_differentiable_backward(op):
    """Under create_graph=True the C++ backward builds its gradients from differentiable ATen ops
    (they join the new graph and agree with the kernels' gradients); without it, the kernels run and
    the gradients are plain tensors (no graph, nothing of the differentiable path's cost)."""
    case = CASES[op]()
    args = [a.detach().double().requires_grad_() for a in case["args"]]
    out = case["public"](*args)
    assert case["node"] in out.grad_fn.name()
    g = torch.randn_like(out)
    plain = torch.autograd.grad(out, args, g, retain_graph=True)
    graph = torch.autograd.grad(out, args, g, create_graph=True)
    assert not any(t.requires_grad for t in plain)
    assert any(t.requires_grad for t in graph)
    for a, b in zip(plain, graph):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


def test_create_graph_keeps_nan_and_inf_where_the_kernels_do():
    """The create_graph backward gives the kernels' gradients also with NaN/inf inputs: a NaN in one
    sequence's or tenant's rows stays in that one's gradient (a one-hot matmul would spread it to
    all as 0 * NaN), PARA rows of tenant -1 read no weights (an inf in an absent tenant's generator
    stays out), and a bank with no tenant (K = 0) works."""
    f64 = dict(dtype=torch.float64)
    x = torch.randn(6, 8, **f64)
    x[1, 3] = float("nan")
    idx = torch.tensor([1, 0, 1, 1, 2, 0])
    h, p = torch.randn(3, 2, 8, **f64), torch.tensor([1, 0, 1])
    wd, wu, bu = torch.randn(2, 8, 4, **f64), torch.randn(2, 4, 5, **f64), torch.randn(2, 5, **f64)
    wd[0, 2, 1] = float("inf")
    empty = (torch.empty(0, 8, 4, **f64), torch.empty(0, 4, 5, **f64), torch.empty(0, 5, **f64))
    cases = [
        (lambda a, b: rk.seq_scale(a, b, idx, backend="cpu"), (x, torch.randn(3, 8, **f64))),
        (lambda a, b: rk.gathered_red_edit(a, b, None, idx - 1, backend="cpu"), (x, torch.randn(2, 8, **f64))),
        (
            lambda *a: rk.gathered_para_vector_gen(a[0], p, *a[1:], torch.tensor([1, -1, 1]), backend="cpu"),
            (h, wd, wu, bu),
        ),
        (lambda *a: rk.gathered_para_vector_gen(a[0], p, *a[1:], torch.full((3,), -1), backend="cpu"), (h, *empty)),
    ]
    for fn, args in cases:
        args = [a.clone().requires_grad_() for a in args]
        out = fn(*args)
        g = torch.randn_like(out)
        plain = torch.autograd.grad(out, args, g, retain_graph=True, allow_unused=True)
        graph = torch.autograd.grad(out, args, g, create_graph=True, allow_unused=True)
        for a, b in zip(plain, graph):
            if a is None or b is None:
                assert a is None and b is None or not (a if a is not None else b).any()
                continue
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12, equal_nan=True)
