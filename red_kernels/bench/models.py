"""Model-level benchmarks: a training step and KV-cached greedy decoding of a random-weight LLaMA,
the frozen base against each adapter method, through the public API (``rk.patch_model``,
``rk.tenants``, ``rk.save_adapter``, ``rk.load_adapter``).

- Training step (:func:`train_case`): forward with labels (the first half of each sequence is the
  prompt, labels -100) and backward, fp32; gradients cleared (untimed) before each step. Variants:
  ``base`` (frozen; ``inputs_embeds`` requires grad so that its graph goes through every layer, as a
  patched model's does), ``red``, ``red+``, ``para``, and, when peft is installed, ``peft-ia3``
  (PEFT's LLaMA defaults: k_proj, v_proj, down_proj) and ``peft-lora-r8`` (q_proj, v_proj).
- Decode (:func:`decode_case`): ``generate`` of a fixed number of new tokens (greedy, no early
  stop) after a prompt, under ``torch.inference_mode``. Variants: ``base``; ``red`` / ``red+`` /
  ``para``, one adapter for every row; ``<method> tenants``, rows cycling over ``tenants`` adapters
  of one backbone under ``rk.tenants`` (the gathered kernels); ``peft lora mixed``, PEFT LoRA r=8 on
  q_proj/v_proj with mixed ``adapter_names``; ``peft ia3 loop``, PEFT IA3 generating one sub-batch
  per tenant (what PEFT users do today, IA3 having no mixed batches). Adapters are perturbed
  from their identity init so they do real work.

Sizes: LLaMA hidden 512, 4 layers (training: batch 4 x 256 tokens; decode: batch 8, prompt 256,
32 new tokens), and for tenants hidden 1024, 8 layers, 16 heads / 4 KV heads; vocabulary 32000.
:data:`TINY` is the ``--quick`` size. Models are built by ``Case.build()``, so only the running case
holds them.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import red_kernels as rk
from red_kernels.bench.timing import Case, Variant

METHODS = ("red", "red+", "para")
PEFT_TRAIN = ("peft-ia3", "peft-lora-r8")
PEFT_DECODE = ("peft lora mixed", "peft ia3 loop")
TRAIN_ROUNDS, DECODE_ROUNDS, QUICK_ROUNDS = 5, 3, 3


@dataclass(frozen=True)
class Llama:
    """A random-weight LLaMA's size."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 32000

    @property
    def tag(self) -> str:
        return f"llama-{self.hidden}x{self.layers}"


SMALL = Llama(512, 4, 8, 8, 1376)
TENANTS = Llama(1024, 8, 16, 4, 2816)
TINY = Llama(64, 2, 4, 2, 176, vocab=512)


def have_peft() -> bool:
    return importlib.util.find_spec("peft") is not None


def llama(size: Llama, device: torch.device | str = "cpu"):
    """A random-weight ``LlamaForCausalLM`` of ``size`` (seed 0), frozen, in eval mode."""
    from red_kernels.demo import random_llama

    config = {"max_position_embeddings": 512, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    model = random_llama(size, size.vocab, 0, **config).to(device).eval()
    model.requires_grad_(False)
    return model


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every red_kernels adapter parameter off its identity init (noise of std 0.02), each
    adapter with its own draws."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".red_edit." in name or ".para_gen." in name:
                p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))


def _tokens(size: Llama, batch: int, length: int, device) -> torch.Tensor:
    return torch.randint(3, size.vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)


def _peft_config(kind: str, training: bool):
    import peft

    if kind == "lora":
        # For decoding, non-zero B so that the adapter is not a no-op PEFT could skip.
        return peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=training)
    return peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


def _peft_model(base, kind: str, count: int = 1, training: bool = False):
    """A PEFT model on a copy of ``base`` with adapters t0 .. t{count-1}."""
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), _peft_config(kind, training), adapter_name="t0")
    for i in range(1, count):
        model.add_adapter(f"t{i}", _peft_config(kind, training))
    return model


# --- training step -------------------------------------------------------------------------------------


