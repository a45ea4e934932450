"""A patched model inside transformers' own saving and training loop (issue 13).

- ``save_pretrained`` of a patched model writes the adapters, not the base: Trainer checkpoints and
  ``save_model()`` hold the adapter, and ``load_adapter`` reads them.
- ``Trainer(resume_from_checkpoint=...)`` restores the vectors, the optimizer and the scheduler: the
  resumed run ends where the uninterrupted one does.
- Guards: a merged model whose new biases its config cannot describe refuses ``save_pretrained``;
  ``patch_model`` refuses a PEFT model; PEFT wrapping a patched model freezes the vectors (documented).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings

import pytest
import torch
from _hf_models import VOCAB, tiny_gpt2, tiny_llama, tiny_t5

import red_kernels as rk
from red_kernels.patch.core import patch_state

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' Trainer needs it

SEQ, PROMPT = 12, 6


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rk.adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _rows(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[:PROMPT] = -100  # the prompt: PARA pools its last token
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * SEQ, "labels": labels.tolist()})
    return rows


def _logits(model, seed=1):
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).logits


def _patched(method):
    torch.manual_seed(0)  # the same base weights every time
    return rk.patch_model(tiny_llama(), method)


# --- save_pretrained -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["red", "red+", "ia3", "para"])
def test_save_pretrained_writes_the_adapter_not_the_base(tmp_path, method):
    model = _patched(method)
    _perturb(model)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "model.safetensors"]
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == set(rk.adapter_parameters(model))  # the model's own keys: Trainer loads them as they are
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["weights"] == "model.safetensors" and meta["adapter_name"] == "default"
    with pytest.raises(OSError):  # no config.json: from_pretrained cannot build a base-less model
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    fresh = copy.deepcopy(model)
    rk.unpatch_model(fresh)
    rk.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=0, atol=0)


def test_save_pretrained_keeps_every_adapter(tmp_path):
    model = _patched("red")
    _perturb(model, 0)
    base = copy.deepcopy(model)
    rk.unpatch_model(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = rk.patch_model(copy.deepcopy(base), "para")
    _perturb(other, 1)
    rk.save_adapter(other, tmp_path / "src" / "b")
    rk.load_adapter(model, tmp_path / "src" / "b")
    model.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "b", "model.safetensors"]
    reloaded = rk.load_adapter(copy.deepcopy(base), tmp_path / "out")
    rk.load_adapter(reloaded, tmp_path / "out" / "b")
    for name in ("default", "b"):
        rk.set_adapter(model, name)
        rk.set_adapter(reloaded, name)
        torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)


def test_save_pretrained_of_several_adapters_with_trainable_modules_loads_back(tmp_path):
    """The trainable modules are shared by the adapters: saved once, at the top; each ``<name>/``
    loads beside the top-level adapter and every adapter's logits come back."""
    torch.manual_seed(0)
    base = tiny_llama()
    model = rk.patch_model(copy.deepcopy(base), "red", trainable=["lm_head"])
    _perturb(model, 0)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)  # a "trained" head
    other = rk.patch_model(copy.deepcopy(base), "ia3")
    _perturb(other, 1)
    rk.save_adapter(other, tmp_path / "src" / "b")
    rk.load_adapter(model, tmp_path / "src" / "b")
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "b" / "adapter_config.json").read_text())["trainable"] == []
    reloaded = rk.load_adapter(copy.deepcopy(base), tmp_path / "out")
    rk.load_adapter(reloaded, tmp_path / "out" / "b", adapter_name="b")
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    for name in ("default", "b"):
        rk.set_adapter(model, name)
        rk.set_adapter(reloaded, name)
        torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)


def test_save_pretrained_options(tmp_path):
    model = _patched("red")
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(ValueError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    # a gathered state dict (FSDP / DeepSpeed) is where the tensors come from when given
    state = {k: torch.full_like(v, 3.0) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "sd", state_dict=state)
    fresh = rk.unpatch_model(copy.deepcopy(model))
    rk.load_adapter(fresh, tmp_path / "sd")
    assert all(bool((p == 3).all()) for p in rk.adapter_parameters(fresh).values())
    with pytest.raises(ValueError, match="state_dict lacks"):
        model.save_pretrained(tmp_path / "bad", state_dict={})
    rk.unpatch_model(model)  # transformers' own method is back
    model.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "config.json").exists()


