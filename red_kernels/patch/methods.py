"""The methods: what an adapter of each method touches on a model, and the modules it owns there.

Every method is one :class:`AdapterConfig` plus the modules it places in the model's banks:

- ``red`` / ``red+``: a :class:`~red_kernels.nn.REDEdit` (``scale``, ``bias``) per target module, in
  the target's bank ``<target>.red_edit``; the target's output ``h`` becomes ``h * scale + bias``.
- ``ia3``: a scale-only :class:`~red_kernels.nn.REDEdit` per target module (PEFT's IA3 vector):
  in the target's bank ``<target>.red_edit`` it scales the target's output; for the targets listed
  in ``inputs`` (IA3's feed-forward targets) it sits in ``<target>.red_edit_in`` and scales the
  target's input ``x [..., in]`` instead: the module computes ``f(x * scale)``. The same editor,
  kernels and tenant gathering as RED, on the other side of the module.
- ``para``: a :class:`~red_kernels.nn.PARAVectorGenerator` per layer, in the layer's bank
  ``<layer>.para_gen``; it pools the layer input's last prompt token into ``l_q, l_v, l_u``
  (``[B, n_q + n_v + n_u]``), which scale the outputs of the layer's query, value and FFN-up
  projections per sequence (``slots``: vector -> module name and part of its output).

A bank (:class:`AdapterBank`) maps adapter names to that adapter's module at one place, so each
adapter's vectors are its own parameters: an optimizer given one adapter never touches another.
Adapter files keep the names without the adapter: ``<target>.red_edit.scale``,
``<target>.red_edit_in.scale``, ``<layer>.para_gen.w_down`` (:func:`file_key`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from red_kernels.nn.para import PARAVectorGenerator
from red_kernels.nn.red import REDEdit
from red_kernels.ops._activations import activation_code
from red_kernels.patch.targets import ArchSpec

EDITOR_ATTR = "red_edit"  # bank of REDEdit on a target module's output
INPUT_EDITOR_ATTR = "red_edit_in"  # bank of REDEdit on a target module's input (IA3's feed-forward targets)
GENERATOR_ATTR = "para_gen"  # bank of PARAVectorGenerator on a layer
BANK_ATTRS = (EDITOR_ATTR, INPUT_EDITOR_ATTR, GENERATOR_ATTR)
_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def check_adapter_name(name: object, fn: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"red_kernels.{fn}: adapter name must be a non-empty string of letters, digits, '_' and '-', got {name!r}"
        )
    return name


@dataclass
class AdapterConfig:
    """One adapter: its method and options, and the module names it touches."""

    method: str  # "red", "red+", "ia3" or "para"
    targets: list[str]  # red, ia3: edited modules; para: layers
    dims: dict[str, int]  # red, ia3: target -> width of the edited side; para: layer -> d_model
    dtype: torch.dtype = torch.float32
    scale: bool = True  # red, ia3
    bias: bool = True  # red (ia3: False)
    inputs: list[str] = field(default_factory=list)  # ia3: the targets whose input (not output) is scaled
    rank: int = 12  # para
    activation: str = "gelu"  # para
    up_bias: bool = True  # para: a trainable b_up (else fixed ones)
    slots: dict[str, dict[str, str]] = field(default_factory=dict)  # para: layer -> {"q"|"v"|"u": module}
    out_sizes: dict[str, list[int]] = field(default_factory=dict)  # para: layer -> [n_q, n_v, n_u]
    target_patterns: list[str] | None = None

    @property
    def bank_attr(self) -> str:
        """The bank of the method's modules (of output editors, for a method that edits both sides)."""
        return GENERATOR_ATTR if self.method == "para" else EDITOR_ATTR

    def bank_of(self, place: str) -> str:
        """The bank attribute holding this adapter's module at ``place``."""
        return INPUT_EDITOR_ATTR if place in self.inputs else self.bank_attr

    def build(self, place: str, device: torch.device, backend: str | None) -> nn.Module:
        """This adapter's fresh module at ``place`` (identity at step 0)."""
        if self.method == "para":
            return PARAVectorGenerator(
                self.dims[place],
                self.out_sizes[place],
                rank=self.rank,
                activation=self.activation,
                up_bias=self.up_bias,
                backend=backend,
                device=device,
                dtype=self.dtype,
            )
        return REDEdit(self.dims[place], self.scale, self.bias, dtype=self.dtype, device=device, backend=backend)

    def param_names(self, place: str) -> list[str]:
        if self.method == "para":
            return ["w_down", "w_up", "b_up"] if self.up_bias else ["w_down", "w_up"]
        return [p for p, on in (("scale", self.scale), ("bias", self.bias)) if on]

    def file_keys(self) -> list[str]:
        return [file_key(self, place, p) for place in self.targets for p in self.param_names(place)]


def file_key(config: AdapterConfig, place: str, param: str) -> str:
    bank = config.bank_of(place)
    return f"{place}.{bank}.{param}" if place else f"{bank}.{param}"


