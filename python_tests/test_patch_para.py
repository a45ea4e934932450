"""PARA on models (issue 10): ``rk.patch_model(model, "para")`` on tiny random-weight LLaMA (grouped-query
attention), GPT-2, RoBERTa and T5 (relu and gated-gelu), each promise checked against a truth that does
not come from the package's own internals:

- the frozen base model (step 0, unpatch, ``disable_adapter``);
- PARA written here from the paper with plain PyTorch hooks on an unpatched copy (:class:`ManualPARA`):
  per layer, pool the layer input at the last prompt token (T5's decoder: the encoder output at the
  encoder's last real token), ``act(x @ W_down) @ W_up + b_up``, split into ``l_q, l_v, l_u``, scale
  the query, value and FFN-up projections' outputs of that sequence;
- what ``generate`` saw (its raw logits and beam scores) against teacher-forced forwards, each row of
  a padded batch against that row alone, the ``reference`` backend, fresh copies of a model, and
  eager PyTorch for ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import threading
import warnings

import pytest
import torch
from _hf_models import TINY, VOCAB, meta_model
from torch import nn

import red_kernels as rk
import red_kernels.patch.sites as sites

GEN = ".para_gen."
ARCH = {"llama": "llama", "gpt2": "gpt2", "roberta": "roberta", "t5-relu": "t5", "t5-gated-gelu": "t5"}
# Typical norm of a layer input's token vector in the tiny models (embeddings of std 0.02 in the
# causal LMs, LayerNorm'd inputs elsewhere): perturbed generators are scaled by it so that the
# vectors depend on the pooled token by O(0.1..1), not by 1e-3 or 1e3.
TOKEN_NORM = {"llama": 0.1, "gpt2": 0.2, "roberta": 6.0, "t5": 8.0}
OPTIONS = dict(rank=12, activation="gelu", up_bias=True, targets=None, trainable=None, backend=None)


# --- models and inputs ----------------------------------------------------------------------------


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TINY[name]()


def perturb(model: nn.Module, arch: str, seed: int = 1) -> None:
    """Generators as after training: every parameter whose name contains ``.para_gen.`` random."""
    g = torch.Generator().manual_seed(seed)
    found = 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if GEN not in n:
                continue
            found += 1
            noise = torch.randn(p.shape, generator=g)
            if n.endswith("w_down"):
                p.copy_(noise / TOKEN_NORM[arch])
            elif n.endswith("w_up"):
                p.copy_(0.15 * noise)
            else:
                p.copy_(1 + 0.1 * noise)
    assert found


def patched(name: str, seed: int = 0, perturb_seed: int | None = 1, **options) -> nn.Module:
    model = make(name, seed)
    rk.patch_model(model, "para", **{**OPTIONS, **options})
    if perturb_seed is not None:
        perturb(model, ARCH[name], perturb_seed)
    return model


def padded_inputs(model: nn.Module, batch: int = 3, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Row 0 left-padded by 2, row 1 right-padded by 3, the rest full; labels as training uses them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[1, -3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kind = model.config.model_type
    if kind == "t5":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, VOCAB, (batch, 5), generator=g)}
    if kind == "roberta":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(batch) % 3}
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def last_real(mask: torch.Tensor) -> torch.Tensor:
    return torch.tensor([int(row.nonzero().max()) for row in mask])


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(1) - 1).clamp(min=0)


def run(model: nn.Module, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def features(model: nn.Module, **inputs) -> torch.Tensor:
    """Logits and last hidden states, flattened: a classifier's logits alone move little."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    hidden = [out.decoder_hidden_states[-1], out.encoder_last_hidden_state] if "decoder_hidden_states" in out else []
    hidden = hidden or [out.hidden_states[-1]]
    return torch.cat([t.flatten() for t in (out.logits, *hidden)])


def greedy(model, ids, mask=None, new=4, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            **kw,
        )


def assert_differ(a: torch.Tensor, b: torch.Tensor, by: float = 1e-3) -> None:
    """``a`` and ``b`` differ by more than ``by`` times ``b``'s largest magnitude."""
    assert (a - b).abs().max().item() > by * b.abs().max().item(), "expected a difference (so the test can fail)"


def red_kernels_hooks(model: nn.Module) -> list:
    hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    return [h for h in hooks if getattr(getattr(h, "func", h), "__module__", "").startswith("red_kernels")]


def close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# --- PARA from the paper, written independently with plain hooks ---------------------------------

