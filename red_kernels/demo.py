"""``python -m red_kernels demo``: RED and PARA fine-tuning of a small LLaMA, end to end, on a CPU,
without any download.

Stages (each with a progress bar; the numbers go to ``<out>/summary.json``):

1. **A base that knows something.** Random weights have nothing to adapt, so a small LLaMA (GQA,
   configuration embedded below) is first pre-trained (full fine-tune) on a generated language:
   an instruction and a string of letters, then ``->`` and the answer. Instructions: ``copy``,
   ``rev`` (reversed), ``next`` / ``prev`` (every letter shifted by one, cyclic). The result is saved
   with ``save_pretrained`` in ``<out>/base/`` and reused by later runs with the same settings.
   ``--model PATH`` loads a local Hugging Face checkpoint instead (the language's tokens are the ids
   0..25 of its vocabulary, so no tokenizer is needed; a model never trained on them knows nothing).
2. **A task the base was not trained on.** ``copy`` and ``rev`` swap meanings: ``copy b a d ->``
   now answers ``d a b`` and ``rev b a d ->`` answers ``b a d``. The right edit depends on the
   prompt's instruction: RED's vectors are the same for every prompt (it can learn one of the two
   behaviours), PARA generates its vectors from the prompt's last token, which has read the
   instruction (it can learn both). Each method (``--method``) trains its adapter on the frozen base
   (labels -100 over the prompt); eval loss and exact-match accuracy of greedy answers on held-out
   prompts are measured before and after, per instruction too. Greedy exact match is computed from
   one teacher-forced forward: a greedy answer equals the target exactly when the argmax at every
   answer position (the end token included) is the target token.
3. **Speed.** A few training steps of each method with the default backend selection and with
   ``backend="reference"`` (eager PyTorch), timed side by side in rounds on copies of the base.
4. **Many adapters on one backbone.** The saved adapters are loaded into one model with
   :func:`red_kernels.load_adapter`, and ``generate`` answers the same prompts as the base, RED and
   PARA in one batch under :func:`red_kernels.tenants`.

Outputs in ``--out``: ``summary.json``, ``loss_curves.png`` (pre-training and every method's
training loss; needs matplotlib), ``adapters/<method>/`` (:func:`red_kernels.save_adapter`; RED+ is
saved as ``red_plus``, a valid adapter name), ``base/``.

Runs on one thread by default for the built-in model: its matrices are 128 wide, where thread
wake-ups cost more than they save, and on a shared 2-core machine two threads ran a training step 20x
slower than one. Deterministic for a given ``--seed`` and thread count.
"""

from __future__ import annotations

import copy
import datetime
import importlib
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# --- the generated language ------------------------------------------------------------------------

PAD, BOS, EOS, SEP = 0, 1, 2, 3
INSTRUCTIONS = {"copy": 4, "rev": 5, "next": 6, "prev": 7}
LETTERS = "abcdefghijklmnop"
FIRST_LETTER = 10  # letter i is token FIRST_LETTER + i
MIN_VOCAB = FIRST_LETTER + len(LETTERS)
VOCAB = 32  # the built-in model's vocabulary: the language's 26 tokens and spares
LANGUAGE_VERSION = 1  # bump when the language changes, so a cached base is not reused


def _shift(xs: Sequence[int], k: int) -> list[int]:
    return [(x + k) % len(LETTERS) for x in xs]


Rule = Callable[[Sequence[int]], list[int]]

