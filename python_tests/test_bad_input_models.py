"""Bad input to the model-level API (issue 9): every case gets a ValueError whose message names the
function (``red_kernels.<fn>``) and the argument or field, and leaves the model exactly as it was:
state_dict keys and values, requires_grad flags, adapter names, active adapter, hooks, the module
tree and the config.

Functions: patch_model, merge_model, load_adapter (damaged files, missing and malformed config
fields, tensors of the wrong kind), save_adapter, set_adapter, delete_adapter, tenants,
prompt_lengths. Everything here is pure Python on tiny models; nothing can crash the process.
"""

from __future__ import annotations

import copy
import functools
import json
import re

import pytest
import torch
from _hf_models import tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import red_kernels as rk


def _perturb(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".red_edit." in n or ".para_gen." in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _patched(method: str = "red", names: tuple[str, ...] = ("default",), model=None, **options) -> nn.Module:
    model = tiny_llama() if model is None else model
    rk.patch_model(model, method, adapter_name=names[0], **options)
    for name in names[1:]:
        state = rk.patch.patch_state(model)
        rk.patch.core.install_adapter(model, state, name, copy.deepcopy(state.adapters[names[0]]))
    _perturb(model)
    return model


def _snapshot(model: nn.Module) -> dict:
    state = rk.patch.patch_state(model)
    config = getattr(model, "config", None)
    return {
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "adapters": None if state is None else (rk.adapter_names(model), state.active),
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
        "tree": repr(model),
        "config": None if config is None else config.to_dict(),
    }


def _assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = _snapshot(model)
    assert now["tree"] == snap["tree"]
    assert now["adapters"] == snap["adapters"]
    assert list(now["state_dict"]) == list(snap["state_dict"])
    for k, v in snap["state_dict"].items():
        assert torch.equal(now["state_dict"][k], v), k
    assert now["requires_grad"] == snap["requires_grad"]
    assert now["hooks"] == snap["hooks"]
    assert now["config"] == snap["config"]


def _refused(model: nn.Module, call, fn: str, *words: str, error=ValueError) -> str:
    """``call()`` raises ``error`` naming ``red_kernels.<fn>`` and each regex in ``words``; the model
    is unchanged."""
    snap = _snapshot(model)
    with pytest.raises(error) as info:
        call()
    msg = str(info.value)
    assert f"red_kernels.{fn}" in msg, msg
    for w in words:
        assert re.search(w, msg, re.S), f"{w!r} not in: {msg}"
    _assert_unchanged(model, snap)
    return msg


# --- patch_model ----------------------------------------------------------------------------------

PATCH_CASES = {
    "backend": (dict(backend="bogus"), "'backend'", "bogus"),
    "targets_int": (dict(targets=123), "'targets'"),
    "targets_empty": (dict(targets=[]), "'targets'"),
    "targets_empty_string": (dict(targets=[""]), "'targets'"),
    "targets_match_nothing": (dict(targets=["no_such_module"]), "'targets'", "no_such_module"),
    "targets_not_linear": (dict(targets=["model.norm"]), "target", "model.norm"),
    "method": (dict(method="lora"), "'method'", "lora"),
    "scale": (dict(scale="no"), "'scale'"),
    "bias": (dict(bias=1), "'bias'"),
    "scale_and_bias_off": (dict(scale=False, bias=False), "'scale'", "'bias'"),
    "dtype_int": (dict(dtype=torch.int32), "'dtype'"),
    "dtype_str": (dict(dtype="float32"), "'dtype'"),
    "rank_0": (dict(method="para", rank=0), "'rank'"),
    "rank_bool": (dict(method="para", rank=True), "'rank'"),
    "rank_float": (dict(method="para", rank=4.0), "'rank'"),
    "activation": (dict(method="para", activation="bogus"), "'activation'", "bogus"),
    "up_bias": (dict(method="para", up_bias="yes"), "'up_bias'"),
    "para_targets_not_layers": (dict(method="para", targets=["mlp.down_proj"]), "PARA targets", "layers"),
    "ia3_bias": (dict(method="ia3", bias=True), "'bias'"),
    "ia3_no_scale": (dict(method="ia3", scale=False, bias=False), "'scale'"),
    "ia3_inputs_not_a_target": (dict(method="ia3", inputs=["q_proj"]), "'inputs'", "q_proj"),
    "ia3_inputs_int": (dict(method="ia3", inputs=3), "'inputs'"),
    "inputs_for_red": (dict(inputs=["down_proj"]), "'inputs'", "'red'"),
    "ia3_input_of_a_norm": (
        dict(method="ia3", targets=["model.norm"], inputs=["model.norm"]),
        "model.norm",
        "LlamaRMSNorm",
    ),
    "adapter_name_dot": (dict(adapter_name="a.b"), "adapter.name", "'a.b'"),
    "adapter_name_empty": (dict(adapter_name=""), "adapter.name"),
    "adapter_name_none": (dict(adapter_name=None), "adapter.name"),
    "trainable_int": (dict(trainable=123), "'trainable'"),
    "trainable_match_nothing": (dict(trainable=["no_such_head"]), "'trainable'", "no_such_head"),
}


@pytest.mark.parametrize("case", list(PATCH_CASES))
def test_patch_model_bad_arguments(case):
    kwargs, *words = PATCH_CASES[case]
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "red")
    model = tiny_llama()
    _refused(model, lambda: rk.patch_model(model, method, **kwargs), "patch_model", *words)
    assert rk.patch.patch_state(model) is None