# Per architecture: the layers (regex), and per vector the scaled module (regex relative to the layer)
# and which third of its output (GPT-2's fused q|k|v) or None for all of it.
LAYOUT = {
    "llama": (r"model\.layers\.\d+", {"q": (r"self_attn\.q_proj", None), "v": (r"self_attn\.v_proj", None),
                                      "u": (r"mlp\.up_proj", None)}),
    "gpt2": (r"transformer\.h\.\d+", {"q": (r"attn\.c_attn", 0), "v": (r"attn\.c_attn", 2), "u": (r"mlp\.c_fc", None)}),
    "roberta": (r"roberta\.encoder\.layer\.\d+", {"q": (r"attention\.self\.query", None),
                                                  "v": (r"attention\.self\.value", None),
                                                  "u": (r"intermediate\.dense", None)}),
    "t5": (r"(encoder|decoder)\.block\.\d+", {"q": (r"layer\.0\.SelfAttention\.q", None),
                                             "v": (r"layer\.0\.SelfAttention\.v", None),
                                             "u": (r"layer\.\d\.DenseReluDense\.(wi|wi_1)", None)}),
}  # fmt: skip
ACTIVATIONS = {"gelu": nn.functional.gelu, "relu": torch.relu}


class ManualPARA:
    """An unpatched copy of the base model plus PARA as the paper states it, with the generator
    weights read from a patched model by name. ``pool`` (and, for T5's decoder, ``enc_pool``) give
    the pooled position of every row explicitly."""

    def __init__(self, base: nn.Module, source: nn.Module, arch: str, activation: str = "gelu"):
        self.model = copy.deepcopy(base)
        self.arch, self.act = arch, ACTIVATIONS[activation]
        layer_rx, slots = LAYOUT[arch]
        modules = dict(self.model.named_modules())
        self.layers = [n for n in modules if re.fullmatch(layer_rx, n)]
        assert self.layers
        self.pool = self.enc_pool = self.enc_out = None
        self.vectors: dict[str, dict[str, torch.Tensor]] = {}
        for layer in self.layers:
            gen = source.get_submodule(f"{layer}.para_gen.default")
            weights = (gen.w_down.detach().clone(), gen.w_up.detach().clone(), gen.b_up.detach().clone())
            self.model.get_submodule(layer).register_forward_pre_hook(self._gen_hook(layer, weights), with_kwargs=True)
            widths = []
            for vector, (rx, third) in slots.items():
                (name,) = [n for n in modules if n.startswith(layer + ".") and re.fullmatch(rx, n[len(layer) + 1 :])]
                module = modules[name]
                width = module.out_features if isinstance(module, nn.Linear) else module.nf
                widths.append(width // 3 if third is not None else width)
                module.register_forward_hook(self._scale_hook(layer, vector, third))
            assert sum(widths) == weights[1].shape[1]
            self.widths = widths
        if arch == "t5":
            self.model.encoder.register_forward_hook(lambda m, a, out: setattr(self, "enc_out", out[0]))

    def _gen_hook(self, layer, weights):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            decoder = layer.startswith("decoder.")
            src, pool = (self.enc_out, self.enc_pool) if decoder else (hidden, self.pool)
            x = src[torch.arange(src.shape[0]), pool].float()
            w_down, w_up, b_up = weights
            out = self.act(x @ w_down) @ w_up + b_up
            self.vectors[layer] = dict(zip("qvu", torch.split(out, self.widths, dim=1)))

        return hook

    def _scale_hook(self, layer, vector, third):
        def hook(module, args, out):
            vec = self.vectors[layer][vector][:, None, :]
            if third is None:
                return out * vec
            n = out.shape[-1] // 3
            parts = list(out.split(n, dim=-1))
            parts[third] = parts[third] * vec
            return torch.cat(parts, -1)

        return hook

    def logits(self, pool, enc_pool=None, **inputs) -> torch.Tensor:
        self.pool, self.enc_pool = torch.as_tensor(pool), None if enc_pool is None else torch.as_tensor(enc_pool)
        return run(self.model, **inputs)


def manual(base, source, name, inputs, activation="gelu") -> ManualPARA:
    """``ManualPARA`` pooling every row's last real token of ``inputs`` (T5's decoder: the encoder's)."""
    ref = ManualPARA(base, source, ARCH[name], activation)
    ref.pool = ref.enc_pool = last_real(inputs["attention_mask"])
    return ref


# --- 1. every architecture: identity at step 0, the paper's PARA once trained, unpatch ------------


@pytest.mark.parametrize("name", list(TINY))
def test_identity_at_step_0_matches_the_paper_once_perturbed_and_unpatch_restores(name):
    model = make(name)
    base = copy.deepcopy(model)
    tree, sd = repr(model), {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    inputs = padded_inputs(model)
    before = features(base, **inputs)

    rk.patch_model(model, "para", **OPTIONS)
    assert torch.equal(features(model, **inputs), before)  # W_up = 0, b_up = 1: bit for bit
    assert rk.trainable_parameters(model).trainable == sum(p.numel() for n, p in model.named_parameters() if GEN in n)

    perturb(model, ARCH[name])
    after = features(model, **inputs)
    assert_differ(after, before, 5e-3)
    close(after, features(manual(base, model, name, inputs).model, **inputs), atol=1e-5, rtol=1e-4)
    with rk.disable_adapter(model):
        assert torch.equal(features(model, **inputs), before)

    rk.unpatch_model(model)
    assert repr(model) == tree
    state = model.state_dict()
    assert list(state) == list(sd)
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in sd.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not red_kernels_hooks(model)  # (transformers adds its own output-capturing hooks)
    assert rk.patch.patch_state(model) is None
    assert torch.equal(features(model, **inputs), before)


# --- 2. the paper's parameter count -------------------------------------------------------------


@pytest.mark.parametrize(("up_bias", "expected"), [(True, 9_560_064), (False, 8_945_664)])
def test_llama_2_7b_trainable_parameters(up_bias, expected):
    # Per layer: W_down 4096 x 12, W_up 12 x (4096 + 4096 + 11008), b_up 19200 (when it trains).
    model = meta_model("llama-2-7b")
    rk.patch_model(model, "para", up_bias=up_bias)
    assert rk.trainable_parameters(model).trainable == expected
    assert {p.device.type for n, p in model.named_parameters() if GEN in n} == {"meta"}


# --- 3. which token is pooled: generation against teacher forcing ---------------------------------


def prompt_and_answer(model, batch=2, prompt=6, new=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, prompt), generator=g)
    out = greedy(model, ids, new=new)
    return out.sequences, torch.stack(out.logits, 1)  # [B, P + A], [B, A, V]: the logits generate saw


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_teacher_forcing_pools_the_prompt_like_generation(name):
    model = patched(name)
    base = make(name)
    p, a = 6, 4
    seq, seen = prompt_and_answer(model, prompt=p, new=a)
    at_answer = slice(p - 1, p - 1 + a)  # position i predicts token i + 1

    with rk.prompt_lengths(model, [p] * len(seq)):
        close(run(model, input_ids=seq)[:, at_answer], seen, atol=1e-4, rtol=0)
    labels = seq.masked_fill(torch.arange(seq.shape[1]) < p, -100)
    close(run(model, input_ids=seq, labels=labels)[:, at_answer], seen, atol=1e-4, rtol=0)
    # The paper's PARA pooling the prompt's last token, written independently.
    ref = ManualPARA(base, model, ARCH[name])
    close(ref.logits([p - 1] * len(seq), input_ids=seq)[:, at_answer], seen, atol=1e-4, rtol=0)
    # Without either the forward pools the answer's last token: other vectors, other logits.
    assert_differ(run(model, input_ids=seq)[:, at_answer], seen)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_left_padded_batch_rows_equal_each_row_alone(name):
    model = patched(name)
    g = torch.Generator().manual_seed(4)
    lengths, width, new = [6, 3, 5], 6, 4
    rows = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = (torch.arange(width) >= width - torch.tensor(lengths)[:, None]).long()
    batch = greedy(model, ids, mask, new=new)
    seen = torch.stack(batch.logits, 1)
    for b, row in enumerate(rows):
        alone = greedy(model, row[None], new=new)
        assert torch.equal(batch.sequences[b, width:], alone.sequences[0, len(row) :]), f"row {b}"
        close(seen[b], torch.stack(alone.logits, 1)[0], atol=1e-4, rtol=0)
        # A forward of the padded prompt: each row's real positions as the row alone (positions
        # counted from the first real token, as generate does: GPT-2's are absolute).
        padded = run(model, input_ids=ids, attention_mask=mask, position_ids=positions(mask))
        close(padded[b, width - len(row) :], run(model, input_ids=row[None])[0])

    # Prompt + answer of the padded batch, told the prompt lengths or shown them by labels: at
    # every answer position the logits generation saw.
    seq = batch.sequences
    full_mask = torch.cat([mask, torch.ones(len(rows), new, dtype=torch.long)], 1)
    forced = dict(input_ids=seq, attention_mask=full_mask, position_ids=positions(full_mask))
    at_answer = slice(width - 1, width - 1 + new)
    with rk.prompt_lengths(model, lengths):
        close(run(model, **forced)[:, at_answer], seen, atol=1e-4, rtol=0)
    labels = seq.masked_fill(torch.arange(seq.shape[1]) < width, -100)
    close(run(model, **forced, labels=labels)[:, at_answer], seen, atol=1e-4, rtol=0)
    assert_differ(run(model, **forced)[:, at_answer], seen)


def test_right_padded_training_batch_pools_each_rows_prompt():
    # Training batches are usually right-padded: prompt + answer, then padding, labels -100 on the
    # prompt and the padding. Each row must see what that row's prompt alone gives at generation.
    model = patched("llama")
    g = torch.Generator().manual_seed(5)
    prompts, answers = [5, 3, 4], [2, 4, 3]
    width = max(p + a for p, a in zip(prompts, answers))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    seen = []
    for b, (p, a) in enumerate(zip(prompts, answers)):
        out = greedy(model, torch.randint(3, VOCAB, (1, p), generator=g), new=a)
        ids[b, : p + a], mask[b, : p + a] = out.sequences[0], 1
        labels[b, p : p + a] = out.sequences[0, p:]
        seen.append(torch.stack(out.logits, 1)[0])
    got = run(model, input_ids=ids, attention_mask=mask, labels=labels)
    unlabelled = run(model, input_ids=ids, attention_mask=mask)
    for b, (p, a) in enumerate(zip(prompts, answers)):
        close(got[b, p - 1 : p - 1 + a], seen[b], atol=1e-4, rtol=0)
        assert_differ(unlabelled[b, p - 1 : p - 1 + a], seen[b])


@pytest.mark.parametrize("name", ["t5-relu", "t5-gated-gelu"])
def test_t5_generation_equals_teacher_forcing_and_the_decoder_pools_the_encoder(name, monkeypatch):
    model = patched(name)
    base = make(name)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding: the encoder's last real token is position 4 of row 1
    ids = ids.masked_fill(mask == 0, 0)
    out = greedy(model, ids, mask, new=4)
    seen = torch.stack(out.logits, 1)
    forced = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1])
    close(run(model, **forced), seen, atol=1e-4, rtol=0)
    close(features(manual(base, model, name, forced).model, **forced), features(model, **forced), atol=1e-5, rtol=1e-4)

    # The decoder's vectors come from the encoder: its prefill input is the start token for every
    # row, yet rows with different encoder inputs get different decoder vectors, and the base
    # model's decoder reading the same encoder output differs from the patched one.
    layer_of = {id(m.w_down): n.rsplit(".para_gen", 1)[0] for n, m in model.named_modules() if n.endswith(".default")}
    calls = []
    real = sites.para_vector_gen

    def spy(h, pool_index, w_down, *args, **kwargs):
        out = real(h, pool_index, w_down, *args, **kwargs)
        calls.append((layer_of[id(w_down)], out.detach().clone()))
        return out

    monkeypatch.setattr(sites, "para_vector_gen", spy)
    start = torch.zeros(2, 1, dtype=torch.long)
    run(model, input_ids=ids, attention_mask=mask, decoder_input_ids=start)
    decoder = [v for layer, v in calls if layer.startswith("decoder.")]
    assert len(decoder) == 2
    for v in decoder:
        assert_differ(v[0], v[1], 1e-2)
    with rk.disable_adapter(model):
        plain = run(model, input_ids=ids, attention_mask=mask, decoder_input_ids=start)
    assert_differ(run(model, input_ids=ids, attention_mask=mask, decoder_input_ids=start), plain)


