"""Mixed and low precision: bf16 autocast, bf16/fp16 parameters, integer and bool
tensors, empty tensors; every figure against ground truth computed here."""

import numpy as np
import pytest
import torch
from torch import nn

import probes
from probes.protocol import histogram, wire
from test_probe import Net, assert_matches, by_key, collect, steps_of
from tui.merge import merge_samples


def assert_hist(s, t: torch.Tensor):
    """The sample's histogram is that of the whole tensor (small tensors are not subsampled)."""
    a = t.detach().float().numpy().reshape(-1)
    want = np.bincount(histogram.bin_index(a), minlength=histogram.NUM_BINS + 1)
    got = np.zeros(histogram.NUM_BINS + 1, dtype=np.int64)
    got[s.hist_lo: s.hist_lo + len(s.hist)] = s.hist
    assert s.hist_n == a.size and (got == want).all()


def train(model, x, steps=3, autocast=None):
    """Train with SGD at every=1; per step the truth: {param: (weight, grad, update)} and the activations."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acts = {}
    for name, m in model.named_modules():
        if name:
            m.register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o.detach().clone()))
    xr = probes.attach(model, opt, every=1, serve=False, spectral_every=None)
    msgs = collect(xr)
    truth = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            out = model(x)
        out.float().pow(2).mean().backward()
        before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        # the update in float64: a difference taken in bf16/fp16 would be rounded
        truth.append(({n: (w, g, p.detach().double() - w.double())
                       for (n, (w, g)), p in zip(before.items(), (q for q in model.parameters() if q.requires_grad))},
                      dict(acts)))
        opt.zero_grad()
    xr.close()
    assert xr._failed == set()
    got = steps_of(msgs)
    assert [s.step for s in got] == list(range(steps))
    return got, truth


def test_bf16_autocast_activations_are_measured_as_the_bf16_tensor():
    torch.manual_seed(0)
    got, truth = train(Net(), torch.randn(16, 12) * 3, autocast=torch.bfloat16)
    for st, (params, acts) in zip(got, truth):
        samples = by_key(st)
        for layer in ("fc1", "act", "fc2"):
            assert acts[layer].dtype == torch.bfloat16  # autocast ran the Linear layers in bf16
            # the bf16 values themselves, upcast: float32 rounding of them would differ in the sums
            assert_matches(samples[(layer, "act")], acts[layer])
            assert_hist(samples[(layer, "act")], acts[layer])
            s, a = samples[(layer, "act")], acts[layer].double().numpy()
            # bf16 -> float32 is exact, so the sum is the bf16 values' to the kernel's float32 block
            # rounding (~1e-7 of the sum of |x - mean|), far below bf16's own ~4e-3 steps
            assert abs(s.sum - a.sum()) <= 1e-5 * np.abs(a - a.mean()).sum()
        for name, (w, g, dw) in params.items():
            assert w.dtype == g.dtype == torch.float32  # the parameters and gradients stay float32
            assert_matches(samples[(name, "weight")], w)
            assert_matches(samples[(name, "grad")], g)
            assert_matches(samples[(name, "update")], dw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_weights_grads_updates(dtype):
    torch.manual_seed(1)
    model = Net().to(dtype)
    got, truth = train(model, torch.randn(16, 12).to(dtype))
    for st, (params, acts) in zip(got, truth):
        samples = by_key(st)
        for name, (w, g, dw) in params.items():
            assert w.dtype == g.dtype == dtype and dw.dtype == torch.float64
            for kind, t in (("weight", w), ("grad", g), ("update", dw)):
                assert_matches(samples[(name, kind)], t)
                assert_hist(samples[(name, kind)], t)
                # sums of the exact upcast values (to the kernel's float32 block rounding, ~1e-7 of
                # the sum of (x - mean)^2: docs/benchmarks.md), not of values rounded to float32 first
                a = t.double().numpy()
                assert abs(samples[(name, kind)].sumsq - (a**2).sum()) <= 1e-5 * ((a - a.mean()) ** 2).sum() + 1e-12
            u = samples[(name, "update")]
            assert u.ratio == pytest.approx((dw.double().norm() / w.double().norm()).item(), rel=1e-6)
        assert_matches(samples[("fc1", "act")], acts["fc1"])


class Mixed(nn.Module):
    """Integer and bool buffers and parameters, a module whose output is bool, an empty Linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.norm = nn.BatchNorm1d(4)  # num_batches_tracked: an int64 buffer
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("mask", torch.tensor([True, False, True, True]))
        self.codes = nn.Parameter(torch.arange(4), requires_grad=False)  # an integer parameter
        self.gate = Gate()
        self.empty = nn.Linear(6, 0)  # a 0x6 weight, a (batch, 0) output

    def forward(self, x):
        self.calls += 1
        h = self.norm(self.fc(x)) * self.mask
        keep = self.gate(h)  # bool
        return torch.cat([h * keep, self.empty(x)], dim=-1)


