"""A sampled step's statistics, gathered on the device: :class:`Batch`.

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
(:mod:`probes.engines.reduce`) gives the same statistics everywhere else.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from probes import engines
from probes.engines import cpu_kernel
from probes.engines.layout import CODE_BINS, CODE_BINS_INT32, CODE_SHIFT, COL, NCOL, NUM_CODES, _NBASE, float_codes
from probes.engines.reduce import _flat32, _has_units, dead_units, sample_plan, segment_rows, tensor_row
from probes.engines.transfer import HostCopy, _element, _on, to_host_async, upload
from probes.protocol import histogram

#: Largest flat buffer reduced at once (elements).
BUCKET = 1 << 22
#: Tensors at least this large are reduced alone.
ALONE = 1 << 16
#: Elements of a batch from which the CPU kernel runs on torch's thread count (one thread below).
PARALLEL_ELEMENTS = 1 << 25


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
            copies.append(to_host_async(pieces[0] if len(pieces) == 1 else torch.cat(pieces)))
            at = 0
            for b, d, p in placed:
                if d == device:
                    blocks[b] = ("dev", where[device], at, len(per_device[device][p]))
                    at += len(per_device[device][p])
        return HostCopy(blocks, copies)

    def to_host(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[n, NCOL]`` and histograms ``[n, NUM_BINS]`` on the host (waits for the copy)."""
        return self.start_copy().wait()


def _check_extra(extra: dict) -> None:
    for col in extra:
        if col not in COL or COL[col] < _NBASE:
            raise ValueError(f"{col!r} is not an extra statistics column")
