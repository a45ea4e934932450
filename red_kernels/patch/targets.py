"""Per-architecture default targets of RED, RED+ and IA3, module-name patterns, and detection.

A target is a module whose output RED edits: a ``torch.nn.Linear`` or a Hugging Face ``Conv1D``
(GPT-2's transposed linear). IA3 scales the output of its targets, except its feed-forward ones
(``Target.scales_input``, the FFN's output projection), whose input it scales. Patterns are matched against
the names of ``model.named_modules()``.

User patterns (``targets=`` / ``trainable=``): a glob (``fnmatch``, where ``*`` also crosses dots)
matched against the full name or any dotted suffix of it, so ``"mlp.down_proj"`` matches
``model.layers.3.mlp.down_proj``; or ``"re:<regex>"``, a regular expression that must match the full
name. The default tables below use regular expressions, so that RoBERTa's FFN ``layer.N.output.dense``
does not also match the attention's ``layer.N.attention.output.dense``.

Detection is structural: an architecture is recognised when every required target pattern of the
method matches a module, so layouts shared by other models work (Mistral, Qwen2, Gemma use LLaMA's
names; BERT, XLM-R, ELECTRA use RoBERTa's; mT5 uses T5's). ``config.model_type`` decides the order in
which the tables are tried, and picks IA3's targets where PEFT's table differs between model types
that share a layout (:class:`IA3Variant`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

METHODS = ("red", "red+", "para", "ia3")
_ANY_PREFIX = r"(?:.*\.)?"


@dataclass(frozen=True)
class Target:
    """A regular expression (full match) naming target modules; ``required`` ones must exist.

    ``scales_input``: an IA3 feed-forward target, whose input (not output) is scaled."""

    regex: str
    required: bool = True
    scales_input: bool = False

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.regex, name) is not None


@dataclass(frozen=True)
class BiasSwitch:
    """A config flag that gives a group of Linear layers a bias (e.g. LLaMA's ``mlp_bias``).

    After :func:`red_kernels.merge_model` adds a bias to one layer of the group, every layer of the
    group gets one (zeros where there was none) and the flag is set, so the merged model loads with
    ``from_pretrained`` of transformers alone."""

    config_attr: str
    regex: str


@dataclass(frozen=True)
class ParaSlot:
    """Where one PARA vector scales: a module (regex relative to the layer) and the part of its
    output, ``(i, n)`` = the i-th of n equal parts (GPT-2's fused q|k|v), or None for all of it."""

    vector: str  # "q", "v" or "u"
    module: str
    part: tuple[int, int] | None = None


@dataclass(frozen=True)
class ParaSpec:
    """PARA's layout of an architecture: its layers (one generator each), the module that owns
    them (``stack_up`` name components above a layer: it receives ``attention_mask`` and the
    cache), the scaled outputs, and how the prompt's last token is found.

    ``labels_are_tokens``: the model's ``labels`` are next-token targets aligned with the input (causal
    LMs), so their leading -100 run is the prompt. ``decoder_pools_encoder``: decoder layers pool the
    encoder output's last real token (T5), so the decoder's vectors depend on the prompt."""

    layer: str
    stack_up: int
    slots: tuple[ParaSlot, ...]
    labels_are_tokens: bool = False
    decoder_pools_encoder: bool = False


@dataclass(frozen=True)
class IA3Variant:
    """IA3 targets of the model types ``model_types``, where PEFT's table differs from the layout's
    default (Qwen2 and Gemma scale ``q_proj`` where LLaMA scales ``k_proj``)."""

    model_types: tuple[str, ...]
    targets: tuple[Target, ...]


@dataclass(frozen=True)
class ArchSpec:
    """``ia3`` (and ``ia3_variants`` per model type) follow PEFT's default IA3 targets
    (``target_modules`` and ``feedforward_modules`` of ``peft.utils.constants``) as PEFT resolves them
    on the module names; the targets whose names end with a feed-forward name are ``scales_input``."""

    name: str
    model_types: tuple[str, ...]
    red: tuple[Target, ...]
    red_plus: tuple[Target, ...]
    bias_switches: tuple[BiasSwitch, ...] = field(default=())
    para: ParaSpec | None = None
    ia3: tuple[Target, ...] = field(default=())
    ia3_variants: tuple[IA3Variant, ...] = field(default=())

    def targets(self, method: str, model_type: str | None = None) -> tuple[Target, ...]:
        """The default targets of ``method``; IA3's are those of ``model_type``'s variant if it has one."""
        if method == "para":
            return (Target(self.para.layer),) if self.para else ()
        if method == "ia3":
            return next((v.targets for v in self.ia3_variants if model_type in v.model_types), self.ia3)
        return self.red if method == "red" else self.red + self.red_plus

    def is_ia3_input(self, name: str, model_type: str | None = None) -> bool:
        """Is ``name`` an IA3 feed-forward target (input scaled) of ``model_type``'s table?"""
        return any(t.scales_input and t.matches(name) for t in self.targets("ia3", model_type))

    def describe(self) -> str:
        red = ", ".join(_short(t.regex) for t in self.red)
        plus = ", ".join(_short(t.regex) for t in self.red_plus)
        return f"{self.name} (model_type {', '.join(self.model_types)}): red = {red}; red+ adds {plus}"


def _short(regex: str) -> str:
    """A readable form of a table regex for error messages."""
    return regex.removeprefix(_ANY_PREFIX).replace(r"\d+", "N").replace("\\.", ".")


def _t(suffix: str, required: bool = True) -> Target:
    return Target(_ANY_PREFIX + suffix, required)


def _ff(suffix: str) -> Target:
    """An IA3 feed-forward target: its input is scaled."""
    return Target(_ANY_PREFIX + suffix, scales_input=True)


_LLAMA_FF = _ff(r"layers\.\d+\.mlp\.down_proj")
_T5_KV = _t(r"block\.\d+\.layer\.\d+\.(?:SelfAttention|EncDecAttention)\.[kv]")


ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"),
        red=(_t(r"layers\.\d+\.mlp\.down_proj"),),
        red_plus=tuple(_t(rf"layers\.\d+\.self_attn\.{p}_proj") for p in "qkvo"),
        bias_switches=(
            BiasSwitch("mlp_bias", _ANY_PREFIX + r"layers\.\d+\.mlp\.(?:gate|up|down)_proj"),
            BiasSwitch("attention_bias", _ANY_PREFIX + r"layers\.\d+\.self_attn\.[qkvo]_proj"),
        ),
        para=ParaSpec(
            layer=_ANY_PREFIX + r"layers\.\d+",
            stack_up=2,
            slots=(
                ParaSlot("q", r"self_attn\.q_proj"),
                ParaSlot("v", r"self_attn\.v_proj"),  # [n_kv_heads * head_dim] under grouped-query attention
                ParaSlot("u", r"mlp\.up_proj"),
            ),
            labels_are_tokens=True,
        ),
        # PEFT's LLaMA / Mistral table; PEFT scales q_proj instead of k_proj for Qwen2/3 and Gemma 1/2.
        ia3=(_t(r"layers\.\d+\.self_attn\.[kv]_proj"), _LLAMA_FF),
        ia3_variants=(
            IA3Variant(("qwen2", "qwen3", "gemma", "gemma2"), (_t(r"layers\.\d+\.self_attn\.[qv]_proj"), _LLAMA_FF)),
        ),
    ),
    ArchSpec(
        name="roberta",
        model_types=("roberta", "bert", "xlm-roberta", "camembert", "electra"),
        # The FFN output projection, before dropout, the residual add and LayerNorm.
        red=(_t(r"layer\.\d+\.output\.dense"),),
        red_plus=(
            *(_t(rf"layer\.\d+\.attention\.self\.{p}") for p in ("query", "key", "value")),
            _t(r"layer\.\d+\.attention\.output\.dense"),
        ),
        para=ParaSpec(
            layer=_ANY_PREFIX + r"encoder\.layer\.\d+",
            stack_up=3,  # roberta.encoder.layer.N -> roberta (RobertaModel gets the [B, L] attention_mask)
            slots=(
                ParaSlot("q", r"attention\.self\.query"),
                ParaSlot("v", r"attention\.self\.value"),
                ParaSlot("u", r"intermediate\.dense"),
            ),
        ),
        # PEFT's "output.dense" (a feed-forward name) also ends the attention's output projection:
        # PEFT scales the input of both.
        ia3=(
            _t(r"layer\.\d+\.attention\.self\.(?:key|value)"),
            _ff(r"layer\.\d+\.(?:attention\.)?output\.dense"),
        ),
    ),
    ArchSpec(
        name="t5",
        model_types=("t5", "mt5", "umt5"),
        red=(_t(r"block\.\d+\.layer\.\d+\.DenseReluDense\.wo"),),
        red_plus=(
            *(_t(rf"block\.\d+\.layer\.\d+\.SelfAttention\.{p}") for p in "qkvo"),
            # Cross-attention exists only in the decoder (absent from T5EncoderModel).
            *(_t(rf"block\.\d+\.layer\.\d+\.EncDecAttention\.{p}", required=False) for p in "qkvo"),
        ),
        para=ParaSpec(
            layer=_ANY_PREFIX + r"block\.\d+",
            stack_up=2,
            slots=(
                ParaSlot("q", r"layer\.0\.SelfAttention\.q"),
                ParaSlot("v", r"layer\.0\.SelfAttention\.v"),
                # wi in T5's FFN, wi_1 (the linear branch) in the gated variant of T5 v1.1 / mT5
                ParaSlot("u", r"layer\.\d+\.DenseReluDense\.(?:wi|wi_1)"),
            ),
            decoder_pools_encoder=True,
        ),
        ia3=(_T5_KV, _ff(r"block\.\d+\.layer\.\d+\.DenseReluDense\.wo")),
        # PEFT's mT5 table: the gated FFN's linear branch wi_1, scaled on its output (no feed-forward
        # target). Not required: a relu mT5 has no wi_1, and PEFT then scales k and v only.
        ia3_variants=(
            IA3Variant(("mt5",), (_T5_KV, _t(r"block\.\d+\.layer\.\d+\.DenseReluDense\.wi_1", required=False))),
        ),
    ),
    ArchSpec(
        name="gpt2",
        model_types=("gpt2",),
        red=(_t(r"h\.\d+\.mlp\.c_proj"),),
        # c_attn is q|k|v fused: one vector of 3 * d edits all three.
        red_plus=(_t(r"h\.\d+\.attn\.c_attn"), _t(r"h\.\d+\.attn\.c_proj")),
        para=ParaSpec(
            layer=_ANY_PREFIX + r"h\.\d+",
            stack_up=2,
            slots=(
                ParaSlot("q", r"attn\.c_attn", (0, 3)),  # the query third of the fused q|k|v
                ParaSlot("v", r"attn\.c_attn", (2, 3)),
                ParaSlot("u", r"mlp\.c_fc"),
            ),
            labels_are_tokens=True,
        ),
        ia3=(_t(r"h\.\d+\.attn\.c_attn"), _ff(r"h\.\d+\.mlp\.c_proj")),
    ),
)

