"""PEFT IA3 adapters (issue 13): a directory saved by PEFT's ``save_pretrained`` loads with
``rk.load_adapter`` and computes what PEFT's own model computes, merges, and serves as a tenant.

Truth is PEFT itself: each adapter is made with ``peft.get_peft_model(base, IA3Config())`` (PEFT's
default IA3 targets of the architecture), its vectors moved away from ones (as after training), and
compared against the PEFT model: a loaded adapter, the merged model, and each row of a batch that
mixes IA3 adapters (and a RED one) with base rows. Directories that red_kernels cannot represent
exactly are refused with a ValueError naming the file and the field, the model left as it was.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from _hf_models import VOCAB, tiny_decoder, tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2, tiny_roberta, tiny_t5
from safetensors.torch import load_file, save_file

import red_kernels as rk

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_gemma():
    return tiny_decoder("Gemma", head_dim=8)


def tiny_mt5():
    """mT5 (gated-gelu FFN, untied head): PEFT's table scales wi_1's output, no feed-forward target."""
    return tiny_t5("gated-gelu", family="MT5")


BASES = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,  # PEFT: q_proj, v_proj (not k_proj), down_proj
    "gemma": tiny_gemma,  # the same as Qwen2
    "gpt2": tiny_gpt2,
    "roberta": tiny_roberta,
    "t5": lambda: tiny_t5("relu"),
    "t5-gated": lambda: tiny_t5("gated-gelu"),
    "mt5": tiny_mt5,
}
# The modules whose INPUT PEFT's default IA3 scales (its feed-forward targets), per layer.
FEEDFORWARD = {
    "llama": ["mlp.down_proj"],
    "qwen2": ["mlp.down_proj"],
    "gemma": ["mlp.down_proj"],
    "gpt2": ["mlp.c_proj"],
    "roberta": ["attention.output.dense", "output.dense"],  # PEFT's "output.dense" ends both
    "t5": ["DenseReluDense.wo"],
    "t5-gated": ["DenseReluDense.wo"],
    "mt5": [],  # PEFT's mT5 table has no feed-forward module
}
ATOL = 1e-5


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _peft_ia3(base, directory, seed: int, **config):
    """PEFT's IA3 model of a copy of ``base`` (default targets unless given), vectors perturbed, saved."""
    model = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.IA3Config(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    _quiet(model.save_pretrained, directory)
    return model.eval()


def _inputs(arch: str, batch: int = 4, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, : b % 3] = 0  # left padding, different per row
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "t5" in arch:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return inputs


def _out(model, inputs) -> torch.Tensor:
    """Per-position outputs: logits of a language model, RoBERTa's last hidden states and its logits."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    if out.logits.dim() == 2:  # sequence classification: both the hidden states and the head's logits
        return torch.cat([out.hidden_states[-1].flatten(1), out.logits], 1)
    return out.logits


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Per architecture: the base model and two saved PEFT IA3 adapters (their PEFT models)."""
    root = tmp_path_factory.mktemp("peft_ia3")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            torch.manual_seed(0)
            base = BASES[arch]()
            models = {}
            for i, name in enumerate(("ia", "ib")):
                models[name] = _peft_ia3(base, root / arch / name, seed=10 + i)
            cache[arch] = (base, models, {n: root / arch / n for n in models})
        return cache[arch]

    return get


ARCHS = list(BASES)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_directory_loads_and_equals_peft(made, arch):
    base, models, dirs = made(arch)
    inputs = _inputs(arch)
    want = _out(models["ia"], inputs)
    assert _max_diff(want, _out(base, inputs)) > 1e-2  # the adapter does change the outputs
    model = copy.deepcopy(base)
    assert rk.load_adapter(model, dirs["ia"]) is model
    assert rk.adapter_names(model) == ["default"]
    config = rk.patch.patch_state(model).adapters["default"]
    assert config.method == "ia3" and not config.bias
    # The targets are PEFT's; the feed-forward ones are scaled on their input.
    peft_targets = sorted(
        n.removeprefix("base_model.model.").removesuffix(".ia3_l.default")
        for n, _ in models["ia"].named_parameters()
        if "ia3_l" in n
    )
    assert sorted(config.targets) == peft_targets
    assert bool(config.inputs) == bool(FEEDFORWARD[arch])
    assert all(any(t.endswith("." + f) for f in FEEDFORWARD[arch]) for t in config.inputs)
    assert all(t in config.inputs for t in config.targets if t.endswith(tuple("." + f for f in FEEDFORWARD[arch])))
    got = _out(model, inputs)
    print(f"{arch}: max |red_kernels - PEFT| = {_max_diff(got, want):.3g}")
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    # Training it trains the scales on both sides (PEFT's model has these parameters trainable too).
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(rk.adapter_parameters(model))


def _peft_default_targets(base) -> tuple[list[str], list[str]]:
    """(targets, feed-forward targets) of ``peft.get_peft_model(base, IA3Config())``, in module order."""
    model = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.IA3Config())
    layers = [
        (n.removeprefix("base_model.model."), m)
        for n, m in model.named_modules()
        if isinstance(m, peft.tuners.ia3.IA3Layer)
    ]
    return [n for n, _ in layers], [n for n, m in layers if m.is_feedforward]


