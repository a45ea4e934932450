"""torch.distributed on patched models (issue 13): 2 gloo processes on this CPU (``_dist_worker.py``),
each stepping on its half of a 4-row batch of the tiny LLaMA (2 layers, hidden 32), 3 steps.

- DDP, RED and PARA, SGD and AdamW: equal to one process (this one) stepping on the whole batch,
  every adapter parameter to 1e-6 (fp32); the two replicas bit for bit equal.
- accelerate on the 2 processes (it wraps the model in DDP and shards the data loader): the same.
- FSDP2 (``fully_shard``) on RED with a bf16 backbone and fp32 vectors, one unit per decoder layer
  plus the root: sharded for real, the editors read whole fp32 vectors inside the forward, and the
  result equals DDP on the same bf16 model (to 1e-6; measured bit for bit); the adapter, saved by
  rank 0 with every unit unsharded, loads into a plain model. Also an fp32 backbone computing in
  bf16 with each editor its own fp32 unit.
- FSDP2 on PARA: expected to fail on this version (see test_fsdp2_on_para).

The loss is the mean of per-row mean token losses (``_dist_worker.row_mean_loss``), so that the
average of the two halves' gradients is the whole batch's gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _dist_worker import STEPS, batch, launch, make_model, snapshot, train

import red_kernels as rk

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]

TOL = 1e-6
# Adapter parameters per layer: RED's scale and bias on mlp.down_proj; PARA's w_down, w_up, b_up.
PER_LAYER = {"red": 2, "para": 3}


def _close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for n, w in want.items():
        assert got[n].dtype == w.dtype == torch.float32, f"{what} {n}"
        torch.testing.assert_close(got[n], w, rtol=TOL, atol=TOL, msg=lambda m, n=n: f"{what} {n}: {m}")


def _close_losses(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want) == STEPS, what
    g, w = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(g, w, rtol=TOL, atol=TOL, msg=lambda m: f"{what} losses: {m}")


def _replicas_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for n in a:
        assert torch.equal(a[n], b[n]), f"{what} {n}: the ranks differ"


def _one_process(method: str, opt: str) -> tuple[dict, dict, list[float]]:
    """(initial, final) adapter parameters and losses of one process stepping on the whole batch."""
    model = make_model(method)
    init = snapshot(model)
    losses = train(model, model, batch(), opt)
    assert losses[-1] < losses[0], losses
    return init, snapshot(model), losses


@pytest.mark.parametrize("method", ["red", "para"])
def test_ddp_equals_one_process_on_the_whole_batch(method, tmp_path):
    r0, r1 = launch(f"ddp-{method}", tmp_path)
    for opt in ("sgd", "adamw"):
        init, want, losses = _one_process(method, opt)
        assert len(want) == 2 * PER_LAYER[method]
        # DDP found every adapter parameter (parameters of the banks inside the layers).
        assert r0[opt]["ddp_params"] == sorted(want)
        for n, w in want.items():
            assert (w - init[n]).abs().max() > 1e-4, f"{opt} {n} did not move"
        _replicas_equal(r0[opt]["params"], r1[opt]["params"], f"ddp {opt}")
        _close(r0[opt]["params"], want, f"ddp {opt}")
        _close_losses(r0[opt]["losses"], losses, f"ddp {opt}")


def test_accelerate_on_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    pytest.importorskip("accelerate")
    results = launch("accelerate", tmp_path)
    inputs = batch()
    for rank, r in enumerate(results):
        assert r["distributed_type"] == "DistributedType.MULTI_CPU" and r["wrapper"] == "DistributedDataParallel"
        half = inputs["input_ids"][2 * rank : 2 * rank + 2]  # each process's rows, at every step
        assert torch.equal(r["rows"], half.expand(STEPS, *half.shape))
    _, want, losses = _one_process("red", "adamw")
    _replicas_equal(results[0]["params"], results[1]["params"], "accelerate")
    _close(results[0]["params"], want, "accelerate")
    _close_losses(results[0]["losses"], losses, "accelerate")


def test_fsdp2_on_a_bf16_backbone_with_fp32_vectors_trains_and_equals_ddp(tmp_path):
    r0, _ = launch("fsdp-red", tmp_path)  # FSDP snapshots are gathered: the same on both ranks
    init = snapshot(make_model("red"))
    for opt in ("sgd", "adamw"):
        fsdp, ddp = r0["fsdp"][opt], r0["ddp"][opt]
        # Sharded for real: each rank holds half of every parameter, the backbone bf16, the vectors fp32.
        assert fsdp["layout"] == {
            "model.layers.0.mlp.down_proj.weight": ("DTensor", torch.bfloat16, (32, 64), (16, 64)),
            "model.layers.0.mlp.down_proj.red_edit.default.scale": ("DTensor", torch.float32, (32,), (16,)),
        }
        # Inside the forward every editor reads its whole vector (a plain Parameter) in fp32.
        assert fsdp["seen"] == [("Parameter", torch.float32)]
        assert fsdp["losses"][-1] < fsdp["losses"][0], fsdp["losses"]
        for n, p in fsdp["params"].items():
            assert (p - init[n]).abs().max() > 1e-4, f"{opt} {n} did not move"
        _close(fsdp["params"], ddp["params"], f"fsdp vs ddp {opt}")
        _close_losses(fsdp["losses"], ddp["losses"], f"fsdp vs ddp {opt}")
        # Saved by rank 0 with every unit unsharded: loads into a plain model as the trained vectors.
        fresh = make_model("red", torch.bfloat16)
        rk.unpatch_model(fresh)
        rk.load_adapter(fresh, tmp_path / f"adapter-{opt}")
        loaded = {n: p.detach() for n, p in rk.adapter_parameters(fresh).items()}
        _replicas_equal(loaded, fsdp["params"], f"fsdp {opt} saved adapter")
    # An fp32 backbone computing in bf16 (param_dtype=torch.bfloat16), each editor its own unit with
    # the default policy: the vectors stay fp32 inside the forward, and the result is DDP's on the
    # model whose frozen weights are rounded to bf16 (buffers fp32, as under FSDP2's cast).
    editors, ddp = r0["fsdp-editors"], r0["ddp-bf16-weights"]
    assert editors["layout"]["model.layers.0.mlp.down_proj.weight"][1] == torch.float32
    assert editors["seen"] == [("Parameter", torch.float32)]
    assert editors["losses"][-1] < editors["losses"][0], editors["losses"]
    _close(editors["params"], ddp["params"], "fsdp editors vs ddp")
    _close_losses(editors["losses"], ddp["losses"], "fsdp editors vs ddp")


def test_fsdp2_on_para(tmp_path):
    r0, _ = launch("fsdp-para", tmp_path)
    assert "error" not in r0, r0["error"]  # was a RecursionError: see sites._para_forward
    fsdp, ddp = r0["fsdp"], r0["ddp"]
    assert fsdp["losses"][-1] < fsdp["losses"][0], fsdp["losses"]
    _close(fsdp["params"], ddp["params"], "fsdp vs ddp para")
    _close_losses(fsdp["losses"], ddp["losses"], "fsdp vs ddp para")
