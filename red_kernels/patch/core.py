"""patch_model / unpatch_model / merge_model / trainable_parameters.

How an edit is attached: each target module (a Linear or a Hugging Face Conv1D) gets a child
:class:`~red_kernels.nn.REDEdit` named ``red_edit`` and a forward hook that returns
``module.red_edit(output)``. Compared with swapping the target for a wrapper module this keeps

- the target's class, attributes and parameter names (model code that reads ``self.wo.weight``
  keeps working; the base keys of ``state_dict`` do not move; the edit vectors appear beside them as
  ``<target>.red_edit.scale`` / ``.bias``),
- unpatching trivially bit-exact: the base parameters are never touched (only ``requires_grad``,
  which is restored), the hook and the child are removed,
- gradient checkpointing (the recomputation calls the module, so the hook runs again) and
  ``torch.compile`` (Dynamo traces module hooks) working unchanged,
- merging simple: the editor sits right after the layer whose weight absorbs it.

The patch's bookkeeping (method, targets, original ``requires_grad`` flags) lives on the model in
the attribute ``_red_kernels_patch``, a plain dataclass, so ``copy.deepcopy`` keeps it.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from red_kernels.nn.red import REDEdit
from red_kernels.patch.targets import ARCH_BY_NAME, METHODS, detect, match_names

EDITOR_ATTR = "red_edit"
STATE_ATTR = "_red_kernels_patch"


@dataclass
class PatchState:
    """What :func:`patch_model` did to a model (stored on it as ``_red_kernels_patch``)."""

    method: str
    architecture: str  # a name in red_kernels.patch.targets.ARCH_BY_NAME, or "custom"
    targets: list[str]  # module names, in model order
    dims: dict[str, int]
    scale: bool
    bias: bool
    dtype: torch.dtype
    trainable: list[str] = field(default_factory=list)  # module names kept trainable
    target_patterns: list[str] | None = None  # the user's targets= patterns, if any
    requires_grad: dict[str, bool] = field(default_factory=dict)  # original flag of each parameter


def patch_state(model: nn.Module) -> PatchState | None:
    """The :class:`PatchState` of a patched model, None for a plain one."""
    return getattr(model, STATE_ATTR, None)


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2): a linear layer storing its weight as [in, out]."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == module.nf
    )


def output_dim(module: nn.Module, name: str) -> int:
    """Width of the target's output, or ValueError when the module is not a supported target."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if _is_conv1d(module):
        return module.nf
    raise ValueError(
        f"red_kernels.patch_model: target {name!r} is a {type(module).__name__}; targets must be "
        "torch.nn.Linear or transformers' Conv1D (the output width of other modules is not known)"
    )


def _as_patterns(value: str | list[str] | tuple[str, ...] | None, arg: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    value = list(value)
    if not value or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"red_kernels.patch_model: argument '{arg}' must be a non-empty list of module-name patterns")
    return value


def _resolve_patterns(patterns: list[str], names: list[str], arg: str) -> list[str]:
    hits = match_names(patterns, names)
    empty = [p for p, found in hits.items() if not found]
    if empty:
        raise ValueError(
            f"red_kernels.patch_model: argument '{arg}': pattern(s) {empty} match no module of the model "
            "(globs match module names and their dotted suffixes, e.g. 'mlp.down_proj'; 're:<regex>' must "
            "match a full name)"
        )
    chosen = {n for found in hits.values() for n in found}
    return [n for n in names if n in chosen]


def _check_method(method: str) -> None:
    if method == "para":
        raise ValueError(
            "red_kernels.patch_model: method='para' is not implemented yet in this version; "
            f"available methods: {', '.join(METHODS)}"
        )
    if method not in METHODS:
        raise ValueError(f"red_kernels.patch_model: argument 'method' must be one of {METHODS}, got {method!r}")


def _detect_architecture(model: nn.Module, names: list[str]) -> str:
    try:
        return detect(model, "red", names)[0].name
    except ValueError:
        return "custom"