def train_case(
    size: Llama = SMALL,
    batch: int = 4,
    seq: int = 256,
    peft: bool | None = None,
    device: torch.device | None = None,
    rounds: int = TRAIN_ROUNDS,
) -> Case:
    """One training step (forward with labels + backward) of the frozen base, RED, RED+, PARA and,
    if ``peft`` (default: when installed), PEFT IA3 and LoRA r=8; ratios to the base."""
    device = device or torch.device("cpu")
    peft = have_peft() if peft is None else peft
    names = ("base", *METHODS, *(PEFT_TRAIN if peft else ()))

    def build() -> dict[str, Variant]:
        base = llama(size, device)
        models = {"base": base, **{m: rk.patch_model(copy.deepcopy(base), m) for m in METHODS}}
        if peft:
            models["peft-ia3"] = _peft_model(base, "ia3", training=True)
            models["peft-lora-r8"] = _peft_model(base, "lora", training=True)
        ids = _tokens(size, batch, seq, device)
        labels = ids.clone()
        labels[:, : seq // 2] = -100  # prompt + answer: PARA pools the prompt's last token

        def step(name: str) -> None:
            model = models[name]
            embeds = model.get_input_embeddings()(ids)
            if name == "base":
                embeds.requires_grad_(True)  # a graph through every layer, like the adapted models'
            model(inputs_embeds=embeds, labels=labels).loss.backward()

        variants = {}
        for name, model in models.items():
            model.train()
            variants[name] = Variant(
                lambda name=name: step(name), setup=lambda m=model: m.zero_grad(set_to_none=True), models=(model,)
            )
        return variants

    return Case(
        group=f"model train step {size.tag} b{batch} s{seq}",
        kind="model",
        variants=names,
        build=build,
        baseline="base",
        rounds=rounds,
        warmup=1,
    )


# --- decoding ------------------------------------------------------------------------------------------


def generate(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    """Greedy decoding of exactly ``new_tokens`` tokens after ``ids``."""
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)


def tenant_bank(base, method: str, count: int):
    """A copy of ``base`` carrying ``count`` adapters t0 .. t{count-1} of ``method``, each different:
    patched once, saved, and loaded back under each name (``rk.save_adapter`` / ``rk.load_adapter``,
    as a server adds customers' adapters)."""
    bank = rk.patch_model(copy.deepcopy(base), method, adapter_name="t0")
    with tempfile.TemporaryDirectory() as d:
        rk.save_adapter(bank, d)
        for i in range(1, count):
            rk.load_adapter(bank, d, f"t{i}")
    perturb(bank)
    return bank


def decode_models(
    size: Llama, variants: Sequence[str], tenants: int = 1, device: torch.device | None = None
) -> dict[str, torch.nn.Module]:
    """The model each decode variant runs (one shared random base; adapters perturbed)."""
    device = device or torch.device("cpu")
    base = llama(size, device)
    models: dict[str, torch.nn.Module] = {}
    for variant in variants:
        method = variant.removesuffix(" tenants")
        if variant == "base":
            models[variant] = base
        elif variant in METHODS:
            models[variant] = rk.patch_model(copy.deepcopy(base), variant)
            perturb(models[variant])
        elif variant.endswith(" tenants") and method in METHODS:
            models[variant] = tenant_bank(base, method, tenants)
        elif variant == "peft lora mixed":
            models[variant] = _peft_model(base, "lora", tenants).eval()
        elif variant == "peft ia3 loop":
            models[variant] = _peft_model(base, "ia3", tenants).eval()
        else:
            raise ValueError(f"unknown decode variant {variant!r}")
    return models


def decode_case(
    size: Llama = SMALL,
    batch: int = 8,
    prompt: int = 256,
    new_tokens: int = 32,
    variants: Sequence[str] = ("base", "red", "para", "red tenants", "para tenants"),
    tenants: int = 8,
    memory: bool = False,
    label: str = "decode",
    device: torch.device | None = None,
    rounds: int = DECODE_ROUNDS,
) -> Case:
    """Greedy decoding of ``new_tokens`` tokens after a ``prompt``-token prompt, ``batch`` rows; rows
    of the ``tenants`` variants cycle over ``tenants`` adapters. Ratios and tokens/s to the base;
    ``memory`` adds each variant's weights and peak extra memory."""
    device = device or torch.device("cpu")
    rows = [f"t{i % tenants}" for i in range(batch)]

    def build() -> dict[str, Variant]:
        models = decode_models(size, variants, tenants, device)
        ids = _tokens(size, batch, prompt, device)

        def call(name: str) -> None:
            model = models[name]
            if name.endswith(" tenants"):
                with rk.tenants(model, rows):
                    generate(model, ids, new_tokens)
            elif name == "peft lora mixed":
                generate(model, ids, new_tokens, adapter_names=rows)
            elif name == "peft ia3 loop":
                for t in sorted(set(rows)):
                    model.set_adapter(t)
                    generate(model, ids[[i for i, r in enumerate(rows) if r == t]], new_tokens)
            else:
                generate(model, ids, new_tokens)

        return {name: Variant(lambda name=name: call(name), models=(models[name],)) for name in variants}

    mixed = any(v not in ("base", *METHODS) for v in variants)
    return Case(
        group=f"model {label} {size.tag} b{batch} p{prompt} +{new_tokens}" + (f" t{tenants}" if mixed else ""),
        kind="model",
        variants=tuple(variants),
        build=build,
        baseline="base",
        rounds=rounds,
        warmup=1,
        tokens=batch * new_tokens,
        memory=memory,
    )


def tenants_case(
    batch: int = 8,
    tenants: int = 8,
    methods: Sequence[str] = ("red", "para"),
    peft: bool | None = None,
    device: torch.device | None = None,
    rounds: int = DECODE_ROUNDS,
) -> Case:
    """The tenants comparison (:data:`TENANTS` size, with memory): decoding of ``batch`` rows cycling
    over ``tenants`` adapters, ``base`` against ``<method> tenants`` for each of ``methods`` and, if
    ``peft`` (default: when installed), PEFT LoRA mixed and the PEFT IA3 loop."""
    peft = have_peft() if peft is None else peft
    variants = ("base", *(f"{m} tenants" for m in methods), *(PEFT_DECODE if peft else ()))
    return decode_case(
        TENANTS,
        batch=batch,
        variants=variants,
        tenants=tenants,
        memory=True,
        label="tenants",
        device=device,
        rounds=rounds,
    )


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """The model-level cases ``python -m red_kernels bench`` runs: a training step, decoding (base,
    RED, PARA, mixed tenants) and, at full size, the tenants comparison with PEFT and memory."""
    peft = have_peft()
    peft_decode = PEFT_DECODE if peft else ()
    if quick:
        return [
            train_case(TINY, batch=2, seq=32, peft=peft, device=device, rounds=QUICK_ROUNDS),
            decode_case(
                TINY,
                batch=4,
                prompt=16,
                new_tokens=8,
                variants=("base", "red", "para", "red tenants", "para tenants", *peft_decode),
                tenants=4,
                memory=True,
                device=device,
                rounds=QUICK_ROUNDS,
            ),
        ]
    return [train_case(SMALL, peft=peft, device=device), decode_case(SMALL, device=device), tenants_case(device=device)]