def _own_default_targets(base) -> tuple[list[str], list[str]]:
    config = rk.patch.patch_state(rk.patch_model(copy.deepcopy(base), "ia3")).config
    return config.targets, config.inputs


def tiny_qwen3():
    return tiny_decoder("Qwen3", head_dim=8)


def tiny_gemma2():
    return tiny_decoder("Gemma2", head_dim=8)


@pytest.mark.parametrize(
    "build", [tiny_mistral, tiny_qwen3, tiny_gemma2, lambda: _quiet(transformers.MT5EncoderModel, tiny_mt5().config)]
)
def test_own_ia3_targets_are_peft_defaults_of_more_model_types(build):
    """Model types that share a layout but not PEFT's IA3 table: the edited modules, and which are
    scaled on their input, are what ``get_peft_model(model, IA3Config())`` wraps."""
    base = build()
    assert _own_default_targets(base) == _peft_default_targets(base)


@pytest.mark.parametrize("build", [tiny_t5, tiny_mt5])
def test_chosen_ia3_targets_take_the_side_peft_gives_them(build):
    """``targets=`` chosen by the user: which of them are scaled on their input follows the model
    type's table as PEFT's ``IA3Config(target_modules=...)`` does (T5: wo's input; mT5, whose table
    has no feed-forward module: wo's output)."""
    base = build()
    own = rk.patch.patch_state(rk.patch_model(copy.deepcopy(base), "ia3", targets=["wo"])).config
    model = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.IA3Config(target_modules=["wo"]))
    layers = [
        (n.removeprefix("base_model.model."), m)
        for n, m in model.named_modules()
        if isinstance(m, peft.tuners.ia3.IA3Layer)
    ]
    assert (own.targets, own.inputs) == ([n for n, _ in layers], [n for n, m in layers if m.is_feedforward])
    assert own.targets