# --- 4. generators run at prefill only; beam search ------------------------------------------------


def count_calls(monkeypatch, name: str) -> list[int]:
    """Replace ``sites.<name>`` by a wrapper that records each call's ``h.shape[1]`` (the sequence
    length of its first argument) in the list returned."""
    calls = []
    real = getattr(sites, name)

    def counting(h, *args, **kwargs):
        calls.append(h.shape[1])
        return real(h, *args, **kwargs)

    monkeypatch.setattr(sites, name, counting)
    return calls


def count_generator_calls(monkeypatch) -> list[int]:
    return count_calls(monkeypatch, "para_vector_gen")


@pytest.mark.parametrize(("name", "layers"), [("llama", 2), ("gpt2", 2), ("t5-relu", 4)])
def test_generators_run_once_per_layer_at_prefill(name, layers, monkeypatch):
    model = patched(name)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))
    reference = greedy(model, ids, new=5)
    calls = count_generator_calls(monkeypatch)
    out = greedy(model, ids, new=5)
    assert len(calls) == layers  # prefill only (T5: encoder + decoder layers), none per decode step
    assert torch.equal(out.sequences, reference.sequences)


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5-relu"])
def test_generation_without_kv_cache_equals_generation_with_it(name):
    # use_cache=False reruns the whole sequence each step; the prompt is still the prompt, so the
    # vectors (and every step's logits) must be those of the cached generation.
    model = patched(name)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(15))
    cached, plain = greedy(model, ids, new=4), greedy(model, ids, new=4, use_cache=False)
    close(torch.stack(plain.logits, 1), torch.stack(cached.logits, 1), atol=1e-4, rtol=0)
    assert torch.equal(plain.sequences, cached.sequences)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_beam_search_scores_equal_teacher_forced_log_probabilities(name, monkeypatch):
    model = patched(name)
    p, new, beams, ret = 6, 4, 3, 2
    ids = torch.randint(3, VOCAB, (2, p), generator=torch.Generator().manual_seed(8))
    calls = count_generator_calls(monkeypatch)
    out = greedy(model, ids, new=new, num_beams=beams, num_return_sequences=ret, output_scores=True)
    assert len(calls) == 2 and out.sequences.shape == (2 * ret, p + new)
    # Step 0: every beam of a row saw the logits of that row's prompt.
    first = run(model, input_ids=ids)[:, -1]
    close(out.logits[0], first.repeat_interleave(beams, 0), atol=1e-4, rtol=0)
    # Each returned sequence's score is its answer's mean log-probability (length_penalty 1) under a
    # teacher-forced forward that pools the prompt.
    with rk.prompt_lengths(model, [p] * len(out.sequences)):
        logp = run(model, input_ids=out.sequences).log_softmax(-1)[:, p - 1 : -1]
    answer = logp.gather(-1, out.sequences[:, p:, None])[..., 0]
    close(out.sequences_scores, answer.sum(1) / new, atol=1e-4, rtol=0)
    assert (out.sequences[:, :p] == ids.repeat_interleave(ret, 0)).all()