# --- Trainer -------------------------------------------------------------------------------------


def _trainer(model, out, max_steps, eval_dataset=None, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=max_steps,
        save_steps=3,
        learning_rate=3e-2,
        lr_scheduler_type="linear",
        warmup_steps=1,
        weight_decay=0.01,
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        **kw,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_rows(), eval_dataset=eval_dataset)


@pytest.fixture
def transformers_warnings(caplog):
    transformers.utils.logging.enable_propagation()
    caplog.set_level(logging.WARNING)
    yield caplog
    transformers.utils.logging.disable_propagation()


@pytest.mark.parametrize("method", ["red", "red+", "ia3", "para"])
def test_trainer_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path, method, transformers_warnings):
    full = _patched(method)
    _trainer(full, tmp_path / "full", 6).train()
    ckpt = tmp_path / "full" / "checkpoint-3"
    files = sorted(os.listdir(ckpt))
    assert "model.safetensors" in files and "config.json" not in files and "optimizer.pt" in files
    adapter_bytes = sum(p.numel() * p.element_size() for p in rk.adapter_parameters(full).values())
    base_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    assert os.path.getsize(ckpt / "model.safetensors") < adapter_bytes + 64 * 1024 < base_bytes

    resumed = _patched(method)
    _perturb(resumed, 5)  # other vectors than the run's: the checkpoint must bring them back
    transformers_warnings.clear()
    _trainer(resumed, tmp_path / "full", 6).train(resume_from_checkpoint=str(ckpt))
    assert not [r for r in transformers_warnings.records if "keys" in r.getMessage()]
    for (k, a), b in zip(rk.adapter_parameters(full).items(), rk.adapter_parameters(resumed).values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=k)

    # the last checkpoint and save_model() output load into a plain model
    trained_logits = _logits(full)
    for where in (tmp_path / "full" / "checkpoint-6", tmp_path / "final"):
        if where.name == "final":
            _trainer(full, tmp_path / "unused", 1).save_model(str(where))
        plain = rk.unpatch_model(copy.deepcopy(full))
        rk.load_adapter(plain, where)
        torch.testing.assert_close(_logits(plain), trained_logits, rtol=0, atol=0)


def test_trainer_load_best_model_at_end_restores_the_best_vectors(tmp_path, transformers_warnings):
    model = _patched("para")
    trainer = _trainer(
        model,
        tmp_path / "run",
        6,
        eval_strategy="steps",
        eval_steps=3,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        # random tokens: the held-out loss rises as the vectors fit the training rows, so the best is
        # the earlier checkpoint and loading it changes the live vectors (the test can fail)
        greater_is_better=False,
        eval_dataset=_rows(8, seed=3),
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-3")
    assert not [r for r in transformers_warnings.records if "keys" in r.getMessage()]
    from safetensors.torch import load_file

    saved = load_file(os.path.join(best, "model.safetensors"))
    live = model.state_dict()
    assert saved and all(torch.equal(live[k], v) for k, v in saved.items())


def test_resume_without_the_checkpoint_would_differ(tmp_path):
    """The exactness check above can fail: resuming from step 0 vectors ends elsewhere."""
    full = _patched("red")
    _trainer(full, tmp_path / "a", 6).train()
    other = _patched("red")
    _trainer(other, tmp_path / "b", 3).train()
    diffs = [
        (a - b).abs().max().item()
        for a, b in zip(rk.adapter_parameters(full).values(), rk.adapter_parameters(other).values())
    ]
    assert max(diffs) > 1e-3


def test_trainer_with_modules_kept_trainable(tmp_path):
    torch.manual_seed(0)
    model = rk.patch_model(tiny_llama(), "red", trainable="lm_head")
    _trainer(model, tmp_path / "run", 3).train()
    plain = rk.unpatch_model(copy.deepcopy(model))
    with torch.no_grad():
        plain.lm_head.weight.zero_()
    rk.load_adapter(plain, tmp_path / "run" / "checkpoint-3")
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=0, atol=0)


