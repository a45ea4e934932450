"""Model-level benchmarks: a training step and KV-cached greedy decoding of a small random LLaMA,
base model vs RED, PARA and mixed-tenant batches, side by side in one process.

- Training step (issue 10): LLaMA hidden 512, 4 layers, seq 256, batch 4, fp32: forward with labels
  + backward. The frozen base's graph goes through every layer (``inputs_embeds`` requires grad),
  as a patched model's does.
- Decode (issue 10): greedy decoding of 32 tokens after a 256-token prompt, batch 8: base and PARA.
- Tenants (issue 11): LLaMA hidden 1024, 8 layers, 16 heads, 4 KV heads, vocab 32000, prompt 256,
  32 new tokens: base, RED tenants, PARA tenants, PEFT LoRA r=8 on q_proj/v_proj with mixed
  ``adapter_names`` and PEFT IA3 looping one sub-batch per tenant (what PEFT users do today), for
  batch 8 / 8 tenants and batch 64 / 1, 8, 64 tenants (``RK_BENCH_TENANTS_FULL=1``; the default run
  keeps batch 8 to fit a 2-core CPU). Peak memory (RSS high-water mark) is recorded per case.

    make bench PYTEST_ARGS="benchmarks/bench_models.py"
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from _common import run

import red_kernels as rk

transformers = pytest.importorskip("transformers")


def _llama(hidden, layers, heads, kv_heads, vocab, inter):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).eval()


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".red_edit." in n or ".para_gen." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


# --- training step -------------------------------------------------------------------------------

_TRAIN = {}


def _train_models():
    if not _TRAIN:
        base = _llama(512, 4, 8, 8, 32000, 1376)
        for p in base.parameters():
            p.requires_grad_(False)
        _TRAIN["base"] = base
        for method in ("red", "para"):
            m = rk.patch_model(copy.deepcopy(base), method)
            _TRAIN[method] = m
    return _TRAIN


@pytest.mark.parametrize("variant", ["base", "red", "para"])
def test_train_step(benchmark, variant):
    model = _train_models()[variant]
    model.train()
    ids = torch.randint(3, 32000, (4, 256), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :128] = -100  # prompt + answer: PARA pools the prompt's last token

    def step():
        embeds = model.get_input_embeddings()(ids)
        if variant == "base":
            embeds.requires_grad_(True)  # a graph through every layer, like the patched models'
        model(inputs_embeds=embeds, labels=labels).loss.backward()

    run(benchmark, step, "model train step llama-512x4 b4 s256", variant, rounds=5)


# --- decoding ------------------------------------------------------------------------------------

_DECODE = {}


def _decode_model(key, hidden, layers, heads, kv_heads, inter):
    if key not in _DECODE:
        _DECODE[key] = _llama(hidden, layers, heads, kv_heads, 32000, inter)
    return _DECODE[key]


def _generate(model, ids, new_tokens=32):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


@pytest.mark.parametrize("variant", ["base", "para"])
def test_decode(benchmark, variant):
    base = _decode_model("small", 512, 4, 8, 8, 1376)
    model = base if variant == "base" else _DECODE.setdefault("small-para", rk.patch_model(copy.deepcopy(base), "para"))
    if variant == "para":
        _perturb(model)
    ids = torch.randint(3, 32000, (8, 256), generator=torch.Generator().manual_seed(0))
    run(
        benchmark,
        lambda: _generate(model, ids),
        "model decode llama-512x4 b8 p256 +32",
        variant,
        rounds=3,
        tokens=8 * 32,
    )


def _tenant_bank(method, count):
    key = f"bank-{method}-{count}"
    if key not in _DECODE:
        base = _decode_model("tenants", 1024, 8, 16, 4, 2816)
        bank = rk.patch_model(copy.deepcopy(base), method, adapter_name="t0")
        _perturb(bank, 0)
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            for i in range(1, count):
                src = rk.patch_model(copy.deepcopy(base), method)
                _perturb(src, i)
                rk.save_adapter(src, f"{d}/t{i}")
                rk.load_adapter(bank, f"{d}/t{i}")
        _DECODE[key] = bank
    return _DECODE[key]


_TENANT_CASES = [(8, 8)] + ([(64, 1), (64, 8), (64, 64)] if os.environ.get("RK_BENCH_TENANTS_FULL") == "1" else [])


def _peft_bank(kind, count):
    peft = pytest.importorskip("peft")
    key = f"peft-{kind}-{count}"
    if key not in _DECODE:
        base = copy.deepcopy(_decode_model("tenants", 1024, 8, 16, 4, 2816))
        if kind == "lora":
            cfg = lambda: peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        else:
            cfg = lambda: peft.IA3Config(
                target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
            )
        model = peft.get_peft_model(base, cfg(), adapter_name="t0")
        for i in range(1, count):
            model.add_adapter(f"t{i}", cfg())
        model.eval()
        _DECODE[key] = model
    return _DECODE[key]


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("batch,tenants", _TENANT_CASES, ids=[f"b{b}-t{t}" for b, t in _TENANT_CASES])
@pytest.mark.parametrize("variant", ["base", "red", "para", "peft-lora", "peft-ia3-loop"])
def test_decode_tenants(benchmark, variant, batch, tenants):
    ids = torch.randint(3, 32000, (batch, 256), generator=torch.Generator().manual_seed(0))
    group = f"model decode tenants llama-1024x8 b{batch} t{tenants}"
    names = [f"t{i % tenants}" for i in range(batch)]
    if variant == "base":
        model = _decode_model("tenants", 1024, 8, 16, 4, 2816)
        go = lambda: _generate(model, ids)  # noqa: E731
    elif variant == "peft-lora":
        model = _peft_bank("lora", tenants)

        def go():
            with torch.inference_mode():
                model.generate(
                    input_ids=ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, adapter_names=names
                )
    elif variant == "peft-ia3-loop":
        model = _peft_bank("ia3", tenants)

        def go():
            for t in sorted(set(names)):
                rows = [i for i, n in enumerate(names) if n == t]
                model.set_adapter(t)
                _generate(model, ids[rows])
    else:
        bank = _tenant_bank(variant, tenants)

        def go():
            with rk.tenants(bank, names):
                _generate(bank, ids)

    run(benchmark, go, group, variant, rounds=3, tokens=batch * 32)
    benchmark.extra_info["peak_rss_mb"] = _peak_rss_mb()