def test_patch_model_without_default_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    _refused(model, lambda: rk.patch_model(model, "red"), "patch_model", "targets")


@pytest.mark.parametrize("method", ["red", "para"])
def test_patch_model_twice(method):
    model = _patched("red", ("a", "b"))
    _refused(model, lambda: rk.patch_model(model, method), "patch_model", "already patched", "'a'")


# --- merge_model ----------------------------------------------------------------------------------


def test_merge_model_refusals():
    para = _patched("para")
    _refused(para, lambda: rk.merge_model(para), "merge_model", "PARA")
    two = _patched("red", ("a", "b"))
    _refused(two, lambda: rk.merge_model(two), "merge_model", "2 adapters", "'a'", "'b'")
    plain = tiny_llama()
    _refused(plain, lambda: rk.merge_model(plain), "merge_model", "not patched")


def test_merge_model_refuses_a_head_tied_to_the_embeddings():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    embeddings = model.transformer.wte.weight.detach().clone()
    rk.patch_model(model, "red", targets=["lm_head"])
    _perturb(model)
    _refused(model, lambda: rk.merge_model(model), "merge_model", "'lm_head'", "transformer.wte.weight", "tied")
    assert torch.equal(model.transformer.wte.weight, embeddings)
    assert model.lm_head.weight is model.transformer.wte.weight


# --- load_adapter ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained RED and PARA adapter of the tiny LLaMA, saved once; tests damage copies."""
    out = {}
    for method in ("red", "para"):
        model = _patched(method)
        directory = tmp_path_factory.mktemp(f"saved_{method}")
        rk.save_adapter(model, directory)
        out[method] = (
            load_file(directory / "adapter.safetensors"),
            json.loads((directory / "adapter_config.json").read_text()),
            (directory / "adapter.safetensors").read_bytes(),
        )
    return out