@pytest.mark.parametrize("arch", ARCHS)
def test_own_ia3_table_is_peft_default(made, arch):
    """``patch_model(model, "ia3")`` touches what PEFT's default IA3Config touches, on the same side."""
    base, _, dirs = made(arch)
    assert _own_default_targets(base) == _peft_default_targets(base)
    own = copy.deepcopy(base)
    rk.patch_model(own, "ia3")
    loaded = copy.deepcopy(base)
    rk.load_adapter(loaded, dirs["ia"])
    mine, theirs = rk.patch.patch_state(own).config, rk.patch.patch_state(loaded).config
    assert (mine.targets, mine.inputs, mine.dims) == (theirs.targets, theirs.inputs, theirs.dims)
    inputs = _inputs(arch)
    assert torch.equal(_out(own, inputs), _out(base, inputs))  # ones: the identity


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_peft_adapter_equals_peft(made, arch):
    base, models, dirs = made(arch)
    inputs = _inputs(arch)
    model = copy.deepcopy(base)
    rk.load_adapter(model, dirs["ia"])
    keys = set(base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # IA3 adds no bias: nothing to warn about
        rk.merge_model(model)
    assert rk.patch.patch_state(model) is None
    hooks = lambda m: [(len(x._forward_hooks), len(x._forward_pre_hooks)) for x in m.modules()]  # noqa: E731
    assert hooks(model) == hooks(base)  # none of red_kernels' left (transformers adds its own)
    assert set(model.state_dict()) == keys
    got, want = _out(model, inputs), _out(models["ia"], inputs)
    print(f"{arch}: merged max |red_kernels - PEFT| = {_max_diff(got, want):.3g}")
    # Folding rounds each weight once in fp32: relative error, seen on mT5's larger logits (~2).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=ATOL)
    # PEFT's own merge agrees on the weights.
    peft_merged = _quiet(copy.deepcopy(models["ia"]).merge_and_unload)
    for k, v in peft_merged.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_merge_folds_input_scales_into_columns(made):
    base, _, dirs = made("gpt2")
    model = copy.deepcopy(base)
    rk.load_adapter(model, dirs["ia"])
    conv = model.transformer.h[0].mlp.c_proj  # Conv1D, weight [in, out], IA3 on its input
    lin_model = copy.deepcopy(made("llama")[0])
    rk.load_adapter(lin_model, made("llama")[2]["ia"])
    lin = lin_model.model.layers[0].mlp.down_proj  # Linear, weight [out, in]
    s_conv = conv.red_edit_in["default"].scale.detach().clone()
    s_lin = lin.red_edit_in["default"].scale.detach().clone()
    w_conv, b_conv, w_lin = conv.weight.detach().clone(), conv.bias.detach().clone(), lin.weight.detach().clone()
    rk.merge_model(model)
    rk.merge_model(lin_model)
    torch.testing.assert_close(conv.weight, w_conv * s_conv[:, None], rtol=0, atol=0)
    assert torch.equal(conv.bias, b_conv)
    torch.testing.assert_close(lin.weight, w_lin * s_lin[None, :], rtol=0, atol=0)
    assert lin.bias is None


def _red_tenant(base, directory, seed: int):
    own = copy.deepcopy(base)
    rk.patch_model(own, "red")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in own.named_parameters():
            if ".red_edit." in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    rk.save_adapter(own, directory)
    return own


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapters_as_tenants_of_a_mixed_batch(made, tmp_path, arch):
    """Rows of two PEFT IA3 adapters, a RED adapter and the base model in one batch: each row is
    what that tenant's own model gives (IA3 rows: PEFT's model)."""
    base, models, dirs = made(arch)
    own = {None: base, **models, "red": _red_tenant(base, tmp_path / "red", seed=3)}
    bank = copy.deepcopy(base)
    rk.load_adapter(bank, dirs["ia"], adapter_name="ia")
    rk.load_adapter(bank, dirs["ib"])  # named after its directory
    rk.load_adapter(bank, tmp_path / "red")
    assert rk.adapter_names(bank) == ["ia", "ib", "red"]
    rows = ["ia", None, "ib", "red", "ia", "ib"]
    inputs = _inputs(arch, batch=len(rows))
    with rk.tenants(bank, rows):
        got = _out(bank, inputs)
    worst = 0.0
    for b, r in enumerate(rows):
        want = _out(own[r], inputs)[b]
        worst = max(worst, _max_diff(got[b], want))
        torch.testing.assert_close(got[b], want, rtol=0, atol=ATOL, msg=lambda m, b=b, r=r: f"row {b} ({r}): {m}")
    print(f"{arch}: mixed batch max |row - own model| = {worst:.3g}")
    # One adapter for every row is the single-adapter path, equal to the gathered one.
    for name in ("ia", "ib"):
        with rk.tenants(bank, [name] * len(rows)):
            torch.testing.assert_close(_out(bank, inputs), _out(own[name], inputs), rtol=0, atol=ATOL)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_tenants_generate_each_peft_models_tokens(made, arch):
    """KV-cached greedy generation of a mixed batch, beams mapped along: each prompt's tokens are
    those of its tenant's own PEFT model."""
    base, models, dirs = made(arch)
    own = {None: base, **models}
    bank = copy.deepcopy(base)
    rk.load_adapter(bank, dirs["ia"], adapter_name="ia")
    rk.load_adapter(bank, dirs["ib"])
    rows = ["ib", "ia", None, "ia"]
    inputs = _inputs(arch, batch=len(rows), seed=1)
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0, num_beams=2)
    with torch.no_grad():
        with rk.tenants(bank, rows):
            got = bank.generate(**inputs, **kw)
        want = {r: own[r].generate(**inputs, **kw) for r in dict.fromkeys(rows)}
    for b, r in enumerate(rows):
        assert got[b].tolist() == want[r][b].tolist(), f"row {b} ({r})"
    assert len({tuple(want[r][b].tolist()) for b, r in enumerate(rows)}) >= 3  # the tenants differ