# --- 5. no state leaks between calls, models and threads ------------------------------------------


def llama_layer_alone(model, hidden: torch.Tensor, index: int = 0) -> torch.Tensor:
    """One LLaMA decoder layer called on its own (it pools its input's last token)."""
    positions_ = torch.arange(hidden.shape[1])[None].expand(hidden.shape[0], -1)
    rope = model.model.rotary_emb(hidden, positions_)
    with torch.no_grad():
        out = model.model.layers[index](hidden, position_embeddings=rope)
    return out[0] if isinstance(out, tuple) else out


def test_forward_after_generation_computes_new_vectors():
    model = patched("llama")
    fresh = copy.deepcopy(model)
    g = torch.Generator().manual_seed(9)
    greedy(model, torch.randint(3, VOCAB, (2, 6), generator=g), new=3)
    for shape in [(2, 9), (3, 5)]:  # the generated batch's shape, and another
        ids = torch.randint(3, VOCAB, shape, generator=g)
        assert torch.equal(run(model, input_ids=ids), run(fresh, input_ids=ids))
    # And generation again, on other prompts.
    ids = torch.randint(3, VOCAB, (3, 4), generator=g)
    a, b = greedy(model, ids, new=3), greedy(fresh, ids, new=3)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def _generate(model, g):
    greedy(model, torch.randint(3, VOCAB, (2, 6), generator=g), new=3)