def _write(directory, tensors=None, meta=None, raw: bytes | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    if meta is not None:
        (directory / "adapter_config.json").write_text(json.dumps(meta))
    if raw is not None:
        (directory / "adapter.safetensors").write_bytes(raw)
    elif tensors is not None:
        save_file(tensors, directory / "adapter.safetensors")
    return directory


def _with(meta: dict, **fields) -> dict:
    return {**meta, **fields}


def _dims(meta: dict, fn) -> dict:
    return {n: fn(v) for n, v in meta["dims"].items()}


def _first(tensors: dict) -> str:
    return sorted(tensors)[0]


def _cases(saved):
    """name -> (method, tensors or raw bytes, meta, regexes the message must hold)."""
    cases = {}
    for method in ("red", "para"):
        tensors, meta, raw = saved[method]
        k = _first(tensors)
        t = tensors[k]
        m = functools.partial(_with, meta)
        cases.update(
            {
                f"{method}-truncated": (method, raw[: len(raw) // 2], meta, "adapter.safetensors", "truncated"),
                f"{method}-truncated_header": (method, raw[:5], meta, "adapter.safetensors"),
                f"{method}-empty_file": (method, b"", meta, "adapter.safetensors"),
                f"{method}-extra_tensor": (method, {**tensors, "model.extra": torch.zeros(3)}, meta, "model.extra"),
                f"{method}-missing_tensor": (method, {n: v for n, v in tensors.items() if n != k}, meta, re.escape(k)),
                f"{method}-wrong_shape": (method, {**tensors, k: torch.zeros(t.numel() + 1)}, meta, re.escape(k)),
                f"{method}-wrong_rank": (method, {**tensors, k: t.reshape(1, *t.shape)}, meta, re.escape(k)),
                f"{method}-int_tensor": (method, {**tensors, k: t.to(torch.int32)}, meta, re.escape(k), "int32"),
                f"{method}-bool_tensor": (method, {**tensors, k: t > 0}, meta, re.escape(k), "bool"),
                f"{method}-fp16_tensor": (method, {**tensors, k: t.half()}, meta, re.escape(k), "float16"),
                f"{method}-fp64_tensor": (method, {**tensors, k: t.double()}, meta, re.escape(k), "float64"),
                f"{method}-config_says_bf16": (method, tensors, m(dtype="bfloat16"), "bfloat16"),
                f"{method}-dtype_int": (method, tensors, m(dtype="int32"), "'dtype'"),
                f"{method}-dtype_not_a_dtype": (method, tensors, m(dtype="Tensor"), "'dtype'"),
                f"{method}-method_lora": (method, tensors, m(method="lora"), "'method'"),
                f"{method}-targets_duplicated": (
                    method,
                    tensors,
                    m(targets=meta["targets"] + meta["targets"][:1]),
                    "'targets'",
                ),
                f"{method}-targets_not_a_list": (method, tensors, m(targets="model.layers.0"), "'targets'"),
                f"{method}-targets_unknown_module": (
                    method,
                    tensors,
                    m(
                        targets=["model.layers.9"],
                        dims={"model.layers.9": 32},
                        **(
                            {
                                "slots": {"model.layers.9": next(iter(meta["slots"].values()))},
                                "out_sizes": {"model.layers.9": next(iter(meta["out_sizes"].values()))},
                            }
                            if method == "para"
                            else {}
                        ),
                    ),
                    "model.layers.9",
                ),
                f"{method}-dims_str": (method, tensors, m(dims=_dims(meta, str)), "'dims'"),
                f"{method}-dims_float": (
                    method,
                    tensors,
                    m(dims=_dims(meta, lambda v: v + 0.5)),
                    "'dims'",
                ),
                f"{method}-dims_bool": (method, tensors, m(dims=_dims(meta, lambda v: True)), "'dims'"),
                f"{method}-dims_wrong_width": (
                    method,
                    tensors,
                    m(dims=_dims(meta, lambda v: v + 1)),
                    "width|PARA layers",
                ),
                f"{method}-format_version": (method, tensors, m(format_version=99), "format_version"),
                f"{method}-model_type": (method, tensors, m(model_type="gpt2"), "model_type"),
                f"{method}-trainable_unknown": (method, tensors, m(trainable=["nope"]), "nope"),
            }
        )
        for field in ("method", "targets", "dims", "dtype", "architecture", "trainable"):
            cases[f"{method}-missing_{field}"] = (
                method,
                tensors,
                {n: v for n, v in meta.items() if n != field},
                f"'{field}'",
                "missing",
            )
    tensors, meta, _ = saved["red"]
    m = functools.partial(_with, meta)
    cases.update(
        {
            "red-missing_scale": ("red", tensors, {n: v for n, v in meta.items() if n != "scale"}, "'scale'"),
            "red-missing_bias": ("red", tensors, {n: v for n, v in meta.items() if n != "bias"}, "'bias'"),
            "red-scale_no": ("red", tensors, m(scale="no"), "'scale'"),
            "red-scale_and_bias_false": ("red", tensors, m(scale=False, bias=False), "'scale'"),
            "red-scale_false_but_tensor_present": ("red", tensors, m(scale=False), "scale"),
        }
    )
    tensors, meta, _ = saved["para"]
    m = functools.partial(_with, meta)
    cases.update(
        {
            "para-missing_rank": ("para", tensors, {n: v for n, v in meta.items() if n != "rank"}, "'rank'"),
            "para-rank_0": ("para", tensors, m(rank=0), "'rank'"),
            "para-rank_other": ("para", tensors, m(rank=4), "w_down|shape"),
            "para-activation_bogus": ("para", tensors, m(activation="bogus"), "'activation'"),
            "para-activation_int": ("para", tensors, m(activation=2), "'activation'"),
            "para-up_bias_str": ("para", tensors, m(up_bias="yes"), "'up_bias'"),
            "para-slots_missing_layer": ("para", tensors, m(slots={}), "'slots'"),
            "para-out_sizes_not_lists": (
                "para",
                tensors,
                m(out_sizes={n: 5 for n in meta["out_sizes"]}),
                "'out_sizes'",
            ),
            "para-slots_not_maps": ("para", tensors, m(slots={n: "q" for n in meta["slots"]}), "'slots'|PARA layers"),
            "para-out_sizes_wrong": (
                "para",
                tensors,
                m(out_sizes={n: [1, 1, 1] for n in meta["out_sizes"]}),
                "PARA layers|out_sizes",
            ),
        }
    )
    return cases


def _load_case_names():
    """The ids of :func:`_cases` (known at collection time, before the adapters are saved)."""
    names = []
    for method in ("red", "para"):
        names += [
            f"{method}-{c}"
            for c in (
                "truncated",
                "truncated_header",
                "empty_file",
                "extra_tensor",
                "missing_tensor",
                "wrong_shape",
                "wrong_rank",
                "int_tensor",
                "bool_tensor",
                "fp16_tensor",
                "fp64_tensor",
                "config_says_bf16",
                "dtype_int",
                "dtype_not_a_dtype",
                "method_lora",
                "targets_duplicated",
                "targets_not_a_list",
                "targets_unknown_module",
                "dims_str",
                "dims_float",
                "dims_bool",
                "dims_wrong_width",
                "format_version",
                "model_type",
                "trainable_unknown",
                *(f"missing_{f}" for f in ("method", "targets", "dims", "dtype", "architecture", "trainable")),
            )
        ]
    names += ["red-missing_scale", "red-missing_bias", "red-scale_no", "red-scale_and_bias_false"]
    names += ["red-scale_false_but_tensor_present"]
    names += [
        "para-missing_rank",
        "para-rank_0",
        "para-rank_other",
        "para-activation_bogus",
        "para-activation_int",
        "para-up_bias_str",
        "para-slots_missing_layer",
        "para-out_sizes_not_lists",
        "para-slots_not_maps",
        "para-out_sizes_wrong",
    ]
    return names


def test_load_case_list_is_complete(saved):
    assert sorted(_load_case_names()) == sorted(_cases(saved))


@pytest.mark.parametrize("into", ["plain", "patched"])
@pytest.mark.parametrize("case", _load_case_names())
def test_load_adapter_bad_files(saved, tmp_path, case, into):
    method, content, meta, *words = _cases(saved)[case]
    directory = tmp_path / "bad_adapter"
    if isinstance(content, bytes):
        _write(directory, meta=meta, raw=content)
    else:
        _write(directory, tensors=content, meta=meta)
    model = tiny_llama() if into == "plain" else _patched("red+", ("a", "b"))
    msg = _refused(model, lambda: rk.load_adapter(model, directory), "load_adapter", *words)
    assert "bad_adapter" in msg  # names the file
    if into == "plain":
        assert rk.patch.patch_state(model) is None


def test_load_adapter_never_unpickles(saved, tmp_path):
    """A pickle renamed adapter.safetensors is refused without running it."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    _, meta, _ = saved["red"]
    directory = _write(tmp_path / "pickled", meta=meta)
    torch.save({"x": Payload()}, directory / "adapter.safetensors")
    plain = tiny_llama()
    _refused(plain, lambda: rk.load_adapter(plain, directory), "load_adapter", "adapter.safetensors")
    tensors, _, _ = saved["red"]
    torch.save(tensors, directory / "adapter.safetensors")  # a real state dict, pickled
    patched = _patched("red", ("a",))
    _refused(patched, lambda: rk.load_adapter(patched, directory), "load_adapter", "adapter.safetensors")
    assert not marker.exists()


def test_load_adapter_bad_names_and_places(saved, tmp_path):
    tensors, meta, _ = saved["red"]
    directory = _write(tmp_path / "good", tensors=tensors, meta=meta)
    model = _patched("red", ("a",))
    _refused(model, lambda: rk.load_adapter(model, directory, adapter_name="a.b"), "load_adapter", "adapter.name")
    _refused(model, lambda: rk.load_adapter(model, directory, adapter_name="a"), "load_adapter", "'a'", "already")
    _refused(model, lambda: rk.load_adapter(model, tmp_path / "nowhere"), "load_adapter", "adapter_config.json")
    no_weights = _write(tmp_path / "no_weights", meta=meta)
    _refused(model, lambda: rk.load_adapter(model, no_weights), "load_adapter", "adapter.safetensors")
    not_json = _write(tmp_path / "not_json", tensors=tensors)
    (not_json / "adapter_config.json").write_text("{not json")
    _refused(model, lambda: rk.load_adapter(model, not_json), "load_adapter", "JSON")
    gpt2 = tiny_gpt2()
    _refused(gpt2, lambda: rk.load_adapter(gpt2, directory), "load_adapter", "model_type")
    # The directory's name is the adapter's default name: a name that is not one is refused.
    odd = _write(tmp_path / "odd.name", tensors=tensors, meta=meta)
    _refused(model, lambda: rk.load_adapter(model, odd), "load_adapter", "adapter.name", "odd.name")


# --- save_adapter ---------------------------------------------------------------------------------


def test_save_adapter_bad_arguments(tmp_path):
    plain = tiny_llama()
    _refused(plain, lambda: rk.save_adapter(plain, tmp_path / "x"), "save_adapter", "not patched")
    model = _patched("red", ("a", "b"))
    _refused(model, lambda: rk.save_adapter(model, tmp_path / "y", adapter_name="zzz"), "save_adapter", "'zzz'")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _cast(model: nn.Module, cast: str) -> tuple[nn.Module, torch.dtype]:
    if cast == "half":
        return model.half(), torch.float16
    return model.to(torch.bfloat16), torch.bfloat16


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
@pytest.mark.parametrize("method", ["red", "para"])
def test_save_after_casting_the_model_writes_fp32(tmp_path, method, cast):
    """The adapter banks keep their dtype when the model is cast, so the saved vectors and the
    config stay float32, and the file loads back into a cast and an fp32 model."""
    model, low = _cast(_patched(method), cast)
    assert model.model.embed_tokens.weight.dtype == low
    vectors = {k: v.detach().clone() for k, v in rk.adapter_parameters(model).items()}
    assert all(v.dtype == torch.float32 for v in vectors.values())
    rk.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["dtype"] == "float32"
    tensors = load_file(tmp_path / "adapter.safetensors")
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    ids = torch.randint(3, 90, (2, 6))
    with torch.no_grad():
        want = model(ids).logits
    base = {k: v for k, v in model.state_dict().items() if ".default." not in k}
    for fresh in (tiny_llama().to(low), tiny_llama()):
        fresh.load_state_dict(base, strict=False)
        rk.load_adapter(fresh, tmp_path)
        for k, p in rk.adapter_parameters(fresh).items():
            assert p.dtype == torch.float32 and torch.equal(p, vectors[k]), k
    with torch.no_grad():
        got = fresh.to(low)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
@pytest.mark.parametrize("method", ["red", "para"])
def test_casting_the_model_keeps_the_adapters_fp32_values(method, cast):
    """Casting keeps the adapters' dtype, and so must keep their values: a round trip of the fp32
    vectors through fp16/bf16 would lose what training made (and what save_adapter then writes)."""
    model = _patched(method)
    before = {k: v.detach().clone() for k, v in rk.adapter_parameters(model).items()}
    model, _ = _cast(model, cast)
    for k, p in rk.adapter_parameters(model).items():
        assert p.dtype == torch.float32, k
        assert torch.equal(p, before[k]), f"{k}: max change {(p - before[k]).abs().max().item():.2e}"


# --- set_adapter / delete_adapter -----------------------------------------------------------------


def test_set_adapter_bad_arguments():
    model = _patched("red", ("a", "b"))
    _refused(model, lambda: rk.set_adapter(model, "zzz"), "set_adapter", "'zzz'", "'a'")
    _refused(model, lambda: rk.set_adapter(model, None), "set_adapter", "None")
    plain = tiny_llama()
    _refused(plain, lambda: rk.set_adapter(plain, "a"), "set_adapter", "not patched")


def test_delete_adapter_bad_arguments():
    model = _patched("red", ("a", "b"))
    _refused(model, lambda: rk.delete_adapter(model, "zzz"), "delete_adapter", "'zzz'")
    _refused(model, lambda: rk.delete_adapter(model, "a"), "delete_adapter", "'a'", "active")
    one = _patched("red", ("only",))
    _refused(one, lambda: rk.delete_adapter(one, "only"), "delete_adapter", "'only'", "only adapter")
    plain = tiny_llama()
    _refused(plain, lambda: rk.delete_adapter(plain, "a"), "delete_adapter", "not patched")


# --- tenants / prompt_lengths ---------------------------------------------------------------------


def _enter(cm):
    def call():
        with cm():
            pass

    return call


def _forward_under(model, cm, ids):
    def call():
        with cm(), torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))

    return call


@pytest.mark.parametrize("method", ["red", "para"])
def test_tenants_bad_arguments(method):
    model = _patched(method, ("a", "b"))
    ids = torch.randint(3, 90, (2, 5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    _refused(model, _enter(lambda: rk.tenants(model, "a")), "tenants", "'names'")
    _refused(model, _enter(lambda: rk.tenants(model, 3)), "tenants", "'names'")
    _refused(model, _enter(lambda: rk.tenants(model, ["a", "zzz"])), "tenants", "'zzz'")
    _refused(model, _enter(lambda: rk.tenants(model, ["a", 3])), "tenants", "3")
    # A row count that fits neither the batch nor a multiple of it: refused at the call.
    _refused(model, _forward_under(model, lambda: rk.tenants(model, ["a", "b", None]), ids), "tenants", "3", "2")
    plain = tiny_llama()
    _refused(plain, _enter(lambda: rk.tenants(plain, ["a"])), "tenants", "not patched")
    with torch.no_grad():  # nothing of the failed calls is left behind
        assert torch.equal(model(input_ids=ids).logits, before)


PROMPT_CASES = {
    "floats": ([1.5, 2.0], "'lengths'"),
    "string": ("12", "'lengths'"),
    "bools": ([True, False], "'lengths'"),
    "none_inside": ([1, None], "'lengths'"),
    "float_tensor": (torch.tensor([1.0, 2.0]), "'lengths'"),
    "bool_tensor": (torch.tensor([True, True]), "'lengths'"),
    "2d_tensor": (torch.tensor([[1, 2]]), "'lengths'"),
    "scalar": (3, "'lengths'"),
}


@pytest.mark.parametrize("case", list(PROMPT_CASES))
def test_prompt_lengths_bad_values(case):
    lengths, *words = PROMPT_CASES[case]
    model = _patched("para", ("a", "b"))
    _refused(model, _enter(lambda: rk.prompt_lengths(model, lengths)), "prompt_lengths", *words)


@pytest.mark.parametrize(
    ("lengths", "words"),
    [
        ([2, 3, 4], ("3 prompt lengths", "2 rows")),  # wrong count for the batch
        ([6, 2], ("prompt_lengths", "6")),  # longer than the row
        ([0, 2], ("prompt_lengths", "0")),
        ([-1, 2], ("prompt_lengths", "-1")),
    ],
)
def test_prompt_lengths_that_do_not_fit_the_batch(lengths, words):
    """Refused when the call sees the batch (the lengths alone cannot be checked at entry), by a
    ValueError naming the argument; the model is unchanged and the next call is clean."""
    model = _patched("para", ("a", "b"))
    ids = torch.randint(3, 90, (2, 5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    snap = _snapshot(model)
    with pytest.raises(ValueError) as info:
        _forward_under(model, lambda: rk.prompt_lengths(model, lengths), ids)()
    msg = str(info.value)
    assert re.search(r"red_kernels\.(prompt_lengths|last_token_index)", msg), msg
    for w in words:
        assert w in msg, msg
    _assert_unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("fn", ["set_adapter", "delete_adapter", "save_adapter", "tenants", "adapter_parameters"])
def test_unhashable_adapter_names(tmp_path, fn):
    """A list where a name belongs is a ValueError naming the function, not a TypeError from a dict
    lookup ("unhashable type: 'list'")."""
    model = _patched("red", ("a", "b"))
    calls = {
        "set_adapter": lambda: rk.set_adapter(model, ["b"]),
        "delete_adapter": lambda: rk.delete_adapter(model, ["b"]),
        "save_adapter": lambda: rk.save_adapter(model, tmp_path / "s", adapter_name=["b"]),
        "tenants": _enter(lambda: rk.tenants(model, [["b"], None])),
        "adapter_parameters": lambda: rk.adapter_parameters(model, ["b"]),
    }
    _refused(model, calls[fn], fn, r"\['b'\]")


def test_prompt_lengths_on_a_plain_model():
    plain = tiny_llama()
    _refused(plain, _enter(lambda: rk.prompt_lengths(plain, [1])), "prompt_lengths", "not patched")