def test_delete_ia3_adapter_removes_its_input_hooks(made, tmp_path):
    base, models, dirs = made("gpt2")
    bank = copy.deepcopy(base)
    rk.load_adapter(bank, dirs["ia"], adapter_name="ia")
    _red_tenant(base, tmp_path / "red", seed=3)
    rk.load_adapter(bank, tmp_path / "red")
    rk.load_adapter(bank, dirs["ib"])
    c_proj = bank.transformer.h[0].mlp.c_proj  # RED on its output, IA3 on its input
    assert list(c_proj.red_edit_in) == ["ia", "ib"] and list(c_proj.red_edit) == ["red"]
    rk.delete_adapter(bank, "ib")
    assert list(c_proj.red_edit_in) == ["ia"]
    inputs = _inputs("gpt2")
    with rk.tenants(bank, ["ia", None, "red", "ia"]):
        got = _out(bank, inputs)
    torch.testing.assert_close(got[0], _out(models["ia"], inputs)[0], rtol=0, atol=ATOL)
    rk.set_adapter(bank, "red")
    rk.delete_adapter(bank, "ia")
    assert "red_edit_in" not in c_proj._modules and not c_proj._forward_pre_hooks
    assert not any(".red_edit_in." in k for k in bank.state_dict())
    rk.unpatch_model(bank)
    assert set(bank.state_dict()) == set(base.state_dict())


