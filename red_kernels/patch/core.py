"""patch_model / unpatch_model / trainable_parameters and the named adapters of a patched model.

A patched model holds named adapters (``patch_model`` creates ``"default"``), each an
:class:`~red_kernels.patch.methods.AdapterConfig` whose modules sit in banks beside the modules they
edit (see :mod:`red_kernels.patch.methods`), and hooks that apply them (see
:mod:`red_kernels.patch.sites`). Which adapter a row uses is the active one (:func:`set_adapter`),
or one per row inside :func:`~red_kernels.patch.context.tenants`.

The patch's bookkeeping lives on the model in the attribute ``_red_kernels_patch``, a plain
:class:`PatchState`, so ``copy.deepcopy`` keeps it (with a fresh per-thread context). A transformers
model's class also becomes a same-named subclass while patched (:mod:`red_kernels.patch.root`:
``save_pretrained`` writes the adapters, ``generate`` fixes the prompt length).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from red_kernels._backend import BACKENDS
from red_kernels.patch import root, sites
from red_kernels.patch.context import Local
from red_kernels.patch.methods import (
    BANK_ATTRS,
    AdapterBank,
    AdapterConfig,
    check_adapter_name,
    check_para_options,
    edit_dim,
    output_dim,
    para_layout,
    slot_pieces,
)
from red_kernels.patch.targets import ARCH_BY_NAME, METHODS, detect, match_names

STATE_ATTR = "_red_kernels_patch"


@dataclass(eq=False)
class PatchState:
    """What :func:`patch_model` and the adapter functions did to a model."""

    architecture: str  # a name in red_kernels.patch.targets.ARCH_BY_NAME, or "custom"
    adapters: dict[str, AdapterConfig]
    active: str | None
    trainable: list[str] = field(default_factory=list)  # base modules kept trainable
    requires_grad: dict[str, bool] = field(default_factory=dict)  # original flag of each parameter
    backend: str | None = None
    # Derived by _refresh from the adapters: scaled module -> [(layer, pieces)], stacks whose
    # decoder layers pool the encoder output.
    para_sites: dict[str, list] = field(default_factory=dict)
    encoder_stacks: set[str] = field(default_factory=set)
    tables: dict = field(default_factory=dict)  # cached [K, ...] tables of mixed batches (no grad)
    local: Local = field(default_factory=Local)  # per-thread context of the forward
    prompt_generate: bool = False  # generate fixes the prompt length (PARA pooling the prompt's last token)

    @property
    def key(self) -> int:
        return id(self)

    @property
    def has_para(self) -> bool:
        return any(c.method == "para" for c in self.adapters.values())

    def pools_encoder(self, stack: str) -> bool:
        return stack in self.encoder_stacks

    @property
    def config(self) -> AdapterConfig:
        """The active adapter's config (the first adapter's when the base is active)."""
        name = self.active if self.active is not None else next(iter(self.adapters))
        return self.adapters[name]

    # The active adapter's fields, as the single-adapter state of earlier versions exposed them.
    method = property(lambda self: self.config.method)
    targets = property(lambda self: self.config.targets)
    dims = property(lambda self: self.config.dims)
    scale = property(lambda self: self.config.scale)
    bias = property(lambda self: self.config.bias)
    dtype = property(lambda self: self.config.dtype)
    target_patterns = property(lambda self: self.config.target_patterns)


def patch_state(model: nn.Module) -> PatchState | None:
    """The :class:`PatchState` of a patched model, None for a plain one."""
    return getattr(model, STATE_ATTR, None)


def require_patched(model: nn.Module, fn: str) -> PatchState:
    state = patch_state(model)
    if state is None:
        raise ValueError(f"red_kernels.{fn}: the model is not patched by red_kernels.patch_model")
    return state


_require_patched = require_patched


# --- planning ------------------------------------------------------------------------------------


def _as_patterns(value, arg: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    try:
        value = list(value)
    except TypeError:
        value = None
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


def _detect_architecture(model: nn.Module, names: list[str]) -> str:
    try:
        return detect(model, "red", names)[0].name
    except ValueError:
        return "custom"


def plan_adapter(
    model: nn.Module,
    method: str,
    targets=None,
    trainable=None,
    *,
    scale: bool | None = None,
    bias: bool | None = None,
    dtype: torch.dtype | None = None,
    rank: int = 12,
    activation: str = "gelu",
    up_bias: bool = True,
    inputs=None,
    backend: str | None = None,
) -> tuple[str, AdapterConfig, list[str]]:
    """Validate an adapter without changing the model: (architecture, config, trainable modules).

    ``targets`` are the edited modules (red, ia3) or the layers (para)."""
    if method not in METHODS:
        raise ValueError(f"red_kernels.patch_model: argument 'method' must be one of {METHODS}, got {method!r}")
    if backend is not None and backend not in ("auto", *BACKENDS):
        raise ValueError(
            f"red_kernels.patch_model: argument 'backend' must be None or one of {('auto', *BACKENDS)}, got {backend!r}"
        )
    scale = True if scale is None else scale
    bias = (method != "ia3") if bias is None else bias
    for arg, value in (("scale", scale), ("bias", bias)):
        if not isinstance(value, bool):
            raise ValueError(f"red_kernels.patch_model: argument '{arg}' must be True or False, got {value!r}")
    if method != "para" and not (scale or bias):
        raise ValueError("red_kernels.patch_model: at least one of 'scale' and 'bias' must be True")
    if method == "ia3" and (bias or not scale):
        raise ValueError(
            "red_kernels.patch_model: IA3 learns scaling vectors only: argument 'scale' must be True and 'bias' False"
        )
    if method != "ia3" and inputs is not None and not (isinstance(inputs, (list, tuple)) and not inputs):
        raise ValueError(
            f"red_kernels.patch_model: argument 'inputs' (targets whose input is scaled) is for method 'ia3', "
            f"not {method!r}"
        )
    vec_dtype = torch.float32 if dtype is None else dtype
    if not isinstance(vec_dtype, torch.dtype) or not vec_dtype.is_floating_point:
        raise ValueError(f"red_kernels.patch_model: argument 'dtype' must be a floating torch.dtype, got {dtype!r}")
    if method == "para":
        check_para_options(rank, activation, up_bias)
    names = [n for n, _ in model.named_modules() if n]
    patterns = _as_patterns(targets, "targets")
    if patterns is None:
        spec, chosen = detect(model, method, names)
        arch = spec.name
    else:
        chosen = _resolve_patterns(patterns, names, "targets")
        arch = _detect_architecture(model, names) if method != "para" else detect(model, method, names)[0].name
    modules = dict(model.named_modules())
    if method == "ia3":
        inputs = _ia3_inputs(arch, getattr(getattr(model, "config", None), "model_type", None), chosen, inputs)
    config = AdapterConfig(method=method, targets=chosen, dims={}, dtype=vec_dtype, target_patterns=patterns)
    if method == "para":
        spec = ARCH_BY_NAME[arch]
        layers = [n for n in chosen if spec.para is not None and any(t.matches(n) for t in spec.targets("para"))]
        if len(layers) != len(chosen):
            bad = sorted(set(chosen) - set(layers))
            raise ValueError(f"red_kernels.patch_model: PARA targets are layers; {bad[:3]} are not {arch} layers")
        config.slots, config.out_sizes, config.dims = para_layout(spec, model, chosen)
        config.rank, config.activation, config.up_bias = rank, activation, up_bias
    else:
        config.inputs = inputs if method == "ia3" else []
        config.dims = {n: edit_dim(config, modules[n], n) for n in chosen}
        config.scale, config.bias = scale, bias
    keep = _resolve_patterns(_as_patterns(trainable, "trainable"), names, "trainable") if trainable else []
    # A trainable module inside another one adds nothing; keep the outermost names only.
    keep = [n for n in keep if not any(n.startswith(k + ".") for k in keep)]
    return arch, config, keep


def _ia3_inputs(arch: str, model_type: str | None, chosen: list[str], inputs) -> list[str]:
    """The IA3 targets whose input is scaled: the feed-forward targets of the architecture's table
    for ``model_type`` (mT5 scales wi_1's output, T5 wo's input), or those among ``chosen`` that the
    ``inputs`` patterns name (an empty list: none)."""
    if inputs is None:
        spec = ARCH_BY_NAME.get(arch)
        return [n for n in chosen if spec is not None and spec.is_ia3_input(n, model_type)]
    if isinstance(inputs, str):
        inputs = [inputs]
    try:
        inputs = list(inputs)
    except TypeError:
        inputs = None
    if inputs is None or not all(isinstance(p, str) and p for p in inputs):
        raise ValueError("red_kernels.patch_model: argument 'inputs' must be a list of module-name patterns")
    return _resolve_patterns(inputs, chosen, "inputs") if inputs else []


def _check_unpatched(model: nn.Module) -> None:
    state = patch_state(model)
    if state is not None or any(
        isinstance(m._modules.get(a), AdapterBank) for m in model.modules() for a in BANK_ATTRS
    ):
        what = f" with adapters {list(state.adapters)}" if state else ""
        raise ValueError(
            f"red_kernels.patch_model: the model is already patched{what}; add adapters with "
            "red_kernels.load_adapter, or call red_kernels.unpatch_model (or merge_model) first"
        )
    peft = [n for n, m in model.named_modules() if type(m).__module__.startswith("peft.")]
    if peft:
        raise ValueError(
            f"red_kernels.patch_model: the model holds PEFT modules ({peft[0] or 'the model itself'!r}, "
            f"{type(model.get_submodule(peft[0])).__name__}); patch the base model before PEFT wraps it, "
            "or load a PEFT IA3 adapter with red_kernels.load_adapter"
        )


# --- installing adapters -------------------------------------------------------------------------


def _stack_of(layer: str, up: int) -> str:
    parts = layer.split(".")
    return ".".join(parts[: max(len(parts) - up, 0)])


def install_adapter(model: nn.Module, state: PatchState, name: str, config: AdapterConfig) -> None:
    """Build ``name``'s modules and place them in the banks; nothing is changed if building fails."""
    modules = {place: model.get_submodule(place) for place in config.targets}
    built = {}
    for place in config.targets:
        ref = next(iter(modules[place].parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        built[place] = config.build(place, device, state.backend)
    for place, module in built.items():
        target = modules[place]
        bank = target._modules.get(config.bank_of(place))
        if bank is None:
            bank = AdapterBank()
            target.add_module(config.bank_of(place), bank)
        bank[name] = module
    state.adapters[name] = config
    refresh_hooks(model, state)


def uninstall_adapter(model: nn.Module, state: PatchState, name: str) -> None:
    config = state.adapters.pop(name)
    for place in config.targets:
        target = model.get_submodule(place)
        bank = target._modules.get(config.bank_of(place))
        if bank is not None and name in bank:
            del bank[name]
            if not len(bank):
                del target._modules[config.bank_of(place)]
    state.tables.clear()
    refresh_hooks(model, state)


def refresh_hooks(model: nn.Module, state: PatchState) -> None:
    """Hooks where the adapters need them, none elsewhere (cost: one pass over the modules)."""
    spec = ARCH_BY_NAME.get(state.architecture)
    sites_needed = {t for c in state.adapters.values() if c.method != "para" for t in c.targets if t not in c.inputs}
    input_sites = {t for c in state.adapters.values() for t in c.inputs}
    layers: dict[str, str] = {}
    para_sites: dict[str, list] = {}
    modules = dict(base_modules(model))
    for config in state.adapters.values():
        if config.method != "para":
            continue
        for layer in config.targets:
            layers[layer] = _stack_of(layer, spec.para.stack_up)
            for module in dict.fromkeys(config.slots[layer].values()):
                width = output_dim(modules[module], module)
                entry = (layer, slot_pieces(spec, config, layer, module, width))
                if entry not in para_sites.setdefault(module, []):
                    para_sites[module].append(entry)
                sites_needed.add(module)
    stacks: dict[str, list[str]] = {}
    for layer, stack in layers.items():
        stacks.setdefault(stack, []).append(layer)
    state.para_sites = para_sites
    state.encoder_stacks = {
        s for s in stacks if spec.para.decoder_pools_encoder and getattr(modules[s], "is_decoder", False)
    }
    root_needed = bool(layers) and spec.para.labels_are_tokens
    state.prompt_generate = root_needed
    for mname, module in modules.items():
        sites.detach_hooks(module)
        if mname in sites_needed:
            sites.attach_site(state, module, mname)
        if mname in input_sites:
            sites.attach_input_site(state, module, mname)
        if mname in layers:
            sites.attach_layer(state, module, mname, layers[mname])
        if mname in stacks:
            sites.attach_stack(state, module, mname, tuple(stacks[mname]))
        if mname == "" and root_needed:
            sites.attach_root(state, module)


def base_modules(module: nn.Module, prefix: str = ""):
    """``named_modules()`` without the adapter banks' contents: a walk whose cost does not grow
    with the number of adapters."""
    yield prefix, module
    for name, child in module._modules.items():
        if child is None or isinstance(child, AdapterBank):
            continue
        yield from base_modules(child, f"{prefix}.{name}" if prefix else name)


def adapter_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """The parameters of adapter ``name`` (default: the active one), by full name."""
    state = require_patched(model, "adapter_parameters")
    name = _known(state, state.active if name is None else name, "adapter_parameters")
    config = state.adapters[name]
    out = {}
    for place in config.targets:
        attr = config.bank_of(place)
        bank = model.get_submodule(place)._modules[attr]
        prefix = f"{place}.{attr}.{name}" if place else f"{attr}.{name}"
        for pname, p in bank[name].named_parameters():
            out[f"{prefix}.{pname}"] = p
    return out


def _known(state: PatchState, name, fn: str) -> str:
    if not isinstance(name, str) or name not in state.adapters:
        raise ValueError(f"red_kernels.{fn}: unknown adapter {name!r}; the model has {list(state.adapters)}")
    return name


def patch_model(
    model: nn.Module,
    method: str = "red",
    targets: str | list[str] | None = None,
    trainable: str | list[str] | None = None,
    *,
    scale: bool | None = None,
    bias: bool | None = None,
    dtype: torch.dtype | None = None,
    rank: int = 12,
    activation: str = "gelu",
    up_bias: bool = True,
    inputs: str | list[str] | None = None,
    backend: str | None = None,
    adapter_name: str = "default",
) -> nn.Module:
    """Freeze ``model`` and add an adapter of ``method`` (named ``adapter_name``), in place.

    - ``"red"`` / ``"red+"``: each target's output ``h [..., d]`` becomes ``h * scale + bias`` with
      learned ``scale [d]`` (init 1) and ``bias [d]`` (init 0). ``red`` edits the FFN output of every
      layer, ``red+`` also the attention projections (table in :mod:`red_kernels.patch.targets`).
    - ``"para"``: per layer a generator pools the layer input's last prompt token ``x [B, d]`` and
      makes ``[l_q, l_v, l_u] = act(x @ W_down) @ W_up + b_up`` (``W_down [d, rank]``, ``W_up
      [rank, n_q + n_v + n_u]``), which scale the query, value and FFN-up projections' outputs of
      that sequence. Init ``W_down ~ N(0, 0.02)``, ``W_up = 0``, ``b_up = 1``; ``up_bias=False``
      keeps ``b_up`` fixed at ones (the paper's parameter count).
    - ``"ia3"``: PEFT's (IA)^3: a learned ``scale`` (init 1) per target, no bias; it scales the
      target's output, or for the feed-forward targets (``inputs``) its input: ``f(x * scale)``.
      Default targets: PEFT's default IA3 targets of the architecture (e.g. LLaMA's ``k_proj``,
      ``v_proj`` and, on its input, ``down_proj``). A PEFT IA3 directory loads with
      :func:`red_kernels.load_adapter`.

    Either way the patched model equals the original bit for bit at step 0.

    Args:
        model: a Hugging Face (or any) ``nn.Module``; LLaMA, RoBERTa, T5 and GPT-2 layouts (and
            their look-alikes) are recognised by their module names.
        targets: module-name patterns overriding the table (globs matched against names and their
            dotted suffixes, e.g. ``"mlp.down_proj"``, or ``"re:<regex>"``): Linear or Conv1D
            modules for red, layers for para.
        trainable: module-name patterns of base modules to keep trainable (e.g. ``"classifier"``);
            saved with the adapter and counted apart by :func:`trainable_parameters`.
        scale, bias: RED's vectors (the paper's ablations turn one off); None: the method's own
            (RED both, IA3 scale only).
        dtype: dtype of the adapter's parameters; None is fp32 whatever the model's dtype (they
            stay so when the model is cast).
        rank, activation, up_bias: PARA's bottleneck width, activation (``gelu``, ``gelu_tanh``,
            ``relu``, ``silu``) and whether ``b_up`` trains.
        inputs: IA3: patterns naming the targets whose input (not output) is scaled; None: the
            architecture's feed-forward targets; ``[]``: none.
        backend: backend of every op the adapters run (None: the usual selection).
        adapter_name: the adapter's name.

    Returns ``model``. Raises ValueError (leaving the model untouched) if it is already patched,
    an argument is invalid, or no target fits.
    """
    check_adapter_name(adapter_name, "patch_model")
    _check_unpatched(model)
    arch, config, keep = plan_adapter(
        model,
        method,
        targets,
        trainable,
        scale=scale,
        bias=bias,
        dtype=dtype,
        rank=rank,
        activation=activation,
        up_bias=up_bias,
        inputs=inputs,
        backend=backend,
    )
    original = {n: p.requires_grad for n, p in model.named_parameters()}
    state = PatchState(architecture=arch, adapters={}, active=adapter_name, trainable=keep, backend=backend)
    state.requires_grad = original
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        install_adapter(model, state, adapter_name, config)
    except Exception:
        _remove_everything(model, state)
        raise
    for name in keep:
        for pname, p in model.get_submodule(name).named_parameters():
            if not set(BANK_ATTRS) & set(pname.split(".")):
                p.requires_grad_(True)
    setattr(model, STATE_ATTR, state)
    root.attach_root_class(model)
    return model


def _remove_everything(model: nn.Module, state: PatchState) -> None:
    for module in model.modules():
        sites.detach_hooks(module)
        for attr in BANK_ATTRS:
            if isinstance(module._modules.get(attr), AdapterBank):
                del module._modules[attr]
    for name, p in model.named_parameters():
        if name in state.requires_grad:
            p.requires_grad_(state.requires_grad[name])
    root.detach_root_class(model)
    if getattr(model, STATE_ATTR, None) is state:
        delattr(model, STATE_ATTR)


def check_own_classes(model: nn.Module, fn: str) -> None:
    """RuntimeError, before anything changes, when a class that patching gave a module (a PARA
    layer's, the root model's) has since been subclassed again by someone else.

    A wrapper such as FSDP2's ``fully_shard`` replaces ``module.__class__`` with a new subclass of the
    class it finds. Giving the module its own class back would mean rebuilding the wrapper's class on
    another base, behind the wrapper's back (its class caches, and its parameter groups, which hold
    the adapters' parameters); so unpatching such a model is refused instead."""
    for name, module in base_modules(model):
        for marker in (sites.PARA_BASE, root.ROOT_BASE):
            made = sites.subclassed_again(module, marker)
            if made is not None:
                raise RuntimeError(
                    f"red_kernels.{fn}: module {name or '(the model itself)'!r} is a "
                    f"{type(module).__qualname__}, a subclass that something made of red_kernels' "
                    f"{made.__qualname__} after patching (a wrapper such as FSDP2's fully_shard does so); "
                    "red_kernels cannot give it its own class back without undoing the wrapper. Call "
                    f"red_kernels.{fn} before wrapping the model (or on an unwrapped copy); nothing was changed"
                )


def unpatch_model(model: nn.Module) -> nn.Module:
    """Remove every adapter, bank and hook and restore each parameter's ``requires_grad``, in place.

    The module tree and ``state_dict`` are then those of the original model, bit for bit (modules
    kept trainable with ``trainable=`` keep whatever training did to them). Raises RuntimeError,
    leaving the model patched, when a wrapper has subclassed a patched class again
    (:func:`check_own_classes`): unpatch before wrapping."""
    state = require_patched(model, "unpatch_model")
    check_own_classes(model, "unpatch_model")
    _remove_everything(model, state)
    return model


# --- named adapters ------------------------------------------------------------------------------


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    return list(require_patched(model, "adapter_names").adapters)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the adapter every row uses and the one that trains: its parameters require
    grad, every other adapter's do not (so an optimizer built now moves it alone)."""
    state = require_patched(model, "set_adapter")
    _known(state, name, "set_adapter")
    for other in state.adapters:
        for p in adapter_parameters(model, other).values():
            p.requires_grad_(other == name)
    state.active = name


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (its modules and, where nothing else needs them, its hooks)."""
    state = require_patched(model, "delete_adapter")
    _known(state, name, "delete_adapter")
    if len(state.adapters) == 1:
        raise ValueError(
            f"red_kernels.delete_adapter: {name!r} is the model's only adapter; use red_kernels.unpatch_model"
        )
    if name == state.active:
        raise ValueError(
            f"red_kernels.delete_adapter: {name!r} is the active adapter; red_kernels.set_adapter another one first"
        )
    uninstall_adapter(model, state, name)


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Count trainable / total parameters, adapter parameters apart from other trainable modules."""
    adapter_ids = {id(p) for m in model.modules() if isinstance(m, AdapterBank) for p in m.parameters()}
    trainable = total = edit = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
            if id(p) in adapter_ids:
                edit += n
    return TrainableParameters(trainable=trainable, total=total, edit=edit, modules=trainable - edit)


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


__all__ = [
    "PatchState",
    "TrainableParameters",
    "adapter_names",
    "adapter_parameters",
    "delete_adapter",
    "patch_model",
    "patch_state",
    "set_adapter",
    "trainable_parameters",
    "unpatch_model",
]
