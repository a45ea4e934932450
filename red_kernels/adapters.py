"""Adapters on disk: ``adapter.safetensors`` (the tensors, no pickle) + ``adapter_config.json``.

Tensor keys are the patched model's parameter names without the adapter's name:
``<target>.red_edit.scale`` / ``.bias`` (RED), ``<layer>.para_gen.w_down`` / ``.w_up`` / ``.b_up``
(PARA), and ``<module>.<param>`` for modules kept trainable with ``patch_model(..., trainable=...)``.
The JSON records the method and its options, the architecture table used, the model type and
class, the exact target names with their widths, the parameters' dtype, the trainable modules and
the package version. A LLaMA-2-7B RED adapter is 262,144 fp32 values: 1 MiB.

Every field and tensor is checked before the model changes; a file that fails a check raises
``ValueError`` naming the file and the field, and leaves the model (and its other adapters) as it was.
"""

from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from red_kernels import peft_ia3
from red_kernels._adapter_io import CONFIG_NAME, read_safetensors
from red_kernels._adapter_io import bad as _bad
from red_kernels.ops._activations import ACTIVATIONS
from red_kernels.patch.core import (
    AdapterConfig,
    install_adapter,
    patch_model,
    patch_state,
    plan_adapter,
    require_patched,
    uninstall_adapter,
)
from red_kernels.patch.methods import BANK_ATTRS, check_adapter_name, edit_dim, file_key, para_layout
from red_kernels.patch.targets import ARCH_BY_NAME, METHODS

WEIGHTS_NAME = "adapter.safetensors"
CHECKPOINT_WEIGHTS_NAME = "model.safetensors"  # save_pretrained / Trainer checkpoints: full state-dict keys
FORMAT = "red_kernels.adapter"
FORMAT_VERSION = 1


def _trainable_params(model: nn.Module, modules: list[str]) -> dict[str, nn.Parameter]:
    """Parameters of the modules kept trainable, by full name (adapter banks excluded)."""
    out = {}
    for m in modules:
        for pname, p in model.get_submodule(m).named_parameters():
            if not set(BANK_ATTRS) & set(pname.split(".")):
                out[f"{m}.{pname}"] = p
    return out


def _adapter_tensors(model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
    out = {}
    for place in config.targets:
        module = model.get_submodule(place)._modules[config.bank_of(place)][name]
        for p in config.param_names(place):
            out[file_key(config, place, p)] = getattr(module, p)
    return out


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """What :func:`save_adapter` writes: the adapter's tensors and the trainable modules' parameters."""
    state = require_patched(model, "adapter_state_dict")
    name = _name(state, adapter_name, "adapter_state_dict")
    return _saved_tensors(model, state, name, state.trainable)


def _saved_tensors(model: nn.Module, state, name: str, trainable: list[str]) -> dict[str, torch.Tensor]:
    """Host copies of adapter ``name``'s tensors (file keys) and of the modules ``trainable``' parameters."""
    tensors = _adapter_tensors(model, name, state.adapters[name])
    tensors.update(_trainable_params(model, trainable))
    return _host_copies(tensors, "save_adapter")


def _host_copies(tensors: dict[str, torch.Tensor], fn: str) -> dict[str, torch.Tensor]:
    """Own, contiguous CPU copies (safetensors refuses tensors that share storage: tied weights)."""
    sharded = [k for k, v in tensors.items() if hasattr(v, "full_tensor")]
    if sharded:  # gathering here would be a collective: a rank-0-only call would hang
        raise RuntimeError(
            f"red_kernels.{fn}: {len(sharded)} tensor(s) are sharded DTensors (e.g. {sharded[0]!r}, FSDP2): "
            "unshard() every FSDP unit on every rank, save on rank 0, then reshard() (README: Training stacks)"
        )
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _name(state, adapter_name, fn: str) -> str:
    name = state.active if adapter_name is None else adapter_name
    if name is None:
        raise ValueError(f"red_kernels.{fn}: no active adapter; pass adapter_name")
    if not isinstance(name, str) or name not in state.adapters:
        raise ValueError(f"red_kernels.{fn}: unknown adapter {name!r}; the model has {list(state.adapters)}")
    return name


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _meta(model: nn.Module, state, name: str, tensors: dict[str, torch.Tensor], trainable: list[str]) -> dict:
    """``adapter_config.json`` of adapter ``name`` whose tensors (file keys) are ``tensors``, saved with
    the modules ``trainable`` (the model's trainable modules, or none)."""
    from red_kernels import __version__

    config = state.adapters[name]
    own = set(config.file_keys())
    model_config = getattr(model, "config", None)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "red_kernels_version": __version__,
        "method": config.method,
        "architecture": state.architecture,
        "model_type": getattr(model_config, "model_type", None),
        "model_class": type(model).__name__,
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "targets": config.targets,
        "target_patterns": config.target_patterns,
        "dims": config.dims,
        "dtype": _dtype_name(next(tensors[k].dtype for k in own)),
        "trainable": trainable,
        "trainable_parameters": {
            k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in tensors.items() if k not in own
        },
        "num_parameters": {
            "edit": sum(tensors[k].numel() for k in own),
            "modules": sum(v.numel() for k, v in tensors.items() if k not in own),
        },
    }
    if config.method == "para":
        meta.update(
            rank=config.rank,
            activation=config.activation,
            up_bias=config.up_bias,
            slots=config.slots,
            out_sizes=config.out_sizes,
        )
    else:
        meta.update(scale=config.scale, bias=config.bias)
    if config.inputs:
        meta["inputs"] = config.inputs  # ia3: the targets whose input is scaled
    return meta