PRETRAIN_RULES: dict[str, Rule] = {
    "copy": lambda xs: list(xs),
    "rev": lambda xs: list(xs)[::-1],
    "next": lambda xs: _shift(xs, 1),
    "prev": lambda xs: _shift(xs, -1),
}
# The new task: copy and rev swapped.
TASK_RULES: dict[str, Rule] = {
    "copy": lambda xs: list(xs)[::-1],
    "rev": lambda xs: list(xs),
}
LANGUAGE_DESCRIPTION = (
    "generated language: an instruction (copy, rev, next, prev) and {lo}-{hi} letters a-p, '->', the answer;\n"
    "  e.g. 'copy b a d ->' answers 'b a d', 'rev b a d ->' 'd a b', 'next b a d ->' 'c b e' (cyclic)"
)
TASK_DESCRIPTION = (
    "new task (not in pre-training): copy and rev swap meanings, so 'copy b a d ->' answers 'd a b'\n"
    "  and 'rev b a d ->' answers 'b a d'. The right edit depends on the prompt's instruction: RED's\n"
    "  vectors are the same for every prompt, PARA generates them from the prompt."
)

Example = tuple[str, tuple[int, ...]]  # (instruction, letters as 0..15)


def prompt_tokens(ex: Example) -> list[int]:
    instr, xs = ex
    return [BOS, INSTRUCTIONS[instr], *(FIRST_LETTER + x for x in xs), SEP]


def answer_tokens(ex: Example, rules: dict[str, Rule]) -> list[int]:
    instr, xs = ex
    return [*(FIRST_LETTER + y for y in rules[instr](xs)), EOS]


def render(tokens: Iterable[int]) -> str:
    """Tokens as text: letters, instructions, '->'; stops at the end token."""
    names = {SEP: "->", **{v: k for k, v in INSTRUCTIONS.items()}}
    out = []
    for t in tokens:
        if t == EOS:
            break
        if t in (PAD, BOS):
            continue
        if FIRST_LETTER <= t < FIRST_LETTER + len(LETTERS):
            out.append(LETTERS[t - FIRST_LETTER])
        else:
            out.append(names.get(t, f"<{t}>"))
    return " ".join(out)


class Sampler:
    """Random examples of the given instructions, never one of ``exclude`` (the held-out set)."""

    def __init__(self, seed: int, instructions: Sequence[str], lengths: tuple[int, int], exclude=frozenset()):
        self.rng = random.Random(seed)
        self.instructions = list(instructions)
        self.lengths = lengths
        self.exclude = exclude

    def one(self) -> Example:
        while True:
            n = self.rng.randint(*self.lengths)
            ex = (self.rng.choice(self.instructions), tuple(self.rng.randrange(len(LETTERS)) for _ in range(n)))
            if ex not in self.exclude:
                return ex

    def many(self, n: int, distinct: bool = False) -> list[Example]:
        out: list[Example] = []
        seen: set[Example] = set()
        while len(out) < n:
            ex = self.one()
            if distinct and ex in seen:
                continue
            seen.add(ex)
            out.append(ex)
        return out


