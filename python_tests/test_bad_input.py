"""Bad input, as a catalogue: wrong calls to every public op function (red_edit, seq_scale,
gathered_red_edit, para_vector_gen, gathered_para_vector_gen, last_token_index) on every backend that
runs here, and to the nn module constructors (REDEdit, PARAVectorGenerator).

Each row of the table is (call, expected exception type, the argument the message must name). The
contract (DESIGN.md, README "Bad input"): a wrong shape, dtype, device, index value or width raises
``ValueError``, a non-tensor where a tensor belongs raises ``TypeError``, and the message names the
op as ``red_kernels.<op>`` (``red_kernels.nn.<Module>`` for the modules) and the argument in quotes
(``'scale'``) -- checked on the host before any kernel reads memory, so never a crash, a hang or a
silent out-of-bounds read. A few rows are valid calls that must *not* raise: index views whose
base holds out-of-range values in the memory the view skips.

The calls run in a subprocess (one for the whole table, reporting case by case): a call that
segfaults or hangs fails its own row, and the subprocess restarts at the next row. Model-level bad
input (patch_model, load_adapter, ...) lives with the model tests.
"""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from _helpers import cpu_backends

import red_kernels as rk

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(rk.__file__)))
BACKENDS = cpu_backends()  # reference, cpu, triton (interpreted): every backend that runs here
KERNEL_BACKENDS = tuple(b for b in BACKENDS if b != "reference")
ANY = "any"  # rows that take no backend (last_token_index, the module constructors)
CASE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Case:
    id: str
    op: str  # the message must contain "red_kernels.<op>"
    call: Callable[[str], object]  # backend -> the call
    exc: type | tuple[type, ...] | None  # None: a valid call that must succeed
    arg: str = ""  # the message must contain "'<arg>'"
    backends: tuple[str, ...] | None = None  # None: every backend; (ANY,): backend-independent


# --- inputs --------------------------------------------------------------------------------------


