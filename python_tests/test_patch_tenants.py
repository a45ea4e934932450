"""Named adapters and mixed-tenant batches (issue 11), checked against an independent truth: every
row of a batch that mixes adapters must give what that tenant's *own* model gives (a deep copy of the
base patched with that adapter alone), and rows with None what the base model gives.

Tenants: RED, RED+, RED scale-only and bias-only, PARA rank 12 (GELU) and PARA rank 4 (ReLU), each
trained (perturbed) in its own copy of the base, saved, and loaded into one bank model.
"""

from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
from _hf_models import VOCAB, tiny_gpt2, tiny_llama, tiny_roberta, tiny_t5

import red_kernels as rk

BASES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "roberta": tiny_roberta, "t5": lambda: tiny_t5("relu")}
PAD_ID = {"llama": 0, "gpt2": 0, "roberta": 1, "t5": 0}
# name -> (method, options); the first one is loaded into the plain bank model with adapter_name=.
TENANTS = {
    "acme": ("red", {}),
    "beta": ("red+", {}),
    "gam": ("red", {"bias": False}),  # scale only
    "dlt": ("red", {"scale": False}),  # bias only
    "p12": ("para", {"rank": 12}),
    "p4": ("para", {"rank": 4, "activation": "relu"}),
}
MIXED = ["acme", None, "p12", "beta", "p4", "gam", "dlt", "acme"]  # RED and PARA in one batch
LAYOUTS = {
    "mixed": MIXED,
    "para_ranks": ["p12", "p4", None, "p4", "p12", "p12"],  # PARA of different ranks / activations
    "red_only": ["gam", "dlt", "beta", None, "acme"],
}
GEN = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)


def _is_adapter_param(name: str) -> bool:
    return ".red_edit." in name or ".para_gen." in name


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial adapter parameters, as after training (PARA's W_up starts at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if _is_adapter_param(n):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


class Bank:
    """A base model, each tenant's own model and the bank holding every tenant's adapter."""

    def __init__(self, arch: str, root) -> None:
        torch.manual_seed(0)
        self.arch = arch
        self.base = BASES[arch]()
        self.models: dict[str | None, torch.nn.Module] = {None: self.base}
        self.dirs = {}
        for i, (name, (method, options)) in enumerate(TENANTS.items()):
            own = copy.deepcopy(self.base)
            rk.patch_model(own, method, **options)
            _perturb(own, seed=100 + i)
            self.dirs[name] = root / arch / name
            rk.save_adapter(own, self.dirs[name])
            self.models[name] = own
        self.bank = copy.deepcopy(self.base)
        for i, name in enumerate(TENANTS):
            # The first makes the plain model a patched one; the others are named after their directory.
            rk.load_adapter(self.bank, self.dirs[name], adapter_name=name if i == 0 else None)

    def inputs(self, batch: int, padding: str, seed: int = 0, seq: int = 7) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        for b in range(batch):  # 0..3 pad tokens, different per row
            if padding == "left":
                mask[b, : b % 4] = 0
            elif padding == "right":
                mask[b, seq - b % 4 :] = 0
        ids = ids.masked_fill(mask == 0, PAD_ID[self.arch])
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.arch == "t5":
            inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=g)
        return inputs


_BANKS: dict[str, Bank] = {}


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")

    def get(arch: str) -> Bank:
        if arch not in _BANKS:
            _BANKS[arch] = Bank(arch, root)
        return _BANKS[arch]

    yield get
    _BANKS.clear()


