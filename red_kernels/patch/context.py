"""The per-forward context of a patched model: which adapter each row uses and which token PARA pools.

Target hooks only read this context; three kinds of model-level hooks and three context managers
fill it, all per thread (a ``threading.local`` on the model's patch state, so threads never see
each other's rows and two patched models share nothing):

- ``tenants(model, names)`` / ``set_adapter`` / ``disable_adapter(model)`` decide each row's
  adapter (a name or None, the base model). :func:`rows_for` expands the names over the rows of a
  call: ``generate(num_beams=k)`` and ``num_return_sequences`` repeat every row k times in place
  (``repeat_interleave``), so a batch of ``k * len(names)`` rows maps name ``i`` to rows
  ``i*k .. i*k + k-1``.
- ``prompt_lengths(model, lengths)`` says how many tokens of each row are the prompt (without
  padding); it overrides what the ``labels`` say.
- A *stack* hook on the module that owns the layers (``LlamaModel``, ``GPT2Model``,
  ``RobertaModel``, each ``T5Stack``) reads ``attention_mask`` and the KV cache of the call and
  records a :class:`Frame`: the pool index of every row at prefill, or, on a decode step (the
  cache already holds tokens), the PARA vectors that prefill attached to that cache object. The
  frame outlives the call so that gradient checkpointing, which reruns a layer during backward,
  pools exactly what the forward pooled; the next call of the stack replaces it.
- A *root* hook on the patched model reads ``labels`` (causal LMs): each row's prompt is the
  leading run of -100 labels, so training on prompt + answer pools the prompt's last token, the
  token inference pools from the prompt alone.

The PARA vectors of a call live in ``local.vectors`` (layer name -> ``[B, n]``), written by the
layer's pre-hook and read by its scaled projections; the stack's exit clears them (also when the
call fails, ``always_call``), after attaching them to the call's cache for the decode steps.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from red_kernels.ops.pooling import last_token_index, lengths_tensor

CACHE_ATTR = "_red_kernels_para_vectors"  # on a transformers Cache object: {state key: {layer: [B, n]}}
IGNORE_INDEX = -100  # transformers' label of tokens that are not trained on (the prompt, padding)


class Local(threading.local):
    """Per-thread context of one patched model. ``deepcopy``/pickle of a model give a fresh one."""

    def __init__(self) -> None:
        self.tenants: tuple[str | None, ...] | None = None  # rk.tenants(...)
        self.disabled = False  # rk.disable_adapter(...)
        self.prompt_lengths: Tensor | None = None  # rk.prompt_lengths(...)
        self.label_lengths: Tensor | None = None  # from the root call's labels
        self.frames: dict[str, Frame] = {}  # stack name -> its last call
        self.vectors: dict[str, Tensor] = {}  # layer name -> PARA vectors of the current call
        self.ids: dict[tuple, Tensor] = {}  # (rows, present adapters, device) -> tenant ids

    def __deepcopy__(self, memo: dict) -> Local:
        return Local()

    def __reduce__(self):
        return (Local, ())


@dataclass
class Frame:
    """What a stack call tells its layers."""

    batch: int
    pool_index: Tensor | None  # [B] int64 at prefill; None on a decode step
    source: Tensor | None  # what the generators read instead of the layer input (T5 decoder: encoder output)
    decode: bool
    cache: object | None
    active: bool = True  # False once the stack call returned (or failed)
    inputs: dict = field(default_factory=dict)  # layer -> its input's key while the call ran


# --- rows ----------------------------------------------------------------------------------------


def rows_for(state, batch: int) -> tuple[str | None, ...] | str | None:
    """Each row's adapter for a call with ``batch`` rows: one name (or None) for every row, or a
    tuple with one entry per row when rows differ."""
    local = state.local
    if local.disabled:
        return None
    names = local.tenants
    if names is None:
        return state.active
    if batch == len(names):
        rows = names
    elif len(names) and batch % len(names) == 0:
        rows = tuple(n for n in names for _ in range(batch // len(names)))
    else:
        raise ValueError(
            f"red_kernels.tenants: {len(names)} tenant names for a batch of {batch} rows; give one name (or None) "
            "per row (generate's num_beams / num_return_sequences multiples are mapped along)"
        )
    first = rows[0] if rows else None
    return first if all(r == first for r in rows) else rows


def tenant_ids(state, rows: tuple[str | None, ...], present: tuple[str, ...], device: torch.device) -> Tensor:
    """``[B]`` int64: each row's index in ``present``, -1 for rows whose adapter is not there."""
    if torch.compiler.is_compiling():  # a constant of the graph; the cache key is not traceable
        index = {n: i for i, n in enumerate(present)}
        return torch.tensor([index.get(r, -1) for r in rows], dtype=torch.int64, device=device)
    # Inference-mode tensors cannot be saved for backward: a training forward builds its own.
    key = (rows, present, device, torch.is_inference_mode_enabled())
    ids = state.local.ids.get(key)
    if ids is None:
        index = {n: i for i, n in enumerate(present)}
        ids = torch.tensor([index.get(r, -1) for r in rows], dtype=torch.int64, device=device)
        if len(state.local.ids) > 64:  # a serving loop sees few distinct row layouts; stay bounded
            state.local.ids.clear()
        state.local.ids[key] = ids
    return ids