def _longer_forward(model, g):
    run(model, input_ids=torch.randint(3, VOCAB, (2, 8), generator=g))


def _prompt_lengths_forward(model, g):
    with rk.prompt_lengths(model, [2, 3]):
        run(model, input_ids=torch.randint(3, VOCAB, (2, 5), generator=g))


@pytest.mark.parametrize("before", [_generate, _longer_forward, _prompt_lengths_forward], ids=lambda f: f.__name__[1:])
def test_layer_called_alone_pools_its_input_whatever_the_model_ran_before(before):
    # sites.py: "a layer called on its own pools its input's last token". A model that ran before
    # (a generation, whose last call was a decode step; a longer forward; a forward told other prompt
    # lengths) of the same batch size must not change what the layer alone computes.
    model = patched("llama")
    fresh = copy.deepcopy(model)
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(10))
    expected = llama_layer_alone(fresh, hidden)
    assert_differ(expected, llama_layer_alone(make("llama"), hidden))
    before(model, torch.Generator().manual_seed(11))
    close(llama_layer_alone(model, hidden), expected, atol=0, rtol=0)


def test_failed_forward_leaves_no_vectors_and_the_next_forward_is_right():
    model = patched("llama")
    fresh = copy.deepcopy(model)
    local = rk.patch.patch_state(model).local
    inputs = padded_inputs(model)
    expected = run(fresh, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])

    bad = inputs["attention_mask"].clone()
    bad[2] = 0  # a row with no token: nothing to pool
    with pytest.raises(ValueError, match="all padding"):
        run(model, input_ids=inputs["input_ids"], attention_mask=bad, labels=inputs["labels"])
    assert not local.vectors
    assert torch.equal(run(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]), expected)

    # A failure after the first layer's generator ran (and with prompt lengths from labels).
    def boom(module, args, kwargs):
        raise RuntimeError("boom")

    labels = inputs["labels"].clone()
    labels[:, :4] = -100
    handle = model.model.layers[1].register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            run(model, **{**inputs, "labels": labels})
    finally:
        handle.remove()
    assert not local.vectors
    assert torch.equal(run(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]), expected)
    assert torch.equal(run(model, **inputs), run(fresh, **inputs))


def test_two_patched_models_are_independent():
    a, b = patched("llama", perturb_seed=1), patched("llama", perturb_seed=2)
    alone_a, alone_b = copy.deepcopy(a), copy.deepcopy(b)
    g = torch.Generator().manual_seed(12)
    x, y = torch.randint(3, VOCAB, (2, 6), generator=g), torch.randint(3, VOCAB, (3, 4), generator=g)
    out_a, out_b = greedy(a, x, new=3), greedy(b, y, new=3)
    with rk.prompt_lengths(a, [3, 3]):  # a context on one model does not reach the other
        fa, fb = run(a, input_ids=x), run(b, input_ids=y)
    assert torch.equal(out_a.sequences, greedy(alone_a, x, new=3).sequences)
    assert torch.equal(out_b.sequences, greedy(alone_b, y, new=3).sequences)
    with rk.prompt_lengths(alone_a, [3, 3]):
        assert torch.equal(fa, run(alone_a, input_ids=x))
    assert torch.equal(fb, run(alone_b, input_ids=y))
    assert_differ(run(a, input_ids=x), run(b, input_ids=x))


