"""On-device reductions: tensors in, short rows of sufficient statistics out.

Everything stays on the tensors' device and nothing synchronises with the
host until :meth:`Batch.to_host`. The cost on small tensors is the number
of kernel launches (and, on a busy CPU, of OpenMP parallel regions), not
the bytes, so tensors are not reduced one by one: a :class:`Batch` holds
them and reduces a whole group at once, by concatenating them into one flat
buffer (in buckets of at most ``BUCKET`` elements) and taking segment sums,
minima and maxima over it. The histograms of the group are binned by one
pass over the concatenated samples and counted by one ``bincount``.

On the CPU the bytes cost instead (torch reads a tensor ~11 times for one
row), so there every row and histogram sample comes from one pass of
:mod:`probes.cpu_kernel`'s C kernel when it could be built; the torch path
gives the same statistics everywhere else.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import cpu_kernel, histogram

# Column layout of a statistics row (float64).
COLUMNS = (
    "count", "sum", "sumsq", "abssum", "min", "max",
    "near_zero", "zeros", "nan", "posinf", "neginf", "sum3", "sum4",
    "dead_units", "ref_sumsq", "init_dist", "lora_sumsq",
)
COL = {name: i for i, name in enumerate(COLUMNS)}
NCOL = len(COLUMNS)
_NBASE = COL["dead_units"]  # columns every reduction computes (the CPU kernel adds dead_units)
_TRASH = histogram.NUM_BINS  # bin index of non-finite values
#: Largest flat buffer reduced at once (elements).
BUCKET = 1 << 22
#: Tensors at least this large are reduced alone.
ALONE = 1 << 16
#: Elements of a batch from which the CPU kernel runs on torch's thread count (one thread below).
PARALLEL_ELEMENTS = 1 << 25
#: Largest |x| for which x^3 and x^4 are summed in float32 (n * x^4 stays below ~1e25).
POW4_SAFE = 1e4
#: Below this largest |x|, x^4 would sink into float32's subnormals (a vanishing gradient's kurtosis).
POW4_TINY = 1e-7


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
    """The same statistics for one large flat tensor (no segment bookkeeping).

    Here the passes over memory cost, not the launches, so the row is built
    from few of them: norms give the sums of |x| and x^2 without
    materialising a copy, one float32 ``y*y`` (y = x - mean) serves x^3 and
    x^4 as dot products (in float64 where |x| is huge or tiny, or the device
    is not the CPU, which would need a host read to tell), and on the CPU,
    where a host read is free, the NaN/Inf counts are skipped when the sums
    show the tensor is finite. Sums of x and x^2 accumulate in float64, like
    :func:`segment_rows`.
    """
    n = f.numel()
    s1 = f.sum(dtype=torch.float64)
    s2 = torch.linalg.vector_norm(f, dtype=torch.float64).square()
    zero = torch.zeros((), dtype=torch.float64, device=f.device)
    if f.device.type == "cpu" and bool(torch.isfinite(s1 + s2)):
        nan = posinf = neginf = zero  # a NaN or an Inf anywhere would make the sums non-finite
    else:
        nan = torch.isnan(f).sum().double()
        posinf = (f == math.inf).sum().double()
        neginf = (f == -math.inf).sum().double()
    mn, mx = torch.aminmax(f)
    if f.device.type == "cpu" and POW4_TINY <= float(torch.maximum(-mn, mx)) <= POW4_SAFE:
        # float32 suffices for powers of y = x - c, c the mean, as in the CPU kernel: the rounding
        # is relative to the spread, so a mean that dwarfs it leaves skewness and kurtosis intact
        c = float(np.float32(float(s1) / n))
        y = f - c
        sq = y * y
        p1, p2 = y.sum(dtype=torch.float64), sq.sum(dtype=torch.float64)
        # each power rounded once or twice in float32 (<= 3 ulp of |y|^p) and summed in float64, so
        # the sums are good to ~4e-7 of sum |y|^p whatever the BLAS: a float32 dot product's own
        # accumulation error depends on the BLAS kernel (AMD's and Intel's differed by 4x)
        p3, p4 = (sq * y).sum(dtype=torch.float64), sq.square().sum(dtype=torch.float64)
        sum3 = p3 + 3 * c * p2 + 3 * c * c * p1 + n * c**3
        sum4 = p4 + 4 * c * p3 + 6 * c * c * p2 + 4 * c**3 * p1 + n * c**4
    else:
        d = f.double()
        sq = d.square()
        sum3, sum4 = torch.dot(sq, d), torch.dot(sq, sq)
    cols = [
        zero + n,
        s1,
        s2,
        torch.linalg.vector_norm(f, 1, dtype=torch.float64),
        mn.double(),
        mx.double(),
        (f.abs() < eps).sum().double(),
        (n - torch.count_nonzero(f)).double(),
        nan,
        posinf,
        neginf,
        sum3,
        sum4,
    ]
    return torch.stack(cols)


def sample_plan(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> tuple[int, int, int]:
    """Which elements of ``x`` go into the histogram: ``(offset, stride, count)`` of its flat view.

    At most ``k`` elements. A plain stride aliases with row widths
    (DESIGN.md); we take an odd stride coprime with the last dimension and a
    random offset.
    """
    n = x.numel()
    if n <= k:
        return 0, 1, n
    width = x.shape[-1] if x.dim() else 1
    stride = -(-n // k) | 1
    while math.gcd(stride, width) != 1:
        stride += 2
    offset = int(torch.randint(stride, (1,), generator=generator)) if generator is not None else 0
    return offset, stride, min(k, -(-(n - offset) // stride))


#: A float32's "code": its top bits (sign, exponent, MANTISSA_BITS of mantissa), which alone decide its bin.
CODE_SHIFT = 23 - histogram.MANTISSA_BITS
NUM_CODES = 1 << (32 - CODE_SHIFT)


def _code_bins() -> torch.Tensor:
    """The bin of every code (numpy's reference binning of the code's smallest value)."""
    codes = (np.arange(NUM_CODES, dtype=np.int64) << CODE_SHIFT).astype(np.uint32)
    return torch.from_numpy(histogram.bin_index(codes.view(np.float32)))


#: Bin of each code; NaN and Inf codes map to ``_TRASH``.
CODE_BINS = _code_bins()
CODE_BINS_INT32 = CODE_BINS.numpy().astype(np.int32)  # for the CPU kernel


def float_codes(sample: torch.Tensor) -> torch.Tensor:
    """The code of each element (two integer ops on the float32 bits)."""
    bits = sample.float().contiguous().view(torch.int32)
    return (bits >> CODE_SHIFT) & (NUM_CODES - 1)


def bin_index(sample: torch.Tensor) -> torch.Tensor:
    """Bin of each element, read from the float32 bits (see probes.histogram)."""
    return CODE_BINS.to(sample.device)[float_codes(sample).long()]


def dead_units(x: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Fraction of last-dimension units never above eps in the batch (torch ops: any device,
    and traceable by torch.compile; the CPU kernel counts them in its own pass)."""
    if not _has_units(x):
        return None
    alive = (x.detach().abs() > eps).reshape(-1, x.shape[-1]).any(0)
    return 1.0 - alive.float().mean()


