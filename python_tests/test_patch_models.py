"""patch_model / unpatch_model on tiny random-weight LLaMA (GQA), RoBERTa, T5 (relu and gated-gelu),
GPT-2, and look-alikes recognised by structure (Mistral, Qwen2, BERT)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from _hf_models import TINY, TINY_LOOKALIKES, inputs_for, logits, randomize_edits
from torch import nn

import red_kernels as rk

ALL = {**TINY, **TINY_LOOKALIKES}

# Expected targets per layer/block (suffixes after the layer prefix), per method.
EXPECTED = {
    "llama": (["mlp.down_proj"], [f"self_attn.{p}_proj" for p in "qkvo"]),
    "roberta": (
        ["output.dense"],
        ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
    ),
    "t5": (["DenseReluDense.wo"], [f"{a}.{p}" for a in ("SelfAttention", "EncDecAttention") for p in "qkvo"]),
    "gpt2": (["mlp.c_proj"], ["attn.c_attn", "attn.c_proj"]),
}
ARCH_OF = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "roberta": "roberta",
    "bert": "roberta",
    "t5-relu": "t5",
    "t5-gated-gelu": "t5",
    "gpt2": "gpt2",
}
LAYER_PREFIX = {
    "llama": r"model\.layers\.\d+\.",
    "roberta": r"(roberta|bert)\.encoder\.layer\.\d+\.",
    "t5": r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.",
    "gpt2": r"transformer\.h\.\d+\.",
}


def _expected_targets(model, arch: str, method: str) -> list[str]:
    red, plus = EXPECTED[arch]
    suffixes = red + (plus if method == "red+" else [])
    rx = re.compile(LAYER_PREFIX[arch] + "(" + "|".join(re.escape(s) for s in suffixes) + ")")
    return [n for n, _ in model.named_modules() if rx.fullmatch(n)]


@pytest.mark.parametrize("method", ["red", "red+"])
@pytest.mark.parametrize("name", list(ALL))
def test_default_targets_freeze_and_identity_at_step_0(name, method):
    model = ALL[name]()
    inputs = inputs_for(model)
    with torch.no_grad():
        before = logits(model, inputs)
    rk.patch_model(model, method)
    state = rk.patch.patch_state(model)
    arch = ARCH_OF[name]
    assert state.architecture == arch
    expected = _expected_targets(model, arch, method)
    assert state.targets == expected and expected
    layers = model.config.num_hidden_layers if arch != "t5" else 2 * model.config.num_layers
    per_layer = {"red": 1, "red+": {"llama": 5, "roberta": 5, "gpt2": 3, "t5": None}[arch]}[method]
    if per_layer:
        assert len(expected) == layers * per_layer
    else:  # T5 RED+: 4 self-attention projections everywhere, 4 cross-attention ones in the decoder
        assert len(expected) == layers * 5 + model.config.num_decoder_layers * 4
    # Only the edit vectors train, and there are two per target of the target's output width.
    modules = dict(model.named_modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.red_edit.default.{v}" for t in expected for v in ("scale", "bias")}
    assert rk.trainable_parameters(model).edit == 2 * sum(state.dims[t] for t in expected)
    for t in expected:
        assert isinstance(modules[t].red_edit["default"], rk.nn.REDEdit)
    with torch.no_grad():
        after = logits(model, inputs)
    assert torch.equal(before, after)  # exactly: scale 1 and bias 0 are exact in fp32


def test_gpt2_c_attn_gets_one_vector_of_3d():
    model = TINY["gpt2"]()
    rk.patch_model(model, "red+")
    d = model.config.n_embd
    assert model.transformer.h[0].attn.c_attn.red_edit["default"].scale.shape == (3 * d,)
    assert model.transformer.h[0].attn.c_proj.red_edit["default"].scale.shape == (d,)


def test_llama_gqa_kv_vectors_have_kv_width():
    model = TINY["llama"]()
    rk.patch_model(model, "red+")
    attn = model.model.layers[0].self_attn
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert (
        attn.k_proj.red_edit["default"].dim
        == attn.v_proj.red_edit["default"].dim
        == model.config.num_key_value_heads * head_dim
    )
    assert attn.q_proj.red_edit["default"].dim == model.config.hidden_size


def test_roberta_ffn_edit_sits_before_dropout_and_layernorm():
    model = TINY["roberta"]()
    rk.patch_model(model, "red")
    layer = model.roberta.encoder.layer[0]
    assert hasattr(layer.output.dense, "red_edit")
    assert not hasattr(layer.attention.output.dense, "red_edit")
    # A bias edit on output.dense must reach the LayerNorm input: check by a probe.
    seen = {}
    layer.output.LayerNorm.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    x = torch.randn(1, 3, 64)
    res = torch.randn(1, 3, 32)
    with torch.no_grad():
        layer.output.dense.red_edit["default"].bias.fill_(5.0)
        out = layer.output(x, res)
        ref = layer.output.LayerNorm(layer.output.dense(x) + res)  # dense(x) already includes the edit
    assert torch.allclose(
        seen["x"], nn.functional.linear(x, layer.output.dense.weight, layer.output.dense.bias) + 5 + res, atol=1e-5
    )
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", list(TINY))
def test_unpatch_restores_module_tree_and_state_dict_bit_for_bit(name):
    model = TINY[name]()
    next(model.parameters()).requires_grad_(False)  # mixed flags: each must come back as it was
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    tree = repr(model)
    rk.patch_model(model, "red+", trainable=None)
    randomize_edits(model)
    rk.unpatch_model(model)
    assert repr(model) == tree
    after = model.state_dict()
    assert list(after) == list(sd)
    for k, v in sd.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(m._forward_hooks for m in model.modules())
    assert rk.patch.patch_state(model) is None
    rk.patch_model(model, "red")  # and it can be patched again


def test_patching_twice_raises():
    model = TINY["llama"]()
    rk.patch_model(model, "red")
    with pytest.raises(ValueError, match="already patched"):
        rk.patch_model(model, "red+")
    rk.unpatch_model(model)
    with pytest.raises(ValueError, match="not patched"):
        rk.unpatch_model(model)
    with pytest.raises(ValueError, match="not patched"):
        rk.merge_model(model)


def test_unknown_method():
    model = TINY["gpt2"]()
    with pytest.raises(ValueError, match="method"):
        rk.patch_model(model, "lora")
    assert rk.patch.patch_state(model) is None


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)) for _ in range(2))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for b in self.blocks:
            x = nn.functional.pad(b(x), (0, 4))
        return self.head(x[..., :4])


def test_unsupported_architecture_error_lists_layouts_and_targets_hint():
    with pytest.raises(ValueError) as exc:
        rk.patch_model(_Toy(), "red")
    msg = str(exc.value)
    for word in ("llama", "roberta", "t5", "gpt2", "targets="):
        assert word in msg


def test_red_plus_needs_every_attention_projection():
    model = TINY["llama"]()
    # A fused-qkv layout (like Phi-3) has no q_proj: RED works, RED+ is refused with the hint.
    for layer in model.model.layers:
        del layer.self_attn.q_proj
    rk.patch_model(model, "red")
    rk.unpatch_model(model)
    with pytest.raises(ValueError, match="targets="):
        rk.patch_model(model, "red+")


def test_custom_targets_and_trainable_head():
    model = _Toy()
    rk.patch_model(model, "red", targets=["blocks.*.2"], trainable="head")
    state = rk.patch.patch_state(model)
    assert state.targets == ["blocks.0.2", "blocks.1.2"] and state.architecture == "custom"
    assert state.trainable == ["head"]
    counts = rk.trainable_parameters(model)
    assert counts.edit == 2 * 2 * 4 and counts.modules == 4 * 2 + 2
    assert counts.trainable == counts.edit + counts.modules
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"} | {
        f"blocks.{i}.2.red_edit.default.{v}" for i in (0, 1) for v in ("scale", "bias")
    }
    rk.unpatch_model(model)
    rk.patch_model(model, "red", targets=[r"re:blocks\.1\.0"])
    assert rk.patch.patch_state(model).targets == ["blocks.1.0"]


def test_targets_override_the_table_on_a_hf_model():
    model = TINY["llama"]()
    rk.patch_model(model, "red", targets=["mlp.up_proj"])
    state = rk.patch.patch_state(model)
    assert state.targets == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert state.architecture == "llama" and state.dims[state.targets[0]] == model.config.intermediate_size


def test_bad_targets_leave_the_model_untouched():
    model = TINY["gpt2"]()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="match no module"):
        rk.patch_model(model, "red", targets=["mlp.nonexistent"])
    with pytest.raises(ValueError, match="Linear or transformers' Conv1D"):
        rk.patch_model(model, "red", targets=["ln_1"])
    with pytest.raises(ValueError, match="trainable"):
        rk.patch_model(model, "red", trainable=["no_such_head"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(isinstance(m, rk.nn.REDEdit) for m in model.modules())
    assert rk.patch.patch_state(model) is None


def test_red_edit_module_and_wrapper():
    edit = rk.nn.REDEdit(6)
    assert edit.scale.dtype == torch.float32 and torch.equal(edit.scale, torch.ones(6))
    assert torch.equal(edit.bias, torch.zeros(6))
    lin = nn.Linear(5, 6).to(torch.bfloat16)
    wrapped = rk.nn.REDWrapped(lin, edit)
    x = torch.randn(3, 5, dtype=torch.bfloat16)
    assert torch.equal(wrapped(x), lin(x))
    with torch.no_grad():
        edit.scale.copy_(torch.arange(6.0))
        edit.bias.fill_(0.5)
    assert torch.equal(wrapped(x), rk.red_edit_reference(lin(x), edit.scale, edit.bias))
    assert rk.nn.REDEdit(6, bias=False).bias is None and rk.nn.REDEdit(6, scale=False).scale is None
    with pytest.raises(ValueError, match="dim"):
        rk.nn.REDEdit(0)
    with pytest.raises(ValueError, match="scale"):
        rk.nn.REDEdit(4, scale=False, bias=False)
    with pytest.raises(ValueError, match="last dim"):
        edit(torch.randn(2, 5))


def test_ablations_scale_only_and_bias_only():
    model = TINY["llama"]()
    rk.patch_model(model, "red", bias=False)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"scale"}
    rk.unpatch_model(model)
    rk.patch_model(model, "red", scale=False)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"bias"}


def test_state_dict_keys_sit_beside_the_target():
    model = TINY["t5-gated-gelu"]()
    base_keys = list(model.state_dict())
    rk.patch_model(model, "red")
    keys = list(model.state_dict())
    new = [k for k in keys if k not in base_keys]
    assert new and all(
        re.fullmatch(r"(encoder|decoder)\.block\.\d\.layer\.\d\.DenseReluDense\.wo\.red_edit\.default\.(scale|bias)", k)
        for k in new
    )
    assert [k for k in keys if k in base_keys] == base_keys


def test_deepcopy_of_a_patched_model_is_independent():
    model = TINY["gpt2"]()
    rk.patch_model(model, "red")
    randomize_edits(model)
    twin = copy.deepcopy(model)
    inputs = inputs_for(model)
    with torch.no_grad():
        assert torch.equal(logits(twin, inputs), logits(model, inputs))
    rk.unpatch_model(twin)
    assert rk.patch.patch_state(model) is not None and model.transformer.h[0].mlp.c_proj.red_edit is not None
    assert not any(m._forward_hooks for m in twin.modules())


def test_a_hand_built_wrapper_is_not_a_patch():
    model = nn.Sequential(rk.nn.REDWrapped(nn.Linear(4, 4), rk.nn.REDEdit(4)), nn.Linear(4, 4))
    rk.patch_model(model, "red", targets=["1"])
    assert rk.patch.patch_state(model).targets == ["1"]


@pytest.mark.parametrize("method", ["red", "para"])
@pytest.mark.parametrize("arch", ["llama", "t5-relu", "gpt2"])
def test_a_deleted_patched_model_is_freed_without_the_garbage_collector(arch, method):
    """No reference cycle through the model (a method bound to it stored on it would make one): a
    bank of tenants built from patched copies must not keep each copy until a full gc pass."""
    import gc
    import weakref

    model = rk.patch_model(TINY[arch](), method)
    args = inputs_for(model)
    with torch.no_grad():
        model(**args)
    gc.collect()
    gc.disable()
    try:
        ref = weakref.ref(model)
        del model
        assert ref() is None
    finally:
        gc.enable()


# --- a wrapper (FSDP2's fully_shard) subclassing the patched classes again ----------------------


def _wrap(module: nn.Module) -> None:
    """What FSDP2's fully_shard does to a module's class: a new subclass of the current one."""
    module.__class__ = type("Wrapped" + type(module).__name__, (type(module),), {})


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def _patched_and_trained(name: str, method: str) -> nn.Module:
    torch.manual_seed(0)
    model = rk.patch_model(TINY[name](), method)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in rk.adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("wrapped", ["root", "layers", "both"])
@pytest.mark.parametrize("method", ["red", "para"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_unpatch_under_a_wrapper_subclass_refuses_and_leaves_the_model_patched(name, method, wrapped):
    """A class that patching gave a module (the root model's; PARA's layers') cannot be given back
    once a wrapper subclassed it again: unpatch_model says so and changes nothing. RED gives the
    layers no class, so with only the layers wrapped it unpatches."""
    model = _patched_and_trained(name, method)
    inputs = inputs_for(model)
    with torch.no_grad():
        want = logits(model, inputs)
    if wrapped in ("layers", "both"):
        for layer in _layers(model):
            _wrap(layer)
    if wrapped in ("root", "both"):
        _wrap(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    names = list(model.state_dict())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    refused = wrapped != "layers" or method == "para"
    if not refused:
        rk.unpatch_model(model)
        assert type(model).__name__ == type(model).__qualname__  # its own class again
        assert not any(m._forward_hooks for m in model.modules())
        return
    first_layer = {"llama": "model.layers.0", "gpt2": "transformer.h.0"}[name]
    first = "(the model itself)" if wrapped != "layers" else first_layer
    with pytest.raises(RuntimeError, match=rf"unpatch_model: module '{re.escape(first)}' .*before wrapping"):
        rk.unpatch_model(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert list(model.state_dict()) == names
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert rk.patch.patch_state(model) is not None
    with torch.no_grad():
        assert torch.equal(logits(model, inputs), want)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merge_under_a_wrapper_subclass_refuses_before_folding(name):
    """merge_model ends by unpatching, which a wrapper's subclass prevents: it must refuse before it
    folds anything into the weights, not after."""
    model = _patched_and_trained(name, "red")
    _wrap(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"merge_model: module '\(the model itself\)' .*before wrapping"):
        rk.merge_model(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert rk.patch.patch_state(model) is not None