def plan_patch(
    model: nn.Module,
    method: str = "red",
    targets: str | list[str] | None = None,
    trainable: str | list[str] | None = None,
) -> tuple[str, list[str], dict[str, int], list[str]]:
    """Validate a patch without changing the model: (architecture, targets, dims, trainable modules)."""
    _check_method(method)
    # A hand-built REDWrapped is not a patch; an editor child named red_edit is.
    if patch_state(model) is not None or any(isinstance(m._modules.get(EDITOR_ATTR), REDEdit) for m in model.modules()):
        state = patch_state(model)
        what = f" with method {state.method!r} on {len(state.targets)} modules" if state else ""
        raise ValueError(
            f"red_kernels.patch_model: the model is already patched{what}; call red_kernels.unpatch_model "
            "(or merge_model) first"
        )
    names = [n for n, _ in model.named_modules() if n]
    patterns = _as_patterns(targets, "targets")
    if patterns is None:
        spec, chosen = detect(model, method, names)
        arch = spec.name
    else:
        chosen = _resolve_patterns(patterns, names, "targets")
        arch = _detect_architecture(model, names)
    modules = dict(model.named_modules())
    dims = {n: output_dim(modules[n], n) for n in chosen}
    keep = _resolve_patterns(_as_patterns(trainable, "trainable"), names, "trainable") if trainable else []
    # A trainable module inside another one adds nothing; keep the outermost names only.
    keep = [n for n in keep if not any(n.startswith(k + ".") for k in keep)]
    return arch, chosen, dims, keep


def _edit_output_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, EDITOR_ATTR)(output)


def _attach(module: nn.Module, editor: REDEdit) -> None:
    module.add_module(EDITOR_ATTR, editor)
    module.register_forward_hook(_edit_output_hook)


def _detach(module: nn.Module) -> None:
    for hook_id, hook in list(module._forward_hooks.items()):
        if hook is _edit_output_hook:
            del module._forward_hooks[hook_id]
            module._forward_hooks_with_kwargs.pop(hook_id, None)
            module._forward_hooks_always_called.pop(hook_id, None)
    if EDITOR_ATTR in module._modules:
        del module._modules[EDITOR_ATTR]


