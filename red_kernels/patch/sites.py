"""The hooks that apply adapters, and attaching / detaching them.

Why a child module plus a hook (not a wrapper module): each edited module keeps its class,
attributes and parameter names (model code that reads ``self.wo.weight`` keeps working; base
``state_dict`` keys do not move, adapter parameters sit beside them as
``<target>.red_edit.<adapter>.scale``); unpatching is bit-exact (the hooks and banks are removed,
base parameters are never touched); gradient checkpointing (the recomputation calls the module
again, so the hook runs again) and ``torch.compile`` (Dynamo traces module hooks) keep working.

Hooks (each a ``functools.partial`` of a function below, so a deep-copied model's hooks point at
its own copied state, and detaching finds them by function):

- :func:`site_hook` on every module whose output an adapter edits: RED and IA3 (its ``red_edit``
  bank) and PARA (the module is a scaled projection of a layer), for one adapter or gathered per row.
- :func:`input_site_hook`, a forward pre-hook on every module whose input an adapter edits (IA3's
  feed-forward targets, bank ``red_edit_in``): the same editors and gathering on the input.
- every PARA layer's ``forward`` (:func:`_para_forward`, through a subclass of the layer's class):
  runs the generators on the layer input (or reuses the decode vectors) and leaves ``[B, n]``
  vectors for the layer's scaled projections.
- the model-level hooks of :mod:`red_kernels.patch.context` on the stacks and the root.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks

from red_kernels.ops.gathered_para_vector_gen import gathered_para_vector_gen
from red_kernels.ops.gathered_red_edit import gathered_red_edit
from red_kernels.ops.para_vector_gen import para_vector_gen
from red_kernels.ops.seq_scale import seq_scale
from red_kernels.patch import context
from red_kernels.patch.methods import EDITOR_ATTR, GENERATOR_ATTR, INPUT_EDITOR_ATTR

# --- tables of the adapters present in a mixed batch ----------------------------------------------


def _table(state, key: tuple, tensors: list[Tensor | None], fill: float | None) -> Tensor | None:
    """``torch.stack`` of one tensor per present adapter (``fill`` where an adapter has none), in
    fp32. Under autograd it is built anew each call (gradients flow back to each adapter's own
    parameters); without, it is cached until a parameter changes (``_version`` counts in-place
    updates: an optimizer step, a load)."""
    if all(t is None for t in tensors):
        return None
    ref = next(t for t in tensors if t is not None)
    # Under torch.compile the table is part of the graph (guarding on _version is not traceable).
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    training = training or torch.compiler.is_compiling()
    if not training:
        key = (*key, torch.is_inference_mode_enabled())  # inference tensors cannot be saved for backward
        version = tuple((id(t), t._version) if t is not None else None for t in tensors)
        hit = state.tables.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
    rows = [t.to(torch.float32) if t is not None else torch.full_like(ref, fill, dtype=torch.float32) for t in tensors]
    table = torch.stack(rows)
    if not training:
        state.tables[key] = (version, table)
    return table


def _present(rows: tuple, bank: nn.ModuleDict) -> tuple[str, ...]:
    return tuple(n for n in dict.fromkeys(rows) if n is not None and n in bank)


# --- RED and PARA on a module's output ------------------------------------------------------------


def site_hook(state, name: str, module: nn.Module, args: tuple, output):
    if not isinstance(output, Tensor):
        return output
    rows = context.rows_for(state, output.shape[0])
    if rows is None:
        return output
    bank = module._modules.get(EDITOR_ATTR)
    fresh = False  # whether ``output`` is known to be a tensor made in this hook
    if bank is not None:
        output = _apply_red(state, (name, EDITOR_ATTR), bank, rows, output)
    for layer, pieces in state.para_sites.get(name, ()):
        vec = state.local.vectors.get(layer)
        if vec is None:
            continue
        vec = _module_vector(vec, pieces, output.shape[-1])
        if (
            output.dim() == 3
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and (fresh or _output_is_fresh(module))
        ):
            # Inference: scale the projection's fresh output in place, as seq_scale would compute it
            # (fp32 multiply, rounded once to the output's dtype), without a second
            # activation-sized tensor (its page faults cost as much as the arithmetic on CPU).
            output.mul_(vec.unsqueeze(1))
        else:
            output = seq_scale(output, vec, backend=state.backend)
        fresh = True  # what this loop returns is its own tensor: in place or seq_scale's result
    return output


def _output_is_fresh(module: nn.Module) -> bool:
    """Whether the output our forward hook receives is provably a new tensor that nobody else holds,
    so that scaling it in place changes nothing anyone can see: the module computes it with
    ``nn.Linear``'s or transformers' ``Conv1D``'s own forward (a new matmul result; a subclass or an
    instance attribute may override ``forward`` and return a cached or aliased tensor), and no other
    forward hook ran before ours (a global one, or one on this module registered before the patch or
    with ``prepend=True``, may have returned a tensor it also keeps). Cost: a few dict lookups."""
    if _global_forward_hooks or "forward" in module.__dict__:
        return False
    first = next(iter(module._forward_hooks.values()), None)
    if not (isinstance(first, functools.partial) and first.func is site_hook):
        return False
    forward = type(module).forward
    if forward is nn.Linear.forward:
        return True
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and forward is conv1d.forward


def _apply_red(state, site: tuple, bank: nn.ModuleDict, rows, h: Tensor) -> Tensor:
    """``h`` edited by the bank's editors: the row's adapter's, or gathered per row (rows whose
    adapter has no editor in this bank are left as they are)."""
    if isinstance(rows, str):
        editor = bank._modules.get(rows)
        return h if editor is None else editor(h)
    present = _present(rows, bank)
    if not present:
        return h
    editors = [bank[n] for n in present]
    scales = _table(state, (*site, present, "scale"), [e.scale for e in editors], 1.0)
    biases = _table(state, (*site, present, "bias"), [e.bias for e in editors], 0.0)
    ids = context.tenant_ids(state, rows, present, h.device)
    return gathered_red_edit(h, scales, biases, ids, backend=state.backend)


def input_site_hook(state, name: str, module: nn.Module, args: tuple, kwargs: dict):
    """Before the module's forward: its input (the first argument, e.g. ``Linear``'s ``input``)
    edited by the ``red_edit_in`` bank, as IA3 computes ``f(x * scale)``."""
    if args:
        x = args[0]
    elif len(kwargs) == 1:
        x = next(iter(kwargs.values()))
    else:
        return None
    bank = module._modules.get(INPUT_EDITOR_ATTR)
    if not isinstance(x, Tensor) or bank is None:
        return None
    rows = context.rows_for(state, x.shape[0])
    if rows is None:
        return None
    x = _apply_red(state, (name, INPUT_EDITOR_ATTR), bank, rows, x)
    if args:
        return (x, *args[1:]), kwargs
    return args, {next(iter(kwargs)): x}


def _module_vector(vec: Tensor, pieces: list[tuple[int, int, int]], width: int) -> Tensor:
    """The ``[B, width]`` vector of one scaled module from the layer's ``[B, n]`` (ones elsewhere)."""
    if len(pieces) == 1 and pieces[0][0] == 0 and pieces[0][1] == width:
        start = pieces[0][2]
        return vec[:, start : start + width]
    parts, at = [], 0
    for out_start, n, vec_start in pieces:
        if out_start > at:
            parts.append(vec.new_ones(vec.shape[0], out_start - at))
        parts.append(vec[:, vec_start : vec_start + n])
        at = out_start + n
    if at < width:
        parts.append(vec.new_ones(vec.shape[0], width - at))
    return torch.cat(parts, 1)


