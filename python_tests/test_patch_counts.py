"""Trainable-parameter counts of RED and RED+ on the papers' real configurations, built on the
meta device (shapes only, no weights, no download), and the size of a LLaMA-2-7B adapter."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _hf_models import meta_model

import red_kernels as rk

PAPER_COUNTS = {
    ("roberta-base", "red"): 18_432,
    ("roberta-large", "red"): 49_152,
    ("gpt2-medium", "red"): 49_152,
    ("gpt2-large", "red"): 92_160,
    ("t5-base", "red"): 36_864,
    ("llama-2-7b", "red"): 262_144,
    ("roberta-base", "red+"): 92_160,
    ("roberta-large", "red+"): 245_760,
    ("gpt2-medium", "red+"): 245_760,
    ("gpt2-large", "red+"): 460_800,
}


@pytest.mark.parametrize(("name", "method"), list(PAPER_COUNTS), ids=lambda x: str(x))
def test_trainable_count_matches_paper(name, method):
    model = meta_model(name)
    total = sum(p.numel() for p in model.parameters())
    rk.patch_model(model, method)
    counts = rk.trainable_parameters(model)
    assert counts.edit == counts.trainable == PAPER_COUNTS[name, method]
    assert counts.modules == 0
    assert counts.total == total + counts.edit
    assert counts.percent == pytest.approx(100 * counts.trainable / counts.total)


def test_llama_7b_percent_and_report():
    model = meta_model("llama-2-7b")
    rk.patch_model(model, "red")
    counts = rk.trainable_parameters(model)
    assert f"{counts.percent:.4f}" == "0.0039"  # the paper's 0.0039%
    assert "262,144" in str(counts)


def test_llama_7b_adapter_is_about_one_megabyte(tmp_path):
    model = meta_model("llama-2-7b")
    rk.patch_model(model, "red")
    # Only the editors are materialised: the base stays on the meta device.
    for m in model.modules():
        if isinstance(m, rk.nn.REDEdit):
            m.to_empty(device="cpu")
            m.reset_parameters()
    rk.save_adapter(model, tmp_path)
    size = os.path.getsize(tmp_path / "adapter.safetensors")
    assert 262_144 * 4 <= size < 262_144 * 4 + 64 * 1024  # 1 MiB of fp32 plus the header
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["method"] == "red" and meta["architecture"] == "llama" and meta["model_type"] == "llama"
    assert len(meta["targets"]) == 32 and set(meta["dims"].values()) == {4096}
    assert meta["dtype"] == "float32" and meta["num_parameters"]["edit"] == 262_144
    assert meta["red_kernels_version"] == rk.__version__


def test_vectors_default_to_fp32_on_a_bf16_model():
    model = meta_model("gpt2-medium").to(torch.bfloat16)
    rk.patch_model(model, "red")
    dtypes = {p.dtype for n, p in model.named_parameters() if ".red_edit." in n}
    assert dtypes == {torch.float32}
    rk.unpatch_model(model)
    rk.patch_model(model, "red", dtype=torch.bfloat16)
    assert {p.dtype for n, p in model.named_parameters() if ".red_edit." in n} == {torch.bfloat16}
