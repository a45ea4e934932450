"""An ``accelerate`` training loop on a patched model (issue 13), one process on this CPU: the model,
optimizer and data loader go through ``Accelerator.prepare``, the loss through
``Accelerator.backward``; the result is compared with the same steps written in plain PyTorch
(``torch.autocast`` where accelerate's ``mixed_precision="bf16"`` wraps the forward in it). The
2-process accelerate loop is in test_distributed.py."""

from __future__ import annotations

import pytest
import torch
from _dist_worker import batch, make_model, snapshot

import red_kernels as rk

accelerate = pytest.importorskip("accelerate")

EPOCHS = 2  # 2 batches of 2 rows each: 4 optimizer steps


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _loader():
    inputs = batch()
    data = torch.utils.data.TensorDataset(inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    return torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _plain(method, bf16):
    model = make_model(method)
    opt = _optimizer(model)
    losses = []
    for _ in range(EPOCHS):
        for ids, mask, labels in _loader():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.float().backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return model, losses


def _accelerate(method, bf16):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, mixed_precision="bf16" if bf16 else "no")
    model = make_model(method)
    model, opt, loader = acc.prepare(model, _optimizer(model), _loader())
    losses = []
    for _ in range(EPOCHS):
        for ids, mask, labels in loader:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return acc, model, losses


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("method", ["red", "para"])
def test_accelerate_loop_equals_a_plain_torch_loop(method, bf16, tmp_path):
    start = make_model(method)
    base = {n: p.detach().clone() for n, p in start.named_parameters() if not p.requires_grad}
    init = snapshot(start)
    acc, model, losses = _accelerate(method, bf16)
    want_model, want_losses = _plain(method, bf16)
    inner = acc.unwrap_model(model)
    assert inner is not None and rk.adapter_names(inner) == ["default"]
    got, want = snapshot(inner), snapshot(want_model)
    assert got.keys() == want.keys() == init.keys()
    for n, w in want.items():
        assert got[n].dtype == torch.float32, n
        assert (w - init[n]).abs().max() > 1e-3, f"{n} did not move"
        torch.testing.assert_close(got[n], w, rtol=1e-6, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-6, atol=1e-6)
    # Each batch's loss is lower in the second epoch (losses alternate between the two batches).
    assert losses[2] < losses[0] and losses[3] < losses[1], losses
    # The backbone stayed frozen and untouched.
    for n, p in inner.named_parameters():
        if n in base:
            assert not p.requires_grad and p.grad is None and torch.equal(p, base[n]), n
    # The adapter trained under accelerate saves and reloads like any other.
    rk.save_adapter(inner, tmp_path / "adapter")
    fresh = make_model(method)
    rk.unpatch_model(fresh)
    rk.load_adapter(fresh, tmp_path / "adapter")
    loaded, trained = rk.adapter_parameters(fresh), rk.adapter_parameters(inner)
    assert loaded.keys() == trained.keys() and len(loaded) == len(got)
    for n, p in loaded.items():
        assert torch.equal(p, trained[n]), n