def _out(model, inputs) -> torch.Tensor:
    """Per-position outputs: the logits of a language model, RoBERTa's last hidden states (its
    classification logits read one position of them; they are checked apart)."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out.hidden_states[-1] if out.logits.dim() == 2 else out.logits


def _valid(inputs, b: int) -> torch.Tensor:
    """Positions of row b whose logits are compared (decoder-only: not padding)."""
    if "decoder_input_ids" in inputs:
        return torch.ones(inputs["decoder_input_ids"].shape[1], dtype=torch.bool)
    return inputs["attention_mask"][b].bool()


# --- forward and generate of mixed batches --------------------------------------------------------


FORWARD_CASES = [
    ("llama", "mixed", "none"),
    ("llama", "mixed", "left"),
    ("llama", "para_ranks", "left"),
    ("llama", "red_only", "left"),
    ("gpt2", "mixed", "left"),
    ("gpt2", "para_ranks", "none"),
    ("roberta", "mixed", "right"),
    ("roberta", "para_ranks", "left"),
    ("t5", "mixed", "right"),
    ("t5", "red_only", "none"),
]


@pytest.mark.parametrize(("arch", "layout", "padding"), FORWARD_CASES)
def test_mixed_rows_forward_equals_each_tenants_model(banks, arch, layout, padding):
    bank = banks(arch)
    rows = LAYOUTS[layout]
    inputs = bank.inputs(len(rows), padding)
    with rk.tenants(bank.bank, rows):
        got = _out(bank.bank, inputs)
    base = _out(bank.base, inputs)
    want = {r: _out(bank.models[r], inputs) for r in dict.fromkeys(rows)}
    for b, r in enumerate(rows):
        keep = _valid(inputs, b)
        torch.testing.assert_close(
            got[b][keep], want[r][b][keep], rtol=0, atol=1e-5, msg=lambda m, b=b, r=r: f"row {b} ({r}): {m}"
        )
        if r is not None:  # each adapter really edits this row
            assert (want[r][b][keep] - base[b][keep]).abs().max() > 1e-3, r
    if arch == "roberta":  # and the classification head's logits
        with torch.no_grad(), rk.tenants(bank.bank, rows):
            got = bank.bank(**inputs).logits
        for b, r in enumerate(rows):
            with torch.no_grad():
                torch.testing.assert_close(got[b], bank.models[r](**inputs).logits[b], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("arch", "padding"), [("llama", "none"), ("llama", "left"), ("gpt2", "left"), ("t5", "right")])
def test_mixed_rows_generate_each_tenants_greedy_tokens(banks, arch, padding):
    bank = banks(arch)
    rows = MIXED
    inputs = bank.inputs(len(rows), padding, seed=1)
    inputs.pop("decoder_input_ids", None)
    kw = dict(GEN, pad_token_id=PAD_ID[arch])
    with torch.no_grad():
        with rk.tenants(bank.bank, rows):
            got = bank.bank.generate(**inputs, **kw)
        want = {r: bank.models[r].generate(**inputs, **kw) for r in dict.fromkeys(rows)}
    for b, r in enumerate(rows):
        assert got[b].tolist() == want[r][b].tolist(), f"row {b} ({r})"
    # The tenants do generate different continuations (else the comparison proves little).
    assert len({tuple(want[r][b].tolist()) for b, r in enumerate(rows)}) >= 4


def test_beams_and_return_sequences_map_rows_along(banks):
    """generate(num_beams=2, num_return_sequences=2) runs 2 * 2 rows per prompt: each belongs to the
    prompt's tenant (repeat_interleave of the names)."""
    bank = banks("llama")
    rows = ["p12", None, "acme", "p4"]
    inputs = bank.inputs(len(rows), "left", seed=2)
    kw = dict(GEN, pad_token_id=0, num_beams=2, num_return_sequences=2)
    with torch.no_grad():
        with rk.tenants(bank.bank, rows):
            got = bank.bank.generate(**inputs, **kw)
        want = {r: bank.models[r].generate(**inputs, **kw) for r in dict.fromkeys(rows)}
    assert got.shape[0] == 2 * len(rows)
    for b, r in enumerate(rows):
        assert got[2 * b : 2 * b + 2].tolist() == want[r][2 * b : 2 * b + 2].tolist(), f"prompt {b} ({r})"


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_one_adapter_for_every_row_equals_set_adapter(banks, arch):
    bank = banks(arch)
    model = copy.deepcopy(bank.bank)  # set_adapter changes the model; keep the shared bank as it is
    inputs = bank.inputs(4, "left")
    base = _out(bank.base, inputs)
    for name in TENANTS:
        with rk.tenants(model, [name] * 4):
            mixed = _out(model, inputs)
        rk.set_adapter(model, name)
        plain = _out(model, inputs)
        assert torch.equal(mixed, plain), name
        torch.testing.assert_close(plain, _out(bank.models[name], inputs), rtol=0, atol=1e-5)
        with rk.disable_adapter(model):
            assert torch.equal(_out(model, inputs), base)
        with rk.tenants(model, [None] * 4):
            assert torch.equal(_out(model, inputs), base)


def test_unknown_tenant_name_is_refused(banks):
    bank = banks("llama")
    with pytest.raises(ValueError, match=r"red_kernels\.tenants: unknown adapter.*'nobody'"):
        with rk.tenants(bank.bank, ["acme", "nobody", None]):
            pass
    # And the context was not left set: a plain call uses the active adapter.
    inputs = bank.inputs(3, "none")
    torch.testing.assert_close(_out(bank.bank, inputs), _out(bank.models["acme"], inputs), rtol=0, atol=1e-5)