def _work(model, seed: int, lengths: list[int] | None):
    """Several forwards and a generation on one model; returns every result."""
    g = torch.Generator().manual_seed(seed)
    results = []
    for step in range(4):
        ids = torch.randint(3, VOCAB, (2 + step % 2, 5 + step), generator=g)
        if lengths is None:
            results.append(run(model, input_ids=ids))
        else:
            with rk.prompt_lengths(model, lengths[: len(ids)]):
                results.append(run(model, input_ids=ids))
    results.append(greedy(model, ids[:, :4], new=3).sequences)
    return results


def _concurrently(jobs):
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def body(i, fn):
        try:
            barrier.wait()
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i, fn)) for i, fn in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("same_model", [False, True], ids=["two-models", "one-model"])
def test_threads_give_the_results_of_sequential_runs(same_model):
    a = patched("llama", perturb_seed=1)
    b = a if same_model else patched("gpt2", perturb_seed=2)
    jobs = [lambda: _work(a, 13, [3, 2, 4]), lambda: _work(b, 14, None)]
    sequential = [job() for job in jobs]
    for _ in range(2):
        for got, want in zip(_concurrently(jobs), sequential):
            assert len(got) == len(want)
            assert all(torch.equal(x, y) for x, y in zip(got, want))


# --- 6. save_adapter / load_adapter ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("llama", {}),
        ("llama", {"up_bias": False}),
        ("llama", {"activation": "relu", "rank": 4}),
        ("gpt2", {}),
        ("t5-gated-gelu", {}),
    ],
    ids=["llama", "llama-no-up-bias", "llama-relu-rank4", "gpt2", "t5-gated-gelu"],
)
def test_save_load_round_trip(name, options, tmp_path):
    model = patched(name, **options)
    rk.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    rank, activation, up_bias = options.get("rank", 12), options.get("activation", "gelu"), options.get("up_bias", True)
    assert (meta["method"], meta["rank"], meta["activation"], meta["up_bias"]) == ("para", rank, activation, up_bias)
    layers = ManualPARA(make(name), model, ARCH[name], activation)
    assert sorted(meta["out_sizes"]) == sorted(layers.layers)
    assert all(sizes == layers.widths for sizes in meta["out_sizes"].values())
    trainable = rk.trainable_parameters(model).trainable
    assert meta["num_parameters"]["edit"] == trainable
    if not up_bias:  # b_up is fixed ones: neither trained nor saved
        assert trainable == sum(d * rank + rank * sum(layers.widths) for d in meta["dims"].values())

    fresh = make(name)  # the same base weights (same seed), no adapter
    rk.load_adapter(fresh, tmp_path)
    inputs = padded_inputs(model)
    assert torch.equal(run(fresh, **inputs), run(model, **inputs))
    assert rk.trainable_parameters(fresh).trainable == trainable
    # and both equal the paper's PARA with the saved generators and the chosen activation
    layers.pool = layers.enc_pool = last_real(inputs["attention_mask"])
    close(features(fresh, **inputs), features(layers.model, **inputs), atol=1e-5, rtol=1e-4)


# --- 7. training ------------------------------------------------------------------------------------


def training_batch(model, seed: int = 0):
    """Prompt + answer (left padding in row 0, right padding in row 1), labels on the answers only:
    the prompts end at positions 4, 2 and 5."""
    inputs = padded_inputs(model, seed=seed)
    prompt_end = torch.tensor([5, 3, 6])[:, None]
    inputs["labels"] = inputs["labels"].masked_fill(torch.arange(8) < prompt_end, -100)
    return inputs


def generator_grads(model) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if GEN in n}
    missing = [n for n, p in params.items() if p.grad is None]
    assert params and not missing, f"no gradient reached {missing}"
    return {n: p.grad.clone() for n, p in params.items()}


def enable_checkpointing(model, **kwargs) -> None:
    with warnings.catch_warnings():  # gradient_checkpointing_enable is deprecated in transformers 5
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


