"""On-device reductions: tensors in, short rows of sufficient statistics out.

Everything stays on the tensors' device and nothing synchronises with the
host until :meth:`Batch.to_host`. The cost on small tensors is the number
of kernel launches (and, on a busy CPU, of OpenMP parallel regions), not
the bytes, so tensors are not reduced one by one: a :class:`Batch` holds
them and reduces a whole group at once, by concatenating them into one flat
buffer (in buckets of at most ``BUCKET`` elements) and taking segment sums,
minima and maxima over it. The histograms of the group are binned by one
pass over the concatenated samples and counted by one ``bincount``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import histogram

# Column layout of a statistics row (float64).
COLUMNS = (
    "count", "sum", "sumsq", "abssum", "min", "max",
    "near_zero", "zeros", "nan", "posinf", "neginf", "sum3", "sum4",
    "dead_units", "ref_sumsq", "init_dist", "lora_sumsq",
)
COL = {name: i for i, name in enumerate(COLUMNS)}
NCOL = len(COLUMNS)
_NBASE = COL["dead_units"]  # columns computed by the reduction itself
_TRASH = histogram.NUM_BINS  # bin index of non-finite values
#: Largest flat buffer reduced at once (elements).
BUCKET = 1 << 22
#: Tensors at least this large are reduced alone.
ALONE = 1 << 16


def _flat32(x: torch.Tensor) -> torch.Tensor:
    """A flat float32 view (or copy, for other float types) of ``x``."""
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()
    return x.reshape(-1)


def segment_rows(flat: torch.Tensor, lengths: list[int], eps: float) -> torch.Tensor:
    """Exact statistics of consecutive segments of ``flat``: ``[len(lengths), _NBASE]``.

    Sums are accumulated in float64. A NaN in a segment makes its sums, min
    and max NaN, as they are for the tensor itself; the counts stay exact.
    """
    lens = torch.tensor(lengths, device=flat.device)

    def seg(data: torch.Tensor, how: str = "sum") -> torch.Tensor:
        return torch.segment_reduce(data, how, lengths=lens, unsafe=True).double()

    d = flat.double()
    d2 = d * d
    a = flat.abs()
    cols = [
        lens.double(),
        seg(d),
        seg(d2),
        seg(a.double()),
        seg(flat, "min"),
        seg(flat, "max"),
        seg((a < eps).double()),
        seg((flat == 0).double()),
        seg(torch.isnan(flat).double()),
        seg((flat == math.inf).double()),
        seg((flat == -math.inf).double()),
        seg(d2 * d),
        seg(d2 * d2),
    ]
    return torch.stack(cols, 1)


def tensor_row(f: torch.Tensor, eps: float) -> torch.Tensor:
    """The same statistics for one large flat tensor (no segment bookkeeping)."""
    a = f.abs()
    mn, mx = torch.aminmax(f)
    d2 = f.double().square()
    cols = [
        torch.tensor(float(f.numel()), dtype=torch.float64, device=f.device),
        f.sum(dtype=torch.float64),
        torch.linalg.vector_norm(f, dtype=torch.float64).square(),  # squares in float64, like segment_rows
        a.sum(dtype=torch.float64),
        mn.double(),
        mx.double(),
        (a < eps).sum().double(),
        (f == 0).sum().double(),
        torch.isnan(f).sum().double(),
        (f == math.inf).sum().double(),
        (f == -math.inf).sum().double(),
        (d2 * f).sum(),
        d2.square().sum(),
    ]
    return torch.stack(cols)


def hist_sample(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """At most ``k`` elements of ``x`` (flat float32) for the histogram.

    A plain stride aliases with row widths (DESIGN.md); we take an odd
    stride coprime with the last dimension and a random offset.
    """
    f = _flat32(x)
    n = f.numel()
    if n <= k:
        return f
    width = x.shape[-1] if x.dim() else 1
    stride = -(-n // k) | 1
    while math.gcd(stride, width) != 1:
        stride += 2
    offset = int(torch.randint(stride, (1,), generator=generator)) if generator is not None else 0
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
    if x.dim() < 2 or x.shape[-1] == 0 or x.numel() == 0:
        return None
    alive = (x.detach().abs() > eps).reshape(-1, x.shape[-1]).any(0)
    return 1.0 - alive.float().mean()


class Batch:
    """The statistics of one sampled step, gathered on the device.

    :meth:`hold` queues a tensor; :meth:`reduce` reduces everything queued
    (call it before the tensors change: weights before the optimizer step);
    :meth:`to_host` reduces what is left and copies all rows and histogram
    counts to the host in one transfer.
    """

    def __init__(self, eps: float, hist_k: int, generator: torch.Generator | None = None) -> None:
        self.eps = eps
        self.hist_k = hist_k
        self.generator = generator
        self.meta: list[tuple[str, str]] = []  # (layer, kind) per reduced row
        self.hist_n: list[int] = []
        self._rows: list[torch.Tensor] = []  # [n, NCOL] blocks, in meta order
        self._counts: list[torch.Tensor] = []  # [n, NUM_BINS] blocks
        self._held: list[tuple[str, str, torch.Tensor, dict[str, torch.Tensor]]] = []
        self.held_elements = 0

    def __len__(self) -> int:
        return len(self.meta) + len(self._held)

    def hold(self, layer: str, kind: str, x: torch.Tensor, *, dead: torch.Tensor | None = None,
             **extra: torch.Tensor | None) -> None:
        """Queue ``x`` (its values must not change until :meth:`reduce`).

        ``dead`` and the other keywords are 0-d tensors computed elsewhere
        that fill the columns of their name (``dead_units``, ``ref_sumsq``,
        ``init_dist``, ``lora_sumsq``); None leaves a column NaN.
        """
        if dead is not None:
            extra["dead_units"] = dead
        for col in extra:
            if col not in COL or COL[col] < _NBASE:
                raise ValueError(f"{col!r} is not an extra statistics column")
        self._held.append((layer, kind, x.detach(), {k: v for k, v in extra.items() if v is not None}))
        self.held_elements += x.numel()

    def reduce(self) -> None:
        """Reduce every held tensor, grouped by device, and let them go."""
        held, self._held, self.held_elements = self._held, [], 0
        by_device: dict[torch.device, list] = {}
        for item in held:
            by_device.setdefault(item[2].device, []).append(item)
        for items in by_device.values():
            self._reduce_group(items)

    def _reduce_group(self, items: list) -> None:
        eps = self.eps
        flats = [_flat32(x) for _, _, x, _ in items]
        device = flats[0].device
        rows = torch.full((len(items), NCOL), math.nan, dtype=torch.float64, device=device)
        # Small tensors share segment reductions; large ones (where the bytes,
        # not the launches, cost) are reduced alone, without a concatenated copy.
        start, size = 0, 0
        for i, f in enumerate(flats + [None]):
            n = f.numel() if f is not None else 0
            if f is None or size + n > BUCKET or n >= ALONE or (i > 0 and flats[i - 1].numel() >= ALONE):
                idx = [j for j in range(start, i) if flats[j].numel()]
                if len(idx) == 1:
                    rows[idx[0], :_NBASE] = tensor_row(flats[idx[0]], eps)
                elif idx:
                    block = segment_rows(torch.cat([flats[j] for j in idx]), [flats[j].numel() for j in idx], eps)
                    rows[idx, :_NBASE] = block
                start, size = i, 0
            size += n
        for i, (_, _, x, _) in enumerate(items):
            if x.numel() == 0:
                rows[i, :_NBASE] = torch.tensor([0, 0, 0, 0, math.nan, math.nan, 0, 0, 0, 0, 0, 0, 0],
                                                dtype=torch.float64, device=device)
        extras = [(i, COL[col], v) for i, (_, _, _, extra) in enumerate(items) for col, v in extra.items()]
        if extras:
            rows[[i for i, _, _ in extras], [c for _, c, _ in extras]] = torch.stack(
                [v.to(device=device, dtype=torch.float64) for _, _, v in extras])
        # histograms: one pass over every sample, one bincount with per-tensor offsets
        samples = [hist_sample(x, self.hist_k, self.generator) for _, _, x, _ in items]
        lengths = torch.tensor([s.numel() for s in samples], device=device)
        width = histogram.NUM_BINS + 1
        offsets = torch.repeat_interleave(torch.arange(len(items), device=device) * width, lengths)
        bins = bin_index(torch.cat(samples)) + offsets
        counts = torch.bincount(bins, minlength=len(items) * width).view(len(items), width)
        self._rows.append(rows)
        self._counts.append(counts[:, : histogram.NUM_BINS])
        self.meta += [(layer, kind) for layer, kind, _, _ in items]
        self.hist_n += [s.numel() for s in samples]

    def to_host(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[n, NCOL]`` and histograms ``[n, NUM_BINS]`` on the host.

        Rows and counts travel in one copy (counts are exact in float64 up
        to 2**53).
        """
        self.reduce()
        if not self._rows:
            return np.zeros((0, NCOL)), np.zeros((0, histogram.NUM_BINS), dtype=np.int64)
        device = self._rows[0].device
        rows = torch.cat([r.to(device) for r in self._rows])
        counts = torch.cat([c.to(device) for c in self._counts]).to(torch.float64)
        host = torch.cat([rows, counts], dim=1).cpu().numpy()
        return host[:, :NCOL], host[:, NCOL:].astype(np.int64)