# --- loading adapters that do not fit -------------------------------------------------------------


def _snapshot(model):
    return (
        rk.adapter_names(model),
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        repr(model),
    )


def _assert_same(model, snap) -> None:
    names, sd, flags, tree = snap
    assert rk.adapter_names(model) == names
    now = model.state_dict()
    assert list(now) == list(sd)
    assert all(torch.equal(now[k], v) for k, v in sd.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert repr(model) == tree


@pytest.mark.parametrize("method", ["red", "para"])
@pytest.mark.parametrize("other", ["gpt2", "wider_llama"])
def test_adapter_of_another_model_is_refused_and_the_bank_unchanged(banks, tmp_path, other, method):
    bank = banks("llama")
    foreign = tiny_gpt2() if other == "gpt2" else tiny_llama(hidden_size=48, intermediate_size=64)
    rk.patch_model(foreign, method)
    _perturb(foreign, seed=7)
    directory = tmp_path / f"foreign_{other}"
    rk.save_adapter(foreign, directory)
    model = copy.deepcopy(bank.bank)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"red_kernels\.load_adapter: .*foreign_" + other) as info:
        rk.load_adapter(model, directory)
    assert "unchanged" in str(info.value)
    _assert_same(model, snap)
    with pytest.raises(ValueError, match="foreign_" + other):
        rk.load_adapter(model, directory, adapter_name="named")
    _assert_same(model, snap)
    with rk.tenants(model, MIXED):  # and the bank still serves its tenants
        inputs = bank.inputs(len(MIXED), "left")
        got = _out(model, inputs)
    for b, r in enumerate(MIXED):
        keep = _valid(inputs, b)
        torch.testing.assert_close(got[b][keep], _out(bank.models[r], inputs)[b][keep], rtol=0, atol=1e-5)


# --- training: set_adapter and mixed-tenant batches -----------------------------------------------


def _row_logprobs(model, inputs) -> torch.Tensor:
    """``[B]``: each row's summed next-token log-likelihood (a loss that splits by row)."""
    out = model(**inputs).logits.float()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    logp = out[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * mask[:, 1:]).sum(1)


def test_set_adapter_trains_only_that_adapter(banks):
    bank = banks("llama")
    model = copy.deepcopy(bank.bank)
    rk.set_adapter(model, "p12")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(rk.adapter_parameters(model, "p12"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1, weight_decay=0.1)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-1, weight_decay=0.1)
    for o in (opt, sgd):
        o.zero_grad()
        (-_row_logprobs(model, bank.inputs(4, "left")).sum()).backward()
        o.step()
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= {k for k in before if ".p12." in k}, sorted(moved)[:5]
    for name in TENANTS:  # every other adapter bit-identical, and frozen
        if name != "p12":
            for k, p in rk.adapter_parameters(model, name).items():
                assert torch.equal(p, before[k]) and not p.requires_grad, k
    rk.set_adapter(model, "acme")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(rk.adapter_parameters(model, "acme"))


def _grads(model, names, inputs, rows):
    for name in names:
        for p in rk.adapter_parameters(model, name).values():
            p.grad = None
    with rk.tenants(model, rows):
        (-_row_logprobs(model, inputs).sum()).backward()
    return {
        name: {
            k: (p.grad.clone() if p.grad is not None else None) for k, p in rk.adapter_parameters(model, name).items()
        }
        for name in names
    }


def _sub(inputs, idx):
    return {k: v[idx] for k, v in inputs.items()}


