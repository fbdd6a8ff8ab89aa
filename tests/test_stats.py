"""Statistics and histograms against numpy/torch ground truth."""

import math

import numpy as np
import pytest
import torch

from probes.engines import cpu_kernel
from probes.protocol import histogram, stats
from probes.capture.step import build_step
from probes.engines.batch import BUCKET, Batch
from probes.engines.layout import bin_index
from probes.engines.reduce import dead_units
from tui import synthetic

EPS = 0.05


@pytest.fixture(autouse=True, params=["cpu-kernel", "torch"])
def reduction_path(request, monkeypatch):
    """Every test here runs on both CPU paths: the C kernel and torch's ops."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_kernel, "ready", lambda: None)
    else:
        request.getfixturevalue("cpu_kernel_lib")
    return request.param


def probe_sample(x: torch.Tensor, kind="weight", hist_k=1 << 30):
    """The probe's own sample of ``x`` (device reductions + host build)."""
    b = Batch(EPS, hist_k, torch.Generator().manual_seed(0))
    b.hold("t", kind, x, dead=dead_units(x, EPS) if kind == "act" else None)
    rows, hists = b.to_host()
    return build_step(0, 0, 0.0, b.meta, rows, hists, b.hist_n).samples[0]


TENSORS = {
    "normal": lambda: torch.randn(300, 70) * 0.02,
    "gelu-like": lambda: torch.nn.functional.gelu(torch.randn(64, 256)),
    "wide-range": lambda: torch.randn(5000) * torch.exp(torch.empty(5000).uniform_(-30, 30)),
    "with-zeros": lambda: torch.relu(torch.randn(1000)),
    "single": lambda: torch.tensor([3.5]),
}


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_statistics_equal_numpy(name):
    torch.manual_seed(1)
    x = TENSORS[name]()
    s = probe_sample(x)
    a = x.double().numpy().reshape(-1)
    assert s.count == a.size
    assert stats.mean(s) == pytest.approx(a.mean(), rel=1e-6, abs=1e-12)
    assert stats.std(s) == pytest.approx(a.std(), rel=1e-4, abs=1e-9)
    assert stats.l2(s) == pytest.approx(np.linalg.norm(a), rel=1e-6)
    assert s.min == a.min() and s.max == a.max()
    assert stats.absmax(s) == np.abs(a).max()
    assert s.near_zero == (np.abs(x.numpy()) < EPS).sum()
    assert s.zeros == (a == 0).sum()
    assert s.nan == s.posinf == s.neginf == 0
    if a.size > 2 and a.std() > 0:
        z = (a - a.mean()) / a.std()
        assert stats.skewness(s) == pytest.approx((z**3).mean(), rel=1e-4, abs=1e-6)
        assert stats.kurtosis(s) == pytest.approx((z**4).mean() - 3, rel=1e-4, abs=1e-6)
        q = stats.quantiles(s)
        for name, p in zip(("p05", "p25", "median", "p75", "p95"), stats.QUANTILES):
            want = np.quantile(a, p)
            assert abs(q[name] - want) <= 0.25 * abs(want) + 2.0**histogram.EXP_LO + 1e-6 * np.abs(a).max()
    # the histogram is exactly numpy's reference binning of the same values
    assert np.array_equal(histogram.expand(s.hist_lo, s.hist), histogram.histogram(x.numpy()))
    assert sum(s.hist) == a.size


def test_nonfinite_counts_are_exact_and_kept_out_of_the_histogram():
    x = torch.randn(1000)
    x[[3, 5, 7]] = math.nan
    x[10] = math.inf
    x[11] = -math.inf
    x[12:20] = 0.0
    s = probe_sample(x)
    assert (s.nan, s.posinf, s.neginf) == (3, 1, 1)
    assert s.zeros == 8
    assert sum(s.hist) == 995 and s.hist_n == 1000
    assert math.isnan(stats.mean(s))  # the true mean of a tensor holding NaN


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes(dtype):
    x = (torch.randn(4096) * 3).to(dtype)
    s = probe_sample(x)
    a = x.double().numpy()
    assert stats.mean(s) == pytest.approx(a.mean(), rel=1e-5, abs=1e-7)
    assert stats.l2(s) == pytest.approx(np.linalg.norm(a), rel=1e-5)
    assert s.max == a.max()


def test_empty_tensor_gives_a_zero_count_sample():
    s = probe_sample(torch.empty(0, 8))
    assert s.count == 0 and s.hist.size == 0 and math.isnan(stats.mean(s))


def test_dead_units_fraction():
    x = torch.randn(32, 10, 8).abs() + 1
    x[..., [1, 4]] = 0.01  # two of eight units never exceed eps
    s = probe_sample(x, kind="act")
    assert s.dead_units == pytest.approx(2 / 8)


def test_sampled_histogram_error_is_small_on_a_large_matrix():
    torch.manual_seed(0)
    x = torch.randn(768, 2304) * 0.02
    full = histogram.histogram(x.numpy())
    s = probe_sample(x, hist_k=65536)
    sampled = histogram.expand(s.hist_lo, s.hist)
    assert 0.9 * 65536 <= s.hist_n <= 65536 and s.count == x.numel()
    err = np.abs(sampled / sampled.sum() - full / full.sum()).max()
    assert err < 0.01


