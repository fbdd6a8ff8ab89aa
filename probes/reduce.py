"""On-device reductions: a tensor in, a short row of sufficient statistics out.

Everything stays on the tensor's device; nothing here synchronises with the
host. :class:`Batch` gathers the rows and histogram bin indices of one
sampled step and brings them to the host in one go at :meth:`Batch.to_host`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import histogram

# Column layout of a statistics row (float64).
COLUMNS = (
    "count", "sum", "sumsq", "abssum", "min", "max",
    "near_zero", "zeros", "nan", "posinf", "neginf",
    "dead_units", "ref_sumsq",
)
COL = {name: i for i, name in enumerate(COLUMNS)}
NCOL = len(COLUMNS)
_TRASH = histogram.NUM_BINS  # bin index of non-finite values


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """A flat float32/float64 view (or copy, for half types) of ``x``."""
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return x.reshape(-1)


def stats_row(x: torch.Tensor, eps: float, dead_units: torch.Tensor | None = None,
              ref_sumsq: torch.Tensor | None = None) -> torch.Tensor:
    """The exact statistics of every element of ``x``, as a float64 row."""
    f = _as_float(x)
    nan = torch.tensor(math.nan, dtype=torch.float64, device=f.device)
    if f.numel() == 0:
        row = torch.full((NCOL,), math.nan, dtype=torch.float64, device=f.device)
        row[[0, 1, 2, 3, 6, 7, 8, 9, 10]] = 0.0
        return row
    a = f.abs()
    mn, mx = torch.aminmax(f)
    parts = [
        torch.tensor(float(f.numel()), dtype=torch.float64, device=f.device),
        f.sum(dtype=torch.float64),
        (f * f).sum(dtype=torch.float64),
        a.sum(dtype=torch.float64),
        mn.double(),
        mx.double(),
        (a < eps).sum().double(),
        (f == 0).sum().double(),
        torch.isnan(f).sum().double(),
        (f == math.inf).sum().double(),
        (f == -math.inf).sum().double(),
        nan if dead_units is None else dead_units.double(),
        nan if ref_sumsq is None else ref_sumsq.double(),
    ]
    return torch.stack(parts)


def hist_sample(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """At most ``k`` elements of ``x`` for the histogram.

    A plain stride aliases with row widths (DESIGN.md); we take an odd
    stride coprime with the last dimension and a random offset.
    """
    f = _as_float(x)
    n = f.numel()
    if n <= k:
        return f
    width = x.shape[-1] if x.dim() else 1
    stride = max(1, n // k) | 1
    while math.gcd(stride, width) != 1:
        stride += 2
    offset = int(torch.randint(stride, (1,), generator=generator).item()) if generator else 0
    return f[offset::stride][:k]


def bin_index(sample: torch.Tensor) -> torch.Tensor:
    """Bin of each element, read from the float32 bits (see probes.histogram)."""
    bits = sample.float().contiguous().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127
    mant = (bits >> (23 - histogram.MANTISSA_BITS)) & (histogram.BINS_PER_OCTAVE - 1)
    mag = ((exp - histogram.EXP_LO) * histogram.BINS_PER_OCTAVE + mant).clamp(-1, histogram.MAG_BINS - 1)
    z = histogram.ZERO_BIN
    idx = torch.where(mag < 0, z, torch.where(bits < 0, z - 1 - mag, z + 1 + mag))
    return torch.where(torch.isfinite(sample), idx, _TRASH).long()


def dead_units(x: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Fraction of last-dimension units never above eps in the batch."""
    if x.dim() < 2 or x.shape[-1] == 0:
        return None
    alive = (x.detach().abs() > eps).reshape(-1, x.shape[-1]).any(0)
    return 1.0 - alive.float().mean()


class Batch:
    """The statistics of one sampled step, gathered on the device."""

    def __init__(self) -> None:
        self.meta: list[tuple[str, str]] = []  # (layer, kind) per row
        self.rows: list[torch.Tensor] = []
        self.bins: list[torch.Tensor] = []
        self.hist_n: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, layer: str, kind: str, x: torch.Tensor, eps: float, hist_k: int,
            generator: torch.Generator | None = None, *, dead: bool = False,
            ref_sumsq: torch.Tensor | None = None) -> None:
        """Reduce ``x`` and remember it under (layer, kind)."""
        du = dead_units(x, eps) if dead else None
        self.rows.append(stats_row(x, eps, du, ref_sumsq))
        sample = hist_sample(x, hist_k, generator)
        self.bins.append(bin_index(sample))
        self.hist_n.append(sample.numel())
        self.meta.append((layer, kind))

    def to_host(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[n, NCOL]`` and histograms ``[n, NUM_BINS]`` on the host.

        The histograms of all tensors are counted by one ``bincount`` over
        offset bin indices, so a step costs one kernel, not one per tensor,
        and rows and counts travel to the host in one copy (counts are exact
        in float64 up to 2**53).
        """
        if not self.rows:
            return np.zeros((0, NCOL)), np.zeros((0, histogram.NUM_BINS), dtype=np.int64)
        width = histogram.NUM_BINS + 1
        device = self.rows[0].device
        rows = torch.stack([r.to(device) for r in self.rows])
        offsets = [b.to(device) + i * width for i, b in enumerate(self.bins)]
        counts = torch.bincount(torch.cat(offsets), minlength=len(self.bins) * width)
        counts = counts.view(len(self.bins), width)[:, : histogram.NUM_BINS]
        host = torch.cat([rows, counts.to(torch.float64)], dim=1).cpu().numpy()
        return host[:, :NCOL], host[:, NCOL:].astype(np.int64)