# --- guards --------------------------------------------------------------------------------------


def test_merged_model_whose_config_cannot_describe_its_biases_refuses_save_pretrained(tmp_path):
    model = rk.patch_model(tiny_t5(), "red")
    _perturb(model)
    with pytest.warns(UserWarning, match="config cannot describe"):
        rk.merge_model(model)
    with pytest.raises(ValueError, match="from_pretrained would silently drop"):
        model.save_pretrained(tmp_path / "t5")
    assert not (tmp_path / "t5").exists()


def test_repatched_merged_model_saves_its_adapter_and_refuses_again_when_unpatched(tmp_path):
    """Patching a merged model whose biases its config cannot describe: while patched, save_pretrained
    is the patched model's (checkpoints of the new adapter); unpatched, the refusal is back."""
    model = rk.patch_model(tiny_t5(), "red")
    _perturb(model)
    with pytest.warns(UserWarning, match="config cannot describe"):
        rk.merge_model(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    rk.patch_model(model, "ia3")
    _perturb(model, seed=1)
    model.save_pretrained(tmp_path / "ckpt")  # what Trainer calls at every checkpoint
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["adapter_config.json", "model.safetensors"]
    with torch.no_grad():
        want = model(**_t5_inputs()).logits
    rk.unpatch_model(model)
    with pytest.raises(ValueError, match="from_pretrained would silently drop"):
        model.save_pretrained(tmp_path / "t5")
    assert not (tmp_path / "t5").exists()
    rk.load_adapter(model, tmp_path / "ckpt")  # onto the merged base it was trained on
    with torch.no_grad():
        torch.testing.assert_close(model(**_t5_inputs()).logits, want, rtol=0, atol=0)
    rk.unpatch_model(model)
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())


def _t5_inputs():
    g = torch.Generator().manual_seed(2)
    return {
        "input_ids": torch.randint(3, VOCAB, (2, 7), generator=g),
        "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=g),
    }


def test_merged_model_whose_config_describes_its_biases_saves_and_reloads(tmp_path):
    model = _patched("red+")
    _perturb(model)
    rk.merge_model(model)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=1e-6)


def test_patch_model_refuses_a_peft_model():
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    with pytest.raises(ValueError, match="PEFT modules"):
        rk.patch_model(wrapped, "red")
    assert patch_state(wrapped) is None
    assert all(torch.equal(before[k], v) for k, v in wrapped.state_dict().items())


def test_peft_wrapping_a_patched_model_freezes_the_vectors_as_documented():
    """PEFT freezes every parameter that is not its own: the RED edit then acts as part of the base
    (a trained RED adapter under a LoRA). Set ``requires_grad`` on ``adapter_parameters`` to train both."""
    peft = pytest.importorskip("peft")
    model = _patched("red")
    _perturb(model)
    expected = _logits(model)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=True))
    vectors = rk.adapter_parameters(model)
    assert not any(p.requires_grad for p in vectors.values())
    torch.testing.assert_close(_logits(wrapped), expected, rtol=0, atol=1e-6)  # LoRA B = 0 at init
    for p in vectors.values():
        p.requires_grad_(True)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vectors.values())


def test_gpt2_trainer_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = rk.patch_model(tiny_gpt2(), "red")
    _trainer(model, tmp_path / "run", 3).train()
    plain = rk.unpatch_model(copy.deepcopy(model))
    rk.load_adapter(plain, tmp_path / "run" / "checkpoint-3")
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=0, atol=0)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"weights": "pytorch_model.bin"}, "field 'weights' must be one of"),
        ({"adapter_name": None}, "field 'adapter_name' must be the saved adapter's name"),
        ({"adapter_name": "other"}, "lacks"),  # the keys hold the name the adapter was saved under
    ],
)
def test_damaged_checkpoint_config_is_refused_and_the_model_is_left_alone(tmp_path, edit, message):
    model = _patched("red")
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta.update(edit)
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    plain = rk.unpatch_model(copy.deepcopy(model))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        rk.load_adapter(plain, tmp_path)
    assert patch_state(plain) is None and plain.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