ARCH_BY_NAME = {a.name: a for a in ARCHITECTURES}


def supported_text() -> str:
    return "\n".join("  - " + a.describe() for a in ARCHITECTURES)


def pattern_matches(pattern: str, name: str) -> bool:
    """User pattern semantics (see the module docstring)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def match_names(patterns: Iterable[str], names: Sequence[str]) -> dict[str, list[str]]:
    """For each pattern, the names it matches (in ``names`` order)."""
    return {p: [n for n in names if pattern_matches(p, n)] for p in patterns}


def table_match(spec: ArchSpec, method: str, names: Sequence[str], model_type: str | None = None) -> list[str] | None:
    """Target names of ``spec`` for ``method`` (and ``model_type``) among ``names``, or None if a
    required target is absent."""
    chosen: list[str] = []
    for target in spec.targets(method, model_type):
        hits = [n for n in names if target.matches(n)]
        if target.required and not hits:
            return None
        chosen.extend(hits)
    order = {n: i for i, n in enumerate(names)}
    return sorted(set(chosen), key=order.__getitem__)


def detect(model: nn.Module, method: str, names: Sequence[str]) -> tuple[ArchSpec, list[str]]:
    """The architecture table that fits ``model`` and its target names for ``method``.

    Raises ValueError listing the supported layouts and how to pass ``targets=`` when none fits."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    ordered = sorted(ARCHITECTURES, key=lambda a: model_type not in a.model_types)
    for spec in ordered:
        chosen = table_match(spec, method, names, model_type)
        if chosen:
            return spec, chosen
    raise ValueError(
        f"red_kernels.patch_model: no default {method!r} targets for {type(model).__name__} "
        f"(model_type {model_type!r}): its module names match none of the supported layouts:\n"
        f"{supported_text()}\n"
        "Pass the modules to edit explicitly, e.g. targets=['mlp.down_proj'] (a glob matched against "
        "module names and their dotted suffixes) or targets=['re:.*layers\\.\\d+\\.mlp\\.down_proj'] "
        "(a full-match regular expression); each target must be a Linear or Conv1D."
    )
