"""Patched models in use: generate with a KV cache, training steps on every backend, gradient
checkpointing, bf16 autocast and torch.compile."""

from __future__ import annotations

import pytest
import torch
from _helpers import cpu_backends
from _hf_models import TINY, inputs_for, randomize_edits

import red_kernels as rk


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5-relu", "t5-gated-gelu"])
def test_generate_with_cache_equals_without(name):
    model = TINY[name]()
    rk.patch_model(model, "red+")
    randomize_edits(model)
    ids = inputs_for(model, batch=2, seq=5)["input_ids"]
    mask = torch.ones_like(ids)
    kw = dict(
        max_new_tokens=6,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        plain = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.scores, plain.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # And the edit changes what is generated (the editors are on the generation path).
    rk.unpatch_model(model)
    with torch.no_grad():
        base = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
    assert not all(torch.equal(a, b) for a, b in zip(base.scores, cached.scores, strict=True))


def _enable_checkpointing(model, kwargs=None) -> None:
    # transformers >= 5.x renamed gradient_checkpointing_enable (non-reentrant by default).
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(kwargs)


def _train(name, method="red", steps=4, backend=None, checkpointing=False, autocast=False, seed=0):
    torch.manual_seed(seed)
    model = TINY[name]()
    rk.patch_model(model, method, backend=backend)
    if checkpointing:
        _enable_checkpointing(model)
    model.train()
    inputs = inputs_for(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


@pytest.mark.parametrize("name", list(TINY))
def test_a_few_steps_reduce_the_loss(name):
    model, losses = _train(name, "red", steps=6)
    assert losses[-1] < losses[0] - 1e-3, losses
    # Only the editors moved.
    for n, p in model.named_parameters():
        assert (".red_edit." in n) == p.requires_grad


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "reference"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_fused_backends_follow_the_reference_trajectory(name, backend):
    _, ref = _train(name, "red+", backend="reference")
    _, got = _train(name, "red+", backend=backend)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "reentrant"),
    [("llama", False), ("llama", True), ("roberta", False), ("t5-gated-gelu", False), ("gpt2", False)],
)
def test_gradient_checkpointing_gives_the_same_gradients(name, reentrant):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = TINY[name]()
        rk.patch_model(model, "red+")
        randomize_edits(model)
        if ckpt:
            _enable_checkpointing(model, {"use_reentrant": reentrant})
        model.train()
        model(**inputs_for(model)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert grads[1][n] is not None and grads[1][n].abs().sum() > 0, n
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    _, losses = _train(name, "red", steps=4, checkpointing=True)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["llama", "t5-relu", "gpt2"])
def test_bf16_autocast_training(name):
    model, losses = _train(name, "red", steps=6, autocast=True)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, n


def test_bf16_model_with_fp32_vectors_trains():
    torch.manual_seed(0)
    model = TINY["llama"]().to(torch.bfloat16)
    rk.patch_model(model, "red")
    inputs = inputs_for(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert model.model.layers[0].mlp.down_proj.red_edit["default"].scale.grad.dtype == torch.float32


def test_torch_compile_of_a_patched_model():
    model = TINY["llama"]()
    rk.patch_model(model, "red+")
    randomize_edits(model)
    inputs = {k: v for k, v in inputs_for(model).items() if k != "attention_mask"}
    eager = model(**inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(**inputs)
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    eager_grads = torch.autograd.grad(
        model(**inputs).loss, [model.model.layers[0].mlp.down_proj.red_edit["default"].scale]
    )
    torch.testing.assert_close(
        model.model.layers[0].mlp.down_proj.red_edit["default"].scale.grad, eager_grads[0], rtol=1e-5, atol=1e-6
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_follow_the_reference_trajectory(dtype):
    from _helpers import gpu_backends

    def run(backend):
        torch.manual_seed(0)
        model = TINY["llama"]().to("cuda", dtype)
        rk.patch_model(model, "red+", backend=backend)
        model.train()
        inputs = {k: v.cuda() for k, v in inputs_for(model).items()}
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        losses = []
        for _ in range(4):
            opt.zero_grad()
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    ref = run("reference")
    assert ref[-1] < ref[0]
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for backend in gpu_backends():
        torch.testing.assert_close(run(backend), ref, rtol=tol, atol=tol, msg=lambda m, b=backend: f"{b}: {m}")