def test_sgd_follows_the_reference_backend():
    base = make("llama")
    reference = copy.deepcopy(base)
    torch.manual_seed(21)
    rk.patch_model(base, "para", **OPTIONS)  # default backend: the C++ kernels on CPU
    torch.manual_seed(21)
    rk.patch_model(reference, "para", **{**OPTIONS, "backend": "reference"})
    inputs = training_batch(base)
    trajectories = []
    for model in (base, reference):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=2.0)
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        trajectories.append(torch.tensor(losses, dtype=torch.float64))
    got, want = trajectories
    close(got, want, atol=0, rtol=1e-5)
    assert want[-1] < want[0] - 1e-4  # it trained (W_up moved off zero)
    for (n, p), (_, q) in zip(base.named_parameters(), reference.named_parameters()):
        if GEN in n:
            close(p, q, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_generator_gradients(reentrant):
    model = patched("llama")
    model.train()
    inputs = training_batch(model)
    model(**inputs).loss.backward()
    plain = generator_grads(model)
    model.zero_grad(set_to_none=True)
    enable_checkpointing(model, use_reentrant=reentrant)
    if reentrant:  # a frozen base needs inputs that require grad for reentrant checkpointing
        model.enable_input_require_grads()
    model(**inputs).loss.backward()
    checkpointed = generator_grads(model)
    for n, g in plain.items():
        assert g.abs().max() > 0, n
        close(checkpointed[n], g, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_trains_fp32_generators():
    model = patched("llama")
    model.train()
    inputs = training_batch(model)
    fp32_loss = model(**inputs).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs).loss
    loss.backward()
    assert abs(loss.item() - fp32_loss) < 2e-2 * abs(fp32_loss)
    for n, g in generator_grads(model).items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().max() > 0, n
    assert {p.dtype for n, p in model.named_parameters() if GEN in n} == {torch.float32}


def test_merge_refuses_para_and_leaves_the_model_patched():
    model = patched("llama")
    inputs = padded_inputs(model)
    before = run(model, **inputs)
    params = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="PARA"):
        rk.merge_model(model)
    assert rk.patch.patch_state(model) is not None and rk.adapter_names(model) == ["default"]
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert torch.equal(run(model, **inputs), before)
    assert_differ(before, run(make("llama"), **inputs))


# --- 8. torch.compile(fullgraph=True) ---------------------------------------------------------------
# backend="aot_eager": Dynamo captures the whole graph (what fullgraph promises) and AOTAutograd traces
# forward and backward through the ops' fake impls and autograd, without inductor's minutes of C++
# compilation on this machine.


def whole_graph(fn, base_fn, *args):
    """``fn`` compiled with fullgraph=True (first called on ``args``). Where that fails only because the
    base model breaks the graph (``base_fn`` fails too), ``fn`` compiled with fullgraph=False once no
    graph break comes from red_kernels."""
    graph = torch.compile(fn, fullgraph=True, backend="aot_eager")
    try:
        graph(*args)
        return graph
    except Exception as exc:
        torch._dynamo.reset()
        try:
            torch.compile(base_fn, fullgraph=True, backend="aot_eager")(*args)
        except Exception:  # noqa: BLE001 - the base breaks the graph: check where the patch's breaks are
            torch._dynamo.reset()
            explained = torch._dynamo.explain(fn)(*args)
            ours = [str(b) for b in explained.break_reasons if "red_kernels" in str(b)]
            assert not ours, ours
            return torch.compile(fn, backend="aot_eager")
        raise AssertionError("the base model compiles with fullgraph=True but the patched one does not") from exc


def test_compiled_layer_equals_eager_and_the_paper():
    model = patched("llama")
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(30))
    rope = model.model.rotary_emb(hidden, torch.arange(5)[None].expand(2, -1))
    layer = model.model.layers[0]
    with torch.no_grad():
        eager = layer(hidden, position_embeddings=rope)
        got = torch.compile(layer, fullgraph=True, backend="aot_eager")(hidden, position_embeddings=rope)
    torch._dynamo.reset()
    close(got, eager, atol=1e-6, rtol=1e-6)
    ref = ManualPARA(make("llama"), model, "llama")
    ref.pool = torch.tensor([4, 4])  # a layer on its own pools its input's last token
    with torch.no_grad():
        close(eager, ref.model.model.layers[0](hidden, position_embeddings=rope), atol=1e-5, rtol=1e-5)


