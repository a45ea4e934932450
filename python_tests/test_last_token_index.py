"""last_token_index: right/left/mixed padding, prompt lengths (training pools what inference pools),
bool and integer masks, errors, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch

import red_kernels as rk
from red_kernels.ops.pooling import _last_token_index_op


def _mask(rows):
    return torch.tensor(rows, dtype=torch.int64)


def test_right_padding():
    m = _mask([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    out = rk.last_token_index(m)
    assert out.dtype == torch.int64 and out.shape == (3,)
    assert out.tolist() == [2, 4, 0]


def test_left_padding():
    m = _mask([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert rk.last_token_index(m).tolist() == [4, 4, 4]


def test_mixed_batch_and_both_sides():
    """Each row's padding side is read from the row itself."""
    m = _mask([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0]])
    assert rk.last_token_index(m).tolist() == [1, 3, 2]
    assert rk.last_token_index(m, [1, 1, 2]).tolist() == [0, 2, 2]


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.int32, torch.uint8])
def test_mask_dtypes(dtype):
    m = _mask([[0, 1, 1, 1], [1, 1, 0, 0]]).to(dtype)
    assert rk.last_token_index(m).tolist() == [3, 1]
    assert rk.last_token_index(m, torch.tensor([2, 1], dtype=torch.int32)).tolist() == [2, 0]


