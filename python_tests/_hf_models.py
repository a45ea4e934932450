"""Tiny random-weight Hugging Face models (no downloads) and the real configurations of the
models in the RED paper, for meta-device parameter counts."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def tiny_decoder(family: str, **overrides):
    """A random causal LM of a LLaMA-like transformers family (``family``: the prefix of its
    ``<family>Config`` / ``<family>ForCausalLM``): 2 layers, width 32, grouped-query attention
    (4 query heads, 2 KV heads)."""
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg.update(overrides)
    config = getattr(transformers, f"{family}Config")(**cfg)
    return _quiet(getattr(transformers, f"{family}ForCausalLM"), config).eval()


def tiny_llama(**overrides):
    """LLaMA with grouped-query attention (4 query heads, 2 KV heads)."""
    return tiny_decoder("Llama", bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)


def tiny_mistral():
    return tiny_decoder("Mistral")


def tiny_qwen2():
    return tiny_decoder("Qwen2")


def _bert_like(config_cls, model_cls, **overrides):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=72,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg.update(overrides)
    return _quiet(model_cls, config_cls(**cfg)).eval()


def tiny_roberta():
    return _bert_like(transformers.RobertaConfig, transformers.RobertaForSequenceClassification, pad_token_id=1)


def tiny_bert():
    return _bert_like(transformers.BertConfig, transformers.BertForSequenceClassification)


def tiny_t5(feed_forward_proj: str = "relu", family: str = "T5"):
    """T5 (``family`` "MT5": mT5, whose config defaults to the gated-gelu FFN and an untied head)."""
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB,
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj=feed_forward_proj,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return _quiet(getattr(transformers, f"{family}ForConditionalGeneration"), cfg).eval()


def tiny_gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return _quiet(transformers.GPT2LMHeadModel, cfg).eval()


TINY = {
    "llama": tiny_llama,
    "roberta": tiny_roberta,
    "t5-relu": lambda: tiny_t5("relu"),
    "t5-gated-gelu": lambda: tiny_t5("gated-gelu"),
    "gpt2": tiny_gpt2,
}
# Models recognised by structure (LLaMA's / RoBERTa's layout) rather than by their own table.
TINY_LOOKALIKES = {"mistral": tiny_mistral, "qwen2": tiny_qwen2, "bert": tiny_bert}


def inputs_for(model, batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs (with labels, so the output has a loss)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # some padding, so masks matter
    model_type = model.config.model_type
    if model_type == "t5":
        dec = torch.randint(3, VOCAB, (batch, seq - 2), generator=g)
        return {"input_ids": ids, "attention_mask": mask, "labels": dec}
    if model_type in ("roberta", "bert"):
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.tensor([0, 2] * (batch // 2) + [1] * (batch % 2)),
        }
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


def randomize_edits(model, seed: int = 1) -> None:
    """Give every editor non-trivial vectors, as after training."""
    import red_kernels as rk

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, rk.nn.REDEdit):
                if m.scale is not None:
                    m.scale.copy_(1 + 0.3 * torch.randn(m.scale.shape, generator=g))
                if m.bias is not None:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


# The papers' configurations, typed in from the public model cards (no download).
def real_config(name: str):
    t = transformers
    if name == "roberta-base":
        return t.RobertaConfig(
            vocab_size=50265,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=514,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            pad_token_id=1,
        )
    if name == "roberta-large":
        return t.RobertaConfig(
            vocab_size=50265,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            max_position_embeddings=514,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            pad_token_id=1,
        )
    if name == "gpt2-medium":
        return t.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16)
    if name == "gpt2-large":
        return t.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=1280, n_layer=36, n_head=20)
    if name == "t5-base":
        return t.T5Config(
            vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, feed_forward_proj="relu"
        )
    if name == "llama-2-7b":
        return t.LlamaConfig(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        )
    raise KeyError(name)


REAL_MODEL_CLASS = {
    "roberta-base": "RobertaModel",
    "roberta-large": "RobertaModel",
    "gpt2-medium": "GPT2LMHeadModel",
    "gpt2-large": "GPT2LMHeadModel",
    "t5-base": "T5ForConditionalGeneration",
    "llama-2-7b": "LlamaForCausalLM",
}


def meta_model(name: str):
    """The real architecture on the meta device: shapes only, no memory, no weights."""
    cls = getattr(transformers, REAL_MODEL_CLASS[name])
    with torch.device("meta"):
        return _quiet(cls, real_config(name))