class AdapterBank(nn.ModuleDict):
    """Adapter name -> that adapter's module at one place of the model.

    Casting the model (``model.half()``, ``.to(torch.bfloat16)``) moves the adapters with it but
    keeps their dtype: vectors and generators stay fp32 (the kernels compute in fp32 and return
    the activations' dtype), so training and saving see what the adapter was made with."""

    def _apply(self, fn, recurse=True):
        # Keep the values, not only the dtype: casting fp32 -> bf16 -> fp32 would round them.
        before = {n: t.data for n, t in (*self.named_parameters(), *self.named_buffers())}
        super()._apply(fn, recurse)
        for n, t in (*self.named_parameters(), *self.named_buffers()):
            if t.dtype != before[n].dtype:
                t.data = before[n].to(device=t.device)
        return self


# --- planning: which modules an adapter touches ---------------------------------------------------


def output_dim(module: nn.Module, name: str) -> int:
    """Width of a target's output, or ValueError when the module is not a supported target."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_conv1d(module):
        return module.nf
    raise ValueError(
        f"red_kernels.patch_model: target {name!r} is a {type(module).__name__}; targets must be "
        "torch.nn.Linear or transformers' Conv1D (the output width of other modules is not known)"
    )


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2): a linear layer storing its weight as [in, out]."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == module.nf
    )


def input_dim(module: nn.Module, name: str = "") -> int:
    """Width of a target's input (a Conv1D's weight is [in, out]), or ValueError when the module is
    not a supported target."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if is_conv1d(module):
        return module.weight.shape[0]
    raise ValueError(
        f"red_kernels.patch_model: target {name!r} is a {type(module).__name__}; input edits need a "
        "torch.nn.Linear or transformers' Conv1D (the input width of other modules is not known)"
    )


def edit_dim(config: AdapterConfig, module: nn.Module, name: str) -> int:
    """Width of the side of ``module`` that ``config`` edits (its input for ``config.inputs``)."""
    return input_dim(module, name) if name in config.inputs else output_dim(module, name)


def para_layout(spec: ArchSpec, model: nn.Module, layers: list[str]) -> tuple[dict, dict, dict]:
    """PARA's slots, out_sizes and d_model per layer, found by the architecture's table."""
    if spec.para is None:
        raise ValueError(f"red_kernels.patch_model: method 'para' has no table for architecture {spec.name!r}")
    modules = dict(model.named_modules())
    slots, sizes, dims = {}, {}, {}
    for layer in layers:
        prefix = f"{layer}." if layer else ""
        names = [n[len(prefix) :] for n in modules if n.startswith(prefix)]
        slots[layer], sizes[layer] = {}, []
        for slot in spec.para.slots:
            hits = [n for n in names if re.fullmatch(slot.module, n)]
            if len(hits) != 1:
                raise ValueError(
                    f"red_kernels.patch_model: layer {layer!r} has {len(hits)} modules matching PARA's {slot.vector!r} "
                    f"projection {slot.module!r} (expected one)"
                )
            name = prefix + hits[0]
            width = output_dim(modules[name], name)
            if slot.part is not None:
                if width % slot.part[1]:
                    raise ValueError(
                        f"red_kernels.patch_model: {name!r} width {width} is not {slot.part[1]} equal parts"
                    )
                width //= slot.part[1]
            slots[layer][slot.vector] = name
            sizes[layer].append(width)
        q = modules[slots[layer]["q"]]
        dims[layer] = input_dim(q)
    return slots, sizes, dims


def slot_pieces(
    spec: ArchSpec, config: AdapterConfig, layer: str, module: str, width: int
) -> list[tuple[int, int, int]]:
    """How ``module``'s vector is cut from the layer's ``[B, n_q + n_v + n_u]``: ``(out_start, length,
    vec_start)`` per scaled part; the rest of the output is left alone (scaled by ones)."""
    offsets, start = {}, 0
    for slot, n in zip(spec.para.slots, config.out_sizes[layer]):
        offsets[slot.vector] = (start, n)
        start += n
    pieces = []
    for slot in spec.para.slots:
        if config.slots[layer][slot.vector] != module:
            continue
        vec_start, n = offsets[slot.vector]
        out_start = 0 if slot.part is None else slot.part[0] * (width // slot.part[1])
        pieces.append((out_start, n, vec_start))
    return sorted(pieces)


def check_para_options(rank: object, activation: object, up_bias: object) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"red_kernels.patch_model: argument 'rank' must be a positive int, got {rank!r}")
    if not isinstance(activation, str):
        raise ValueError(f"red_kernels.patch_model: argument 'activation' must be a string, got {activation!r}")
    activation_code(activation, "patch_model")
    if not isinstance(up_bias, bool):
        raise ValueError(f"red_kernels.patch_model: argument 'up_bias' must be True or False, got {up_bias!r}")


__all__ = ["AdapterBank", "AdapterConfig", "EDITOR_ATTR", "GENERATOR_ATTR", "INPUT_EDITOR_ATTR"]