def _write(directory: str, weights: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, weights), metadata={"format": "pt", "producer": FORMAT})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` of one adapter (default: the active
    one) of a patched model, with the modules kept trainable, to ``directory``."""
    state = require_patched(model, "save_adapter")
    name = _name(state, adapter_name, "save_adapter")
    _write_adapter(model, state, os.fspath(directory), name, state.trainable)


def _write_adapter(model: nn.Module, state, directory: str, name: str, trainable: list[str]) -> None:
    """:func:`save_adapter` of adapter ``name`` with the modules ``trainable`` (all or none of the model's)."""
    tensors = _saved_tensors(model, state, name, trainable)
    _write(directory, WEIGHTS_NAME, tensors, _meta(model, state, name, tensors, trainable))


def checkpoint_keys(model: nn.Module) -> dict[str, str]:
    """Full state-dict key -> file key of what a checkpoint of the patched model holds: the active
    adapter's tensors and the parameters of the modules kept trainable."""
    state = require_patched(model, "save_pretrained")
    out = {}
    if state.active is not None:
        config = state.adapters[state.active]
        out = {full: key for key, full in _full_names(config, state.active).items()}
    out.update({k: k for k in _trainable_params(model, state.trainable)})
    return out


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    push_to_hub: bool = False,
    **kwargs,
) -> None:
    """``model.save_pretrained(directory)`` of a patched transformers model: what transformers'
    ``Trainer`` calls for every checkpoint and for ``save_model()``.

    Writes the adapters, not the frozen base: the active adapter (the one that trains) and the
    modules kept trainable in ``directory`` as ``model.safetensors`` (the model's own state-dict
    keys, which ``Trainer(resume_from_checkpoint=...)`` loads into the patched model) with its
    ``adapter_config.json``; every other adapter in ``directory/<name>/`` as :func:`save_adapter`
    writes it, but without the trainable modules, which are shared by all adapters and saved once, at
    the top. No ``config.json``: ``from_pretrained`` of the directory fails instead of building a
    model without its base weights. Load it with ``red_kernels.load_adapter(base_model, directory)``,
    then each other adapter with ``red_kernels.load_adapter(base_model, directory/<name>, <name>)``.
    (With no active adapter nothing is written at the top, and each ``<name>/`` keeps the trainable
    modules, so loads as the first adapter of a plain model.)

    ``state_dict`` (a full state dict gathered by FSDP or DeepSpeed) is where the tensors are read
    when given; ``is_main_process=False`` writes nothing; other transformers options (shard size,
    safe serialization, ...) do not apply to a few megabytes of adapter and are ignored."""
    if push_to_hub:
        raise ValueError(
            "red_kernels: save_pretrained(push_to_hub=True) of a patched model is not supported; save it, "
            "then upload the directory (huggingface_hub.upload_folder)"
        )
    state = require_patched(model, "save_pretrained")
    if not is_main_process:
        return
    directory = os.fspath(save_directory)
    keys = checkpoint_keys(model)
    if state.active is not None:
        source = state_dict if state_dict is not None else model.state_dict(keep_vars=True)
        missing = [k for k in keys if k not in source]
        if missing:
            raise ValueError(f"red_kernels.save_pretrained: state_dict lacks {len(missing)} key(s): {missing[:5]}")
        tensors = _host_copies({k: source[k] for k in keys}, "save_pretrained")
        meta = _meta(model, state, state.active, {keys[k]: v for k, v in tensors.items()}, state.trainable)
        meta.update(weights=CHECKPOINT_WEIGHTS_NAME, adapter_name=state.active)
        _write(directory, CHECKPOINT_WEIGHTS_NAME, tensors, meta)
    # load_adapter takes a second adapter only without trainable modules (they are not per adapter):
    # the others leave them to the top-level file, where the active adapter saved them.
    others_trainable = state.trainable if state.active is None else []
    for name in state.adapters:
        if name != state.active:
            _write_adapter(model, state, os.path.join(directory, name), name, others_trainable)


# --- reading and checking --------------------------------------------------------------------------


def _field(meta: dict, path: str, key: str, check, what: str, optional: bool = False):
    if key not in meta:
        if optional:
            return None
        raise _bad(path, f"field {key!r} is missing")
    value = meta[key]
    if optional and value is None:
        return None
    if not check(value):
        raise _bad(path, f"field {key!r} must be {what}, got {value!r}")
    return value


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The parsed and checked ``adapter_config.json`` of a red_kernels adapter."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"red_kernels.load_adapter: no {CONFIG_NAME} in {os.fspath(directory)!r}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(path, "not a red_kernels adapter config (field 'format' is not 'red_kernels.adapter')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise _bad(path, f"format_version {meta.get('format_version')!r}; this red_kernels reads {FORMAT_VERSION}")
    method = _field(meta, path, "method", lambda v: v in METHODS, f"one of {METHODS}")
    _field(meta, path, "architecture", lambda v: isinstance(v, str), "a string")
    _field(meta, path, "model_type", lambda v: isinstance(v, str), "a string or null", optional=True)
    _field(meta, path, "model_class", lambda v: isinstance(v, str), "a string", optional=True)
    targets = _field(meta, path, "targets", lambda v: _str_list(v) and v, "a non-empty list of module names")
    if len(set(targets)) != len(targets):
        raise _bad(path, "field 'targets' lists a module twice")
    _field(
        meta,
        path,
        "dims",
        lambda v: isinstance(v, dict) and set(v) == set(targets) and all(_is_int(x) and x > 0 for x in v.values()),
        "a positive width for every target",
    )
    dtype = _field(meta, path, "dtype", lambda v: isinstance(v, str), "a dtype name")
    if not isinstance(getattr(torch, dtype, None), torch.dtype) or not getattr(torch, dtype).is_floating_point:
        raise _bad(path, f"field 'dtype' must name a floating dtype, got {dtype!r}")
    trainable = _field(meta, path, "trainable", _str_list, "a list of module names")
    if len(set(trainable)) != len(trainable):
        raise _bad(path, "field 'trainable' lists a module twice")
    _field(meta, path, "target_patterns", _str_list, "a list of patterns or null", optional=True)
    weights = (WEIGHTS_NAME, CHECKPOINT_WEIGHTS_NAME)
    _field(meta, path, "weights", lambda v: v in weights, f"one of {list(weights)}", optional=True)
    if meta.get("weights") == CHECKPOINT_WEIGHTS_NAME:  # keys are the saving model's: they hold its name
        _field(meta, path, "adapter_name", lambda v: isinstance(v, str) and v, "the saved adapter's name")
    params = _field(meta, path, "trainable_parameters", lambda v: isinstance(v, dict), "an object", optional=True)
    for key, info in (params or {}).items():
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)):
            raise _bad(path, f"field 'trainable_parameters' entry {key!r} must have 'shape' and 'dtype'")
    if method == "para":
        _field(meta, path, "rank", lambda v: _is_int(v) and v > 0, "a positive int")
        _field(meta, path, "activation", lambda v: v in ACTIVATIONS, f"one of {list(ACTIVATIONS)}")
        _field(meta, path, "up_bias", lambda v: isinstance(v, bool), "true or false")
        _field(meta, path, "slots", lambda v: isinstance(v, dict) and set(v) == set(targets), "a slot map per layer")
        _field(
            meta,
            path,
            "out_sizes",
            lambda v: (
                isinstance(v, dict)
                and set(v) == set(targets)
                and all(isinstance(x, list) and x and all(_is_int(n) and n > 0 for n in x) for x in v.values())
            ),
            "a list of positive widths per layer",
        )
    else:
        _field(meta, path, "scale", lambda v: isinstance(v, bool), "true or false")
        _field(meta, path, "bias", lambda v: isinstance(v, bool), "true or false")
        if not (meta["scale"] or meta["bias"]):
            raise _bad(path, "fields 'scale' and 'bias' are both false")
        if method == "ia3" and (meta["bias"] or not meta["scale"]):
            raise _bad(path, "an 'ia3' adapter has fields 'scale' true and 'bias' false")
    inputs = _field(meta, path, "inputs", _str_list, "a list of module names", optional=True) or []
    if inputs and (method != "ia3" or not set(inputs) <= set(targets) or len(set(inputs)) != len(inputs)):
        raise _bad(path, "field 'inputs' must list 'ia3' targets, each once")
    return meta


def _read_tensors(directory: str | os.PathLike, meta: dict, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """The adapter's tensors by file key (a checkpoint's full keys mapped back)."""
    weights = meta.get("weights") or WEIGHTS_NAME
    _, tensors = read_safetensors(directory, weights)
    if weights == CHECKPOINT_WEIGHTS_NAME:
        saved = meta["adapter_name"]
        to_file = {full: key for key, full in _full_names(config, saved).items()}
        tensors = {to_file.get(k, k): v for k, v in tensors.items()}
    return tensors


def _config_from(meta: dict) -> AdapterConfig:
    config = AdapterConfig(
        method=meta["method"],
        targets=list(meta["targets"]),
        dims=dict(meta["dims"]),
        dtype=getattr(torch, meta["dtype"]),
        target_patterns=meta.get("target_patterns"),
    )
    if config.method == "para":
        config.rank, config.activation, config.up_bias = meta["rank"], meta["activation"], meta["up_bias"]
        config.slots, config.out_sizes = meta["slots"], {k: list(v) for k, v in meta["out_sizes"].items()}
    else:
        config.scale, config.bias = meta["scale"], meta["bias"]
        config.inputs = list(meta.get("inputs") or [])
    return config


def _validate(model: nn.Module, meta: dict, config: AdapterConfig, tensors: dict, path: str) -> None:
    """Every check against the model that can fail, before the model is touched."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if meta.get("model_type") and model_type and meta["model_type"] != model_type:
        raise _bad(path, f"the adapter was trained on model_type {meta['model_type']!r}, the model is {model_type!r}")
    modules = dict(model.named_modules())
    missing = [t for t in config.targets + meta["trainable"] if t not in modules]
    if missing:
        raise _bad(
            path,
            f"the model has no module(s) {missing[:5]} that the adapter names (model class "
            f"{meta.get('model_class')!r}, architecture {meta['architecture']!r})",
        )
    if config.method == "para":
        spec = ARCH_BY_NAME.get(meta["architecture"])
        if spec is None or spec.para is None:
            raise _bad(path, f"PARA adapter of unknown architecture {meta['architecture']!r}")
        slots, sizes, dims = para_layout(spec, model, config.targets)
        if (slots, sizes, dims) != (config.slots, config.out_sizes, config.dims):
            raise _bad(path, "the model's PARA layers (projections or widths) differ from the adapter's")
    else:
        for t in config.targets:
            try:
                d = edit_dim(config, modules[t], t)
            except ValueError as exc:
                raise _bad(path, str(exc).removeprefix("red_kernels.patch_model: ")) from None
            side = "input" if t in config.inputs else "output"
            if d != config.dims[t]:
                raise _bad(
                    path, f"module {t!r} has {side} width {d} but the adapter's vectors have width {config.dims[t]}"
                )
    expected = {}
    for place in config.targets:
        gen_shapes = {
            "w_down": (config.dims.get(place), config.rank),
            "w_up": (config.rank, sum(config.out_sizes.get(place, []))),
            "b_up": (sum(config.out_sizes.get(place, [])),),
        }
        for p in config.param_names(place):
            shape = gen_shapes[p] if config.method == "para" else (config.dims[place],)
            expected[file_key(config, place, p)] = (shape, config.dtype)
    recorded = meta.get("trainable_parameters") or {}
    for key, p in _trainable_params(model, meta["trainable"]).items():
        dtype = getattr(torch, recorded[key]["dtype"], None) if key in recorded else p.dtype
        expected[key] = (tuple(p.shape), dtype)
    absent, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    if absent:
        raise _bad(path, f"the file lacks {len(absent)} tensor(s): {sorted(absent)[:5]}")
    if extra:
        raise _bad(path, f"the file has {len(extra)} tensor(s) the model does not: {sorted(extra)[:5]}")
    for key, (shape, dtype) in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise _bad(path, f"tensor {key!r} has shape {list(t.shape)}, the model expects {list(shape)}")
        if t.dtype != dtype:
            raise _bad(path, f"tensor {key!r} is {t.dtype}, the config says {dtype}")


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    backend: str | None = None,
) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter`, or by ``save_pretrained`` of a patched model
    (a transformers ``Trainer`` checkpoint or ``save_model()`` directory, see :func:`save_pretrained`).

    - On a plain model: patch it as the adapter says and load the tensors, as adapter
      ``adapter_name`` (default ``"default"``), active and trainable.
    - On a patched model: add the adapter under ``adapter_name`` (default: the directory's name)
      beside the others, without re-patching or copying the backbone; it is frozen and inactive
      until :func:`set_adapter` (or used per row with :func:`tenants`). Adapters of one model may
      differ in method and options. An adapter carrying trainable base modules can only be the
      first (those modules are not per adapter).

    Any mismatch (a damaged file, a missing or malformed config field, model type, missing module,
    widths, missing or extra tensors, shapes, dtypes, a name in use) raises ValueError naming the
    file and the field, before the model is changed. Nothing is unpickled. Returns ``model``.

    A PEFT IA3 adapter directory (``adapter_config.json`` with ``peft_type`` ``"IA3"`` and
    ``adapter_model.safetensors``) loads the same way, as an ``"ia3"`` adapter: see
    :mod:`red_kernels.peft_ia3`."""
    if peft_ia3.is_peft_directory(directory):
        config, vectors = peft_ia3.read_peft_ia3(model, directory)  # checked against the model
        meta = {"architecture": "custom", "trainable": [], "target_patterns": None}
        path = os.path.join(os.fspath(directory), peft_ia3.WEIGHTS_NAME)
        tensors = {file_key(config, place, "scale"): v for place, v in vectors.items()}
    else:
        meta = read_adapter_config(directory)
        path = os.path.join(os.fspath(directory), meta.get("weights") or WEIGHTS_NAME)
        config = _config_from(meta)
        tensors = _read_tensors(directory, meta, config)
        _validate(model, meta, config, tensors, path)
    state = patch_state(model)
    if state is None:
        name = check_adapter_name("default" if adapter_name is None else adapter_name, "load_adapter")
        arch, planned, _ = plan_adapter(model, config.method, ["re:" + _esc(t) for t in config.targets], None)
        if meta["architecture"] not in ("custom", arch):
            raise _bad(path, f"the adapter is for architecture {meta['architecture']!r}, the model is {arch!r}")
        patch_model(
            model,
            config.method,
            targets=["re:" + _esc(t) for t in config.targets],
            trainable=["re:" + _esc(m) for m in meta["trainable"]] or None,
            scale=config.scale,
            bias=config.bias,
            dtype=config.dtype,
            rank=config.rank,
            activation=config.activation,
            up_bias=config.up_bias,
            inputs=["re:" + _esc(t) for t in config.inputs],
            backend=backend,
            adapter_name=name,
        )
        state = patch_state(model)
        state.adapters[name].target_patterns = meta["target_patterns"]
        fresh = True
    else:
        default = os.path.basename(os.path.normpath(os.fspath(directory)))
        name = check_adapter_name(default if adapter_name is None else adapter_name, "load_adapter")
        if name in state.adapters:
            raise _bad(path, f"the model already has an adapter named {name!r} (adapters: {list(state.adapters)})")
        if meta["architecture"] not in ("custom", state.architecture):
            raise _bad(
                path, f"the adapter is for architecture {meta['architecture']!r}, the model is {state.architecture!r}"
            )
        if meta["trainable"]:
            raise _bad(
                path,
                f"the adapter keeps base modules {meta['trainable']} trainable; such an adapter can only "
                "be loaded into a plain model (base modules are shared by all adapters)",
            )
        install_adapter(model, state, name, config)
        fresh = False
    try:
        params = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers(remove_duplicate=False))
        full = _full_names(config, name)
        with torch.no_grad():
            for key, value in tensors.items():
                key = full.get(key, key)
                (params[key] if key in params else buffers[key]).copy_(value)
        if not fresh:
            for p in _adapter_tensors(model, name, config).values():
                if isinstance(p, nn.Parameter):
                    p.requires_grad_(False)
    except Exception:
        if fresh:
            from red_kernels.patch.core import unpatch_model

            unpatch_model(model)
        else:
            uninstall_adapter(model, state, name)
        raise
    return model


def _full_names(config: AdapterConfig, name: str) -> dict[str, str]:
    """File key -> the model's parameter name (the file's key plus the adapter's name) of every
    tensor of adapter ``name``."""
    out = {}
    for place in config.targets:
        for param in config.param_names(place):
            key = file_key(config, place, param)
            out[key] = key[: -len(param)] + f"{name}.{param}"
    return out


def _esc(name: str) -> str:
    return re.escape(name)


__all__ = ["adapter_state_dict", "load_adapter", "read_adapter_config", "save_adapter", "save_pretrained"]
