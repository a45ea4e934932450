"""``python -m red_kernels bench``: it runs from the package alone (a copy of ``red_kernels/`` outside
the checkout, no ``benchmarks/`` beside it, no pytest), times each variant, and writes the JSON
(machine, versions, date, medians, ratios), the markdown table and the chart; its command line
rejects what it does not know; the runner interleaves rounds and survives a failing variant."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from red_kernels.__main__ import main
from red_kernels.bench.runner import matcher
from red_kernels.bench.timing import Variant, measure

ROOT = Path(__file__).resolve().parents[1]


def _bench(
    tmp_path: Path, *args: str, timeout: int = 150, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the command from a copy of the package in tmp_path/site (as pip installs it: the package
    and its built extension, nothing else of the checkout), with tmp_path/run as the working folder."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "red_kernels", site / "red_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RED_KERNELS_BACKEND")}
    env["PYTHONPATH"] = str(site)
    env.update(extra_env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "red_kernels", "bench", *args],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, run_dir


def _by_group(rows: list[dict]) -> dict[str, dict[str, dict]]:
    groups: dict[str, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], {})[r["variant"]] = r
    return groups


def _check_record(record: dict, site: Path) -> None:
    m, v = record["machine"], record["versions"]
    assert m["cpu"] and isinstance(m["cores"], int) and m["cores"] >= 1
    assert m["gpu"] is None or (isinstance(m["gpu"], str) and m["gpu"])  # no GPU here: None
    assert set(v) >= {"python", "torch", "transformers", "red_kernels"} and v["torch"] and v["red_kernels"]
    assert datetime.datetime.fromisoformat(record["date"]).tzinfo is not None
    assert Path(record["package"]).resolve() == (site / "red_kernels").resolve()  # the copy, not the checkout


@pytest.mark.slow
def test_op_bench_from_an_installed_copy(tmp_path):
    import red_kernels as rk

    proc, run_dir = _bench(
        tmp_path,
        *("--quick", "--ops-only", "--filter", "^red_edit 256x1024", "--out", "res"),
        extra_env={"RED_KERNELS_NO_HUGE_PAGES": "0"},  # "0": advice on, as by default; recorded
    )
    out = run_dir / "res"
    record = json.loads((out / "bench.json").read_text())
    _check_record(record, tmp_path / "site")
    # The variables that change timings are recorded and named in the table's header.
    assert record["environment"].get("RED_KERNELS_NO_HUGE_PAGES") == "0"
    assert "TRITON_INTERPRET" not in record["environment"]
    assert "environment: RED_KERNELS_NO_HUGE_PAGES=0" in (out / "bench.md").read_text().splitlines()[0]
    assert record["settings"]["quick"] and record["settings"]["filters"] == ["^red_edit 256x1024"]

    groups = _by_group(record["results"])
    assert set(groups) == {"red_edit 256x1024-fp32 fwd", "red_edit 256x1024-fp32 fwd+bwd"}
    expected = {"eager", "torch.compile", "floor", "rk-reference"}
    if rk.backend_info("cpu").available:
        expected.add("rk-cpu")
    for group, rows in groups.items():
        assert set(rows) == expected, group  # the interpreted Triton backend is not benchmarked
        eager, compiled, floor = rows["eager"], rows["torch.compile"], rows["floor"]
        for r in rows.values():
            assert "error" not in r, r
            assert 0 < r["min_ms"] <= r["median_ms"] and r["rounds"] == 5
            assert r["baseline"] == "eager"
            assert r["speedup"] == pytest.approx(eager["median_ms"] / r["median_ms"])
            assert r["vs_compile"] == pytest.approx(compiled["median_ms"] / r["median_ms"])
            assert r["per_floor"] == pytest.approx(r["median_ms"] / floor["median_ms"])
        assert eager["speedup"] == pytest.approx(1.0) and floor["per_floor"] == pytest.approx(1.0)

    table = (out / "bench.md").read_text()
    assert "| benchmark | variant | median ms | vs eager | vs torch.compile | / floor |" in table
    assert "red_edit 256x1024-fp32 fwd+bwd | rk-reference |" in table
    assert "vs eager" in proc.stdout and "res/bench.json" in proc.stdout
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in proc.stdout
    else:
        png = (out / "bench.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000


@pytest.mark.slow
def test_model_bench_quick(tmp_path):
    pytest.importorskip("transformers")
    _, run_dir = _bench(tmp_path, "--quick", "--models-only", "--out", "res", timeout=240)
    record = json.loads((run_dir / "res" / "bench.json").read_text())
    _check_record(record, tmp_path / "site")
    groups = _by_group(record["results"])
    train = next(rows for g, rows in groups.items() if g.startswith("model train step"))
    decode = next(rows for g, rows in groups.items() if g.startswith("model decode"))
    have_peft = importlib.util.find_spec("peft") is not None
    peft_train = {"peft-ia3", "peft-lora-r8"} if have_peft else set()
    peft_decode = {"peft lora mixed", "peft ia3 loop"} if have_peft else set()
    assert set(train) == {"base", "red", "red+", "para"} | peft_train
    assert set(decode) == {"base", "red", "para", "red tenants", "para tenants"} | peft_decode
    if not have_peft:
        assert "PEFT variants skipped: peft not installed" in record["notes"]
    for rows in (train, decode):
        for r in rows.values():
            assert "error" not in r, r
            assert r["baseline"] == "base"
            assert r["speedup"] == pytest.approx(rows["base"]["median_ms"] / r["median_ms"])
    for r in decode.values():  # tokens/s and memory of every decode variant
        assert r["tokens_per_s"] == pytest.approx(4 * 8 / (r["median_ms"] / 1e3))
        assert r["weights_mb"] > 0 and r["peak_extra_mb"] >= 0
    # one backbone serves every tenant: a bank of 4 RED adapters weighs about the base
    assert decode["red tenants"]["weights_mb"] < 1.1 * decode["base"]["weights_mb"]


# --- the command line ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, words",
    [
        ("info", ["backend", "automatic"]),
        ("demo", ["--method", "--steps", "summary.json"]),
        (
            "bench",
            ["--quick", "--filter", "--out", "--rounds", "--ops-only", "--models-only", "--list", "torch.compile"],
        ),
    ],
)
def test_help_of_each_command(command, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in words:
        assert word in out, (command, word)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--bogus"], "unrecognized arguments: --bogus"),
        (["bench", "--quick", "-k", "red_edit"], "unrecognized arguments: -k red_edit"),
        (["bench", "--", "--quick"], "unrecognized arguments"),
        (["bench", "--rounds", "0"], "must be a positive integer"),
        (["bench", "--ops-only", "--models-only"], "not allowed with argument"),
        (["bench", "--filter"], "expected at least one argument"),
    ],
)
def test_bench_rejects_unknown_flags_and_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_list_shows_cases_without_the_interpreter(capsys):
    assert main(["bench", "--quick", "--ops-only", "--list"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if not line.startswith("note:")]
    ops = ("red_edit", "seq_scale", "gathered_red_edit", "para_vector_gen", "gathered_para_vector_gen")
    for op in ops:
        assert any(line.startswith(f"{op} ") for line in lines), op
    assert all("eager" in line or "loop" in line for line in lines)
    # This suite interprets Triton on CPU (conftest): a timing of the interpreter is not a kernel's.
    assert "rk-triton" not in out
    assert not any(line.startswith("model ") for line in lines)


def test_a_filter_that_matches_nothing_is_an_error(capsys):
    assert main(["bench", "--ops-only", "--filter", "no-such-case"]) == 2
    assert "no case matches --filter no-such-case" in capsys.readouterr().err


def test_filter_is_a_substring_or_a_regex():
    assert matcher("^red_edit ")("red_edit 256x1024-fp32 fwd")
    assert not matcher("^red_edit ")("gathered_red_edit K4 4x64x1024-fp32 fwd")
    assert matcher("fwd+bwd")("red_edit 256x1024-fp32 fwd+bwd")  # literal, though "+" is a regex operator
    assert not matcher("fwd+bwd")("red_edit 256x1024-fp32 fwd")
    assert matcher("model (train|decode)")("model decode llama-64x2 b4 p16 +8 t4")
    assert matcher("[")("a [ b")  # not a valid regex: a substring


# --- the runner ------------------------------------------------------------------------------------------


def test_rounds_interleave_variants_and_a_failing_variant_is_dropped():
    calls: list[str] = []

    def variant(name: str) -> Variant:
        return Variant(lambda: calls.append(name), setup=lambda: calls.append(f"setup {name}"))

    def broken():
        calls.append("broken")
        raise RuntimeError("no C++ compiler\ndetails")

    ticks = []
    times, errors = measure(
        {"a": variant("a"), "broken": Variant(broken), "b": variant("b")},
        rounds=3,
        warmup=1,
        iterations=2,
        tick=lambda: ticks.append(1),
    )
    a_, b_ = ["setup a", "a", "a"], ["setup b", "b", "b"]
    # Round r starts at variant r mod 3 (a, broken, b); broken is gone after round 0.
    assert calls == [*a_, "broken", *b_] + [*b_, *a_] + [*b_, *a_] + [*a_, *b_]
    assert set(times) == {"a", "b"} and all(len(t) == 3 and min(t) >= 0 for t in times.values())
    assert errors == {"broken": "RuntimeError: no C++ compiler"}
    assert len(ticks) == 4 * 3  # every (round, variant), the dropped one too: the bar's total holds


def test_each_round_starts_one_variant_further():
    """Round r runs the variants from the (r mod n)-th on, so no variant always follows the same one
    (a variant after a memory-heavy one would pay for its freed pages every round)."""
    order: list[str] = []
    names = ["a", "b", "c", "d"]
    times, errors = measure({n: Variant(lambda n=n: order.append(n)) for n in names}, rounds=6, warmup=2)
    rounds = [order[i : i + 4] for i in range(0, len(order), 4)]
    assert rounds == [names[r % 4 :] + names[: r % 4] for r in range(8)]
    assert not errors and all(len(t) == 6 for t in times.values())
    before = {n: {prev for prev, cur in zip(order, order[1:]) if cur == n} for n in names}
    assert all(len(prev) > 1 for prev in before.values()), before


# --- benchmarks/models_side_by_side.py -------------------------------------------------------------------


def _side_by_side():
    spec = importlib.util.spec_from_file_location("models_side_by_side", ROOT / "benchmarks" / "models_side_by_side.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_side_by_side_says_when_the_base_fails(monkeypatch, capsys):
    """A failing base variant is reported with its error and the other variants' rows print without
    ratios (it raised KeyError: 'base')."""
    from red_kernels.bench.timing import Case

    def broken():
        raise RuntimeError("base exploded")

    case = Case(
        group="model toy decode",
        kind="model",
        variants=("base", "red"),
        build=lambda: {"base": Variant(broken), "red": Variant(lambda: None)},
        baseline="base",
        rounds=2,
        warmup=0,
        tokens=4,
    )
    module = _side_by_side()
    monkeypatch.setattr(module.models, "decode_case", lambda **_: case)
    monkeypatch.setattr(sys, "argv", ["models_side_by_side.py", "decode", "--rounds", "2"])
    assert module.main() == 1
    out = capsys.readouterr().out
    assert "model toy decode (medians of 2 interleaved rounds)" in out
    assert "base: RuntimeError: base exploded" in out
    assert "no ratios to base: the base variant failed" in out
    red = next(line for line in out.splitlines() if line.strip().startswith("red "))
    assert "tokens/s" in red and "(no base to compare)" in red
