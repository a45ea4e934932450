"""PEFT IA3 adapters: a PEFT ``save_pretrained`` directory of an (IA)^3 adapter, loaded as a red_kernels
``"ia3"`` adapter by :func:`red_kernels.load_adapter` (so it merges, and serves as a tenant).

What PEFT computes (``peft/tuners/ia3/layer.py``), per target ``Linear`` or ``Conv1D`` with its
vector ``ia3_l``:

- a feed-forward target (named by ``feedforward_modules``): ``ia3_l [1, in]`` scales the input,
  ``f((x.to(l.dtype) * l).to(x.dtype))``;
- any other target: ``ia3_l [out, 1]`` scales the output, ``(f(x) * l).to(f(x).dtype)``.

red_kernels computes the same with a scale-only :class:`~red_kernels.nn.REDEdit` on the target's
input or output (``red_edit`` computes in fp32 and rounds once to the activation's dtype: with fp32
vectors, as PEFT keeps them, the result is PEFT's).

The directory holds ``adapter_config.json`` (``peft_type`` ``"IA3"``) and
``adapter_model.safetensors`` with one tensor ``base_model.model.<module>.ia3_l`` per target. The
targets are the file's tensors; which of them scale their input follows PEFT's rule on
``feedforward_modules`` (a string: ``re.fullmatch`` of the module name; a list: the name ends with
an entry). ``target_modules`` / ``exclude_modules`` are checked against the file: a module they
name without a tensor keeps PEFT's initial ones (the identity, when ``init_ia3_weights``).

Refused with ValueError naming the file and the field, the model left unchanged: another
``peft_type``, a config field this module does not know, ``modules_to_save`` (trainable copies of
base modules), a missing ``feedforward_modules``, tensors of modules that are not Linear / Conv1D or
whose shape does not fit the module, a pickled ``adapter_model.bin``. This module needs neither
``peft`` nor ``transformers`` installed.
"""

from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from red_kernels._adapter_io import CONFIG_NAME, read_safetensors
from red_kernels._adapter_io import bad as _bad
from red_kernels.patch.methods import AdapterConfig, input_dim, is_conv1d, output_dim

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
_KEY = re.compile(r"base_model\.model\.(.+)\.ia3_l")

# IA3Config's fields (and those of PeftConfig it inherits), as peft 0.21 writes them. ``fan_in_fan_out``
# does not change what PEFT computes (PEFT sets it from each target's type); ``init_ia3_weights`` only
# matters for targets the file has no tensor for.
_OPTIONAL_STR = (str, type(None))
_FIELDS = {
    "peft_type": str,
    "task_type": _OPTIONAL_STR,
    "base_model_name_or_path": _OPTIONAL_STR,
    "revision": _OPTIONAL_STR,
    "inference_mode": bool,
    "auto_mapping": (dict, type(None)),
    "peft_version": _OPTIONAL_STR,
    "target_modules": (list, str),
    "exclude_modules": (list, str, type(None)),
    "feedforward_modules": (list, str),
    "fan_in_fan_out": bool,
    "modules_to_save": (list, type(None)),
    "init_ia3_weights": bool,
}


def is_peft_directory(directory: str | os.PathLike) -> bool:
    """Does ``directory`` hold a PEFT adapter (an ``adapter_config.json`` with a ``peft_type``)?"""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # red_kernels' own reader names what is wrong
    return isinstance(meta, dict) and "peft_type" in meta


def read_peft_config(directory: str | os.PathLike) -> dict:
    """The checked ``adapter_config.json`` of a PEFT IA3 adapter."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    with open(path) as f:
        meta = json.load(f)
    if meta.get("peft_type") != "IA3":
        raise _bad(
            path,
            f"field 'peft_type' is {meta.get('peft_type')!r}; red_kernels loads PEFT adapters of type 'IA3' "
            "(and its own adapters)",
        )
    unknown = sorted(set(meta) - set(_FIELDS))
    if unknown:
        raise _bad(
            path,
            f"unknown IA3 config field(s) {unknown}: red_kernels cannot tell whether they change what the "
            "adapter computes",
        )
    for key, kinds in _FIELDS.items():
        if key not in meta:
            if key == "feedforward_modules":
                raise _bad(
                    path,
                    "field 'feedforward_modules' is missing: PEFT fills it from its table by model type; "
                    "save the adapter with the list PEFT used",
                )
            continue
        value = meta[key]
        if not isinstance(value, kinds) or (isinstance(value, list) and not all(isinstance(v, str) for v in value)):
            raise _bad(path, f"field {key!r} has an unexpected value {value!r}")
    if meta.get("modules_to_save"):
        raise _bad(
            path,
            f"field 'modules_to_save' is {meta['modules_to_save']}: trainable copies of base modules (e.g. a "
            "classification head) are not part of an IA3 adapter that red_kernels can serve beside others; "
            "save the adapter without them (and load those weights into the base model)",
        )
    return meta


def _is_feedforward(meta: dict, name: str) -> bool:
    """PEFT's ``IA3Model._check_target_module_feedforward``."""
    ff = meta["feedforward_modules"]
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(k) for k in ff)