@pytest.mark.parametrize("pair", [("acme", "beta"), ("acme", "p12"), ("p12", "p4"), ("gam", "p4")])
def test_mixed_batch_gives_each_adapter_its_own_rows_gradient(banks, pair):
    bank = banks("llama")
    model = copy.deepcopy(bank.bank)
    a, b = pair
    for name in pair:
        for p in rk.adapter_parameters(model, name).values():
            p.requires_grad_(True)
    rows = [a, None, b, a, b, None, a]
    inputs = bank.inputs(len(rows), "left", seed=3)
    mixed = _grads(model, pair, inputs, rows)
    for name in pair:
        idx = [i for i, r in enumerate(rows) if r == name]
        alone = _grads(model, [name], _sub(inputs, idx), [name] * len(idx))[name]
        for k, g in mixed[name].items():
            assert g is not None and alone[k] is not None and alone[k].abs().sum() > 0, k
            torch.testing.assert_close(g, alone[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # None rows contribute nothing: the batch without them gives the same gradients.
    idx = [i for i, r in enumerate(rows) if r is not None]
    without = _grads(model, pair, _sub(inputs, idx), [rows[i] for i in idx])
    for name in pair:
        for k, g in mixed[name].items():
            torch.testing.assert_close(g, without[name][k], rtol=1e-5, atol=1e-5)
    # Adapters not in the batch (frozen) get nothing.
    for name in TENANTS:
        if name not in pair:
            assert all(p.grad is None for p in rk.adapter_parameters(model, name).values()), name


# --- delete_adapter and large banks ---------------------------------------------------------------


def test_delete_adapter(banks):
    bank = banks("llama")
    model = copy.deepcopy(bank.bank)
    assert rk.patch.patch_state(model).active == "acme"
    sd = model.state_dict()
    assert any(".p4." in k for k in sd)
    rk.delete_adapter(model, "p4")
    assert "p4" not in rk.adapter_names(model)
    assert not any(".p4." in k for k in model.state_dict())
    assert set(model.state_dict()) == {k for k in sd if ".p4." not in k}
    with pytest.raises(ValueError, match="'p4'"):
        with rk.tenants(model, ["p4"]):
            pass
    # The others still serve their rows (tables of the deleted adapter are not reused).
    rows = ["p12", "acme", None, "beta", "gam"]
    inputs = bank.inputs(len(rows), "left")
    with rk.tenants(model, rows):
        got = _out(model, inputs)
    for b, r in enumerate(rows):
        keep = _valid(inputs, b)
        torch.testing.assert_close(got[b][keep], _out(bank.models[r], inputs)[b][keep], rtol=0, atol=1e-5)
    # It can be loaded again under its name.
    rk.load_adapter(model, bank.dirs["p4"])
    with rk.tenants(model, ["p4", "p12"]):
        got = _out(model, bank.inputs(2, "none"))
    torch.testing.assert_close(got[0], _out(bank.models["p4"], bank.inputs(2, "none"))[0], rtol=0, atol=1e-5)

    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"red_kernels\.delete_adapter: 'acme' is the active adapter"):
        rk.delete_adapter(model, "acme")
    _assert_same(model, snap)
    for name in list(rk.adapter_names(model)):
        if name != "acme":
            rk.delete_adapter(model, name)
    rk.set_adapter(model, "acme")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"red_kernels\.delete_adapter: 'acme' is the model's only adapter"):
        rk.delete_adapter(model, "acme")
    _assert_same(model, snap)


def test_a_bank_of_100_adapters(banks):
    bank = banks("llama")
    model = copy.deepcopy(bank.base)
    base_count = sum(p.numel() for p in model.parameters())
    rk.load_adapter(model, bank.dirs["acme"], adapter_name="t0")
    size = sum(p.numel() for p in rk.adapter_parameters(model, "t0").values())
    assert size == 2 * 2 * 32  # 2 layers x (scale + bias) x hidden

    def add_and_delete_times():
        adds, deletes = [], []
        for _ in range(7):
            t = time.perf_counter()
            rk.load_adapter(model, bank.dirs["beta"], adapter_name="probe")
            adds.append(time.perf_counter() - t)
            t = time.perf_counter()
            rk.delete_adapter(model, "probe")
            deletes.append(time.perf_counter() - t)
        return statistics.median(adds), statistics.median(deletes)

    for i in range(1, 10):
        rk.load_adapter(model, bank.dirs["acme"], adapter_name=f"t{i}")
    add10, del10 = add_and_delete_times()
    for i in range(10, 100):
        rk.load_adapter(model, bank.dirs["acme"], adapter_name=f"t{i}")
    add100, del100 = add_and_delete_times()
    assert len(rk.adapter_names(model)) == 100
    assert sum(p.numel() for p in model.parameters()) == base_count + 100 * size
    assert len(model.state_dict()) == len(bank.base.state_dict()) + 100 * 2 * 2
    # Adding the 101st / deleting one costs about what it costs in a bank of 10.
    assert add100 < 5 * add10, (add10, add100)
    assert del100 < 5 * del10, (del10, del100)
    # Rows of a few of the 100 (each holds acme's vectors) still match acme's own model.
    rows = ["t57", None, "t98", "t1"]
    inputs = bank.inputs(len(rows), "left")
    with rk.tenants(model, rows):
        got = _out(model, inputs)
    for b, r in enumerate(rows):
        own = bank.models[None if r is None else "acme"]
        keep = _valid(inputs, b)
        torch.testing.assert_close(got[b][keep], _out(own, inputs)[b][keep], rtol=0, atol=1e-5)