def test_mixed_batch_gradients_of_input_and_output_scales(made):
    """Training through the gathered input edit: each adapter's gradient from a mixed batch equals
    its gradient from its own rows alone."""
    base, _, dirs = made("llama")
    bank = copy.deepcopy(base)
    rk.load_adapter(bank, dirs["ia"], adapter_name="ia")
    rk.load_adapter(bank, dirs["ib"])
    for name in ("ia", "ib"):
        for p in rk.adapter_parameters(bank, name).values():
            p.requires_grad_(True)
    rows = ["ia", None, "ib", "ia", "ib"]
    inputs = _inputs("llama", batch=len(rows), seed=2)

    def grads(idx, names):
        for name in ("ia", "ib"):
            for p in rk.adapter_parameters(bank, name).values():
                p.grad = None
        sub = {k: v[idx] for k, v in inputs.items()}
        with rk.tenants(bank, names):
            out = bank(**sub).logits
        (out.float().square() * sub["attention_mask"][..., None]).sum().backward()
        return {name: {k: p.grad for k, p in rk.adapter_parameters(bank, name).items()} for name in ("ia", "ib")}

    mixed = grads(list(range(len(rows))), rows)
    for name in ("ia", "ib"):
        idx = [i for i, r in enumerate(rows) if r == name]
        alone = grads(idx, [name] * len(idx))[name]
        assert any(".red_edit_in." in k for k in alone)
        for k, g in mixed[name].items():
            assert alone[k] is not None and alone[k].abs().sum() > 0, k
            torch.testing.assert_close(g, alone[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_torch_compile_fullgraph_of_a_mixed_ia3_batch(made):
    """The input pre-hook and its gathered edit trace into one graph."""
    base, models, dirs = made("llama")
    bank = copy.deepcopy(base)
    rk.load_adapter(bank, dirs["ia"], adapter_name="ia")
    rk.load_adapter(bank, dirs["ib"])
    rows = ["ia", None, "ib"]
    ids = _inputs("llama", batch=len(rows))["input_ids"]
    torch._dynamo.reset()
    fn = torch.compile(lambda ids: bank(ids).logits, fullgraph=True, backend="eager")
    with torch.no_grad(), rk.tenants(bank, rows):
        got = fn(ids)
    for b, r in enumerate(rows):
        with torch.no_grad():
            want = ({None: base, **models}[r])(ids).logits[b]
        torch.testing.assert_close(got[b], want, rtol=0, atol=ATOL)


def test_native_ia3_adapter_round_trip(tmp_path):
    """An IA3 adapter saved by red_kernels (``inputs`` in its config) loads back the same."""
    torch.manual_seed(0)
    model = tiny_gpt2()
    rk.patch_model(model, "ia3")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in rk.adapter_parameters(model).values():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    inputs = _inputs("gpt2")
    want = _out(model, inputs)
    rk.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["method"] == "ia3" and meta["inputs"] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert "transformer.h.0.mlp.c_proj.red_edit_in.scale" in load_file(tmp_path / "adapter.safetensors")
    torch.manual_seed(0)
    fresh = tiny_gpt2()
    rk.load_adapter(fresh, tmp_path)
    assert torch.equal(_out(fresh, inputs), want)
    rk.load_adapter(fresh, tmp_path, adapter_name="again")  # and as a named adapter
    with rk.tenants(fresh, ["again", None, "default", "again"]):
        got = _out(fresh, inputs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])


def test_bf16_model_with_fp32_vectors(made, tmp_path):
    """A bf16 base: PEFT keeps fp32 vectors and rounds once to bf16, as red_edit does."""
    base, _, _ = made("llama")
    base16 = copy.deepcopy(base).to(torch.bfloat16)
    peft_model = _peft_ia3(base16, tmp_path / "bf16", seed=4)
    assert {p.dtype for n, p in peft_model.named_parameters() if "ia3_l" in n} == {torch.float32}
    model = copy.deepcopy(base16)
    rk.load_adapter(model, tmp_path / "bf16")
    inputs = _inputs("llama")
    got, want = _out(model, inputs), _out(peft_model, inputs)
    print(f"bf16: max |red_kernels - PEFT| = {_max_diff(got.float(), want.float()):.3g}")
    assert torch.equal(got, want)


# --- directories that cannot be loaded exactly ---------------------------------------------------


def _snapshot(model):
    state = rk.patch.patch_state(model)
    return (
        None if state is None else rk.adapter_names(model),
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        repr(model),
    )


def _assert_same(model, snap) -> None:
    now = _snapshot(model)
    assert now[0] == snap[0] and now[2:] == snap[2:]
    assert list(now[1]) == list(snap[1]) and all(torch.equal(now[1][k], v) for k, v in snap[1].items())


def _edited_copy(src, dst, config=None, tensors=None, drop=None):
    """A copy of PEFT directory ``src`` with its config / tensors changed."""
    dst.mkdir(parents=True)
    meta = json.loads((src / "adapter_config.json").read_text())
    meta = config(meta) if config else meta
    (dst / "adapter_config.json").write_text(json.dumps(meta))
    weights = load_file(src / "adapter_model.safetensors")
    weights = tensors(weights) if tensors else weights
    if drop != "weights":
        save_file(weights, dst / "adapter_model.safetensors")
    return dst


def _with(key, value):
    return lambda meta: {**meta, key: value}


def _first_key(fragment):
    return lambda t: next(k for k in t if fragment in k)


BAD = {
    # name -> (config edit, tensors edit, drop, regexes the message must hold)
    "peft_type_lora": (_with("peft_type", "LORA"), None, None, ["'peft_type'", "LORA"]),
    "unknown_field": (_with("ia3_mode", "fancy"), None, None, ["ia3_mode", "unknown"]),
    "modules_to_save": (_with("modules_to_save", ["lm_head"]), None, None, ["'modules_to_save'", "lm_head"]),
    "feedforward_missing": (
        lambda m: {k: v for k, v in m.items() if k != "feedforward_modules"},
        None,
        None,
        ["'feedforward_modules'"],
    ),
    "feedforward_other": (_with("feedforward_modules", []), None, None, ["feedforward_modules", "down_proj", "shape"]),
    "feedforward_bad_type": (_with("feedforward_modules", 3), None, None, ["'feedforward_modules'"]),
    "target_not_named": (_with("target_modules", ["v_proj", "down_proj"]), None, None, ["'target_modules'", "k_proj"]),
    "init_random_missing": (
        _with("init_ia3_weights", False),
        lambda t: {k: v for k, v in t.items() if "layers.1.self_attn.k_proj" not in k},
        None,
        ["'init_ia3_weights'", "layers.1.self_attn.k_proj"],
    ),
    "missing_weights": (None, None, "weights", ["adapter_model.safetensors"]),
    "not_an_ia3_key": (None, lambda t: {**t, "base_model.model.lm_head.weight": torch.ones(3)}, None, ["lm_head"]),
    "norm_target": (
        _with("target_modules", ["k_proj", "v_proj", "down_proj", "norm"]),
        lambda t: {**t, "base_model.model.model.norm.ia3_l": torch.ones(32, 1)},
        None,
        ["model.norm", "LlamaRMSNorm"],
    ),
    "no_such_module": (
        None,
        lambda t: {**t, "base_model.model.model.layers.7.mlp.down_proj.ia3_l": torch.ones(1, 64)},
        None,
        ["layers.7"],
    ),
    "int_vector": (
        None,
        lambda t: {k: (v.to(torch.int32) if "k_proj" in k else v) for k, v in t.items()},
        None,
        ["int32"],
    ),
    "mixed_dtypes": (
        None,
        lambda t: {k: (v.double() if "k_proj" in k else v) for k, v in t.items()},
        None,
        ["mix dtypes"],
    ),
}


@pytest.mark.parametrize("patched", [False, True], ids=["plain", "bank"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_directory_is_refused_and_the_model_unchanged(made, tmp_path, case, patched):
    base, _, dirs = made("llama")
    config, tensors, drop, words = BAD[case]
    directory = _edited_copy(dirs["ia"], tmp_path / case, config, tensors, drop)
    model = copy.deepcopy(base)
    if patched:
        rk.load_adapter(model, dirs["ib"], adapter_name="ib")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"red_kernels\.load_adapter: ") as info:
        rk.load_adapter(model, directory)
    msg = str(info.value)
    assert case in msg and "unchanged" in msg, msg  # names the directory (its file)
    for w in words:
        assert w in msg, f"{w!r} not in: {msg}"
    _assert_same(model, snap)


def test_width_mismatch_is_refused(made, tmp_path):
    """An adapter of a wider LLaMA: the vector's shape names the tensor and the module's width."""
    base, _, dirs = made("llama")
    _peft_ia3(tiny_llama(hidden_size=48, intermediate_size=80), tmp_path / "wide", seed=1)
    bank = copy.deepcopy(base)
    rk.load_adapter(bank, dirs["ia"])
    for model in (copy.deepcopy(base), bank):
        snap = _snapshot(model)
        with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*ia3_l.* has shape \[.*width is.*expected"):
            rk.load_adapter(model, tmp_path / "wide")
        _assert_same(model, snap)


def test_pickled_adapter_is_refused(made, tmp_path):
    base, _, dirs = made("llama")
    directory = _edited_copy(dirs["ia"], tmp_path / "pickled", drop="weights")
    torch.save({"x": torch.ones(1)}, directory / "adapter_model.bin")
    model = copy.deepcopy(base)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="adapter_model.bin.*safe_serialization"):
        rk.load_adapter(model, directory)
    _assert_same(model, snap)


def test_sequence_classification_head_is_refused(tmp_path):
    """PEFT's SEQ_CLS task saves the classifier (``modules_to_save``): refused, naming the field."""
    base = tiny_roberta()
    model = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.IA3Config(task_type="SEQ_CLS"))
    _quiet(model.save_pretrained, tmp_path / "cls")
    target = copy.deepcopy(base)
    snap = _snapshot(target)
    with pytest.raises(ValueError, match=r"adapter_config\.json.*'modules_to_save'.*classifier"):
        rk.load_adapter(target, tmp_path / "cls")
    _assert_same(target, snap)


def test_name_in_use_is_refused(made):
    base, _, dirs = made("llama")
    model = copy.deepcopy(base)
    rk.load_adapter(model, dirs["ia"], adapter_name="ia")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="already has an adapter named 'ia'"):
        rk.load_adapter(model, dirs["ia"])
    _assert_same(model, snap)
