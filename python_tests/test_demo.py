"""The command line (``python -m red_kernels info | demo | bench``) and the demo at a tiny size.

The demo runs twice in a subprocess, the way ``make demo`` runs it: the first run pre-trains the
tiny base and saves it, the second reuses it, and both must give the same numbers (fixed seed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from red_kernels.__main__ import main

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
OPS = ("red_edit", "seq_scale", "gathered_red_edit", "para_vector_gen", "gathered_para_vector_gen")


# --- command line ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        ([], ["info", "demo", "bench"]),
        (["info"], ["backend", "automatic", "para_vector_gen"]),
        (["demo"], ["--method", "--model", "--out", "--steps", "summary.json", "loss_curves.png"]),
        (["bench"], ["--quick", "--filter", "--out", "bench.json"]),
    ],
)
def test_help_describes_each_command(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in words:
        assert word in out, (argv, word)
    assert "--tiny" not in out  # the test suite's size stays hidden


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--bogus"],
        ["demo", "--method", "lora"],
        ["demo", "--steps", "0"],
        ["demo", "--", "--steps", "3"],
        ["info", "--verbose"],
        ["info", "--", "x"],
        ["bench", "-k", "red_edit"],  # not pytest: --filter selects cases
        ["frobnicate"],
        [],
        ["demo", "--model", "no/such/checkpoint"],  # local paths only: no download
    ],
)
def test_unknown_flags_and_bad_values_are_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_progress_fallback_without_tqdm(capsys):
    from red_kernels.demo import _Fallback

    bar = _Fallback(range(20), total=20, desc="training x")
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix_str(f"loss {i}")
    assert seen == list(range(20))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].strip() == "training x: 2/20 loss 1" and lines[-1].strip() == "training x: 20/20 loss 19"


def test_info_names_the_default_backend_of_every_op(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("default backend per op") :]
    for op in OPS:
        line = next(line for line in table.splitlines() if line.split()[:1] == [op])
        assert line.split()[1] in ("reference", "cpu", "triton", "cuda"), line


# --- the demo ----------------------------------------------------------------------------------------

FIELDS = (
    "trainable_params",
    "total_params",
    "eval_loss_before",
    "eval_loss_after",
    "accuracy_before",
    "accuracy_after",
    "steps_per_s",
)


def _demo(out: Path) -> tuple[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RED_KERNELS_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-m", "red_kernels", "demo", "--tiny", "--steps", "3", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    first = _demo(out)
    second = _demo(out)
    return out, first, second


def test_demo_writes_summary_plot_and_adapters(demo_runs):
    out, (stdout, summary), _ = demo_runs
    assert set(summary["methods"]) == {"red", "para"}
    for method, r in summary["methods"].items():
        for field in FIELDS:
            assert field in r, (method, field)
        assert 0 < r["trainable_params"] < r["total_params"]
        assert set(r["steps_per_s"]) == {"default", "reference"}
        assert all(v > 0 for v in r["steps_per_s"].values())
        assert 0.0 <= r["accuracy_after"] <= 1.0
        assert r["eval_loss_before"] == pytest.approx(summary["base"]["eval_loss"], rel=1e-5)  # identity at step 0
        for name in ("adapter.safetensors", "adapter_config.json"):
            assert (out / "adapters" / method / name).is_file()
    for key in ("cpu", "cores"):
        assert summary["machine"][key]
    assert set(summary["versions"]) >= {"python", "torch", "transformers", "red_kernels"}
    assert summary["date"]
    assert set(summary["default_backends"]) == set(OPS)
    assert (out / "base" / "config.json").is_file() and (out / "base" / "model.safetensors").is_file()
    pytest.importorskip("matplotlib")
    assert (out / "loss_curves.png").stat().st_size > 1000


def test_demo_says_what_the_task_is(demo_runs):
    _, (stdout, _), _ = demo_runs
    assert "new task" in stdout and "copy and rev swap" in stdout
    assert "trainable params:" in stdout
    assert "steps/s" in stdout


def test_mixed_tenant_generate_lists_every_tenant(demo_runs):
    _, (stdout, summary), _ = demo_runs
    rows = summary["mixed_tenant_generate"]
    prompts = {r["prompt"] for r in rows}
    assert len(prompts) >= 2
    for prompt in prompts:
        assert sorted(r["tenant"] for r in rows if r["prompt"] == prompt) == ["base", "para", "red"]
    table = stdout[stdout.index("mixed-tenant generate") :].splitlines()[2 : 2 + len(rows)]
    assert [line.split()[0] for line in table] == [r["tenant"] for r in rows]


def test_demo_reuses_the_base_and_is_deterministic(demo_runs):
    _, (_, first), (stdout, second) = demo_runs
    assert not first["base"]["cached"] and second["base"]["cached"]
    assert "reused the pre-trained model" in stdout
    for method in first["methods"]:
        a, b = first["methods"][method], second["methods"][method]
        for field in ("eval_loss_before", "eval_loss_after", "accuracy_after", "train_loss"):
            assert a[field] == b[field], (method, field)
    assert first["mixed_tenant_generate"] == second["mixed_tenant_generate"]