def test_numpy_and_torch_binning_agree_and_edges_contain_values():
    x = np.concatenate([np.random.default_rng(0).standard_normal(20000) * 10.0 ** np.random.default_rng(1).uniform(-14, 14, 20000),
                        [0.0, -0.0, 1e-45, 3e38, -3e38]]).astype(np.float32)
    idx = histogram.bin_index(x)
    assert np.array_equal(idx, bin_index(torch.from_numpy(x)).numpy())
    inside = (x >= histogram.EDGES[idx]) & (x < histogram.EDGES[idx + 1])
    saturated = (idx == 0) | (idx == histogram.NUM_BINS - 1) | (idx == histogram.ZERO_BIN)
    assert (inside | saturated).all()
    assert np.all(np.diff(histogram.EDGES) > 0)


def test_quantiles_within_one_bin_of_numpy():
    x = np.random.default_rng(0).standard_normal(100000).astype(np.float32)
    s = synthetic.sample_of("x", "act", x)
    for q, got in zip([0.05, 0.25, 0.5, 0.75, 0.95], histogram.quantiles(s.hist_lo, s.hist, [0.05, 0.25, 0.5, 0.75, 0.95])):
        want = np.quantile(x, q)
        assert abs(got - want) <= 0.25 * abs(want) + 2.0**histogram.EXP_LO + 1e-3


def test_export_dict_matches_contract():
    s = synthetic.sample_of("a.b.weight", "weight", np.array([0.0, 0.01, -2.0, 3.0]))
    d = stats.export_dict(s, step=7, rank=1)
    assert {k: d[k] for k in ("type", "step", "rank", "layer", "kind", "count")} == {
        "type": "sample", "step": 7, "rank": 1, "layer": "a.b.weight", "kind": "weight", "count": 4}
    assert d["near_zero"] == 0.5 and d["zeros"] == 0.25 and d["absmax"] == 3.0
    assert len(d["hist"]["edges"]) == len(d["hist"]["counts"]) + 1


def test_a_batch_of_many_tensors_equals_each_alone():
    """Small tensors share segment reductions, big ones go alone: same numbers."""
    torch.manual_seed(0)
    xs = [torch.randn(n) * s for n, s in [(7, 1.0), (0, 1.0), (1000, 0.01), (BUCKET // 3, 2.0), (50, 1e-9),
                                          (BUCKET + 5, 0.5), (3, 1e6)]]
    xs[2][5] = math.nan
    b = Batch(EPS, 4096, torch.Generator().manual_seed(0))
    for i, x in enumerate(xs):
        b.hold(f"t{i}", "weight", x)
    rows, hists = b.to_host()
    batched = build_step(0, 0, 0.0, b.meta, rows, hists, b.hist_n).samples
    for x, s in zip(xs, batched):
        alone = probe_sample(x, hist_k=4096)
        assert (s.count, s.nan, s.zeros, s.near_zero, s.hist_n) == (alone.count, alone.nan, alone.zeros,
                                                                   alone.near_zero, alone.hist_n)
        for f in ("sum", "sumsq", "abssum", "min", "max"):
            a, c = getattr(s, f), getattr(alone, f)
            assert (math.isnan(a) and math.isnan(c)) or a == pytest.approx(c, rel=1e-9), f


@pytest.mark.parametrize("values", [np.ones(64), np.zeros(64), np.full(10, -0.3), np.array([1.0, 1.0, 1.1]),
                                    np.array([0.0, 0.0, 0.0, 5e-13])])
def test_quantiles_lie_within_min_and_max(values):
    """LayerNorm weights (all ones) and zero biases: the bin [1, 1.25) or the zero bin
    [-2**-40, 2**-40] interpolated gave p05..p95 = 1.0125..1.2375 and +-8e-13 before."""
    a = values.astype(np.float32)
    s = synthetic.sample_of("x", "weight", a)
    q = stats.quantiles(s)
    for name, p in zip(("p05", "p25", "median", "p75", "p95"), stats.QUANTILES):
        assert a.min() <= q[name] <= a.max()
        want = np.quantile(a.astype(np.float64), p)
        # clamping keeps the documented bound: one bin (25% relative, 2**EXP_LO near zero)
        assert abs(q[name] - want) <= 0.25 * abs(want) + 2.0**histogram.EXP_LO
    if a.min() == a.max():
        assert all(v == a[0] for v in q.values())  # a constant tensor: its value, exactly


def test_clamped_quantiles_of_a_random_tensor_keep_the_bound():
    rng = np.random.default_rng(3)
    a = (1.0 + 0.01 * rng.standard_normal(5000)).astype(np.float32)  # all inside one octave's bins
    s = synthetic.sample_of("x", "weight", a)
    q = stats.quantiles(s)
    for name, p in zip(("p05", "p25", "median", "p75", "p95"), stats.QUANTILES):
        want = np.quantile(a.astype(np.float64), p)
        assert a.min() <= q[name] <= a.max() and abs(q[name] - want) <= 0.25 * abs(want)