def _f(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _i(*values):
    return torch.tensor(values, dtype=torch.int64)


def _poisoned(values, poison=1 << 40):
    """``values`` as every other element of a base whose other elements are ``poison``: a valid
    index view over memory that must not be read."""
    base = torch.full((2 * len(values),), poison, dtype=torch.int64)
    base[::2] = torch.tensor(values, dtype=torch.int64)
    return base[::2]


def _expanded(value, n):
    return torch.tensor([value], dtype=torch.int64).expand(n)


META = "meta"


# --- the table -------------------------------------------------------------------------------------


def _red_edit_cases() -> list[Case]:
    op = "red_edit"

    def c(id_, args, exc, arg):
        return Case(f"{op}-{id_}", op, lambda be: rk.red_edit(*args(), backend=be), exc, arg)

    h = lambda: _f(4, 8)  # noqa: E731
    return [
        c("scale_width", lambda: (h(), _f(7), None), ValueError, "scale"),
        c("bias_width", lambda: (h(), None, _f(9)), ValueError, "bias"),
        c("scale_2d", lambda: (h(), _f(1, 8), None), ValueError, "scale"),
        c("scale_0d", lambda: (h(), torch.tensor(1.0), None), ValueError, "scale"),
        c("h_0d", lambda: (torch.tensor(1.0), None, None), ValueError, "h"),
        c("h_int32", lambda: (torch.ones(4, 8, dtype=torch.int32), _f(8), None), ValueError, "h"),
        c("h_bool", lambda: (torch.ones(4, 8, dtype=torch.bool), None, _f(8)), ValueError, "h"),
        c("h_complex", lambda: (torch.ones(4, 8, dtype=torch.complex64), _f(8), None), ValueError, "h"),
        c("scale_int64", lambda: (h(), torch.ones(8, dtype=torch.int64), None), ValueError, "scale"),
        c("bias_bool", lambda: (h(), None, torch.ones(8, dtype=torch.bool)), ValueError, "bias"),
        c("bias_dtype_differs", lambda: (h(), _f(8), _f(8, dtype=torch.float64)), ValueError, "bias"),
        c("scale_meta", lambda: (h(), _f(8).to(META), None), ValueError, "scale"),
        c("bias_meta", lambda: (h(), _f(8), _f(8).to(META)), ValueError, "bias"),
        c("h_list", lambda: ([[1.0] * 8], None, None), TypeError, "h"),
        c("h_none", lambda: (None, _f(8), None), TypeError, "h"),
        c("scale_float", lambda: (h(), 2.0, None), TypeError, "scale"),
        c("bias_list", lambda: (h(), None, [0.0] * 8), TypeError, "bias"),
    ]


def _seq_scale_cases() -> list[Case]:
    op = "seq_scale"

    def c(id_, args, exc, arg):
        return Case(f"{op}-{id_}", op, lambda be: rk.seq_scale(*args(), backend=be), exc, arg)

    def valid_view(be):
        x, vec = _f(4, 8), _f(2, 8)
        got = rk.seq_scale(x, vec, _poisoned([0, 1, 1, 0]), backend=be)
        want = rk.seq_scale_reference(x, vec, _i(0, 1, 1, 0))
        torch.testing.assert_close(got, want, msg=lambda m: "wrong rows through a sliced seq_index: " + m)
        return got

    x3, x2 = lambda: _f(2, 3, 8), lambda: _f(4, 8)  # noqa: E731
    return [
        c("dense_x_2d", lambda: (x2(), _f(4, 8), None), ValueError, "x"),
        c("dense_x_4d", lambda: (_f(2, 3, 1, 8), _f(2, 8), None), ValueError, "x"),
        c("vec_1d", lambda: (x3(), _f(8), None), ValueError, "vec"),
        c("vec_rows", lambda: (x3(), _f(3, 8), None), ValueError, "vec"),
        c("vec_width", lambda: (x3(), _f(2, 7), None), ValueError, "vec"),
        c("x_int", lambda: (torch.ones(2, 3, 8, dtype=torch.int64), _f(2, 8), None), ValueError, "x"),
        c("vec_int", lambda: (x3(), torch.ones(2, 8, dtype=torch.int32), None), ValueError, "vec"),
        c("vec_bool", lambda: (x3(), torch.ones(2, 8, dtype=torch.bool), None), ValueError, "vec"),
        c("vec_meta", lambda: (x3(), _f(2, 8).to(META), None), ValueError, "vec"),
        c("x_list", lambda: ([[[1.0] * 8] * 3] * 2, _f(2, 8), None), TypeError, "x"),
        c("vec_none", lambda: (x3(), None, None), TypeError, "vec"),
        c("packed_x_3d", lambda: (x3(), _f(2, 8), _i(0, 1)), ValueError, "x"),
        c("seq_index_high", lambda: (x2(), _f(2, 8), _i(0, 1, 2, 0)), ValueError, "seq_index"),
        c("seq_index_negative", lambda: (x2(), _f(2, 8), _i(0, -1, 1, 0)), ValueError, "seq_index"),
        c("seq_index_huge", lambda: (x2(), _f(2, 8), _i(0, 1 << 40, 1, 0)), ValueError, "seq_index"),
        c("seq_index_no_seqs", lambda: (x2(), _f(0, 8), _i(0, 0, 0, 0)), ValueError, "seq_index"),
        c("seq_index_expanded_bad", lambda: (x2(), _f(2, 8), _expanded(5, 4)), ValueError, "seq_index"),
        c("seq_index_sliced_bad", lambda: (x2(), _f(2, 8), _poisoned([0, 1, 7, 0], 0)), ValueError, "seq_index"),
        c("seq_index_float", lambda: (x2(), _f(2, 8), torch.zeros(4)), ValueError, "seq_index"),
        c("seq_index_int32", lambda: (x2(), _f(2, 8), torch.zeros(4, dtype=torch.int32)), ValueError, "seq_index"),
        c("seq_index_bool", lambda: (x2(), _f(2, 8), torch.zeros(4, dtype=torch.bool)), ValueError, "seq_index"),
        c("seq_index_length", lambda: (x2(), _f(2, 8), _i(0, 1, 0)), ValueError, "seq_index"),
        c("seq_index_2d", lambda: (x2(), _f(2, 8), torch.zeros(4, 1, dtype=torch.int64)), ValueError, "seq_index"),
        c("seq_index_meta", lambda: (x2(), _f(2, 8), _i(0, 1, 1, 0).to(META)), ValueError, "seq_index"),
        c("seq_index_list", lambda: (x2(), _f(2, 8), [0, 1, 1, 0]), TypeError, "seq_index"),
        Case(f"{op}-seq_index_poisoned_view_is_valid", op, valid_view, None),
    ]


def _gathered_red_edit_cases() -> list[Case]:
    op = "gathered_red_edit"

    def c(id_, args, exc, arg):
        return Case(f"{op}-{id_}", op, lambda be: rk.gathered_red_edit(*args(), backend=be), exc, arg)

    def valid_view(be):
        h, s, b = _f(4, 8), _f(2, 8), _f(2, 8)
        got = rk.gathered_red_edit(h, s, b, _poisoned([0, -1, 1, 0]), backend=be)
        want = rk.gathered_red_edit_reference(h, s, b, _i(0, -1, 1, 0))
        torch.testing.assert_close(got, want, msg=lambda m: "wrong rows through a sliced tenant_ids: " + m)
        return got

    h, s = lambda: _f(4, 8), lambda: _f(2, 8)  # noqa: E731
    return [
        c("ids_high", lambda: (h(), s(), None, _i(0, 1, 2, -1)), ValueError, "tenant_ids"),
        c("ids_below_minus_one", lambda: (h(), s(), None, _i(0, -2, 1, -1)), ValueError, "tenant_ids"),
        c("ids_huge", lambda: (h(), s(), s(), _i(0, 1 << 40, 1, -1)), ValueError, "tenant_ids"),
        c("ids_very_negative", lambda: (h(), None, s(), _i(0, -(1 << 40), 1, -1)), ValueError, "tenant_ids"),
        c("ids_no_tenants", lambda: (h(), _f(0, 8), None, _i(0, -1, -1, -1)), ValueError, "tenant_ids"),
        c("ids_expanded_bad", lambda: (h(), s(), None, _expanded(2, 4)), ValueError, "tenant_ids"),
        c("ids_sliced_bad", lambda: (h(), s(), None, _poisoned([0, 1, 9, -1], 0)), ValueError, "tenant_ids"),
        c(
            "ids_2d_transposed_bad",
            lambda: (_f(2, 3, 8), s(), None, torch.tensor([[0, 1], [1, 0], [0, 5]]).T),
            ValueError,
            "tenant_ids",
        ),
        c("ids_int32", lambda: (h(), s(), None, torch.zeros(4, dtype=torch.int32)), ValueError, "tenant_ids"),
        c("ids_float", lambda: (h(), s(), None, torch.zeros(4)), ValueError, "tenant_ids"),
        c("ids_bool", lambda: (h(), s(), None, torch.zeros(4, dtype=torch.bool)), ValueError, "tenant_ids"),
        c("ids_length", lambda: (h(), s(), None, _i(0, 1, 0)), ValueError, "tenant_ids"),
        c("ids_full_shape", lambda: (h(), s(), None, torch.zeros(4, 8, dtype=torch.int64)), ValueError, "tenant_ids"),
        c("ids_0d", lambda: (h(), s(), None, torch.tensor(0)), ValueError, "tenant_ids"),
        c("ids_meta", lambda: (h(), s(), None, _i(0, 1, 0, 1).to(META)), ValueError, "tenant_ids"),
        c("ids_list", lambda: (h(), s(), None, [0, 1, 0, 1]), TypeError, "tenant_ids"),
        c("no_tables", lambda: (h(), None, None, _i(0, 1, 0, 1)), ValueError, "scales"),
        c("scales_width", lambda: (h(), _f(2, 7), None, _i(0, 1, 0, 1)), ValueError, "scales"),
        c("scales_1d", lambda: (h(), _f(8), None, _i(0, 0, 0, 0)), ValueError, "scales"),
        c("biases_width", lambda: (h(), s(), _f(2, 9), _i(0, 1, 0, 1)), ValueError, "biases"),
        c("biases_tenants", lambda: (h(), s(), _f(3, 8), _i(0, 1, 0, 1)), ValueError, "biases"),
        c(
            "biases_dtype_differs",
            lambda: (h(), s(), _f(2, 8, dtype=torch.float16), _i(0, 1, 0, 1)),
            ValueError,
            "biases",
        ),
        c("scales_int", lambda: (h(), torch.ones(2, 8, dtype=torch.int64), None, _i(0, 1, 0, 1)), ValueError, "scales"),
        c("scales_meta", lambda: (h(), s().to(META), None, _i(0, 1, 0, 1)), ValueError, "scales"),
        c("h_1d", lambda: (_f(8), s(), None, _i(0)), ValueError, "h"),
        c("h_int", lambda: (torch.ones(4, 8, dtype=torch.int32), s(), None, _i(0, 1, 0, 1)), ValueError, "h"),
        c("h_list", lambda: ([[1.0] * 8] * 4, s(), None, _i(0, 1, 0, 1)), TypeError, "h"),
        c("scales_list", lambda: (h(), [[1.0] * 8] * 2, None, _i(0, 1, 0, 1)), TypeError, "scales"),
        Case(f"{op}-ids_poisoned_view_is_valid", op, valid_view, None),
    ]


def _para_args(b=2, t=3, d=8, r=4, n=5, k=None):
    lead = () if k is None else (k,)
    return [_f(b, t, d), torch.zeros(b, dtype=torch.int64), _f(*lead, d, r), _f(*lead, r, n), _f(*lead, n)]


def _para_cases() -> list[Case]:
    op = "para_vector_gen"

    def c(id_, change, exc, arg, backends=None, **shape):
        def call(be):
            args = _para_args(**shape)
            kwargs = {}
            for key, value in change().items():
                if isinstance(key, int):
                    args[key] = value
                else:
                    kwargs[key] = value
            return rk.para_vector_gen(*args, backend=be, **kwargs)

        return Case(f"{op}-{id_}", op, call, exc, arg, backends)

    def valid_view(be):
        args = _para_args(b=3)
        args[1] = _poisoned([2, 0, 1])
        got = rk.para_vector_gen(*args, backend=be)
        args[1] = _i(2, 0, 1)
        torch.testing.assert_close(
            got, rk.para_vector_gen_reference(*args), msg=lambda m: "wrong rows through a sliced pool_index: " + m
        )
        return got

    return [
        c("h_2d", lambda: {0: _f(3, 8)}, ValueError, "h"),
        c("h_int", lambda: {0: torch.ones(2, 3, 8, dtype=torch.int64)}, ValueError, "h"),
        c("h_list", lambda: {0: [[[0.0] * 8] * 3] * 2}, TypeError, "h"),
        c("pool_index_high", lambda: {1: _i(0, 3)}, ValueError, "pool_index"),
        c("pool_index_negative", lambda: {1: _i(-1, 0)}, ValueError, "pool_index"),
        c("pool_index_huge", lambda: {1: _i(1 << 40, 0)}, ValueError, "pool_index"),
        c("pool_index_no_tokens", lambda: {0: _f(2, 0, 8)}, ValueError, "pool_index"),
        c("pool_index_expanded_bad", lambda: {1: _expanded(3, 2)}, ValueError, "pool_index"),
        c("pool_index_int32", lambda: {1: torch.zeros(2, dtype=torch.int32)}, ValueError, "pool_index"),
        c("pool_index_float", lambda: {1: torch.zeros(2)}, ValueError, "pool_index"),
        c("pool_index_bool", lambda: {1: torch.zeros(2, dtype=torch.bool)}, ValueError, "pool_index"),
        c("pool_index_length", lambda: {1: _i(0, 0, 0)}, ValueError, "pool_index"),
        c("pool_index_2d", lambda: {1: torch.zeros(2, 1, dtype=torch.int64)}, ValueError, "pool_index"),
        c("pool_index_meta", lambda: {1: _i(0, 0).to(META)}, ValueError, "pool_index"),
        c("pool_index_int", lambda: {1: 0}, TypeError, "pool_index"),
        c("pool_index_list", lambda: {1: [0, 0]}, TypeError, "pool_index"),
        c("w_down_input_size", lambda: {2: _f(7, 4)}, ValueError, "w_down"),
        c("w_down_1d", lambda: {2: _f(8)}, ValueError, "w_down"),
        c("w_down_rank_0", lambda: {2: _f(8, 0), 3: _f(0, 5)}, ValueError, "w_down"),
        c("w_down_int", lambda: {2: torch.ones(8, 4, dtype=torch.int64)}, ValueError, "w_down"),
        c("w_down_meta", lambda: {2: _f(8, 4).to(META)}, ValueError, "w_down"),
        c("w_down_list", lambda: {2: [[0.0] * 4] * 8}, TypeError, "w_down"),
        c("w_up_rank", lambda: {3: _f(3, 5)}, ValueError, "w_up"),
        c("w_up_1d", lambda: {3: _f(5)}, ValueError, "w_up"),
        c("w_up_dtype_differs", lambda: {3: _f(4, 5, dtype=torch.float64)}, ValueError, "w_up"),
        c("b_up_width", lambda: {4: _f(6)}, ValueError, "b_up"),
        c("b_up_2d", lambda: {4: _f(1, 5)}, ValueError, "b_up"),
        c("b_up_bool", lambda: {4: torch.ones(5, dtype=torch.bool)}, ValueError, "b_up"),
        c("b_up_dtype_differs", lambda: {4: _f(5, dtype=torch.bfloat16)}, ValueError, "b_up"),
        c("activation_unknown", lambda: {"activation": "tanh"}, ValueError, "activation"),
        c("activation_none", lambda: {"activation": None}, ValueError, "activation"),
        # Above the kernels' rank 64 only an explicit kernel backend is bad input (RuntimeError
        # naming the limit); the reference runs any rank.
        c(
            "w_down_rank_65",
            lambda: {2: _f(8, 65), 3: _f(65, 5)},
            RuntimeError,
            "w_down",
            backends=KERNEL_BACKENDS,
        ),
        Case(f"{op}-pool_index_poisoned_view_is_valid", op, valid_view, None),
    ]


def _gathered_para_cases() -> list[Case]:
    op = "gathered_para_vector_gen"

    def c(id_, change, exc, arg, k=2):
        def call(be):
            args = [*_para_args(b=3, k=k), _i(0, 1, -1)]
            for key, value in change().items():
                args[key] = value
            return rk.gathered_para_vector_gen(*args, backend=be)

        return Case(f"{op}-{id_}", op, call, exc, arg)

    def valid_view(be):
        args = [*_para_args(b=3, k=2), _poisoned([1, -1, 0])]
        got = rk.gathered_para_vector_gen(*args, backend=be)
        args[5] = _i(1, -1, 0)
        want = rk.gathered_para_vector_gen_reference(*args)
        torch.testing.assert_close(got, want, msg=lambda m: "wrong rows through a sliced tenant_ids: " + m)
        return got

    return [
        c("ids_high", lambda: {5: _i(0, 2, -1)}, ValueError, "tenant_ids"),
        c("ids_below_minus_one", lambda: {5: _i(0, -2, 1)}, ValueError, "tenant_ids"),
        c("ids_huge", lambda: {5: _i(0, 1 << 40, 1)}, ValueError, "tenant_ids"),
        c("ids_no_tenants", lambda: {5: _i(0, -1, -1)}, ValueError, "tenant_ids", k=0),
        c("ids_expanded_bad", lambda: {5: _expanded(7, 3)}, ValueError, "tenant_ids"),
        c("ids_int32", lambda: {5: torch.zeros(3, dtype=torch.int32)}, ValueError, "tenant_ids"),
        c("ids_float", lambda: {5: torch.zeros(3)}, ValueError, "tenant_ids"),
        c("ids_length", lambda: {5: _i(0, 1)}, ValueError, "tenant_ids"),
        c("ids_2d", lambda: {5: torch.zeros(3, 1, dtype=torch.int64)}, ValueError, "tenant_ids"),
        c("ids_meta", lambda: {5: _i(0, 1, 0).to(META)}, ValueError, "tenant_ids"),
        c("ids_list", lambda: {5: [0, 1, 0]}, TypeError, "tenant_ids"),
        c("ids_none", lambda: {5: None}, TypeError, "tenant_ids"),
        c("pool_index_high", lambda: {1: _i(0, 3, 0)}, ValueError, "pool_index"),
        c("w_down_plain_shape", lambda: {2: _f(8, 4)}, ValueError, "w_down"),
        c("w_up_tenants", lambda: {3: _f(3, 4, 5)}, ValueError, "w_up"),
        c("w_up_rank", lambda: {3: _f(2, 3, 5)}, ValueError, "w_up"),
        c("b_up_tenants", lambda: {4: _f(3, 5)}, ValueError, "b_up"),
        c("b_up_width", lambda: {4: _f(2, 6)}, ValueError, "b_up"),
        c("w_down_input_size", lambda: {2: _f(2, 7, 4)}, ValueError, "w_down"),
        c("w_down_int", lambda: {2: torch.ones(2, 8, 4, dtype=torch.int64)}, ValueError, "w_down"),
        Case(f"{op}-ids_poisoned_view_is_valid", op, valid_view, None),
    ]


def _last_token_index_cases() -> list[Case]:
    op = "last_token_index"

    def c(id_, mask, lengths, exc, arg):
        return Case(f"{op}-{id_}", op, lambda be: rk.last_token_index(mask(), lengths()), exc, arg, (ANY,))

    ones = lambda: torch.ones(2, 4, dtype=torch.int64)  # noqa: E731
    none = lambda: None  # noqa: E731
    return [
        c("mask_float", lambda: torch.ones(2, 4), none, ValueError, "attention_mask"),
        c("mask_1d", lambda: torch.ones(4, dtype=torch.int64), none, ValueError, "attention_mask"),
        c("mask_3d", lambda: torch.ones(2, 4, 1, dtype=torch.int64), none, ValueError, "attention_mask"),
        c("mask_value_2", lambda: torch.tensor([[1, 1, 2, 0], [1, 0, 0, 0]]), none, ValueError, "attention_mask"),
        c(
            "mask_value_negative",
            lambda: torch.tensor([[1, 1, 0, 0], [1, -1, 0, 0]]),
            none,
            ValueError,
            "attention_mask",
        ),
        c("mask_all_padding", lambda: torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]), none, ValueError, "attention_mask"),
        c("mask_list", lambda: [[1, 1, 0, 0]], none, TypeError, "attention_mask"),
        c("lengths_float", ones, lambda: torch.tensor([1.0, 2.0]), ValueError, "prompt_lengths"),
        c("lengths_bool", ones, lambda: torch.tensor([True, True]), ValueError, "prompt_lengths"),
        c("lengths_count", ones, lambda: _i(1, 2, 3), ValueError, "prompt_lengths"),
        c("lengths_2d", ones, lambda: torch.ones(2, 1, dtype=torch.int64), ValueError, "prompt_lengths"),
        c("lengths_zero", ones, lambda: _i(0, 2), ValueError, "prompt_lengths"),
        c("lengths_negative", ones, lambda: [-1, 2], ValueError, "prompt_lengths"),
        c("lengths_too_long", ones, lambda: _i(2, 5), ValueError, "prompt_lengths"),
        c("lengths_non_integer", ones, lambda: [1.5, 2], ValueError, "prompt_lengths"),
        c("lengths_meta", ones, lambda: _i(1, 2).to(META), ValueError, "prompt_lengths"),
    ]


