"""The one-pass C kernel (probes/engines/cpu_kernel.c) against numpy and against the torch path."""

import logging
import math
import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from probes.engines import batch, cpu_kernel, layout, reduce
from probes.engines.batch import Batch
from probes.engines.layout import COLUMNS, NUM_CODES
from probes.engines.reduce import sample_plan

EPS = 0.05
ROW = COLUMNS[:13]


def _tensors():
    g = torch.Generator().manual_seed(0)
    with_nonfinite = torch.randn(5000, generator=g)
    with_nonfinite[[1, 50, 700]] = math.nan
    with_nonfinite[9] = math.inf
    with_nonfinite[[10, 11]] = -math.inf
    signed_zeros = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 0.049999997, 0.05, -0.05, 1.0])
    return {
        "normal": torch.randn(300, 70, generator=g) * 0.02,
        "nonfinite": with_nonfinite,
        "only-inf": torch.tensor([math.inf, 1.0, -2.0]),
        "zeros-and-eps-edges": signed_zeros,
        "huge": torch.randn(1000, generator=g) * 1e30,  # x^4 overflows float32, not the float64 sums
        "subnormal": torch.full((64,), 1e-40),
        "tiny": torch.randn(3000, generator=g) * 1e-12,  # a vanishing gradient: x^4 is far below float32's range
        "single": torch.tensor([3.5]),
        "empty": torch.empty(0, 8),
        "transposed": torch.randn(64, 48, generator=g).t(),
        "float16": (torch.randn(4096, generator=g) * 3).half(),
        "bfloat16": (torch.randn(4096, generator=g) * 3).bfloat16(),
        "float64": torch.randn(2048, generator=g, dtype=torch.float64),
        "large": torch.randn(batch.BUCKET + 5, generator=g) * 0.5,
    }


TENSORS = _tensors()


def numpy_row(x: torch.Tensor) -> dict:
    """The row's ground truth, from the float32 values in float64 numpy."""
    f = x.detach().float().reshape(-1).numpy()
    a = f.astype(np.float64)
    finite = a[np.isfinite(a)]
    has_nan = np.isnan(a).any()
    with np.errstate(over="ignore", invalid="ignore"):
        return {
            "count": a.size, "sum": a.sum(), "sumsq": (a * a).sum(), "abssum": np.abs(a).sum(),
            "min": math.nan if has_nan or not a.size else a.min(), "max": math.nan if has_nan or not a.size else a.max(),
            "near_zero": (np.abs(f) < np.float32(EPS)).sum(), "zeros": (a == 0).sum(), "nan": np.isnan(a).sum(),
            "posinf": (a == math.inf).sum(), "neginf": (a == -math.inf).sum(),
            "sum3": (a**3).sum(), "sum4": (a**4).sum(),
            "_finite": finite.size == a.size,
        }


POWERS = {"sum": 1, "sumsq": 2, "sum3": 3, "sum4": 4, "abssum": 1}


def sum_tolerance(col: str, x: torch.Tensor, raw_rel: float = 1e-12) -> float:
    """How far the kernel's ``col`` may be from the exact sum.

    The kernel sums powers of x - c in float32 per block of 1,024, with c
    near the mean, and adds the blocks in float64: ~1e-7 (at most ~4e-6) of
    the sum of |x - mean|^p, plus float64 rounding of the sum of |x|^p
    (``raw_rel``: 1e-12).
    """
    a = x.detach().float().double().reshape(-1).numpy()
    if not a.size:
        return 0.0
    p = POWERS[col]
    central = np.abs(a if col == "abssum" else a - a.mean()) ** p
    return 1e-5 * central.sum() + raw_rel * (np.abs(a) ** p).sum() + 1e-300


def kernel_rows(xs, k=65535, threads=1):
    flats = [reduce._flat32(x).contiguous() for x in xs]
    plans = [sample_plan(x, k, torch.Generator().manual_seed(i)) for i, x in enumerate(xs)]
    return cpu_kernel.reduce(flats, plans, EPS, layout.CODE_SHIFT, layout.CODE_BINS_INT32, threads), flats, plans


