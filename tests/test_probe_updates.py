"""Updates beyond one step: distance from initialisation, and LoRA adapters' shift."""

import msgspec
import numpy as np
import pytest
import torch
from torch import nn

import probes
from probes.protocol import stats, wire
from tui.merge import merge_samples


def collect(xr):
    msgs = []
    xr.publisher.subscribe(msgs.append)
    return msgs


def steps_of(msgs):
    return [m for m in msgs if isinstance(m, wire.Step)]


def updates(step):
    return {s.layer: s for s in step.samples if s.kind == "update"}


def test_distance_from_init_equals_the_full_tensor_truth():
    """Weights no larger than update_sample: the subset is the whole tensor, so the
    estimate must equal ||W_t - W_0|| / ||W_0|| computed on the full tensor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    xr = probes.attach(model, opt, every=2, serve=False, spectral_every=None)
    msgs = collect(xr)
    truth = {}
    for step in range(7):
        model(torch.randn(16, 12)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        truth[step] = {n: ((p.detach() - w0[n]).norm() / w0[n].norm()).item() for n, p in model.named_parameters()}
    xr.close()
    got = steps_of(msgs)
    assert [s.step for s in got] == [0, 2, 4, 6]
    for st in got:
        ups = updates(st)
        assert set(ups) == set(w0)
        for name, want in truth[st.step].items():
            assert want > 0
            assert ups[name].init_dist == pytest.approx(want, rel=1e-5)
            assert stats.export_dict(ups[name], st.step, 0)["init_dist"] == ups[name].init_dist
    # the distance grows while Adam keeps moving the weights the same way
    assert updates(got[-1])["0.weight"].init_dist > updates(got[0])["0.weight"].init_dist
    # other kinds carry none
    assert all(s.init_dist is None for s in got[0].samples if s.kind != "update")


def test_distance_from_init_on_a_subset_estimates_a_large_weight():
    torch.manual_seed(1)
    model = nn.Linear(256, 256)  # 65,536 elements, 4,096 of them in the subset
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    w0 = model.weight.detach().clone()
    xr = probes.attach(model, opt, every=1, serve=False, spectral_every=None, update_sample=4096)
    msgs = collect(xr)
    for _ in range(3):
        model(torch.randn(64, 256)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    xr.close()
    want = ((model.weight.detach() - w0).norm() / w0.norm()).item()
    got = updates(steps_of(msgs)[-1])["weight"].init_dist
    assert got == pytest.approx(want, rel=0.1)


def test_a_weight_that_was_zero_at_attach_has_no_distance():
    model = nn.Linear(4, 4)
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xr = probes.attach(model, opt, every=1, serve=False, spectral_every=None)
    msgs = collect(xr)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    xr.close()
    ups = updates(steps_of(msgs)[0])
    assert ups["weight"].init_dist is None and ups["bias"].init_dist is not None


def _sample(**kw):
    base = dict(layer="fc.weight", kind="update", count=4, sum=1.0, sumsq=1.0, abssum=1.0, min=0.0, max=1.0,
                near_zero=0, zeros=0, nan=0, posinf=0, neginf=0, hist_lo=0, hist_counts=b"", hist_n=0)
    return wire.Sample(**{**base, **kw})


def test_frames_without_the_new_fields_still_decode():
    """A protocol-2 frame written before init_dist existed (samples end at sum4) decodes,
    with the new fields at their defaults: the version did not change."""
    step = wire.Step(step=3, rank=0, time=1.0, samples=[_sample(ratio=1e-3, init_dist=0.25)])
    raw = msgspec.msgpack.decode(wire.encode(step)[4:])
    old_len = wire.Sample.__struct_fields__.index("sum4") + 1
    assert len(raw["samples"][0]) > old_len  # the new frame does carry more
    raw["samples"] = [s[:old_len] for s in raw["samples"]]
    raw.pop("phase", None)
    old = wire.decode(msgspec.msgpack.encode(raw))
    assert old.samples[0].ratio == 1e-3 and old.samples[0].init_dist is None
    assert wire.decode(wire.encode(step)[4:]).samples[0].init_dist == 0.25
    assert wire.PROTOCOL_VERSION == 3 and 2 in wire.READABLE_VERSIONS  # 3 for rank -1; fields alone bump nothing


def test_merged_ranks_take_the_largest_distance():
    merged = merge_samples([_sample(init_dist=0.1), _sample(init_dist=0.3), _sample()])
    assert merged.init_dist == 0.3 and merged.count == 12


class PlainLoRA(nn.Module):
    """Adapters as plain submodules and a float ``scale`` (as in tests/test_fault_zoo.py)."""

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 8.0):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / r

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scale


class PeftLoRA(nn.Module):
    """peft's LoraLayer attribute layout: ModuleDicts per adapter name and a ``scaling`` dict;
    the adapters are registered before the base layer here, to check the grouping."""

    def __init__(self, base: nn.Linear, r: int = 2, alpha: float = 6.0, names=("default", "other")):
        super().__init__()
        self.lora_A = nn.ModuleDict({k: nn.Linear(base.in_features, r, bias=False) for k in names})
        self.lora_B = nn.ModuleDict({k: nn.Linear(r, base.out_features, bias=False) for k in names})
        self.base_layer = base
        self.scaling = {k: alpha / r * (i + 1) for i, k in enumerate(names)}
        for k in names:
            nn.init.zeros_(self.lora_B[k].weight)

    def forward(self, x):
        out = self.base_layer(x)
        for k in self.lora_A:
            out = out + self.lora_B[k](self.lora_A[k](x)) * self.scaling[k]
        return out


class Adapted(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = PlainLoRA(nn.Linear(16, 24))
        self.act = nn.GELU()
        self.v = PeftLoRA(nn.Linear(24, 8))

    def forward(self, x):
        return self.v(self.act(self.q(x)))


def _adapters(model):
    return {"q.lora_B.weight": (model.q.lora_A.weight, model.q.lora_B.weight, model.q.scale, model.q.base_layer),
            **{f"v.lora_B.{k}.weight": (model.v.lora_A[k].weight, model.v.lora_B[k].weight, model.v.scaling[k],
                                         model.v.base_layer) for k in ("default", "other")}}


def test_lora_shift_equals_the_full_product_and_stays_zero_for_a_b_that_never_moves():
    torch.manual_seed(0)
    model = Adapted()
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n
    # the "other" adapter's B is left out of the optimizer (a classic mistake): it never moves
    trained = [p for n, p in model.named_parameters() if "lora_" in n and "lora_B.other" not in n]
    opt = torch.optim.Adam(trained, lr=1e-2)
    xr = probes.attach(model, opt, every=1, serve=False, spectral_every=None)
    msgs = collect(xr)
    truth = []
    for _ in range(5):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        truth.append({b: ((wb @ wa) * s).norm().item() / base.weight.norm().item()
                      for b, (wa, wb, s, base) in _adapters(model).items()})
        opt.step()
        opt.zero_grad()
    xr.close()
    steps = steps_of(msgs)
    assert len(steps) == 5
    for st, want in zip(steps, truth):
        weights = {s.layer: s for s in st.samples if s.kind == "weight"}
        for b, shift in want.items():
            assert weights[b].lora_shift == pytest.approx(shift, rel=1e-5, abs=1e-12)
            assert stats.export_dict(weights[b], st.step, 0)["lora_shift"] == weights[b].lora_shift
        assert weights["v.lora_B.other.weight"].lora_shift == 0.0  # exactly: B is still zero
        assert weights["q.base_layer.weight"].lora_shift is None  # only B weights carry it
    assert steps[0].samples and truth[0]["q.lora_B.weight"] == 0.0 < truth[-1]["q.lora_B.weight"]
    # the adapter that never moves is flagged
    stalled = {m.layer for m in msgs if isinstance(m, wire.Alert) and m.rule == "stalled"}
    assert "v.lora_B.other.weight" in stalled and "q.lora_B.weight" not in stalled
    # the Hello groups each adapter with its base module
    layers = xr.publisher.hello.layers
    names = [li.name for li in layers]
    info = {li.name: li for li in layers}
    for adapter, base in (("q.lora_A", "q.base_layer"), ("q.lora_B", "q.base_layer"),
                          ("v.lora_A.default", "v.base_layer"), ("v.lora_B.other", "v.base_layer")):
        assert (info[adapter].role, info[adapter].adapter_of) == ("lora", base)
    assert info["q.base_layer"].adapter_of == "" and info["q.base_layer"].role == ""
    v = names.index("v.base_layer")
    assert names[v:v + 5] == ["v.base_layer", "v.lora_A.default", "v.lora_A.other",
                              "v.lora_B.default", "v.lora_B.other"]


def test_lora_shift_merges_and_old_frames_lack_it():
    assert merge_samples([_sample(lora_shift=0.01), _sample(lora_shift=0.02)]).lora_shift == 0.02
    assert _sample().lora_shift is None