def _module_cases() -> list[Case]:
    def red(id_, exc, arg, **kw):
        return Case(f"REDEdit-{id_}", "nn.REDEdit", lambda be: rk.nn.REDEdit(**kw), exc, arg, (ANY,))

    def para(id_, exc, arg, **kw):
        kw = {"d_model": 8, "out_sizes": (4, 4), **kw}
        return Case(
            f"PARAVectorGenerator-{id_}",
            "nn.PARAVectorGenerator",
            lambda be: rk.nn.PARAVectorGenerator(**kw),
            exc,
            arg,
            (ANY,),
        )

    typed = (TypeError, ValueError)  # a value of the wrong type: either is a clear answer
    return [
        red("dim_zero", ValueError, "dim", dim=0),
        red("dim_negative", ValueError, "dim", dim=-3),
        red("dim_non_integer", typed, "dim", dim=2.5),
        red("dim_string", typed, "dim", dim="8"),
        red("dim_bool", typed, "dim", dim=True),
        red("no_vectors", ValueError, "scale", dim=8, scale=False, bias=False),
        red("dtype_int", ValueError, "dtype", dim=8, dtype=torch.int32),
        red("dtype_string", typed, "dtype", dim=8, dtype="float32"),
        para("d_model_zero", ValueError, "d_model", d_model=0),
        para("d_model_non_integer", typed, "d_model", d_model=2.5),
        para("out_sizes_empty", ValueError, "out_sizes", out_sizes=()),
        para("out_sizes_zero", ValueError, "out_sizes", out_sizes=(4, 0)),
        para("out_sizes_negative", ValueError, "out_sizes", out_sizes=(-4,)),
        para("out_sizes_non_integer", typed, "out_sizes", out_sizes=(2.5, 4)),
        para("out_sizes_int", typed, "out_sizes", out_sizes=8),
        para("rank_zero", ValueError, "rank", rank=0),
        para("rank_non_integer", typed, "rank", rank=2.5),
        para("activation_unknown", ValueError, "activation", activation="tanh"),
        para("dtype_int", typed, "dtype", dtype=torch.int64),
    ]