def collate(examples: Sequence[Example], rules: dict[str, Rule]) -> dict[str, torch.Tensor]:
    """Right-padded prompt + answer; labels -100 over the prompt and the padding."""
    pairs = [(prompt_tokens(ex), answer_tokens(ex, rules)) for ex in examples]
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), PAD, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (p, a) in enumerate(pairs):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p) : n] = torch.tensor(a)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- sizes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """Model and schedule sizes. ``default`` is the demo; ``tiny`` (hidden flag ``--tiny``) is
    for the test suite."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    batch: int
    eval_size: int
    lengths: tuple[int, int]
    timing_rounds: int
    timing_steps: int
    generate_prompts: int


PRESETS = {
    "default": Preset(
        hidden=128,
        layers=4,
        heads=4,
        kv_heads=2,
        intermediate=256,
        pretrain_steps=800,
        pretrain_batch=64,
        pretrain_lr=4e-3,
        batch=32,
        eval_size=512,
        lengths=(3, 8),
        timing_rounds=5,
        timing_steps=6,
        generate_prompts=4,
    ),
    "tiny": Preset(
        hidden=32,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=64,
        pretrain_steps=20,
        pretrain_batch=16,
        pretrain_lr=4e-3,
        batch=8,
        eval_size=32,
        lengths=(3, 5),
        timing_rounds=1,
        timing_steps=2,
        generate_prompts=2,
    ),
}
DEFAULT_STEPS = 600
METHODS = ("red", "red+", "para")
# Learning rates per method (AdamW, linear warm-up and decay). RED's two vectors per module need a
# large one, as in the RED paper.
LEARNING_RATES = {"red": 1e-1, "red+": 5e-2, "para": 2e-2}
# Adapter names (and directories under adapters/): letters, digits, '_' and '-' only.
ADAPTER_NAMES = {"red": "red", "red+": "red_plus", "para": "para"}

# Ops and the modules that list their backends (IMPLEMENTED).
OPS = {
    "red_edit": "red_kernels.ops.red_edit",
    "seq_scale": "red_kernels.ops.seq_scale",
    "gathered_red_edit": "red_kernels.ops.gathered_red_edit",
    "para_vector_gen": "red_kernels.ops.para_vector_gen",
    "gathered_para_vector_gen": "red_kernels.ops.para_vector_gen",  # its backends live there
}


def default_backends(device: str = "cpu") -> dict[str, str]:
    """The backend each op picks by automatic selection on ``device`` here (``RED_KERNELS_BACKEND``
    and :func:`red_kernels.use_backend` can override it)."""
    from red_kernels._backend import AUTO, resolve

    dev = torch.device(device)
    return {op: resolve(AUTO, dev, op, importlib.import_module(mod).IMPLEMENTED) for op, mod in OPS.items()}


# --- progress --------------------------------------------------------------------------------------


class _Fallback:
    """What the demo uses of tqdm, when tqdm is not installed: a line every ~10%."""

    def __init__(self, iterable=None, total=None, desc="", **_):
        self.iterable, self.total, self.desc, self.n, self.postfix = iterable, total, desc, 0, ""
        self.every = max(1, (total or 1) // 10)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            print(f"  {self.desc}: {self.n}/{self.total} {self.postfix}", file=sys.stderr, flush=True)

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        pass


def progress(iterable=None, total=None, desc=""):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Fallback(iterable, total=total, desc=desc)
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def log(msg: str = "") -> None:
    print(msg, flush=True)


# --- training and evaluation ---------------------------------------------------------------------


def _schedule(steps: int, warmup: int, floor: float = 0.0) -> Callable[[int], float]:
    return lambda s: min(1.0, (s + 1) / warmup) * max(floor, 1.0 - s / steps)


def train(
    model,
    params: list[torch.nn.Parameter],
    lr: float,
    steps: int,
    next_batch: Callable[[], dict[str, torch.Tensor]],
    desc: str,
    *,
    warmup: int = 20,
    floor: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    clip: float | None = None,
) -> list[float]:
    """AdamW on ``params`` with linear warm-up and linear decay; returns the loss of every step."""
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, max(1, min(warmup, steps // 10 + 1)), floor))
    model.train()
    losses = []
    bar = progress(range(steps), total=steps, desc=desc)
    for _ in bar:
        loss = model(**next_batch()).loss
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix_str(f"loss {losses[-1]:.3f}", refresh=False)
    bar.close()
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model, examples: Sequence[Example], rules: dict[str, Rule], chunk: int = 256) -> dict:
    """Eval loss (mean cross-entropy over answer tokens) and exact-match accuracy of the greedy
    answers, overall and per instruction (teacher-forced: see the module docstring)."""
    model.eval()
    total_loss, tokens = 0.0, 0
    correct: dict[str, list[int]] = {}
    for i in range(0, len(examples), chunk):
        part = examples[i : i + chunk]
        batch = collate(part, rules)
        logits = model(**batch).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        total_loss += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
        ).item()
        tokens += int((target != -100).sum())
        ok = ((logits.argmax(-1) == target) | (target == -100)).all(1)
        for ex, good in zip(part, ok.tolist()):
            correct.setdefault(ex[0], []).append(int(good))
    hits = sum(sum(v) for v in correct.values())
    return {
        "loss": total_loss / tokens,
        "accuracy": hits / len(examples),
        "accuracy_by_instruction": {k: sum(v) / len(v) for k, v in sorted(correct.items())},
    }


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def time_backends(base, method: str, batches: list[dict], rounds: int, steps: int, seed: int) -> dict[str, float]:
    """Training steps per second of ``method`` with the default backend selection and with the
    reference backend, each on its own copy of ``base``, timed alternately in ``rounds`` (median
    per-step time of the rounds), so that both see the same machine load."""
    import red_kernels as rk

    runs = {}
    for label, backend in (("default", None), ("reference", "reference")):
        torch.manual_seed(seed)
        model = rk.patch_model(copy.deepcopy(base), method, backend=backend)
        model.train()
        runs[label] = (model, torch.optim.AdamW(_trainable(model), lr=1e-3))

    def step(label: str, batch: dict) -> None:
        model, opt = runs[label]
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for label in runs:  # warm-up: first calls load kernels and allocate
        for batch in batches[:2]:
            step(label, batch)
    per_step: dict[str, list[float]] = {label: [] for label in runs}
    bar = progress(total=rounds * len(runs), desc=f"timing {method}")
    for _ in range(rounds):
        for label in runs:
            t0 = time.perf_counter()
            for i in range(steps):
                step(label, batches[i % len(batches)])
            per_step[label].append((time.perf_counter() - t0) / steps)
            bar.update()
    bar.close()
    return {label: 1.0 / statistics.median(times) for label, times in per_step.items()}


# --- models ------------------------------------------------------------------------------------------


def _quiet_transformers():
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def random_llama(size, vocab: int, seed: int, **config):
    """A ``LlamaForCausalLM`` with random weights (drawn after ``torch.manual_seed(seed)``): the
    widths of ``size`` (anything with ``hidden``, ``intermediate``, ``layers``, ``heads`` and
    ``kv_heads``: a :class:`Preset`, or the benchmarks' ``Llama``), ``vocab`` tokens, and
    ``config``'s further ``LlamaConfig`` fields. The demo and the model benchmarks both build theirs
    here."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        **config,
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(config)


def build_base(preset: Preset, seed: int):
    return random_llama(
        preset,
        VOCAB,
        seed,
        max_position_embeddings=64,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )


def pretrained_base(preset: Preset, seed: int, out: Path) -> tuple[object, dict]:
    """The pre-trained base: from ``out/base`` when it was made with the same settings, else
    trained now and saved there."""
    import transformers

    directory = out / "base"
    spec = {"language_version": LANGUAGE_VERSION, "seed": seed, "preset": asdict(preset)}
    meta_path = directory / "demo_base.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if meta.get("spec") == json.loads(json.dumps(spec)):
            model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
            log(f"base: reused the pre-trained model in {directory} (delete it to pre-train again)")
            return model, {**meta, "cached": True}
    model = build_base(preset, seed)
    held_out = Sampler(seed + 1, list(PRETRAIN_RULES), preset.lengths).many(preset.eval_size, distinct=True)
    sampler = Sampler(seed + 2, list(PRETRAIN_RULES), preset.lengths, exclude=frozenset(held_out))
    log(
        f"base: pre-training a {preset.layers}-layer LLaMA (hidden {preset.hidden}, {preset.heads} heads, "
        f"{preset.kv_heads} KV heads) on the language, {preset.pretrain_steps} steps of {preset.pretrain_batch}"
    )
    t0 = time.perf_counter()
    losses = train(
        model,
        list(model.parameters()),
        preset.pretrain_lr,
        preset.pretrain_steps,
        lambda: collate(sampler.many(preset.pretrain_batch), PRETRAIN_RULES),
        "pre-training",
        warmup=50,
        floor=0.05,
        betas=(0.9, 0.98),
        clip=1.0,
    )
    seconds = time.perf_counter() - t0
    result = evaluate(model, held_out, PRETRAIN_RULES)
    meta = {
        "spec": spec,
        "seconds": seconds,
        "steps": preset.pretrain_steps,
        "train_loss": [round(x, 5) for x in losses],
        "language_eval": result,
    }
    model.save_pretrained(directory)
    meta_path.write_text(json.dumps(meta) + "\n")
    return model, {**meta, "cached": False}


def load_base(path: str):
    import transformers

    if not os.path.isdir(path):
        raise SystemExit(f"--model {path}: not a directory (the demo loads local checkpoints only, no download)")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    model.eval()
    vocab = model.get_input_embeddings().num_embeddings
    if vocab < MIN_VOCAB:
        raise SystemExit(
            f"--model {path}: vocabulary of {vocab} tokens; the demo's language needs ids 0..{MIN_VOCAB - 1}"
        )
    log(f"base: {type(model).__name__} from {path} (the language uses its token ids 0..{MIN_VOCAB - 1})")
    return model


# --- machine, versions ---------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else None
    return {
        "cpu": cpu,
        "isa": isa,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def versions() -> dict:
    import transformers

    import red_kernels

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "red_kernels": red_kernels.__version__,
    }


# --- the demo ------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def _by_instruction(result: dict) -> str:
    return ", ".join(f"{k} {_pct(v).strip()}" for k, v in result["accuracy_by_instruction"].items())


def mixed_tenant_generate(base, methods: list[str], adapters: Path, prompts: list[Example]) -> list[dict]:
    """Load every saved adapter into one copy of the base and answer each prompt as the base and
    as every adapter, all rows in one ``generate`` batch."""
    import red_kernels as rk

    bank = copy.deepcopy(base)
    for method in methods:
        rk.load_adapter(bank, adapters / ADAPTER_NAMES[method], adapter_name=ADAPTER_NAMES[method])
    tenants = [None, *(ADAPTER_NAMES[m] for m in methods)]
    rows = [(ex, t) for ex in prompts for t in tenants]
    encoded = [prompt_tokens(ex) for ex, _ in rows]
    width = max(map(len, encoded))
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(encoded):  # left padding: every row's prompt ends at the last column
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    longest = max(len(ex[1]) for ex in prompts) + 1
    with torch.no_grad(), rk.tenants(bank, [t for _, t in rows]):
        out = bank.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=longest,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )
    result = []
    log(
        f"mixed-tenant generate: {len(prompts)} held-out prompts x {len(tenants)} tenants (base, "
        f"{', '.join(tenants[1:])}) = {len(rows)} rows in one batch on one backbone"
    )
    log(f"  {'tenant':<9} {'prompt':<26} {'answer':<17} new-task answer")
    for (ex, tenant), row in zip(rows, out[:, width:].tolist()):
        answer = render(row)
        expected = render(answer_tokens(ex, TASK_RULES))
        ok = answer == expected
        name = tenant or "base"
        log(f"  {name:<9} {render(prompt_tokens(ex)):<26} {answer:<17} {'ok' if ok else 'wrong (' + expected + ')'}")
        result.append(
            {"tenant": name, "prompt": render(prompt_tokens(ex)), "answer": answer, "expected": expected, "correct": ok}
        )
    return result


