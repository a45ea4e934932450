"""RED adapters on disk: ``adapter.safetensors`` (the vectors, no pickle) + ``adapter_config.json``.

Tensor keys are the patched model's parameter names: ``<target>.red_edit.scale`` /
``<target>.red_edit.bias`` for every edited module, and ``<module>.<param>`` for modules kept
trainable with ``patch_model(..., trainable=...)``. The JSON records the method, the architecture
table used, the model type and class, the exact target names with their widths, the vector dtype,
the trainable modules and the package version. A LLaMA-2-7B RED adapter is 262,144 fp32 values: 1 MiB.
"""

from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from red_kernels.patch.core import (
    EDITOR_ATTR,
    PatchState,
    _require_patched,
    output_dim,
    patch_model,
    patch_state,
    plan_patch,
    unpatch_model,
)

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "red_kernels.adapter"
FORMAT_VERSION = 1


def _editor_keys(state: PatchState) -> list[str]:
    parts = [p for p, on in (("scale", state.scale), ("bias", state.bias)) if on]
    return [f"{t}.{EDITOR_ATTR}.{p}" for t in state.targets for p in parts]


def _trainable_params(model: nn.Module, modules: list[str]) -> dict[str, nn.Parameter]:
    """Parameters of the modules kept trainable, by full name (editors excluded)."""
    out = {}
    for m in modules:
        for pname, p in model.get_submodule(m).named_parameters():
            if EDITOR_ATTR not in pname.split("."):
                out[f"{m}.{pname}"] = p
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What :func:`save_adapter` writes: the edit vectors and the trainable modules' parameters."""
    state = _require_patched(model, "adapter_state_dict")
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = {k: params[k] for k in _editor_keys(state)}
    tensors.update(_trainable_params(model, state.trainable))
    # Own, contiguous CPU copies: safetensors refuses tensors that share storage (tied weights).
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` of a patched model to ``directory``."""
    from safetensors.torch import save_file

    from red_kernels import __version__

    state = _require_patched(model, "save_adapter")
    tensors = adapter_state_dict(model)
    editor_keys = set(_editor_keys(state))
    config = getattr(model, "config", None)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "red_kernels_version": __version__,
        "method": state.method,
        "architecture": state.architecture,
        "model_type": getattr(config, "model_type", None),
        "model_class": type(model).__name__,
        "targets": state.targets,
        "target_patterns": state.target_patterns,
        "dims": state.dims,
        "scale": state.scale,
        "bias": state.bias,
        "dtype": str(state.dtype).removeprefix("torch."),
        "trainable": state.trainable,
        "trainable_parameters": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in tensors.items()
            if k not in editor_keys
        },
        "num_parameters": {
            "edit": sum(tensors[k].numel() for k in editor_keys),
            "modules": sum(v.numel() for k, v in tensors.items() if k not in editor_keys),
        },
    }
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt", "producer": FORMAT})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The parsed ``adapter_config.json``, checked to be a red_kernels adapter of a known version."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"red_kernels.load_adapter: no {CONFIG_NAME} in {os.fspath(directory)!r}")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"red_kernels.load_adapter: {path} is not a red_kernels adapter config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"red_kernels.load_adapter: {path} has format_version {meta.get('format_version')}; "
            f"this red_kernels reads version {FORMAT_VERSION}"
        )
    return meta


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"red_kernels.load_adapter: unknown vector dtype {name!r} in {CONFIG_NAME}")
    return dtype


def _exact(names: list[str]) -> list[str]:
    return ["re:" + re.escape(n) for n in names]


def _fail(msg: str) -> ValueError:
    return ValueError(f"red_kernels.load_adapter: {msg}; the model was left unchanged")


def _listing(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _validate(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every check that can fail, before the model is touched."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if meta["model_type"] and model_type and meta["model_type"] != model_type:
        raise _fail(f"the adapter was trained on model_type {meta['model_type']!r}, the model is {model_type!r}")
    modules = dict(model.named_modules())
    missing = [t for t in meta["targets"] if t not in modules]
    if missing:
        raise _fail(
            f"the model has no module(s) {_listing(missing)} that the adapter edits "
            f"(architecture {meta['architecture']!r}, model class {meta['model_class']!r})"
        )
    for t in meta["targets"]:
        d = output_dim(modules[t], t)
        if d != meta["dims"][t]:
            raise _fail(f"module {t!r} has output width {d} but the adapter's vectors have width {meta['dims'][t]}")
    for m in meta["trainable"]:
        if m not in modules:
            raise _fail(f"the model has no module {m!r} that the adapter keeps trainable")
    parts = [p for p, on in (("scale", meta["scale"]), ("bias", meta["bias"])) if on]
    expected = {f"{t}.{EDITOR_ATTR}.{p}": (meta["dims"][t],) for t in meta["targets"] for p in parts}
    for key, p in _trainable_params(model, meta["trainable"]).items():
        expected[key] = tuple(p.shape)
    absent, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    if absent:
        raise _fail(f"{WEIGHTS_NAME} lacks {len(absent)} tensor(s): {_listing(absent)}")
    if extra:
        raise _fail(f"{WEIGHTS_NAME} has {len(extra)} tensor(s) the model does not: {_listing(extra)}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise _fail(f"tensor {key!r} has shape {list(tensors[key].shape)}, the model expects {list(shape)}")


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, backend: str | None = None) -> nn.Module:
    """Patch ``model`` (a fresh base model) as the adapter says and load its vectors, in one call.

    A model already patched with the same method and targets just gets the adapter's values (to
    switch adapters). Any mismatch (model type, missing module, output width, missing or extra
    tensors, shapes) raises ValueError before the model is changed. Nothing is unpickled.

    Returns ``model``."""
    from safetensors.torch import load_file

    meta = read_adapter_config(directory)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise _fail(f"no {WEIGHTS_NAME} in {os.fspath(directory)!r}")
    tensors = load_file(weights)
    dtype = _dtype(meta["dtype"])
    _validate(model, meta, tensors)
    state = patch_state(model)
    if state is not None:
        same = (state.method, state.targets, state.scale, state.bias, state.trainable) == (
            meta["method"],
            meta["targets"],
            meta["scale"],
            meta["bias"],
            meta["trainable"],
        )
        if not same:
            raise _fail(
                "the model is already patched differently (method, targets, vectors or trainable modules); "
                "unpatch it first"
            )
        fresh = False
    else:
        arch, _, _, _ = plan_patch(model, meta["method"], _exact(meta["targets"]), _exact(meta["trainable"]) or None)
        if meta["architecture"] not in ("custom", arch):
            raise _fail(f"the adapter is for architecture {meta['architecture']!r}, the model is {arch!r}")
        patch_model(
            model,
            meta["method"],
            targets=_exact(meta["targets"]),
            trainable=_exact(meta["trainable"]) or None,
            scale=meta["scale"],
            bias=meta["bias"],
            dtype=dtype,
            backend=backend,
        )
        state = patch_state(model)
        state.target_patterns = meta["target_patterns"]
        fresh = True
    try:
        params = dict(model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for key, value in tensors.items():
                params[key].copy_(value)
    except Exception:
        if fresh:
            unpatch_model(model)
        raise
    return model


__all__ = ["adapter_state_dict", "load_adapter", "read_adapter_config", "save_adapter"]