class Gate(nn.Module):
    """A leaf module with a parameter (so it is hooked) whose output is bool."""

    def __init__(self):
        super().__init__()
        self.threshold = nn.Parameter(torch.zeros(()), requires_grad=False)  # a comparison has no gradient

    def forward(self, h):
        return h > self.threshold


def test_int_and_bool_tensors_are_ignored_and_empty_ones_give_count_0_samples(caplog):
    torch.manual_seed(2)
    model = Mixed()
    got, truth = train(model, torch.randn(8, 6))
    assert "switched off" not in caplog.text
    for st, (params, acts) in zip(got, truth):
        samples = by_key(st)
        layers = {layer for layer, _ in samples}
        # int/bool buffers and parameters, and the bool output of `gate`, are not streams
        assert not {"calls", "mask", "codes", "norm.num_batches_tracked", "gate"} & layers
        assert ("gate.threshold", "weight") in samples  # the gate's float parameter is read
        assert ("gate", "act") not in samples
        # empty tensors: a sample with no elements, not an error
        for key in (("empty.weight", "weight"), ("empty.weight", "grad"), ("empty.weight", "update"),
                    ("empty.bias", "weight"), ("empty", "act")):
            s = samples[key]
            assert (s.count, s.sum, s.sumsq, s.hist_n, s.nan, s.zeros) == (0, 0, 0, 0, 0, 0), key
            assert s.ratio is None and s.dead_units is None
        assert acts["empty"].shape == (8, 0)
        # the others are still exact
        for name in ("fc.weight", "norm.weight"):
            w, g, dw = params[name]
            assert_matches(samples[(name, "weight")], w)
            assert_matches(samples[(name, "grad")], g)
            assert_matches(samples[(name, "update")], dw)
        assert_matches(samples[("norm", "act")], acts["norm"])


def test_merging_an_empty_sample_keeps_the_others_min_and_max():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(3, 0))
    xr = probes.attach(model, every=1, serve=False, spectral_every=None)
    msgs = collect(xr)
    xr.step()
    xr.close()
    s = by_key(steps_of(msgs)[0])
    full, empty = s[("0.weight", "weight")], s[("1.weight", "weight")]
    assert empty.count == 0
    merged = merge_samples([empty, full])
    assert (merged.count, merged.min, merged.max) == (full.count, full.min, full.max)


def test_an_empty_sample_exports_without_error():
    s = wire.Sample(layer="e", kind="act", count=0, sum=0.0, sumsq=0.0, abssum=0.0, min=float("nan"),
                    max=float("nan"), near_zero=0, zeros=0, nan=0, posinf=0, neginf=0, hist_lo=0,
                    hist_counts=b"", hist_n=0)
    from probes.protocol import stats

    d = stats.export_dict(s, 0, 0)
    assert d["count"] == 0 and np.isnan(d["mean"]) and d["hist"]["counts"] == []