# --- torch.compile --------------------------------------------------------------------------------


def _decode_step(model, ids, mask, cache):
    return model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits


def _prefill(model, inputs):
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return nxt, torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1), out.cache


def test_torch_compile_fullgraph_of_a_mixed_tenant_decode_step(banks):
    bank = banks("llama")
    rows = ["acme", None, "p12", "beta", "p4", "gam"]
    inputs = bank.inputs(len(rows), "left")
    # The base model's decode step must compile in one graph, else there is nothing to check.
    torch._dynamo.reset()
    nxt, mask, cache = _prefill(bank.base, inputs)
    with torch.no_grad():
        want = _decode_step(bank.base, nxt, mask, copy.deepcopy(cache))
        got = torch.compile(_decode_step, fullgraph=True, backend="aot_eager")(bank.base, nxt, mask, cache)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    torch._dynamo.reset()
    with rk.tenants(bank.bank, rows):
        nxt, mask, cache = _prefill(bank.bank, inputs)  # eager prefill: makes the PARA rows' vectors
        with torch.no_grad():
            eager = _decode_step(bank.bank, nxt, mask, copy.deepcopy(cache))
            compiled = torch.compile(_decode_step, fullgraph=True, backend="aot_eager")(bank.bank, nxt, mask, cache)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    # And the step is each tenant's own decode step.
    for b, r in enumerate(rows):
        own_next, own_mask, own_cache = _prefill(bank.models[r], inputs)
        assert torch.equal(own_next[b], nxt[b]), b
        with torch.no_grad():
            own = _decode_step(bank.models[r], own_next, own_mask, own_cache)
        torch.testing.assert_close(compiled[b], own[b], rtol=0, atol=1e-5, msg=lambda m, b=b: f"row {b}: {m}")


def test_torch_compile_fullgraph_of_a_mixed_tenant_forward(banks):
    bank = banks("llama")
    model = copy.deepcopy(bank.bank)
    rows = ["acme", None, "beta", "gam", "p12"]
    ids = bank.inputs(len(rows), "none")["input_ids"]
    torch._dynamo.reset()
    fn = torch.compile(lambda ids: model(ids).logits, fullgraph=True, backend="eager")
    with torch.no_grad(), rk.tenants(model, rows):
        got = fn(ids)  # compiled first, on a model that has not served a mixed batch yet
        eager = model(ids).logits
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)
    for b, r in enumerate(rows):
        with torch.no_grad():
            own = bank.models[r](ids).logits
        torch.testing.assert_close(got[b], own[b], rtol=0, atol=1e-5)


def test_torch_compile_fullgraph_after_eager_mixed_batches(banks):
    """A server warms up eagerly (or prefills eagerly) and then compiles: the [K, d] tables that the
    eager mixed batch cached must not stop the trace (no data-dependent guard on a parameter's
    version counter)."""
    bank = banks("llama")
    model = copy.deepcopy(bank.bank)
    rows = ["acme", None, "beta", "gam"]
    ids = bank.inputs(len(rows), "none")["input_ids"]
    torch._dynamo.reset()
    fn = torch.compile(lambda ids: model(ids).logits, fullgraph=True, backend="eager")
    with torch.no_grad(), rk.tenants(model, rows):
        eager = model(ids).logits
        got = fn(ids)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["red", "para"])
def test_training_after_serving_the_same_rows(tmp_path, method):
    """Tenant ids and tables made under inference_mode are not reused by a training forward
    (inference tensors cannot be saved for backward)."""
    model = tiny_llama()
    rk.patch_model(model, method, adapter_name="a")
    rk.save_adapter(model, tmp_path)
    rk.load_adapter(model, tmp_path, adapter_name="b")
    ids = torch.randint(3, VOCAB, (2, 5))
    with torch.inference_mode(), rk.tenants(model, ["a", "b"]):
        model(ids)
    for p in rk.adapter_parameters(model, "b").values():
        p.requires_grad_(True)
    with rk.tenants(model, ["a", "b"]):
        model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in rk.adapter_parameters(model, "b").values())
    # Frozen adapters with a gradient through the activations (e.g. training the embeddings).
    for p in rk.adapter_parameters(model, "b").values():
        p.requires_grad_(False)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.inference_mode(), rk.tenants(model, ["a", "b"]):
        model(ids)
    with rk.tenants(model, ["a", "b"]):
        model(inputs_embeds=embeds, labels=ids).loss.backward()
    assert embeds.grad is not None
