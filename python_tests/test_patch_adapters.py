"""save_adapter / load_adapter: safetensors + JSON, round trips, and clear errors that leave the
model untouched."""

from __future__ import annotations

import json

import pytest
import torch
from _hf_models import TINY, inputs_for, logits, randomize_edits
from safetensors.torch import load_file, save_file

import red_kernels as rk


def _trained(name="llama", method="red", **kw):
    model = TINY[name]()
    rk.patch_model(model, method, **kw)
    randomize_edits(model)
    return model


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        repr(model),
    )


def _assert_untouched(model, snap):
    sd, flags, tree = snap
    assert repr(model) == tree and rk.patch.patch_state(model) is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == list(sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("method", ["red", "red+"])
@pytest.mark.parametrize("name", list(TINY))
def test_round_trip(tmp_path, name, method):
    torch.manual_seed(0)
    model = _trained(name, method)
    inputs = inputs_for(model)
    with torch.no_grad():
        ref = logits(model, inputs)
    rk.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    tensors = load_file(tmp_path / "adapter.safetensors")
    # The file's keys are the parameter names without the adapter's name.
    trained = {n.replace(".default.", ".") for n, p in model.named_parameters() if p.requires_grad}
    assert set(tensors) == trained
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["method"] == method and meta["targets"] == rk.patch.patch_state(model).targets

    torch.manual_seed(0)
    fresh = TINY[name]()  # same seed: same base weights
    assert rk.load_adapter(fresh, tmp_path) is fresh
    state = rk.patch.patch_state(fresh)
    assert state.method == method and state.architecture == meta["architecture"]
    with torch.no_grad():
        assert torch.equal(logits(fresh, inputs), ref)
    assert {n.replace(".default.", ".") for n, p in fresh.named_parameters() if p.requires_grad} == set(tensors)


def test_trainable_head_is_saved_and_reported(tmp_path):
    torch.manual_seed(0)
    model = _trained("roberta", "red", trainable=["classifier"])
    with torch.no_grad():
        model.classifier.out_proj.weight.add_(1.0)  # "trained" head
    counts = rk.trainable_parameters(model)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert counts.modules == head and counts.edit == 2 * 2 * model.config.hidden_size
    rk.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["trainable"] == ["classifier"]
    assert meta["num_parameters"] == {"edit": counts.edit, "modules": head}
    torch.manual_seed(0)
    fresh = TINY["roberta"]()
    rk.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh.classifier.out_proj.weight, model.classifier.out_proj.weight)
    assert fresh.classifier.out_proj.weight.requires_grad
    inputs = inputs_for(model)
    with torch.no_grad():
        assert torch.equal(logits(fresh, inputs), logits(model, inputs))


def test_tied_trainable_weights_save(tmp_path):
    model = TINY["gpt2"]()
    assert model.lm_head.weight is model.transformer.wte.weight
    rk.patch_model(model, "red", trainable=["lm_head"])
    rk.save_adapter(model, tmp_path)
    assert "lm_head.weight" in load_file(tmp_path / "adapter.safetensors")


def test_load_into_a_patched_model_adds_a_named_adapter(tmp_path):
    a = _trained("gpt2", "red")
    rk.save_adapter(a, tmp_path / "tenant_a")
    b = TINY["gpt2"]()
    rk.patch_model(b, "red+")
    rk.load_adapter(b, tmp_path / "tenant_a")  # named after its directory, frozen and inactive
    assert rk.adapter_names(b) == ["default", "tenant_a"]
    ka = {k.replace(".default.", ".tenant_a."): v for k, v in a.state_dict().items() if ".red_edit." in k}
    sd = b.state_dict()
    assert ka and all(torch.equal(sd[k], v) for k, v in ka.items())
    assert not any(p.requires_grad for p in rk.adapter_parameters(b, "tenant_a").values())
    with pytest.raises(ValueError, match="already has an adapter named 'tenant_a'"):
        rk.load_adapter(b, tmp_path / "tenant_a")
    assert rk.adapter_names(b) == ["default", "tenant_a"]


def test_load_then_merge(tmp_path):
    model = _trained("llama", "red+")
    inputs = inputs_for(model)
    with torch.no_grad():
        ref = logits(model, inputs)
    rk.save_adapter(model, tmp_path)
    fresh = TINY["llama"]()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".red_edit." not in k})
    rk.merge_model(rk.load_adapter(fresh, tmp_path))
    with torch.no_grad():
        out = logits(fresh, inputs)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_vector_dtype_round_trips(tmp_path):
    model = _trained("llama", "red", dtype=torch.bfloat16)
    rk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["dtype"] == "bfloat16"
    fresh = rk.load_adapter(TINY["llama"](), tmp_path)
    assert fresh.model.layers[0].mlp.down_proj.red_edit["default"].scale.dtype == torch.bfloat16


def test_wrong_architecture_is_refused_untouched(tmp_path):
    rk.save_adapter(_trained("llama"), tmp_path)
    gpt2 = TINY["gpt2"]()
    snap = _snapshot(gpt2)
    with pytest.raises(ValueError, match="model_type 'llama'.*unchanged"):
        rk.load_adapter(gpt2, tmp_path)
    _assert_untouched(gpt2, snap)


def test_wrong_dims_are_refused_untouched(tmp_path):
    rk.save_adapter(_trained("llama"), tmp_path)
    from _hf_models import tiny_llama

    wider = tiny_llama(hidden_size=48, intermediate_size=64)
    snap = _snapshot(wider)
    with pytest.raises(ValueError, match="output width 48.*width 32"):
        rk.load_adapter(wider, tmp_path)
    _assert_untouched(wider, snap)


def test_fewer_layers_are_refused_untouched(tmp_path):
    rk.save_adapter(_trained("llama"), tmp_path)
    from _hf_models import tiny_llama

    short = tiny_llama(num_hidden_layers=1)
    snap = _snapshot(short)
    with pytest.raises(ValueError, match="no module"):
        rk.load_adapter(short, tmp_path)
    _assert_untouched(short, snap)


def test_missing_and_extra_keys_are_refused_untouched(tmp_path):
    rk.save_adapter(_trained("t5-relu"), tmp_path)
    path = tmp_path / "adapter.safetensors"
    tensors = load_file(path)
    missing = dict(tensors)
    missing.pop(sorted(missing)[0])
    save_file(missing, path)
    model = TINY["t5-relu"]()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        rk.load_adapter(model, tmp_path)
    _assert_untouched(model, snap)
    save_file({**tensors, "encoder.extra": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="has 1 tensor"):
        rk.load_adapter(model, tmp_path)
    bad = dict(tensors)
    k = sorted(bad)[0]
    bad[k] = torch.zeros(bad[k].numel() + 1)
    save_file(bad, path)
    with pytest.raises(ValueError, match="shape"):
        rk.load_adapter(model, tmp_path)
    _assert_untouched(model, snap)


def test_not_an_adapter_directory(tmp_path):
    model = TINY["gpt2"]()
    with pytest.raises(ValueError, match="adapter_config.json"):
        rk.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a red_kernels adapter"):
        rk.load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="not patched"):
        rk.save_adapter(model, tmp_path)


def test_no_pickle_in_the_adapter(tmp_path):
    rk.save_adapter(_trained("gpt2"), tmp_path)
    raw = (tmp_path / "adapter.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: a JSON header and raw buffers
    assert header["__metadata__"]["producer"] == "red_kernels.adapter"
    assert b"\x80\x04" not in raw[:2] and raw[8:9] == b"{"