def test_prompt_lengths_right_and_left():
    right = _mask([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    left = _mask([[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    pl = torch.tensor([3, 2])
    assert rk.last_token_index(right, pl).tolist() == [2, 1]
    assert rk.last_token_index(left, pl).tolist() == [3, 4]
    assert rk.last_token_index(left, [3, 2]).tolist() == [3, 4]  # a plain list works too


def test_training_pools_the_inference_token():
    """prompt + answer in one sequence (training) pools the same prompt token as the prompt alone
    (inference), for right- and left-padded batches."""
    torch.manual_seed(0)
    prompts = [torch.randint(5, 100, (int(n),)) for n in (3, 7, 1, 5)]
    answers = [torch.randint(5, 100, (int(n),)) for n in (4, 1, 6, 2)]

    def batch(seqs, left):
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.int64)
        mask = torch.zeros(len(seqs), width, dtype=torch.int64)
        for i, s in enumerate(seqs):
            sl = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, sl], mask[i, sl] = s, 1
        return ids, mask

    for left in (False, True):
        p_ids, p_mask = batch(prompts, left)
        t_ids, t_mask = batch([torch.cat([p, a]) for p, a in zip(prompts, answers)], left)
        at_inference = p_ids[torch.arange(4), rk.last_token_index(p_mask)]
        at_training = t_ids[torch.arange(4), rk.last_token_index(t_mask, [len(p) for p in prompts])]
        assert torch.equal(at_inference, at_training)
        assert torch.equal(at_inference, torch.stack([p[-1] for p in prompts]))


def test_padding_inside_a_row_is_skipped():
    m = _mask([[1, 1, 0, 1, 0]])
    assert rk.last_token_index(m).tolist() == [3]
    assert rk.last_token_index(m, [3]).tolist() == [3]
    assert rk.last_token_index(m, [2]).tolist() == [1]


def test_empty_batch():
    out = rk.last_token_index(torch.zeros(0, 5, dtype=torch.int64))
    assert out.shape == (0,) and out.dtype == torch.int64


def test_matches_a_loop_on_random_masks():
    torch.manual_seed(1)
    b, length = 64, 17
    lengths = torch.randint(1, length + 1, (b,))
    left = torch.rand(b) < 0.5
    pos = torch.arange(length)
    mask = torch.where(left[:, None], pos >= length - lengths[:, None], pos < lengths[:, None]).long()
    pl = (torch.rand(b) * lengths).long().clamp(min=1)
    want_last = [max(i for i in range(length) if mask[r, i]) for r in range(b)]
    want_prompt = [[i for i in range(length) if mask[r, i]][pl[r] - 1] for r in range(b)]
    assert rk.last_token_index(mask).tolist() == want_last
    assert rk.last_token_index(mask, pl).tolist() == want_prompt


# --- errors ------------------------------------------------------------------------------------


def test_all_padding_row():
    with pytest.raises(ValueError, match="'attention_mask'.*row 1 is all padding"):
        rk.last_token_index(_mask([[1, 0], [0, 0], [0, 1]]))


@pytest.mark.parametrize("pl,row,pattern", [([0, 2], 0, r"\[1, 2\]"), ([2, 3], 1, r"\[1, 2\]"), ([-1, 1], 0, "")])
def test_prompt_lengths_out_of_range(pl, row, pattern):
    with pytest.raises(ValueError, match=f"'prompt_lengths'.*row {row}.*{pattern}"):
        rk.last_token_index(_mask([[1, 1, 0], [0, 1, 1]]), pl)


@pytest.mark.parametrize(
    "mask,pl,pattern",
    [
        (torch.ones(4, dtype=torch.int64), None, "'attention_mask' must be \\[B, L\\]"),
        (torch.ones(2, 3, 4, dtype=torch.int64), None, "'attention_mask' must be \\[B, L\\]"),
        (torch.ones(2, 3), None, "'attention_mask' must be bool or integer"),
        (torch.tensor([[1, 2, 0]]), None, "'attention_mask' must hold only 0 and 1; row 0 has 2"),
        (torch.ones(2, 3, dtype=torch.int64), torch.tensor([1, 1, 1]), "'prompt_lengths' must have shape \\[2\\]"),
        (torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 1, dtype=torch.int64), "'prompt_lengths' must have shape"),
        (torch.ones(2, 3, dtype=torch.int64), torch.tensor([1.0, 2.0]), "'prompt_lengths' must be integer"),
        (torch.ones(2, 3, dtype=torch.int64), torch.tensor([True, True]), "'prompt_lengths' must be integer"),
        (
            torch.ones(2, 3, dtype=torch.int64),
            torch.ones(2, dtype=torch.int64, device="meta"),
            "'prompt_lengths' is on",
        ),
    ],
)
def test_bad_inputs(mask, pl, pattern):
    with pytest.raises(ValueError, match=pattern):
        rk.last_token_index(mask, pl)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="'attention_mask'"):
        rk.last_token_index([[1, 1, 0]])


# --- registration ------------------------------------------------------------------------------


def test_opcheck():
    m = _mask([[1, 1, 0, 0], [0, 1, 1, 1]])
    torch.library.opcheck(_last_token_index_op, (m, None))
    torch.library.opcheck(_last_token_index_op, (m, torch.tensor([1, 2])))
    torch.library.opcheck(_last_token_index_op, (m.bool(), torch.tensor([2, 3], dtype=torch.int32)))


def test_compile_fullgraph():
    """Pooling inside a compiled PARA forward: index, gather, no graph break."""
    torch._dynamo.reset()

    def pool(h, mask, pl):
        idx = rk.last_token_index(mask, pl)
        return h[torch.arange(h.shape[0]), idx] * 2

    h = torch.randn(3, 6, 8)
    mask = _mask([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pl = torch.tensor([2, 3, 6])
    compiled = torch.compile(pool, fullgraph=True)
    torch.testing.assert_close(compiled(h, mask, pl), pool(h, mask, pl))
    torch.testing.assert_close(compiled(h, mask, None), pool(h, mask, None))
    with pytest.raises(ValueError, match="all padding"):
        compiled(h, torch.zeros_like(mask), None)


@pytest.mark.parametrize("lengths", [[1.5, 2], [True, 2], ["2", 2], 3, [[1], [2]]])
def test_prompt_lengths_sequence_must_hold_ints(lengths):
    """A float length is not truncated, a bool is not a length (issue 9)."""
    mask = torch.ones(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="red_kernels.last_token_index: argument 'prompt_lengths'"):
        rk.last_token_index(mask, lengths)


def test_prompt_lengths_sequence_of_numpy_ints():
    np = pytest.importorskip("numpy")
    mask = torch.ones(2, 3, dtype=torch.int64)
    assert rk.last_token_index(mask, [np.int64(2), 3]).tolist() == [1, 2]