def same(a: float, b: float, rel: float = 1e-12) -> bool:
    if math.isnan(b):
        return math.isnan(a)
    if math.isinf(b):
        return a == b
    return a == pytest.approx(b, rel=rel, abs=1e-300)


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_kernel_rows_equal_numpy(name, cpu_kernel_lib):
    x = TENSORS[name]
    (rows, _), _, _ = kernel_rows([x])
    want = numpy_row(x)
    for col, got in zip(ROW, rows[0]):
        if col in POWERS:
            if not want["_finite"]:
                assert not math.isfinite(got), col  # a NaN or Inf makes the sums non-finite, as in torch
            else:
                assert abs(got - want[col]) <= sum_tolerance(col, x), (col, got, want[col])
        else:
            assert same(got, want[col]), (col, got, want[col])


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_kernel_equals_the_torch_path_rows_and_histograms(name, cpu_kernel_lib, monkeypatch):
    x = TENSORS[name]

    def batch_rows():
        b = Batch(EPS, 4096, torch.Generator().manual_seed(3))
        b.hold("t", "weight", x)
        return b.to_host(), b.hist_n

    (k_rows, k_hist), k_n = batch_rows()
    monkeypatch.setattr(cpu_kernel, "ready", lambda: None)
    (t_rows, t_hist), t_n = batch_rows()
    assert np.array_equal(k_hist, t_hist) and k_n == t_n  # the same sample, binned the same
    for col, a, b in zip(ROW, k_rows[0], t_rows[0]):
        if col in POWERS:
            # both within the kernel's bound of the exact sum, so within twice it of each other
            # (torch rounds each power in float32 and sums in float64, the kernel sums (x - c)^p
            # in float32 blocks): no BLAS accumulation order enters either
            assert (not math.isfinite(b) and not math.isfinite(a)) or abs(a - b) <= 2 * sum_tolerance(col, x), col
        else:
            assert same(a, b, rel=1e-9), (col, a, b)


def test_histograms_equal_torch_bincount_and_threads_change_nothing(cpu_kernel_lib):
    xs = list(TENSORS.values())
    (rows1, hists1), flats, plans = kernel_rows(xs, k=1000, threads=1)
    codes = Batch._count_codes(flats, plans).view(len(xs), NUM_CODES).numpy()
    ref = np.zeros_like(hists1)
    for code, b in enumerate(layout.CODE_BINS.tolist()):
        ref[:, b] += codes[:, code]
    assert np.array_equal(hists1, ref) and ref[:, -1].sum() > 0  # NaN and Inf go to the last (trash) bin
    for threads in (2, 3, 16):
        (rows, hists), _, _ = kernel_rows(xs, k=1000, threads=threads)
        assert np.array_equal(hists, hists1)
        assert np.array_equal(rows, rows1, equal_nan=True)


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_a_mean_that_dwarfs_the_spread_keeps_its_moments(path, cpu_kernel_lib, monkeypatch):
    """A LayerNorm-like weight, 1 + 1e-3 N(0, 1) with a tail: raw float32 power sums would leave
    nothing of its skewness or kurtosis; sums of powers of x - c, c near the mean, keep them."""
    from probes.protocol import stats

    if path == "torch":
        monkeypatch.setattr(cpu_kernel, "ready", lambda: None)
    g = torch.Generator().manual_seed(5)
    x = 1 + 1e-3 * torch.randn(200_000, generator=g)
    x[:100] = 1 + 0.05 * torch.rand(100, generator=g)  # a right tail: skewed, heavy
    b = Batch(EPS, 4096)
    b.hold("ln", "weight", x)
    r = dict(zip(ROW, b.to_host()[0][0].tolist()))
    counts = {c: int(r[c]) for c in ("count", "near_zero", "zeros", "nan", "posinf", "neginf")}
    s = stats.Sample("ln", "weight", hist_lo=0, hist_counts=b"", hist_n=0, **{**r, **counts})
    a = x.double().numpy()
    z = (a - a.mean()) / a.std()
    assert stats.std(s) == pytest.approx(a.std(), rel=1e-5)
    assert stats.skewness(s) == pytest.approx((z**3).mean(), rel=1e-3)
    assert stats.kurtosis(s) == pytest.approx((z**4).mean() - 3, rel=1e-3)