# --- context managers ----------------------------------------------------------------------------


def _require(model: nn.Module, fn: str):
    from red_kernels.patch.core import patch_state

    state = patch_state(model)
    if state is None:
        raise ValueError(f"red_kernels.{fn}: the model is not patched by red_kernels.patch_model")
    return state


@contextlib.contextmanager
def _bound(local: Local, attr: str, value) -> Iterator[None]:
    """``local.<attr> = value`` inside the block; the outer value again after it, whatever happens."""
    previous = getattr(local, attr)
    setattr(local, attr, value)
    try:
        yield
    finally:
        setattr(local, attr, previous)


@contextlib.contextmanager
def tenants(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Run ``model(...)`` / ``model.generate(...)`` with one adapter per row: ``names[i]`` is an
    adapter name of the model or None (the base model). Rows that use different adapters go
    through the gathered kernels; a batch whose rows all use one adapter takes the single-adapter
    path. Per thread; nested blocks restore the outer names."""
    state = _require(model, "tenants")
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(
            f"red_kernels.tenants: argument 'names' must list one adapter name (or None) per row, got {names!r}"
        )
    names = tuple(names)
    unknown = [n for n in names if n is not None and (not isinstance(n, str) or n not in state.adapters)]
    if unknown:
        raise ValueError(
            f"red_kernels.tenants: unknown adapter(s) {unknown}; the model has {sorted(state.adapters)} (None = base)"
        )
    with _bound(state.local, "tenants", names):
        yield


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """Run the base model: no adapter edits any row inside the block (per thread)."""
    state = _require(model, "disable_adapter")
    with _bound(state.local, "disabled", True):
        yield


@contextlib.contextmanager
def prompt_lengths(model: nn.Module, lengths: Sequence[int] | Tensor) -> Iterator[None]:
    """PARA: row ``b``'s prompt is its first ``lengths[b]`` tokens (padding not counted), so its
    generators pool the prompt's last token. Overrides what ``labels`` say; for evaluation and custom
    loops that feed prompt + answer in one sequence."""
    state = _require(model, "prompt_lengths")
    if isinstance(lengths, Tensor):
        if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex() or lengths.dim() != 1:
            raise ValueError(
                f"red_kernels.prompt_lengths: argument 'lengths' must be a 1-D integer tensor, got "
                f"{lengths.dtype} of shape {list(lengths.shape)}"
            )
        value = lengths.to(torch.int64)
    else:
        value = lengths_tensor(lengths, "prompt_lengths", "lengths")
    with _bound(state.local, "prompt_lengths", value):
        yield


# --- model-level hooks ---------------------------------------------------------------------------


class ArgReader:
    """Reads named arguments of a module call whether they came by keyword or by position."""

    def __init__(self, module: nn.Module) -> None:
        import inspect

        try:
            params = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        self.position = {
            p.name: i
            for i, p in enumerate(params)
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        }

    def __call__(self, args: tuple, kwargs: dict, *names: str):
        for name in names:
            if name in kwargs:
                return kwargs[name]
            i = self.position.get(name)
            if i is not None and i < len(args):
                return args[i]
        return None


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    if length is None:  # legacy tuple caches: ((k, v), ...) with k [B, H, T, D]
        return int(cache[0][0].shape[-2]) if len(cache) and len(cache[0]) else 0
    return int(length())


def label_prompt_lengths(labels: Tensor, mask: Tensor | None) -> Tensor:
    """Each row's prompt length from ``labels [B, L]``: the non-padding tokens before its first label
    that is not -100. A row with no leading -100 (or only -100) pools its last token."""
    trained = labels != IGNORE_INDEX
    valid = torch.ones_like(trained) if mask is None else mask[:, -labels.shape[1] :] != 0
    before = (trained.to(torch.int32).cumsum(1) == 0) & valid  # non-padding positions before the first label
    lengths = before.sum(1)
    total = valid.sum(1)
    return torch.where((lengths == 0) | (lengths == total) | ~trained.any(1), total, lengths)


def root_pre_hook(state, reader: ArgReader, module: nn.Module, args: tuple, kwargs: dict) -> None:
    labels = reader(args, kwargs, "labels")
    if isinstance(labels, Tensor) and labels.dim() == 2 and not labels.is_floating_point():
        mask = reader(args, kwargs, "attention_mask")
        state.local.label_lengths = label_prompt_lengths(labels, mask if isinstance(mask, Tensor) else None)
    else:
        state.local.label_lengths = None


def root_post_hook(state, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    state.local.label_lengths = None


def generate_with_prompt(state, model: nn.Module, generate, *args, **kwargs):
    """``model.generate`` of a patched causal LM: the prompt's length is known for the whole
    generation, so every forward pools the prompt's last token, also without a KV cache
    (``use_cache=False`` reruns prompt + generated tokens at every step)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask")
    if state.local.prompt_lengths is None and isinstance(ids, Tensor) and ids.dim() == 2 and ids.shape[0]:
        if isinstance(mask, Tensor) and mask.shape == ids.shape:
            lengths = (mask != 0).sum(1)
        else:  # no mask: every token is the prompt's, unless generate infers padding from pad tokens
            pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
            lengths = (
                None
                if isinstance(pad, int) and bool((ids == pad).any())
                else ids.new_full((ids.shape[0],), ids.shape[1])
            )
        if lengths is not None and bool((lengths > 0).all()):
            with prompt_lengths(model, lengths):
                return generate(model, *args, **kwargs)
    return generate(model, *args, **kwargs)


def _pool_index(state, mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    lengths = state.local.prompt_lengths
    if lengths is None:
        lengths = state.local.label_lengths
    if lengths is not None:
        if lengths.shape[0] != batch and not (lengths.shape[0] and batch % lengths.shape[0] == 0):
            raise ValueError(
                f"red_kernels.prompt_lengths: {lengths.shape[0]} prompt lengths for a batch of {batch} rows"
            )
        if lengths.shape[0] != batch and lengths.shape[0] and batch % lengths.shape[0] == 0:
            lengths = lengths.repeat_interleave(batch // lengths.shape[0])  # generate's beams / returned sequences
        lengths = lengths.to(device)
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.int64, device=device)
    elif mask.dim() != 2 or mask.shape[0] != batch:
        raise ValueError(
            f"red_kernels (PARA): attention_mask must be [batch, length] (1 = token, 0 = padding) to find each "
            f"row's last prompt token, got shape {list(mask.shape)}"
        )
    else:
        mask = mask[:, -length:]
    return last_token_index(mask, lengths)


def stack_pre_hook(state, stack: str, reader: ArgReader, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Record the frame of this stack call (see the module docstring)."""
    local = state.local
    x = reader(args, kwargs, "input_ids")
    if not isinstance(x, Tensor):
        x = reader(args, kwargs, "inputs_embeds")
    if not isinstance(x, Tensor) or not state.has_para:
        local.frames.pop(stack, None)
        return
    batch, length = x.shape[0], x.shape[1]
    cache = reader(args, kwargs, "cache", "past_key_values")
    decode = _cache_length(cache) > 0
    source = reader(args, kwargs, "encoder_hidden_states") if state.pools_encoder(stack) else None
    pool = None
    if decode:
        stored = getattr(cache, CACHE_ATTR, {}).get(state.key)
        if stored is None:
            raise ValueError(
                "red_kernels (PARA): a decode step with a KV cache that this patched model did not fill: the "
                "PARA vectors are made at prefill (the first call, empty cache) and travel with the cache object"
            )
        local.vectors.update(stored)
    elif isinstance(source, Tensor):
        enc_mask = reader(args, kwargs, "encoder_attention_mask")
        enc_mask = enc_mask if isinstance(enc_mask, Tensor) and enc_mask.dim() == 2 else None
        pool = last_token_index(
            enc_mask if enc_mask is not None else torch.ones(source.shape[:2], dtype=torch.int64, device=source.device)
        )
    else:
        source = None
        mask = reader(args, kwargs, "attention_mask")
        pool = _pool_index(state, mask if isinstance(mask, Tensor) else None, batch, length, x.device)
    local.frames[stack] = Frame(batch=batch, pool_index=pool, source=source, decode=decode, cache=cache)


def _output_cache(output):
    for name in ("cache", "past_key_values"):
        try:
            cache = output[name] if isinstance(output, dict) else getattr(output, name, None)
        except (KeyError, AttributeError):
            cache = None
        if cache is not None:
            return cache
    return None


def stack_post_hook(state, stack: str, layers: tuple[str, ...], module: nn.Module, args, kwargs, output) -> None:
    """Attach a prefill's vectors to the returned cache; clear the call's vectors (always runs)."""
    local = state.local
    frame = local.frames.get(stack)
    vectors = {name: local.vectors.pop(name).detach() for name in layers if name in local.vectors}
    if frame is None:
        return
    frame.active = False
    if frame.decode or output is None:
        return
    cache = _output_cache(output)
    if cache is not None:  # also when no row used PARA: a decode step then knows prefill ran
        stored = getattr(cache, CACHE_ATTR, None)
        if stored is None:
            stored = {}
            setattr(cache, CACHE_ATTR, stored)
        stored[state.key] = vectors


__all__ = ["disable_adapter", "prompt_lengths", "tenants"]