def _has_units(x: torch.Tensor) -> bool:
    return x.dim() >= 2 and x.shape[-1] > 0 and x.numel() > 0


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
        # [n, NCOL] and [n, NUM_BINS] blocks, in meta order: numpy from the CPU kernel, else on the device
        self._rows: list[torch.Tensor | np.ndarray] = []
        self._counts: list[torch.Tensor | np.ndarray] = []
        # (layer, kind, tensor, extra columns, dead units wanted)
        self._held: list[tuple[str, str, torch.Tensor, dict[str, torch.Tensor | float], bool]] = []
        self.held_elements = 0

    def __len__(self) -> int:
        return len(self.meta) + len(self._held)

    def hold(self, layer: str, kind: str, x: torch.Tensor, *, dead: torch.Tensor | None = None,
             units: bool = False, detach: bool = True, **extra: torch.Tensor | float | None) -> None:
        """Queue ``x`` (its values must not change until :meth:`reduce`).

        ``units=True`` has the reduction measure ``x``'s dead units (the
        ``dead_units`` column) in the same pass.
        ``dead`` and the other keywords are 0-d tensors (or floats) computed elsewhere
        that fill the columns of their name (``dead_units``, ``ref_sumsq``,
        ``init_dist``, ``lora_sumsq``); None leaves a column NaN.
        ``detach=False`` keeps ``x`` itself (it is detached when reduced):
        under torch.compile a detached view would be an aliased graph output,
        which inductor's alias replay got wrong on GPT-2's logits.
        """
        if dead is not None:
            extra["dead_units"] = dead
        for col in extra:
            if col not in COL or COL[col] < _NBASE:
                raise ValueError(f"{col!r} is not an extra statistics column")
        self._held.append((layer, kind, x.detach() if detach else x, {k: v for k, v in extra.items() if v is not None},
                           units and _has_units(x)))
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
        flats = [_flat32(x) for _, _, x, _, _ in items]
        plans = [sample_plan(x, self.hist_k, self.generator) for _, _, x, _, _ in items]
        device = flats[0].device
        if device.type == "cpu" and cpu_kernel.ready() is not None:
            # more threads pay only for large batches: on the demo model's ~9 M elements beside
            # training, torch's spinning OpenMP workers made two threads slower than one
            threads = torch.get_num_threads() if sum(f.numel() for f in flats) >= PARALLEL_ELEMENTS else 1
            units = [x.shape[-1] if wanted else 0 for _, _, x, _, wanted in items]
            base, hists = cpu_kernel.reduce([f.contiguous() for f in flats], plans, self.eps, CODE_SHIFT,
                                            CODE_BINS_INT32, threads, units)
            rows = np.full((len(items), NCOL), math.nan)  # numpy from here on: no torch op per block
            rows[:, : cpu_kernel.NROW] = base  # the statistics and the dead units
            for i, (_, _, _, extra, _) in enumerate(items):
                for col, v in extra.items():
                    rows[i, COL[col]] = float(v)
            counts = hists[:, : histogram.NUM_BINS]
        else:
            rows = torch.full((len(items), NCOL), math.nan, dtype=torch.float64, device=device)
            self._reduce_rows(flats, rows)
            extras = [(i, COL[col], v) for i, (_, _, _, extra, _) in enumerate(items) for col, v in extra.items()]
            extras += [(i, COL["dead_units"], dead_units(x, self.eps))
                       for i, (_, _, x, _, wanted) in enumerate(items) if wanted]
            if extras:
                rows[[i for i, _, _ in extras], [c for _, c, _ in extras]] = torch.stack(
                    [torch.as_tensor(v, dtype=torch.float64, device=device) for _, _, v in extras])
            codes = self._count_codes(flats, plans)
            # the few thousand code counts per tensor are folded into bins
            counts = torch.zeros(len(items), histogram.NUM_BINS + 1, dtype=codes.dtype, device=device)
            counts.index_add_(1, CODE_BINS.to(device), codes.view(len(items), NUM_CODES))
            counts = counts[:, : histogram.NUM_BINS]
        self._rows.append(rows)
        self._counts.append(counts)
        self.meta += [(layer, kind) for layer, kind, _, _, _ in items]
        self.hist_n += [count for _, _, count in plans]

    def _reduce_rows(self, flats: list[torch.Tensor], rows: torch.Tensor) -> None:
        """The torch path of the statistics rows (any device)."""
        eps = self.eps
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
        for i, f in enumerate(flats):
            if f.numel() == 0:
                rows[i, :_NBASE] = torch.tensor([0, 0, 0, 0, math.nan, math.nan, 0, 0, 0, 0, 0, 0, 0],
                                                dtype=torch.float64, device=f.device)

    @staticmethod
    def _count_codes(flats: list[torch.Tensor], plans: list[tuple[int, int, int]]) -> torch.Tensor:
        """Float-code counts ``[n, NUM_CODES]`` of each tensor's histogram sample: one pass, one bincount.

        Elements are counted per code (the float's top bits) with per-tensor
        offsets, two integer ops per element instead of a dozen for binning.
        """
        device = flats[0].device
        samples = [f[off::stride][:k] for f, (off, stride, k) in zip(flats, plans)]
        lengths = torch.tensor([s.numel() for s in samples], device=device)
        offsets = torch.repeat_interleave(torch.arange(len(flats), device=device, dtype=torch.int32) * NUM_CODES,
                                          lengths)
        return torch.bincount(float_codes(torch.cat(samples)) + offsets, minlength=len(flats) * NUM_CODES)

    def to_host(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[n, NCOL]`` and histograms ``[n, NUM_BINS]`` on the host.

        The blocks the CPU kernel made are numpy already; the others travel in
        one copy (rows and counts together: counts are exact in float64 up to
        2**53).
        """
        self.reduce()
        if not self._rows:
            return np.zeros((0, NCOL)), np.zeros((0, histogram.NUM_BINS), dtype=np.int64)
        rows, counts = list(self._rows), list(self._counts)
        on_device = [i for i, r in enumerate(rows) if isinstance(r, torch.Tensor)]
        if on_device:
            device = rows[on_device[0]].device
            host = torch.cat([torch.cat([rows[i].to(device), counts[i].to(device, torch.float64)], 1)
                              for i in on_device]).cpu().numpy()
            at = 0
            for i in on_device:
                n = len(rows[i])
                rows[i], counts[i] = host[at : at + n, :NCOL], host[at : at + n, NCOL:]
                at += n
        return np.concatenate(rows), np.concatenate(counts).astype(np.int64)