@functools.cache
def cases() -> list[Case]:
    return [
        *_red_edit_cases(),
        *_seq_scale_cases(),
        *_gathered_red_edit_cases(),
        *_para_cases(),
        *_gathered_para_cases(),
        *_last_token_index_cases(),
        *_module_cases(),
    ]


def _runs() -> list[tuple[str, Case]]:
    """Every (backend, case) pair the table asks for, in a fixed order."""
    out = []
    for case in cases():
        for backend in case.backends or BACKENDS:
            if backend == ANY or backend in BACKENDS:
                out.append((backend, case))
    return out


def _key(backend: str, case: Case) -> str:
    return f"{backend}:{case.id}"


# --- the subprocess ------------------------------------------------------------------------------


def serve(start: int) -> None:
    """Subprocess side: run the table from row ``start``, one JSON line per row on stdout
    (``{"start": key}`` before a row runs, then its outcome)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import faulthandler

    faulthandler.enable()
    for backend, case in _runs()[start:]:
        key = _key(backend, case)
        out.write(json.dumps({"start": key}) + "\n")
        try:
            case.call(backend)
            result = {"key": key, "raised": None}
        except BaseException as exc:
            result = {
                "key": key,
                "raised": [t.__name__ for t in type(exc).__mro__],
                "message": str(exc),
                "traceback": "".join(traceback.format_exception(exc)[-3:]),
            }
        out.write(json.dumps(result) + "\n")
    out.write(json.dumps({"done": True}) + "\n")


def _run_table() -> dict[str, dict]:
    """Run the whole table in subprocesses; a row that kills or hangs its process is recorded as
    such and the next process starts at the following row."""
    runs = _runs()
    results: dict[str, dict] = {}
    start = 0
    while start < len(runs):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path[:0] = [{PACKAGE_ROOT!r}, {TESTS_DIR!r}]; "
                f"import test_bad_input; test_bad_input.serve({start})",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=TESTS_DIR,
        )
        current, buf, stderr = None, b"", b""
        deadline = time.monotonic() + CASE_TIMEOUT_S * 3  # the first row also pays the imports
        finished = False
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout, proc.stderr], [], [], max(left, 0))
            if not ready:  # hung in the current row
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                results[current or _key(*runs[start])] = {"hung": True}
                break
            if proc.stderr in ready:
                stderr = (stderr + os.read(proc.stderr.fileno(), 1 << 16))[-8000:]
            if proc.stdout not in ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:  # the process ended
                proc.wait()
                if not finished:
                    results[current or _key(*runs[start])] = {
                        "died": f"exit status {proc.returncode}",
                        "stderr": stderr.decode(errors="replace")[-3000:],
                    }
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "start" in msg:
                    current = msg["start"]
                    deadline = time.monotonic() + CASE_TIMEOUT_S
                elif "key" in msg:
                    results[msg["key"]] = msg
                    current = None
                elif "done" in msg:
                    finished = True
        if finished:
            break
        keys = [_key(*r) for r in runs]
        start = max(keys.index(k) for k in results) + 1
    return results


@pytest.fixture(scope="module")
def table_results():
    return _run_table()


def _params():
    return [pytest.param(backend, case, id=_key(backend, case)) for backend, case in _runs()]


@pytest.mark.parametrize("backend,case", _params())
def test_bad_input(table_results, backend, case):
    result = table_results.get(_key(backend, case))
    assert result is not None, "the table's subprocess never reached this row"
    assert not result.get("hung"), f"hung (more than {CASE_TIMEOUT_S:.0f} s)"
    assert "died" not in result, f"the process died ({result['died']}) in this call:\n{result['stderr']}"
    raised = result["raised"]
    if case.exc is None:
        assert raised is None, f"a valid call raised {raised[0]}: {result['message']}\n{result['traceback']}"
        return
    expected = case.exc if isinstance(case.exc, tuple) else (case.exc,)
    names = [e.__name__ for e in expected]
    assert raised is not None, f"no error; expected {' or '.join(names)} naming '{case.arg}'"
    message = result["message"]
    assert any(n in raised for n in names), (
        f"raised {raised[0]}, expected {' or '.join(names)}: {message}\n{result['traceback']}"
    )
    assert f"red_kernels.{case.op}" in message, f"the message does not name red_kernels.{case.op}: {message}"
    assert f"'{case.arg}'" in message, f"the message does not name the argument '{case.arg}': {message}"