def _is_target(meta: dict, name: str) -> bool:
    """PEFT's ``check_target_module_exists`` for an IA3 config (no layer selection options)."""
    exclude = meta.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{k}") for k in exclude):
            return False
    targets = meta["target_modules"]
    if targets == "all-linear":  # PEFT saves the list it resolved; a hand-written config may keep the wildcard
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{k}") for k in targets)


def _read_tensors(directory: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    pickled = os.path.isfile(os.path.join(os.fspath(directory), PICKLE_NAME))
    hint = (
        f"; {PICKLE_NAME} is a pickle, which red_kernels does not load: save with "
        "save_pretrained(..., safe_serialization=True)"
        if pickled
        else ""
    )
    return read_safetensors(directory, WEIGHTS_NAME, hint)


def read_peft_ia3(model: nn.Module, directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The ``"ia3"`` adapter config of a PEFT IA3 directory for ``model``, and each target's vector
    (``[d]``, by module name), every check done without changing the model."""
    meta = read_peft_config(directory)
    cfg_path = os.path.join(os.fspath(directory), CONFIG_NAME)
    path, tensors = _read_tensors(directory)
    modules = dict(model.named_modules())
    vectors, inputs, dims, dtypes = {}, [], {}, set()
    for key, t in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise _bad(path, f"tensor {key!r} is not an IA3 vector (expected 'base_model.model.<module>.ia3_l')")
        name = match.group(1)
        module = modules.get(name)
        if module is None:
            raise _bad(path, f"tensor {key!r}: the model has no module {name!r} ({type(model).__name__})")
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise _bad(
                path,
                f"tensor {key!r}: module {name!r} is a {type(module).__name__}; red_kernels serves IA3 on "
                "torch.nn.Linear and transformers' Conv1D targets",
            )
        if not _is_target(meta, name):
            raise _bad(path, f"tensor {key!r}: {CONFIG_NAME}'s 'target_modules' does not name module {name!r}")
        feedforward = _is_feedforward(meta, name)
        width = input_dim(module, name) if feedforward else output_dim(module, name)
        shape = (1, width) if feedforward else (width, 1)
        if tuple(t.shape) != shape:
            kind, side = ("a feed-forward", "input") if feedforward else ("an", "output")
            raise _bad(
                path,
                f"tensor {key!r} has shape {list(t.shape)}; module {name!r} is {kind} IA3 target (per "
                f"'feedforward_modules') whose {side} width is {width}: expected {list(shape)}",
            )
        if not t.dtype.is_floating_point:
            raise _bad(path, f"tensor {key!r} is {t.dtype}; IA3 vectors are floating point")
        vectors[name] = t.reshape(width)
        dims[name] = width
        dtypes.add(t.dtype)
        if feedforward:
            inputs.append(name)
    if not vectors:
        raise _bad(path, "the file holds no IA3 vector")
    if len(dtypes) > 1:
        raise _bad(path, f"the IA3 vectors mix dtypes {sorted(str(d) for d in dtypes)}")
    missing = [n for n, m in modules.items() if n and n not in vectors and _is_target(meta, n) and _has_weight(m)]
    if missing and not meta.get("init_ia3_weights", True):
        raise _bad(
            cfg_path,
            f"field 'init_ia3_weights' is false and the file has no vector for target(s) {missing[:3]}: PEFT "
            "would give them random vectors",
        )
    order = {n: i for i, n in enumerate(modules)}
    targets = sorted(vectors, key=order.__getitem__)
    config = AdapterConfig(
        method="ia3",
        targets=targets,
        dims={n: dims[n] for n in targets},
        dtype=dtypes.pop(),
        scale=True,
        bias=False,
        inputs=[n for n in targets if n in inputs],
    )
    return config, {n: vectors[n] for n in targets}


def _has_weight(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


__all__ = ["is_peft_directory", "read_peft_ia3"]