# --- PARA generators on a layer's input -----------------------------------------------------------


def _input_key(t: Tensor):
    """What identifies a layer input across gradient checkpointing's rerun (the same storage; the
    reentrant variant passes detached copies). None under torch.compile, where it is not traceable."""
    if torch.compiler.is_compiling():
        return None
    return (t.data_ptr(), tuple(t.shape), t.stride())


def run_generators(state, layer: str, stack: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before the layer's own forward: its vectors for this call, in ``local.vectors[layer]``."""
    local = state.local
    hidden = args[0] if args else kwargs.get("hidden_states")
    frame = local.frames.get(stack)
    if frame is not None and frame.active and frame.decode:
        return  # the vectors of this cache were loaded by the stack hook; generators do not run
    local.vectors.pop(layer, None)
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        return
    rows = context.rows_for(state, hidden.shape[0])
    bank = module._modules.get(GENERATOR_ATTR)
    if rows is None or bank is None:
        return
    # The stack's frame pools while its call runs, and afterwards for gradient checkpointing's rerun
    # of this layer during backward (recognised by its input); a layer called on its own pools its
    # input's last token.
    key = _input_key(hidden)
    usable = frame is not None and frame.pool_index is not None and frame.batch == hidden.shape[0]
    if usable and frame.active:
        frame.inputs[layer] = key
    elif usable:
        usable = key is not None and frame.inputs.get(layer) == key
    if usable:
        source, pool = (frame.source if frame.source is not None else hidden), frame.pool_index
    else:
        source = hidden
        pool = torch.full((hidden.shape[0],), hidden.shape[1] - 1, dtype=torch.int64, device=hidden.device)
    if isinstance(rows, str):
        gen = bank._modules.get(rows)
        if gen is not None:
            local.vectors[layer] = para_vector_gen(
                source, pool, gen.w_down, gen.w_up, gen.b_up, gen.activation, backend=state.backend
            )
        return
    present = _present(rows, bank)
    if not present:
        return
    vec = None
    groups: dict[tuple, list[str]] = {}
    for n in present:  # one gathered call per (rank, activation): the kernels stack equal shapes
        groups.setdefault((bank[n].rank, bank[n].activation), []).append(n)
    for (_, activation), names in groups.items():
        gens = [bank[n] for n in names]
        tables = [
            _table(state, (layer, tuple(names), p), [getattr(g, p) for g in gens], None)
            for p in ("w_down", "w_up", "b_up")
        ]
        ids = context.tenant_ids(state, rows, tuple(names), hidden.device)
        out = gathered_para_vector_gen(source, pool, *tables, ids, activation, backend=state.backend)
        vec = out if vec is None else vec * out
    local.vectors[layer] = vec


def end_layer(state, layer: str, stack: str) -> None:
    """Outside a stack call (a layer run on its own, or rerun by checkpointing during backward) the
    vectors end with the layer; inside one, the stack's exit takes them (for the cache)."""
    frame = state.local.frames.get(stack)
    if frame is None or not frame.active:
        state.local.vectors.pop(layer, None)


def _para_forward(self, para_cls: type, args: tuple, kwargs: dict):
    """``forward`` of a PARA layer: the generators, then the layer's own forward.

    A subclass's forward rather than a forward pre-hook, so that the generators run inside the
    layer's gradient checkpoint: transformers checkpoints ``forward`` (not ``__call__``, whose hooks
    stay outside), and the recomputation must make the vectors again for the projections' hooks.
    The layer's own forward is the one after ``para_cls`` in the MRO, not after ``type(self)``: FSDP2's
    ``fully_shard`` gives the module yet another subclass. A layer whose PARA adapters were all
    deleted under such a wrapper keeps the class (it cannot be given back without undoing the
    wrapper's) but no longer its entry, and runs its own forward alone."""
    entry = self.__dict__.get(LAYER_ATTR)
    if entry is None:
        return super(para_cls, self).forward(*args, **kwargs)
    state, layer, stack = entry
    run_generators(state, layer, stack, self, args, kwargs)
    try:
        return super(para_cls, self).forward(*args, **kwargs)
    finally:
        end_layer(state, layer, stack)


LAYER_ATTR = "_red_kernels_para_layer"
PARA_BASE = "_red_kernels_base"  # in the body of each PARA layer class: the class it derives from
_PARA_CLASSES: dict[type, type] = {}


def _para_class(cls: type) -> type:
    """``cls`` with :func:`_para_forward`: same ``__name__`` (the model's repr is unchanged), a
    distinct ``__qualname__`` so that pickling a patched model fails loudly instead of silently
    dropping PARA (save adapters with ``save_adapter``)."""
    if cls not in _PARA_CLASSES:

        def forward(self, *args, **kwargs):
            return _para_forward(self, para, args, kwargs)

        para = type(
            cls.__name__,
            (cls,),
            {"forward": forward, "__qualname__": f"PARA[{cls.__qualname__}]", PARA_BASE: cls},
        )
        _PARA_CLASSES[cls] = para
    return _PARA_CLASSES[cls]


# --- attach / detach ------------------------------------------------------------------------------

HOOK_FUNCS = (site_hook, input_site_hook, context.stack_pre_hook, context.stack_post_hook)
HOOK_FUNCS += (context.root_pre_hook, context.root_post_hook)


def has_hook(module: nn.Module, func) -> bool:
    hooks = (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
    return any(isinstance(h, functools.partial) and h.func is func for h in hooks)


def attach_site(state, module: nn.Module, name: str) -> None:
    if not has_hook(module, site_hook):
        module.register_forward_hook(functools.partial(site_hook, state, name))


def attach_input_site(state, module: nn.Module, name: str) -> None:
    if not has_hook(module, input_site_hook):
        module.register_forward_pre_hook(functools.partial(input_site_hook, state, name), with_kwargs=True)


def attach_layer(state, module: nn.Module, layer: str, stack: str) -> None:
    module.__dict__[LAYER_ATTR] = (state, layer, stack)
    # getattr, not vars(type(module)): under a wrapper's subclass of the PARA class (FSDP2's
    # fully_shard) the layer is PARA already; another PARA class on top would run the generators twice.
    if getattr(type(module), PARA_BASE, None) is None:
        module.__class__ = _para_class(type(module))


def attach_stack(state, module: nn.Module, stack: str, layers: tuple[str, ...]) -> None:
    if not has_hook(module, context.stack_pre_hook):
        reader = context.ArgReader(module)
        module.register_forward_pre_hook(
            functools.partial(context.stack_pre_hook, state, stack, reader), with_kwargs=True
        )
        module.register_forward_hook(
            functools.partial(context.stack_post_hook, state, stack, layers), with_kwargs=True, always_call=True
        )


def attach_root(state, module: nn.Module) -> None:
    if not has_hook(module, context.root_pre_hook):
        reader = context.ArgReader(module)
        module.register_forward_pre_hook(functools.partial(context.root_pre_hook, state, reader), with_kwargs=True)
        module.register_forward_hook(
            functools.partial(context.root_post_hook, state), with_kwargs=True, always_call=True
        )


def detach_hooks(module: nn.Module) -> None:
    """Remove every red_kernels hook (and PARA layer class) from ``module`` (not from its children)."""
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for hook_id, hook in list(hooks.items()):
            if isinstance(hook, functools.partial) and hook.func in HOOK_FUNCS:
                del hooks[hook_id]
                for extra in (
                    "_forward_hooks_with_kwargs",
                    "_forward_hooks_always_called",
                    "_forward_pre_hooks_with_kwargs",
                ):
                    getattr(module, extra, {}).pop(hook_id, None)
    # Only a class red_kernels made is given back; under a wrapper's subclass of it the class stays
    # (unpatch_model refuses such a model first, see red_kernels.patch.core.check_own_classes).
    base = vars(type(module)).get(PARA_BASE)
    if base is not None:
        module.__class__ = base
    module.__dict__.pop(LAYER_ATTR, None)


def subclassed_again(module: nn.Module, marker: str) -> type | None:
    """The red_kernels-made class (one whose body holds ``marker``: :data:`PARA_BASE` or the root
    class's) that ``module``'s class derives from when someone else subclassed it again after the
    patch (FSDP2's ``fully_shard`` replaces ``module.__class__`` with a subclass of it); None when the
    class is red_kernels' own or derives from none."""
    cls = type(module)
    if marker in vars(cls):
        return None
    return next((c for c in cls.__mro__ if marker in vars(c)), None)