def test_compiled_training_step_equals_eager():
    # One graph for the forward with labels (loss and logits) and its backward, called on a training
    # batch, on other tokens and padding, and under prompt_lengths: each as eager.
    model = patched("llama")
    model.train()
    base = make("llama")
    batch = training_batch(model)
    other = training_batch(model, seed=31)

    def step(m):
        def fn(ids, mask, labels):
            out = m(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
            return out.loss, out.logits

        return fn

    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    eager_loss, eager_logits = step(model)(*args)
    eager_loss.backward()
    eager_grads = generator_grads(model)
    model.zero_grad(set_to_none=True)
    graph = whole_graph(step(model), step(base), *args)
    loss, logits = graph(*args)
    loss.backward()
    close(loss, eager_loss, atol=1e-6, rtol=1e-6)
    close(logits, eager_logits, atol=1e-5, rtol=1e-5)
    for n, g in generator_grads(model).items():
        close(g, eager_grads[n], atol=1e-6, rtol=1e-5)

    other_args = (other["input_ids"], other["attention_mask"], other["labels"])
    for lengths in (None, [2, 3, 4]):
        with rk.prompt_lengths(model, lengths) if lengths else contextlib.nullcontext():
            got, want = graph(*other_args), step(model)(*other_args)
        close(got[1], want[1], atol=1e-5, rtol=1e-5)
        close(got[0], want[0], atol=1e-6, rtol=1e-6)
    assert_differ(got[1], step(model)(*other_args)[1])
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_scales_in_place_exactly_as_seq_scale(dtype):
    """Without autograd the scaled projections are multiplied in place (no second activation-sized
    tensor); the logits equal the autograd path's (seq_scale) bit for bit."""
    torch.manual_seed(0)
    model = TINY["llama"]().to(dtype)
    rk.patch_model(model, "para")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".para_gen." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    with torch.no_grad():
        inplace = model(ids).logits
    with torch.enable_grad():
        kernel = model(ids).logits.detach()
    assert torch.equal(inplace, kernel)


def test_generate_when_a_wrapper_subclasses_the_patched_class_again():
    """FSDP2's fully_shard swaps the model's class for a subclass of it: the patched class's generate
    (which fixes the prompt length) must still find the original generate."""
    model = rk.patch_model(TINY["llama"](), "para")
    with torch.no_grad():
        for p in rk.adapter_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    want = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    model.__class__ = type(type(model).__name__, (type(model),), {})
    got = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(got, want)


def test_adapters_added_and_deleted_under_a_wrapper_subclass(tmp_path, monkeypatch):
    """After a wrapper subclassed the PARA layers' class (FSDP2's fully_shard), adding a PARA adapter
    keeps the wrapper's class (a second PARA class on top would run the generators twice), and
    deleting every PARA adapter leaves layers that run their own forward (the class cannot be given
    back under the wrapper; unpatch_model refuses such a model, see test_patch_models)."""
    model = patched("llama")
    rk.save_adapter(model, tmp_path / "para")
    red = rk.patch_model(make("llama"), "red")
    with torch.no_grad():
        for p in rk.adapter_parameters(red).values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    rk.save_adapter(red, tmp_path / "red")
    for layer in model.model.layers:
        layer.__class__ = type("Wrapped" + type(layer).__name__, (type(layer),), {})
    classes = [type(layer) for layer in model.model.layers]
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))
    want = run(model, input_ids=ids)

    rk.load_adapter(model, tmp_path / "para", "second")
    rk.set_adapter(model, "second")
    assert [type(layer) for layer in model.model.layers] == classes
    calls = count_generator_calls(monkeypatch)
    assert torch.equal(run(model, input_ids=ids), want)
    assert len(calls) == 2  # once per layer

    rk.load_adapter(model, tmp_path / "red", "red")
    rk.set_adapter(model, "red")
    rk.delete_adapter(model, "default")
    rk.delete_adapter(model, "second")
    assert [type(layer) for layer in model.model.layers] == classes
    assert torch.equal(run(model, input_ids=ids), run(red, input_ids=ids))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_scales_every_projection_in_place(name, monkeypatch):
    """The decode-speed path: in plain generate (nn.Linear / Conv1D projections, no other hooks) every
    scaled projection is multiplied in place, never through seq_scale; with autograd it is seq_scale."""
    model = patched(name)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))
    calls = count_calls(monkeypatch, "seq_scale")
    model.generate(ids, max_new_tokens=4, do_sample=False)
    assert calls == []
    with torch.enable_grad():
        model(ids)
    assert calls  # the counter does see the out-of-place path


@pytest.mark.parametrize("where", ["hook before the patch", "prepended hook", "caching forward", "global hook"])
def test_an_output_held_elsewhere_is_not_scaled_in_place(where):
    """A projection output that someone else also holds (an earlier forward hook that returns a tensor
    it keeps, a module that caches its output) is scaled out of place: the kept tensor is left as the
    projection computed it, and the logits equal the autograd path's."""
    model = make("llama")
    q = model.model.layers[0].self_attn.q_proj
    kept = []

    def keep(module, args, out):
        kept.append((out, out.clone()))
        return out

    class CachingLinear(nn.Linear):
        def forward(self, x):
            out = super().forward(x)
            kept.append((out, out.clone()))
            return out

    if where == "hook before the patch":
        q.register_forward_hook(keep)
    elif where == "caching forward":
        q.__class__ = CachingLinear
    rk.patch_model(model, "para", **OPTIONS)
    perturb(model, "llama")
    handle = None
    if where == "prepended hook":
        handle = q.register_forward_hook(keep, prepend=True)
    elif where == "global hook":
        handle = nn.modules.module.register_module_forward_hook(lambda m, a, out: keep(m, a, out) if m is q else None)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))
    try:
        got = run(model, input_ids=ids)
        with torch.enable_grad():
            want = model(input_ids=ids).logits.detach()
    finally:
        if handle is not None:
            handle.remove()
    assert len(kept) == 2
    out, snapshot = kept[0]
    assert torch.equal(out, snapshot)
    assert torch.equal(got, want)
