"""merge_model: fold a RED or IA3 adapter into the weights of the layers it edits (zero inference cost).

An edit of the output: ``W' = diag(scale) W`` and ``b' = scale * b + bias`` for a Linear (weight
``[out, in]``); the columns for GPT-2's Conv1D (weight ``[in, out]``). An edit of the input (IA3's
feed-forward targets), ``f(x * s) = x diag(s) W^T + b``: ``W' = W diag(s)``, the Linear's columns
(the Conv1D's rows), bias unchanged. Arithmetic in fp32 (fp64 for fp64 weights), stored in the
weight's dtype. PARA cannot be merged: its vectors depend on the input.
"""

from __future__ import annotations

import copy
import functools
import re
import warnings

import torch
from torch import nn

from red_kernels.patch.core import _remove_everything, check_own_classes, require_patched
from red_kernels.patch.methods import INPUT_EDITOR_ATTR, is_conv1d
from red_kernels.patch.targets import ARCH_BY_NAME


def _acc(weight: torch.Tensor) -> torch.dtype:
    """The dtype the folding arithmetic runs in: fp32, or fp64 for fp64 weights."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _as_acc(vector: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
    """An editor's vector (or None) on the weight's device, in :func:`_acc`'s dtype."""
    return None if vector is None else vector.detach().to(device=weight.device, dtype=_acc(weight))


@torch.no_grad()
def _scale_weight(module: nn.Module, s: torch.Tensor, side: str) -> None:
    """Multiply ``module``'s weight in place by the vector ``s`` (in :func:`_acc`'s dtype) along its
    ``side`` ("out" or "in") features: Linear (weight [out, in]) ``W' = diag(s) W`` / ``W' = W diag(s)``;
    Conv1D (weight [in, out]) the transposes."""
    weight = module.weight
    in_dim = 0 if is_conv1d(module) else 1
    shape = [1, 1]
    shape[in_dim if side == "in" else 1 - in_dim] = -1
    weight.copy_((weight.to(_acc(weight)) * s.view(shape)).to(weight.dtype))


@torch.no_grad()
def _fold_input(module: nn.Module, editor: nn.Module) -> None:
    """Fold an input scale ``s`` into ``module`` in place (``f(x * s)``: the weight's input features
    times ``s``); the bias is unchanged."""
    _scale_weight(module, _as_acc(editor.scale, module.weight), "in")


@torch.no_grad()
def _fold(module: nn.Module, editor: nn.Module) -> bool:
    """Fold ``editor`` into ``module`` in place; True if the module gained a bias.

    Linear (weight [out, in]): ``W' = diag(s) W``; Conv1D (weight [in, out]): ``W' = W diag(s)``;
    both: ``b' = s * b + c``. Arithmetic in fp32 (fp64 for fp64 weights), stored in the weight dtype."""
    weight = module.weight
    acc = _acc(weight)
    s, c = _as_acc(editor.scale, weight), _as_acc(editor.bias, weight)
    if s is not None:
        _scale_weight(module, s, "out")
    b = module.bias
    if b is not None:
        new_b = b.to(acc)
        if s is not None:
            new_b = new_b * s
        if c is not None:
            new_b = new_b + c
        b.copy_(new_b.to(b.dtype))
        return False
    if c is None:
        return False
    module.bias = nn.Parameter(c.to(weight.dtype), requires_grad=weight.requires_grad)
    return True


def _apply_bias_switches(model: nn.Module, arch: str, gained: list[str]) -> list[str]:
    """Describe merged biases through the config's switches where the architecture has them.

    Returns the names of layers that gained a bias the config does not describe."""
    spec = ARCH_BY_NAME.get(arch)
    config = getattr(model, "config", None)
    if spec is None or config is None or not gained:
        return gained
    modules = dict(model.named_modules())
    added: list[str] = []  # zero biases added to complete a group, removed again if the check fails
    changed: dict[str, object] = {}
    for switch in spec.bias_switches:
        group = [n for n, m in modules.items() if isinstance(m, nn.Linear) and _re_full(switch.regex, n)]
        if not any(n in gained for n in group) or getattr(config, switch.config_attr, None) is not False:
            continue
        changed[switch.config_attr] = False
        setattr(config, switch.config_attr, True)
        for n in group:
            m = modules[n]
            if m.bias is None:
                m.bias = nn.Parameter(
                    torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                    requires_grad=m.weight.requires_grad,
                )
                added.append(n)
    if not changed:
        return gained
    if _config_describes(model):
        described = set()
        for attr in changed:
            switch = next(s for s in spec.bias_switches if s.config_attr == attr)
            described |= {n for n in modules if _re_full(switch.regex, n)}
        return [n for n in gained if n not in described]
    for attr, value in changed.items():  # the model class ignores the switch: undo
        setattr(config, attr, value)
    for n in added:
        modules[n].bias = None
    return gained


def _re_full(regex: str, name: str) -> bool:
    return re.fullmatch(regex, name) is not None


def _config_describes(model: nn.Module) -> bool:
    """Does ``type(model)(model.config)`` have exactly the model's state_dict keys? (Built on meta.)"""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception:  # noqa: BLE001 - any failure means "cannot confirm"
        return False
    return set(fresh.state_dict()) == set(model.state_dict())