def patch_model(
    model: nn.Module,
    method: str = "red",
    targets: str | list[str] | None = None,
    trainable: str | list[str] | None = None,
    *,
    scale: bool = True,
    bias: bool = True,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> nn.Module:
    """Freeze ``model`` and insert RED editors on its target modules, in place.

    Each target's output ``h [..., d]`` becomes ``h * scale + bias`` with learned ``scale [d]``
    (init 1) and ``bias [d]`` (init 0), so the patched model equals the original at step 0.

    Args:
        model: a Hugging Face (or any) ``nn.Module``.
        method: ``"red"`` (the FFN output of every layer) or ``"red+"`` (also the attention
            projections); see :mod:`red_kernels.patch.targets` for the per-architecture table.
            Architectures are recognised by their module names, so layouts shared with LLaMA,
            RoBERTa/BERT, T5 and GPT-2 work.
        targets: module-name patterns overriding the table (globs matched against names and their
            dotted suffixes, e.g. ``"mlp.down_proj"``, or ``"re:<regex>"``); Linear or Conv1D only.
        trainable: module-name patterns of base modules to keep trainable (e.g. ``"classifier"``);
            they are saved with the adapter and counted apart by :func:`trainable_parameters`.
        scale, bias: learn the scaling / bias vectors (the paper's ablations turn one off).
        dtype: dtype of the vectors; None is fp32 whatever the model's dtype.
        backend: backend of :func:`red_kernels.red_edit` for every editor (None: usual selection).

    Returns:
        ``model`` itself. Raises ValueError (and leaves the model untouched) if it is already
        patched, the method is unknown, or no target fits.
    """
    arch, chosen, dims, keep = plan_patch(model, method, targets, trainable)
    vec_dtype = torch.float32 if dtype is None else dtype
    modules = dict(model.named_modules())
    # Build every editor before touching the model, so a failure leaves it as it was.
    editors = {}
    for name in chosen:
        weight = modules[name].weight
        editors[name] = REDEdit(dims[name], scale, bias, dtype=vec_dtype, device=weight.device, backend=backend)
    original = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, editor in editors.items():
        _attach(modules[name], editor)
    for name in keep:
        for pname, p in modules[name].named_parameters():
            if EDITOR_ATTR not in pname.split("."):
                p.requires_grad_(True)
    state = PatchState(
        method=method,
        architecture=arch,
        targets=chosen,
        dims=dims,
        scale=scale,
        bias=bias,
        dtype=vec_dtype,
        trainable=keep,
        target_patterns=_as_patterns(targets, "targets"),
        requires_grad=original,
    )
    setattr(model, STATE_ATTR, state)
    return model


def _require_patched(model: nn.Module, fn: str) -> PatchState:
    state = patch_state(model)
    if state is None:
        raise ValueError(f"red_kernels.{fn}: the model is not patched by red_kernels.patch_model")
    return state


def _remove_patch(model: nn.Module, state: PatchState) -> None:
    for name in state.targets:
        _detach(model.get_submodule(name))
    for name, p in model.named_parameters():
        if name in state.requires_grad:
            p.requires_grad_(state.requires_grad[name])
    delattr(model, STATE_ATTR)


def unpatch_model(model: nn.Module) -> nn.Module:
    """Remove every editor and hook and restore each parameter's ``requires_grad``, in place.

    The module tree and ``state_dict`` are then those of the original model, bit for bit (modules
    kept trainable with ``trainable=`` keep whatever training did to them)."""
    _remove_patch(model, _require_patched(model, "unpatch_model"))
    return model


@torch.no_grad()
def _fold(module: nn.Module, editor: REDEdit) -> bool:
    """Fold ``editor`` into ``module`` in place; True if the module gained a bias.

    Linear (weight [out, in]): ``W' = diag(s) W``; Conv1D (weight [in, out]): ``W' = W diag(s)``;
    both: ``b' = s * b + c``. Arithmetic in fp32 (fp64 for fp64 weights), stored in the weight dtype."""
    weight = module.weight
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    s = editor.scale.detach().to(device=weight.device, dtype=acc) if editor.scale is not None else None
    c = editor.bias.detach().to(device=weight.device, dtype=acc) if editor.bias is not None else None
    out_dim = -1 if _is_conv1d(module) else 0  # the output features' dim of the weight
    if s is not None:
        shape = [1, 1]
        shape[out_dim] = -1
        weight.copy_((weight.to(acc) * s.view(shape)).to(weight.dtype))
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


def merge_model(model: nn.Module) -> nn.Module:
    """Fold every edit into the layer it follows and return the plain model (in place).

    ``W' = diag(scale) W`` and ``b' = scale * b + bias`` (a bias is added where the layer has
    none; for GPT-2's Conv1D, whose weight is [in, out], the columns are scaled). The result has no
    red_kernels module or hook left, its parameters' ``requires_grad`` are restored, and its outputs
    equal the patched model's up to rounding. Where the architecture has a config switch for the new
    biases (LLaMA's ``mlp_bias`` / ``attention_bias``) it is set, and the other layers of that
    group get zero biases, so ``save_pretrained`` / ``from_pretrained`` of transformers reload the
    merged model; otherwise a warning names the layers whose bias only lives in memory."""
    state = _require_patched(model, "merge_model")
    for name in state.targets:  # check every layer first, so a refusal leaves the model patched
        weight = model.get_submodule(name).weight
        if type(weight) not in (nn.Parameter, torch.Tensor) or not weight.dtype.is_floating_point:
            raise ValueError(
                f"red_kernels.merge_model: cannot fold into {name!r}: its weight is a "
                f"{type(weight).__name__} of {weight.dtype} (quantized or wrapped); merge into a "
                "floating-point copy of the base model, or keep the patched model"
            )
    gained = []
    for name in state.targets:
        module = model.get_submodule(name)
        if _fold(module, getattr(module, EDITOR_ATTR)):
            gained.append(name)
    _remove_patch(model, state)
    for name in gained:  # a new bias trains (or not) like the weight it was folded beside
        module = model.get_submodule(name)
        module.bias.requires_grad_(module.weight.requires_grad)
    orphan = _apply_bias_switches(model, state.architecture, gained)
    if orphan and getattr(model, "config", None) is not None:
        warnings.warn(
            f"red_kernels.merge_model: {len(orphan)} layer(s) gained a bias that {type(model).__name__}'s "
            f"config cannot describe (e.g. {orphan[0]!r}); the merged model computes correctly, but "
            "transformers' from_pretrained will not reload those biases. Ship the adapter "
            "(red_kernels.save_adapter) and merge after loading instead.",
            stacklevel=2,
        )
    return model


@dataclass(frozen=True)
class TrainableParameters:
    """Parameter counts of a (patched) model."""

    trainable: int  # every parameter with requires_grad
    total: int  # every parameter (shared ones once)
    edit: int  # trainable parameters of RED editors
    modules: int  # other trainable parameters (e.g. a classification head kept with trainable=)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} (edit vectors {self.edit:,}, other modules {self.modules:,}) "
            f"|| all params: {self.total:,} || trainable%: {self.percent:.4f}"
        )


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Count trainable / total parameters, edit vectors apart from other trainable modules."""
    edit_ids = {id(p) for m in model.modules() if isinstance(m, REDEdit) for p in m.parameters()}
    trainable = total = edit = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
            if id(p) in edit_ids:
                edit += n
    return TrainableParameters(trainable=trainable, total=total, edit=edit, modules=trainable - edit)


__all__ = [
    "PatchState",
    "TrainableParameters",
    "merge_model",
    "patch_model",
    "patch_state",
    "trainable_parameters",
    "unpatch_model",
]
