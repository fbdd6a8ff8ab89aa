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
:mod:`probes.engines.cpu_kernel`'s C kernel when it could be built; the torch path
gives the same statistics everywhere else.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from probes.engines import cpu_kernel
from probes import engines
from probes.protocol import histogram

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
    lens = upload(lengths, flat.device)

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


def sample_plan(x: torch.Tensor, k: int, generator: torch.Generator | np.random.Generator | None = None,
                n: int | None = None) -> tuple[int, int, int]:
    """Which elements of ``x`` go into the histogram: ``(offset, stride, count)`` of its flat view
    (of its first ``n`` elements when given: a piece of a flat buffer).

    At most ``k`` elements. A plain stride aliases with row widths
    (DESIGN.md); we take an odd stride coprime with the last dimension and a
    random offset (from a numpy generator, or a torch one).
    """
    width = (x.shape[-1] if x.dim() else 1) if n is None else max(n, 1)
    n = x.numel() if n is None else n
    if n <= k:
        return 0, 1, n
    stride = -(-n // k) | 1
    while math.gcd(stride, width) != 1:
        stride += 2
    if generator is None:
        offset = 0
    elif isinstance(generator, np.random.Generator):  # no torch op: nothing a device counts
        offset = int(generator.integers(stride))
    else:
        offset = int(torch.randint(stride, (1,), generator=generator))
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
    """Bin of each element, read from the float32 bits (see probes.protocol.histogram)."""
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


class HostCopy:
    """A step's rows on their way to the host: :meth:`wait` (on the publisher thread) gives them.

    The device blocks left in one non-blocking copy into pinned memory, with a
    CUDA event recorded after it; the training thread never waits for it.
    """

    def __init__(self, blocks: list, copies: list[tuple[torch.Tensor, object]]) -> None:
        self._blocks = blocks  # ("np", rows, counts) | ("dev", copy index, first row, rows)
        self._copies = copies  # (host tensor [n, NCOL + NUM_BINS], CUDA event or None)

    def wait(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[n, NCOL]`` and histograms ``[n, NUM_BINS]`` (waits for the copy's event)."""
        hosts = []
        for host, event in self._copies:
            if event is not None:
                event.synchronize()
            hosts.append(host.numpy())
        if not self._blocks:
            return np.zeros((0, NCOL)), np.zeros((0, histogram.NUM_BINS), dtype=np.int64)
        rows, counts = [], []
        for block in self._blocks:
            if block[0] == "np":
                rows.append(block[1])
                counts.append(block[2])
            else:
                _, c, at, n = block
                rows.append(hosts[c][at : at + n, :NCOL])
                counts.append(hosts[c][at : at + n, NCOL:])
        return np.concatenate(rows), np.concatenate(counts).astype(np.int64)


def upload(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (a list, a numpy array, a float) as a tensor on ``device``, without a host sync.

    On CUDA ``torch.tensor(..., device=)`` copies from pageable memory and then waits for the
    stream to drain, which costs the training its run-ahead. Staged through pinned memory, the
    copy is queued like a kernel; torch's caching host allocator keeps the pinned block until the
    copy is done. (bench/gpu.py counts a sampled step's host syncs on a GPU: 0.)
    """
    t = torch.as_tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _to_host_async(t: torch.Tensor) -> tuple[torch.Tensor, object]:
    """``t`` copied to (pinned) host memory without blocking, and the CUDA event that marks the end."""
    if t.device.type == "cpu":
        return t, None
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event
    return t.cpu(), None  # other devices: a plain (blocking) copy


class Batch:
    """The statistics of one sampled step, gathered on the device.

    :meth:`hold` queues a tensor; :meth:`reduce` reduces everything queued
    (call it before the tensors change: weights before the optimizer step);
    :meth:`start_copy` reduces what is left and starts the one copy of all
    rows and histogram counts to the host (:meth:`to_host` also waits for it).
    Each device's tensors are reduced by the engine :mod:`probes.engines`
    chooses.
    """

    def __init__(self, eps: float, hist_k: int,
                 generator: torch.Generator | np.random.Generator | None = None) -> None:
        self.eps = eps
        self.hist_k = hist_k
        self.generator = generator
        self.meta: list[tuple[str, str]] = []  # (layer, kind) per reduced row
        self.hist_n: list[int] = []
        # in meta order: ("np", rows, counts) from the CPU kernel, ("torch", rows, counts) on the device,
        # ("eng", device, first row, rows) of the device engine's rows
        self._blocks: list[tuple] = []
        self._engine: dict[torch.device, object] = {}  # device -> device_engine.Rows
        # (layer, kind, tensor, extra columns, dead units wanted), or ("split", names, kind, flat, lengths, vectors)
        self._held: list[tuple] = []
        self.held_bytes = 0

    def __len__(self) -> int:
        return len(self.meta) + sum(len(h[1]) if h[0] == "split" else 1 for h in self._held)

    def hold(self, layer: str, kind: str, x: torch.Tensor, *, dead: torch.Tensor | None = None,
             units: bool = False, detach: bool = True, **extra: torch.Tensor | float | None) -> None:
        """Queue ``x`` (its values must not change until :meth:`reduce`).

        ``units=True`` has the reduction measure ``x``'s dead units (the
        ``dead_units`` column) in the same pass.
        ``dead`` and the other keywords are 0-d tensors (or floats, or ``(vector, index)``:
        one element of a tensor computed for many rows at once) computed elsewhere
        that fill the columns of their name (``dead_units``, ``ref_sumsq``,
        ``init_dist``, ``lora_sumsq``); None leaves a column NaN.
        ``x`` itself is kept (it is detached when reduced, if at all: the
        device engine reads it in place); ``detach`` is accepted for callers
        that still pass it. Under torch.compile a detached view would be an
        aliased graph output, which inductor's alias replay got wrong on
        GPT-2's logits.
        """
        if dead is not None:
            extra["dead_units"] = dead
        _check_extra(extra)
        # not detached here (an op per tensor): every reduction reads it detached
        self._held.append((layer, kind, x, {k: v for k, v in extra.items() if v is not None}, units and _has_units(x)))
        self.held_bytes += x.numel() * x.element_size()

    def hold_split(self, layers: list[str], kind: str, flat: torch.Tensor, lengths: list[int],
                   **vectors: torch.Tensor | None) -> None:
        """Queue consecutive pieces of the flat tensor ``flat`` (``lengths[i]`` elements for
        ``layers[i]``) as tensors of their own; each keyword is a vector with one value per piece
        for the column of its name. The device engine reads the pieces in place (no op per piece)."""
        vectors = {k: v for k, v in vectors.items() if v is not None}
        _check_extra(vectors)
        self._held.append(("split", list(layers), kind, flat, list(lengths), vectors))
        self.held_bytes += flat.numel() * flat.element_size()

    def reduce(self) -> None:
        """Reduce every held tensor, grouped by device, and let them go."""
        held, self._held, self.held_bytes = self._held, [], 0
        by_device: dict[torch.device, list] = {}
        for item in held:
            by_device.setdefault(item[3].device if item[0] == "split" else item[2].device, []).append(item)
        for device, items in by_device.items():
            if engines.for_device(device) == "device":
                from probes.engines.device import supported

                # a dtype the engine does not read (float8...) takes torch's ops, alone
                other = [it for it in items if not supported(it[3] if it[0] == "split" else it[2])]
                items = [it for it in items if not any(it is o for o in other)]
                if other:
                    self._reduce_group(self._expand(other))
                try:
                    if items:
                        self._reduce_on_engine(device, items)
                    continue
                except Exception as e:  # off for this device from now on; torch's ops answer
                    engines.failed(device, e)
            self._reduce_group(self._expand(items))

    def _expand(self, items: list) -> list:
        """Split pieces as tensors of their own (for the torch path and the CPU kernel)."""
        out = []
        for item in items:
            if item[0] != "split":
                out.append(item)
                continue
            _, layers, kind, flat, lengths, vectors = item
            cols = {c: (v.tolist() if v.device.type == "cpu" else v) for c, v in vectors.items()}
            for i, (layer, piece) in enumerate(zip(layers, flat.detach().split(lengths))):
                out.append((layer, kind, piece, {c: v[i] for c, v in cols.items()}, False))
        return out

    def _reduce_on_engine(self, device: torch.device, items: list) -> None:
        from probes.engines import device as de

        rows = self._engine.get(device)
        if rows is None:
            rows = self._engine[device] = de.Rows(device, self.eps)
        work, meta, hist_n, later = [], [], [], []
        for item in items:
            if item[0] == "split":
                _, layers, kind, flat, lengths, vectors = item
                at = 0
                first = len(work)
                for layer, n in zip(layers, lengths):
                    plan = sample_plan(flat, self.hist_k, self.generator, n=n)
                    work.append(de.Item(flat, plan, offset=at, n=n))
                    meta.append((layer, kind))
                    hist_n.append(plan[2])
                    at += n
                later += [("vec", first, COL[c], v) for c, v in vectors.items()]
                continue
            layer, kind, x, extra, units = item
            plan = sample_plan(x, self.hist_k, self.generator)
            floats = {COL[c] - _NBASE: float(v) for c, v in extra.items() if not isinstance(v, (torch.Tensor, tuple))}
            later += [("t", len(work), COL[c], v) for c, v in extra.items() if isinstance(v, (torch.Tensor, tuple))]
            work.append(de.Item(x, plan, units=x.shape[-1] if units else 0, extras=floats))
            meta.append((layer, kind))
            hist_n.append(plan[2])
        first = rows.add(work)
        for what, i, col, v in later:
            (rows.vector_extras if what == "vec" else rows.tensor_extras).append((first + i, col, v))
        last = self._blocks[-1] if self._blocks else None
        if last is not None and last[0] == "eng" and last[1] == device and last[2] + last[3] == first:
            self._blocks[-1] = ("eng", device, last[2], last[3] + len(work))  # one block: no slice per group
        else:
            self._blocks.append(("eng", device, first, len(work)))
        self.meta += meta
        self.hist_n += hist_n

    def _reduce_group(self, items: list) -> None:
        flats = [_flat32(x) for _, _, x, _, _ in items]
        plans = [sample_plan(x, self.hist_k, self.generator) for _, _, x, _, _ in items]
        device = flats[0].device
        if engines.for_device(device) == "cpu-kernel":
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
                    rows[i, COL[col]] = float(_element(v))
            self._blocks.append(("np", rows, hists[:, : histogram.NUM_BINS]))
        else:
            rows = torch.full((len(items), NCOL), math.nan, dtype=torch.float64, device=device)
            self._reduce_rows(flats, rows)
            extras = [(i, COL[col], v) for i, (_, _, _, extra, _) in enumerate(items) for col, v in extra.items()]
            extras += [(i, COL["dead_units"], dead_units(x, self.eps))
                       for i, (_, _, x, _, wanted) in enumerate(items) if wanted]
            if extras:
                rows[upload([i for i, _, _ in extras], device), upload([c for _, c, _ in extras], device)] = torch.stack(
                    [_on(v, device) for _, _, v in extras])
            codes = self._count_codes(flats, plans)
            # the few thousand code counts per tensor are folded into bins
            counts = torch.zeros(len(items), histogram.NUM_BINS + 1, dtype=codes.dtype, device=device)
            counts.index_add_(1, upload(CODE_BINS, device), codes.view(len(items), NUM_CODES))
            self._blocks.append(("torch", rows, counts[:, : histogram.NUM_BINS]))
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
                rows[i, :_NBASE] = upload([0, 0, 0, 0, math.nan, math.nan, 0, 0, 0, 0, 0, 0, 0], f.device,
                                          torch.float64)

    @staticmethod
    def _count_codes(flats: list[torch.Tensor], plans: list[tuple[int, int, int]]) -> torch.Tensor:
        """Float-code counts ``[n, NUM_CODES]`` of each tensor's histogram sample: one pass, one bincount.

        Elements are counted per code (the float's top bits) with per-tensor
        offsets, two integer ops per element instead of a dozen for binning.
        """
        device = flats[0].device
        samples = [f[off::stride][:k] for f, (off, stride, k) in zip(flats, plans)]
        lengths = upload([s.numel() for s in samples], device)
        offsets = torch.repeat_interleave(torch.arange(len(flats), device=device, dtype=torch.int32) * NUM_CODES,
                                          lengths)
        return torch.bincount(float_codes(torch.cat(samples)) + offsets, minlength=len(flats) * NUM_CODES)

    def start_copy(self) -> HostCopy:
        """Reduce what is left and start the step's copy to the host; never waits for the device.

        The CPU kernel's blocks are numpy already; the device's rows and
        histogram counts (counts are exact in float64 up to 2**53) travel in
        one non-blocking copy per device.
        """
        self.reduce()
        per_device: dict[torch.device, list[torch.Tensor]] = {}
        blocks: list = []
        finals = {}
        for device, rows in self._engine.items():
            try:
                finals[device] = rows.finalize()
            except Exception as e:  # this step's engine rows are lost; later steps use torch's ops
                engines.failed(device, e)
                raise
        self._engine = {}
        placed: list[tuple[int, torch.device, int]] = []  # (block index, device, piece index)
        for block in self._blocks:
            if block[0] == "np":
                blocks.append(block)
                continue
            if block[0] == "torch":
                _, r, c = block
                piece = torch.cat([r, c.to(torch.float64)], 1)
            else:
                _, device, first, n = block
                whole = finals[device]
                piece = whole if first == 0 and n == len(whole) else whole[first : first + n]
            pieces = per_device.setdefault(piece.device, [])
            placed.append((len(blocks), piece.device, len(pieces)))
            pieces.append(piece)
            blocks.append(None)
        copies, where = [], {}
        for device, pieces in per_device.items():
            where[device] = len(copies)
            copies.append(_to_host_async(pieces[0] if len(pieces) == 1 else torch.cat(pieces)))
            at = 0
            for b, d, p in placed:
                if d == device:
                    blocks[b] = ("dev", where[device], at, len(per_device[device][p]))
                    at += len(per_device[device][p])
        return HostCopy(blocks, copies)

    def to_host(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[n, NCOL]`` and histograms ``[n, NUM_BINS]`` on the host (waits for the copy)."""
        return self.start_copy().wait()


def _element(v):
    """An extra column's value: ``(vector, index)`` is that element of the vector."""
    return v[0][v[1]] if isinstance(v, tuple) else v


def _on(v, device: torch.device) -> torch.Tensor:
    """An extra column's value as a 0-d float64 tensor on ``device`` (host values uploaded without a sync)."""
    v = _element(v)
    if isinstance(v, torch.Tensor) and v.device == device:
        return v.to(torch.float64).reshape(())
    return upload(v.detach() if isinstance(v, torch.Tensor) else float(v), device, torch.float64).reshape(())


def _check_extra(extra: dict) -> None:
    for col in extra:
        if col not in COL or COL[col] < _NBASE:
            raise ValueError(f"{col!r} is not an extra statistics column")