def plot(path: Path, pretrain: list[float] | None, curves: dict[str, list[float]]) -> bool:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False

    def smooth(xs: list[float], k: int) -> list[float]:
        out, acc = [], 0.0
        for i, x in enumerate(xs):
            acc += x - (xs[i - k] if i >= k else 0.0)
            out.append(acc / min(i + 1, k))
        return out

    panels = ([("pre-training (full fine-tune, generated language)", {"base": pretrain})] if pretrain else []) + [
        ("adapters on the frozen base (new task)", curves)
    ]
    fig = Figure(figsize=(6 * len(panels), 4.2), layout="constrained")
    for ax, (title, series) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for name, ys in series.items():
            k = max(1, len(ys) // 40)
            (line,) = ax.plot(ys, alpha=0.25, linewidth=0.8)
            ax.plot(smooth(ys, k), color=line.get_color(), label=f"{name} (mean of {k})" if k > 1 else name)
        ax.set(title=title, xlabel="step", ylabel="training loss", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=110)
    return True


def adapt(base, method: str, steps: int, preset: Preset, seed: int, task_eval: list[Example], out: Path) -> dict:
    """Train one adapter on the new task (every method sees the same batches), evaluate it before
    and after, save it, and time training steps of the default and the reference backends."""
    import red_kernels as rk

    name = ADAPTER_NAMES[method]
    train_data = Sampler(seed + 4, list(TASK_RULES), preset.lengths, exclude=frozenset(task_eval))
    torch.manual_seed(seed)
    model = rk.patch_model(copy.deepcopy(base), method, adapter_name=name)
    counts = rk.trainable_parameters(model)
    log(f"[{method}] {counts}")
    before = evaluate(model, task_eval, TASK_RULES)
    t0 = time.perf_counter()
    curve = train(
        model,
        _trainable(model),
        LEARNING_RATES[method],
        steps,
        lambda: collate(train_data.many(preset.batch), TASK_RULES),
        f"training {method}",
    )
    train_seconds = time.perf_counter() - t0
    after = evaluate(model, task_eval, TASK_RULES)
    rk.save_adapter(model, out / "adapters" / name)
    log(
        f"[{method}] eval loss {before['loss']:.3f} -> {after['loss']:.3f}, accuracy {_pct(before['accuracy'])} -> "
        f"{_pct(after['accuracy'])}  [{_by_instruction(after)}]  ({steps} steps, {train_seconds:.1f} s)"
    )
    del model
    timing_batches = [collate(train_data.many(preset.batch), TASK_RULES) for _ in range(4)]
    speed = time_backends(base, method, timing_batches, preset.timing_rounds, preset.timing_steps, seed)
    log(
        f"[{method}] training steps/s: default backends {speed['default']:.1f}, reference "
        f"{speed['reference']:.1f} ({speed['default'] / speed['reference']:.2f}x)"
    )
    log()
    return {
        "adapter": name,
        "adapter_dir": str(out / "adapters" / name),
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "eval_loss_before": before["loss"],
        "eval_loss_after": after["loss"],
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "accuracy_by_instruction_before": before["accuracy_by_instruction"],
        "accuracy_by_instruction_after": after["accuracy_by_instruction"],
        "steps": steps,
        "batch": preset.batch,
        "lr": LEARNING_RATES[method],
        "train_seconds": train_seconds,
        "steps_per_s": speed,
        "train_loss": [round(x, 5) for x in curve],
    }


def print_summary(base_task: dict, results: dict[str, dict]) -> None:
    log("summary:")
    log(
        f"  {'method':<6} {'trainable / total':>22} {'eval loss':>15} {'accuracy':>16} "
        f"{'steps/s default | reference':>28}"
    )
    log(f"  {'base':<6} {'':>22} {base_task['loss']:>15.3f} {_pct(base_task['accuracy']):>16}")
    for m, r in results.items():
        log(
            f"  {m:<6} {r['trainable_params']:>10,} / {r['total_params']:<10,} "
            f"{r['eval_loss_before']:>6.3f} -> {r['eval_loss_after']:<5.3f} "
            f"{_pct(r['accuracy_before'])} -> {_pct(r['accuracy_after'])} "
            f"{r['steps_per_s']['default']:>13.1f} | {r['steps_per_s']['reference']:.1f}"
        )


def run(
    method: str = "all",
    model_path: str | None = None,
    out: str | os.PathLike = "demo_out",
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    threads: int | None = None,
    tiny: bool = False,
) -> dict:
    """The whole demo (see the module docstring); returns what it writes to ``summary.json``."""
    started = time.perf_counter()
    preset = PRESETS["tiny" if tiny else "default"]
    methods = ["red", "para"] if method == "all" else [method]
    out = Path(out)
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or (previous_threads if model_path else 1))
    _quiet_transformers()
    try:
        log(f"red_kernels demo: methods {', '.join(methods)}, {steps} steps each, seed {seed}, out {out}/")
        language_description = LANGUAGE_DESCRIPTION.format(lo=preset.lengths[0], hi=preset.lengths[1])
        log(language_description)
        log(TASK_DESCRIPTION)
        mach = machine()
        log(
            f"machine: {mach['cpu']} ({mach['isa'] or '?'}), {mach['cores']} cores, "
            f"{mach['torch_threads']} torch thread(s)"
        )
        backends = default_backends("cpu")
        log("default backends: " + ", ".join(f"{op} {b}" for op, b in backends.items()))
        log()

        t0 = time.perf_counter()
        pretrain_curve = None
        if model_path:
            base, base_meta = load_base(model_path), {"source": model_path}
        else:
            base, base_meta = pretrained_base(preset, seed, out)
            pretrain_curve = base_meta.pop("train_loss", None)
            base_meta = {"source": "built-in", **base_meta}
        base.eval()
        for p in base.parameters():
            p.requires_grad_(False)
        base_seconds = time.perf_counter() - t0
        language_eval = Sampler(seed + 1, list(PRETRAIN_RULES), preset.lengths).many(preset.eval_size, distinct=True)
        language = evaluate(base, language_eval, PRETRAIN_RULES)
        log(
            f"base on its own language (held out): loss {language['loss']:.3f}, accuracy "
            f"{_pct(language['accuracy'])}  [{_by_instruction(language)}]"
        )
        task_eval = Sampler(seed + 3, list(TASK_RULES), preset.lengths).many(preset.eval_size, distinct=True)
        base_task = evaluate(base, task_eval, TASK_RULES)
        log(
            f"base on the new task (held out):     loss {base_task['loss']:.3f}, accuracy "
            f"{_pct(base_task['accuracy'])}  [{_by_instruction(base_task)}]"
        )
        log()

        results = {m: adapt(base, m, steps, preset, seed, task_eval, out) for m in methods}

        prompts = Sampler(seed + 5, list(TASK_RULES), preset.lengths, exclude=frozenset(task_eval)).many(
            preset.generate_prompts, distinct=True
        )
        generated = mixed_tenant_generate(base, methods, out / "adapters", prompts)
        log()

        png = out / "loss_curves.png"
        plotted = plot(png, pretrain_curve, {m: r["train_loss"] for m, r in results.items()})
        runtime = time.perf_counter() - started
        summary = {
            "task": {
                "language": language_description,
                "task": TASK_DESCRIPTION,
                "eval_examples": len(task_eval),
                "accuracy": "exact match of the greedy answer (end token included)",
            },
            "base": {
                **base_meta,
                "seconds": base_seconds,
                "language_eval": language,
                "eval_loss": base_task["loss"],
                "accuracy": base_task["accuracy"],
                "accuracy_by_instruction": base_task["accuracy_by_instruction"],
            },
            "methods": results,
            "default_backends": backends,
            "mixed_tenant_generate": generated,
            "loss_curves": str(png) if plotted else None,
            "machine": mach,
            "versions": versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "args": {"method": method, "model": model_path, "steps": steps, "seed": seed, "tiny": tiny},
            "runtime_s": runtime,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        print_summary(base_task, results)
        log(
            f"wrote {out / 'summary.json'}, {png if plotted else 'no plot (pip install matplotlib)'}, "
            f"adapters in {out / 'adapters'}/"
        )
        log(f"finished in {runtime:.0f} s")
        return summary
    finally:
        torch.set_num_threads(previous_threads)
