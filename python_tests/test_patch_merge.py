"""merge_model: edits folded into the preceding Linear / Conv1D; plain model, same outputs; LLaMA's
bias switches make the merged model reload with transformers alone."""

from __future__ import annotations

import warnings

import pytest
import torch
from _hf_models import TINY, TINY_LOOKALIKES, inputs_for, logits, randomize_edits, transformers
from torch import nn

import red_kernels as rk


def _rel_close(out, ref, rtol):
    err = (out - ref).abs().max().item()
    assert err <= rtol * ref.abs().max().item(), f"max error {err:.3g} vs scale {ref.abs().max().item():.3g}"


@pytest.mark.parametrize("method", ["red", "red+"])
@pytest.mark.parametrize("name", list(TINY) + ["qwen2"])
def test_merge_matches_patched_and_leaves_a_plain_model(name, method):
    model = {**TINY, **TINY_LOOKALIKES}[name]()
    inputs = inputs_for(model)
    base_keys = set(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rk.patch_model(model, method)
    randomize_edits(model)
    with torch.no_grad():
        patched = logits(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # T5 (and Qwen2's o_proj) warn that biases exist only in memory
        merged_model = rk.merge_model(model)
    assert merged_model is model
    assert not any(isinstance(m, rk.nn.REDEdit) for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    assert rk.patch.patch_state(model) is None
    assert not any(type(m).__module__.startswith("red_kernels") for m in model.modules())
    assert not any(".red_edit." in k for k in model.state_dict())
    assert base_keys <= set(model.state_dict())  # plus any biases the merge added
    assert {n: p.requires_grad for n, p in model.named_parameters() if n in flags} == flags
    with torch.no_grad():
        merged = logits(model, inputs)
    _rel_close(merged, patched, 1e-5)


def test_merge_conv1d_scales_columns():
    model = TINY["gpt2"]()
    rk.patch_model(model, "red")
    conv = model.transformer.h[0].mlp.c_proj
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    randomize_edits(model)
    s, c = conv.red_edit["default"].scale.detach().clone(), conv.red_edit["default"].bias.detach().clone()
    rk.merge_model(model)
    assert conv.weight.shape == w.shape  # [in, out]
    torch.testing.assert_close(conv.weight, w * s[None, :], rtol=0, atol=0)
    torch.testing.assert_close(conv.bias, s * b + c)


def test_merge_linear_without_bias_gets_one():
    lin = nn.Linear(5, 3, bias=False)
    holder = nn.Sequential(lin)
    rk.patch_model(holder, "red", targets=["0"])
    randomize_edits(holder)
    x = torch.randn(4, 5)
    with torch.no_grad():
        ref = holder(x)
    s, c = lin.red_edit["default"].scale.detach().clone(), lin.red_edit["default"].bias.detach().clone()
    w = lin.weight.detach().clone()
    rk.merge_model(holder)
    assert isinstance(lin.bias, nn.Parameter) and lin.bias.requires_grad  # like the restored weight
    assert lin.weight.requires_grad
    torch.testing.assert_close(lin.weight, w * s[:, None], rtol=0, atol=0)
    torch.testing.assert_close(lin.bias, c, rtol=0, atol=0)
    with torch.no_grad():
        _rel_close(holder(x), ref, 1e-5)


def test_merge_bias_only_ablation_keeps_weights():
    model = TINY["llama"]()
    rk.patch_model(model, "red", scale=False)
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    randomize_edits(model)
    rk.merge_model(model)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, w)


def test_merge_bf16_model_fp32_vectors():
    model = TINY["llama"]().to(torch.bfloat16)
    inputs = inputs_for(model)
    rk.patch_model(model, "red")
    randomize_edits(model)
    with torch.no_grad():
        patched = logits(model, inputs).float()
    rk.merge_model(model)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.down_proj.bias.dtype == torch.bfloat16
    with torch.no_grad():
        merged = logits(model, inputs).float()
    _rel_close(merged, patched, 0.05)  # bf16 rounding of the folded weights


@pytest.mark.parametrize(("method", "switches"), [("red", ["mlp_bias"]), ("red+", ["mlp_bias", "attention_bias"])])
def test_merged_llama_round_trips_through_transformers(tmp_path, method, switches):
    model = TINY["llama"]()
    inputs = inputs_for(model)
    rk.patch_model(model, method)
    randomize_edits(model)
    with torch.no_grad():
        patched = logits(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the config describes every new bias: no warning
        rk.merge_model(model)
    for attr in switches:
        assert getattr(model.config, attr) is True
    # The other layers of the group got zero biases, so the checkpoint is complete.
    assert torch.equal(model.model.layers[0].mlp.up_proj.bias, torch.zeros(model.config.intermediate_size))
    model.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert set(reloaded.state_dict()) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    with torch.no_grad():
        _rel_close(logits(reloaded, inputs), patched, 1e-5)


def test_t5_merge_warns_that_biases_live_only_in_memory():
    model = TINY["t5-relu"]()
    rk.patch_model(model, "red")
    randomize_edits(model)
    with pytest.warns(UserWarning, match="from_pretrained will not reload"):
        rk.merge_model(model)
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.bias is not None
    assert not hasattr(model.config, "mlp_bias")


def test_merge_without_new_biases_is_silent():
    model = TINY["gpt2"]()  # Conv1D always has a bias
    rk.patch_model(model, "red+")
    randomize_edits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rk.merge_model(model)


def test_merge_refuses_non_float_weights_and_leaves_the_patch():
    holder = nn.Sequential(nn.Linear(4, 4))
    rk.patch_model(holder, "red", targets=["0"])
    holder[0].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)  # "quantized"
    with pytest.raises(ValueError, match="cannot fold"):
        rk.merge_model(holder)
    assert rk.patch.patch_state(holder) is not None and isinstance(holder[0].red_edit["default"], rk.nn.REDEdit)