def _shared_weights(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """Targets whose weight is also another parameter of the model (tied embeddings and heads)."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    storages: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if p.device.type != "meta":
            storages.setdefault(p.untyped_storage().data_ptr(), []).append(pname)
    shared = {}
    for name in names:
        weight = model.get_submodule(name).weight
        others = set(owners.get(id(weight), []))
        if weight.device.type != "meta":
            others |= set(storages.get(weight.untyped_storage().data_ptr(), []))
        others.discard(f"{name}.weight")
        if others:
            shared[name] = sorted(others)
    return shared


def merge_model(model: nn.Module) -> nn.Module:
    """Fold the model's RED or IA3 adapter into the layers it edits and return the plain model (in place).

    ``W' = diag(scale) W`` and ``b' = scale * b + bias`` (a bias is added where the layer has
    none; for GPT-2's Conv1D, whose weight is [in, out], the columns are scaled); an IA3 scale of
    a layer's input scales the weight's input features instead (``W' = W diag(scale)``). The result has no
    red_kernels module or hook left, its parameters' ``requires_grad`` are restored, and its outputs
    equal the patched model's up to rounding. Where the architecture has a config switch for the new
    biases (LLaMA's ``mlp_bias`` / ``attention_bias``) it is set, and the other layers of that
    group get zero biases, so ``save_pretrained`` / ``from_pretrained`` of transformers reload the
    merged model; otherwise a warning names the layers whose bias only lives in memory.

    Refused with ValueError, the model left as it was: a PARA adapter (its vectors depend on the
    input), a model holding several adapters (delete the others first), a weight shared with
    another parameter (a head tied to the embeddings: folding would rescale both), quantized weights.
    """
    state = require_patched(model, "merge_model")
    if len(state.adapters) != 1:
        raise ValueError(
            f"red_kernels.merge_model: the model holds {len(state.adapters)} adapters {list(state.adapters)}; "
            "merging folds one into the weights: save the others, delete_adapter them, then merge"
        )
    name, config = next(iter(state.adapters.items()))
    if config.method == "para":
        raise ValueError(
            "red_kernels.merge_model: a PARA adapter cannot be merged: its vectors depend on each input's "
            "prompt; keep the patched model (its cost is one tiny generator per layer at prefill)"
        )
    for target in config.targets:  # check every layer first, so a refusal leaves the model patched
        weight = model.get_submodule(target).weight
        if type(weight) not in (nn.Parameter, torch.Tensor) or not weight.dtype.is_floating_point:
            raise ValueError(
                f"red_kernels.merge_model: cannot fold into {target!r}: its weight is a "
                f"{type(weight).__name__} of {weight.dtype} (quantized or wrapped); merge into a "
                "floating-point copy of the base model, or keep the patched model"
            )
    shared = _shared_weights(model, config.targets)
    if shared:
        target, others = next(iter(shared.items()))
        raise ValueError(
            f"red_kernels.merge_model: {target!r}'s weight is shared with {others} (tied weights): folding the "
            "edit into it would also change those; untie them first (e.g. clone the head's weight into its "
            "own Parameter) or keep the patched model"
        )
    check_own_classes(model, "merge_model")  # before any weight changes
    gained = []
    for target in config.targets:
        module = model.get_submodule(target)
        editor = getattr(module, config.bank_of(target))[name]
        if config.bank_of(target) == INPUT_EDITOR_ATTR:
            _fold_input(module, editor)
        elif _fold(module, editor):
            gained.append(target)
    _remove_everything(model, state)
    for target in gained:  # a new bias trains (or not) like the weight it was folded beside
        module = model.get_submodule(target)
        module.bias.requires_grad_(module.weight.requires_grad)
    orphan = _apply_bias_switches(model, state.architecture, gained)
    if orphan and getattr(model, "config", None) is not None:
        warnings.warn(
            f"red_kernels.merge_model: {len(orphan)} layer(s) gained a bias that {type(model).__name__}'s "
            f"config cannot describe (e.g. {orphan[0]!r}); the merged model computes correctly, but "
            "transformers' from_pretrained will not reload those biases, so its save_pretrained now refuses. "
            "Ship the adapter (red_kernels.save_adapter) and merge after loading instead.",
            stacklevel=2,
        )
        # On the instance, so it outlives this class: patching the model again gives it a class whose
        # save_pretrained (a data descriptor, see root.py) wins until unpatch_model, which brings this back.
        if callable(getattr(type(model), "save_pretrained", None)):
            model.__dict__["save_pretrained"] = functools.partial(_refuse_save, type(model).__name__, orphan)
    return model


def _refuse_save(cls: str, orphan: list[str], *args, **kwargs) -> None:
    """``save_pretrained`` of a merged model whose new biases its config cannot describe: transformers
    would write them and ``from_pretrained`` would drop them, reloading a different model."""
    raise ValueError(
        f"red_kernels: this {cls} was merged by red_kernels.merge_model, which gave {len(orphan)} layer(s) "
        f"a bias its config cannot describe (e.g. {orphan[0]!r}); from_pretrained would silently drop them. "
        "Save the adapter instead (red_kernels.save_adapter before merging; load_adapter + merge_model after "
        "loading the base), or save the state dict yourself (safetensors.torch.save_model) and load it into "
        "a model whose layers have those biases. `del model.save_pretrained` restores transformers' method."
    )


__all__ = ["merge_model"]