def test_an_untrusted_cache_directory_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    mine = cpu_kernel._cache_dir()
    assert mine == tmp_path / "xray-tui" and (os.stat(mine).st_mode & 0o777) == 0o700
    os.chmod(mine, 0o777)  # someone else could plant a library there
    assert cpu_kernel._cache_dir() is None


def fresh_kernel_state(monkeypatch):
    """As if no probe had asked for the kernel yet in this process."""
    for name, value in (("_tried", False), ("_lib", None), ("_done", threading.Event()), ("_builder", None)):
        monkeypatch.setattr(cpu_kernel, name, value)


def test_ready_never_waits_for_the_compiler(tmp_path, monkeypatch, cpu_kernel_lib):
    fresh_kernel_state(monkeypatch)
    slow_cc = tmp_path / "slow-cc"
    slow_cc.write_text(f"#!/bin/sh\nsleep 1\nexec {shutil.which('cc')} \"$@\"\n")
    slow_cc.chmod(0o755)
    monkeypatch.setenv("CC", str(slow_cc))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing built there yet
    t0 = time.monotonic()
    assert cpu_kernel.ready() is None and cpu_kernel.ready() is None  # the build runs in the background
    b = Batch(EPS, 4096)
    b.hold("t", "weight", torch.arange(10.0))
    rows, _ = b.to_host()  # meanwhile the torch path answers
    assert rows[0, 1] == 45.0 and time.monotonic() - t0 < 0.9
    cpu_kernel._builder.join(60)
    assert cpu_kernel.ready() is not None and list((tmp_path / "cache" / "xray-tui").glob("cpu_kernel-*.so"))


@pytest.mark.parametrize("how", ["switched off", "no compiler"])
def test_without_the_kernel_the_torch_path_answers_and_says_so_once(how, monkeypatch, caplog):
    fresh_kernel_state(monkeypatch)
    if how == "switched off":
        monkeypatch.setenv("XRAY_TUI_CPU_KERNEL", "0")
    else:
        monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.INFO, logger="xray-tui"):
        assert cpu_kernel.load() is None and cpu_kernel.load() is None
        b = Batch(EPS, 4096)
        b.hold("t", "weight", torch.arange(10.0))
        rows, _ = b.to_host()
    assert rows[0, 1] == 45.0
    assert len([r for r in caplog.records if "kernel" in r.getMessage()]) == 1


def test_dead_units_equal_the_torch_path_nan_columns_included(cpu_kernel_lib, monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, 24, generator=g)
    x[..., :5] = 0.01  # five units never top eps
    x[0, 0, 5] = math.nan  # a NaN beside large values: alive
    x[..., 6] = math.nan  # all NaN: tops nothing, dead
    wide = torch.randn(3, 3000, generator=g)  # rows wider than the kernel's blocks
    wide[:, 2999] = 0
    cases = [x, x.bfloat16(), x.transpose(0, 1), torch.relu(torch.randn(4, 7, generator=g) - 3), wide,
             torch.randn(50, generator=g), torch.empty(0, 4)]

    def dead_column():
        b = Batch(EPS, 4096)
        for i, c in enumerate(cases):
            b.hold(str(i), "act", c, units=True)
        return b.to_host()[0][:, layout.COL["dead_units"]]

    kernel = dead_column()
    monkeypatch.setattr(cpu_kernel, "ready", lambda: None)
    torch_path = dead_column()
    truth = [float(reduce.dead_units(c, EPS)) if c.dim() >= 2 and c.numel() else math.nan for c in cases]
    assert np.allclose(kernel, truth, atol=1e-7, equal_nan=True) and np.allclose(torch_path, truth, atol=1e-7, equal_nan=True)
    assert kernel[0] == 6 / 24 and kernel[4] == 1 / 3000 and math.isnan(kernel[5])


def test_gather_equals_torch_indexing(cpu_kernel_lib):
    g = torch.Generator().manual_seed(2)
    flats = [torch.randn(1000, generator=g), torch.randn(7, generator=g), torch.empty(0), torch.randn(50, generator=g)]
    indices = [torch.randperm(1000, generator=g)[:100].sort().values, None, None, torch.tensor([49, 0, 0])]
    want = torch.cat([f if i is None else f[i] for f, i in zip(flats, indices)])
    assert torch.equal(cpu_kernel.gather(flats, indices), want)
