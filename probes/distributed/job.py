"""The whole job through torch.distributed: rank 0 merges every rank's statistics.

On a sampled training step every rank hands its rows (probes/reduce.py) to
a :class:`Job`, whose own thread packs them into flat buffers, one slot
per (layer, kind) of a table fixed at attach and equal on every rank, and
runs four collectives on a gloo group of the probe's own, in the same order
on every rank:

1. ``all_gather`` of a short per-rank vector (step, replicated gradient
   norm, non-finite count, step time, data+forward time, loss, backlog);
2. ``all_reduce(SUM)`` of the additive columns, float64 (counts, power sums,
   near-zero/zero/NaN/Inf counts, the update's reference sum of squares,
   histogram sizes);
3. ``all_reduce(MAX)`` of max, -min and the distance from initialisation;
4. ``all_reduce(SUM)`` of the histogram counts, int32 (half the bytes of
   float64; exact below 2**31 per bin), left out above ``MAX_HIST_BYTES``:
   after the first round only each slot's window, the bins the job occupied
   in the previous round plus a margin (the same on every rank, from the MAX
   all-reduce); a slot whose counts left its window on some rank goes again
   whole in a fifth all-reduce, issued by every rank (exact whatever moved).

They are issued together (``async_op``) and waited for on the job thread,
never on the training thread, and never on an unsampled step. Rank 0 then
publishes the job's :class:`~probes.protocol.wire.Step` with ``rank=-1`` (its counts
are the sums over all ranks: a replicated DDP weight counts ``world`` times)
and the per-rank vector (:class:`~probes.protocol.wire.RankStats`).

What is exact and what is not: counts, sums, power sums, min, max, the
histogram and the update ratio (sqrt of summed update sumsq over summed
reference sumsq) are exact merges. ``dead_units`` is the mean of the ranks'
fractions (the job's exact figure, units dead on every rank, needs per-unit
masks the rows do not carry); ``init_dist`` is the largest rank's; the
spectral figures and evaluation passes are not merged (each rank's own
stream has them).

Pace: each rank's backlog (sampled steps queued for its job thread) is in
the gathered vector, so every rank sees the largest; while it exceeds
``BACKLOG_HIGH`` the job merges half as many sampled steps (one in 2, 4, ...
64; the others go to each rank's own stream only), and twice as many again
after ``CALM_ROUNDS`` rounds with nothing queued anywhere: the same steps on
every rank, and a ``job-stride`` note says so.

Failure: the group has a timeout, so a rank that dies or hangs makes a
round fail after at most ``timeout`` seconds on the job thread while
training goes on; the job is then off on that rank for good (never a
collective on some ranks only: a rank that stops contributing stops for
good, and the others time out once). After a failed round every rank that
is still there says so in the job's store (torch.distributed's own), so
rank 0 can name the ranks that did not: dead or hung (a ``rank-missing``
alert each, and a ``job-off`` note).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import queue
import socket
import threading
import time
import zlib
from collections import deque

import numpy as np
import torch
import torch.distributed as dist

from probes.protocol import histogram, wire
from probes.engines.layout import COL, NCOL

log = logging.getLogger("xray-tui")

#: Additive columns of a row, summed over ranks (a rank without the row adds zeros).
SUM_COLS = ("count", "sum", "sumsq", "abssum", "near_zero", "zeros", "nan", "posinf", "neginf",
            "sum3", "sum4", "ref_sumsq", "lora_sumsq")
# then: dead-unit fractions and how many ranks had one, ranks with the row, histogram sizes, and
# ranks whose counts fell outside this round's window (their slot's counts go again, whole)
_DEAD, _DEAD_N, _PRESENT, _HIST_N, _LOST = range(len(SUM_COLS), len(SUM_COLS) + 5)
#: Columns of a slot in the SUM buffer (float64).
SUM_HEAD = len(SUM_COLS) + 5
#: Columns of a slot in the MAX buffer: max, -min, init_dist, and the largest and (negated) smallest
#: magnitude (bins away from the zero bin) its non-zero histogram bins hold.
MAX_WIDTH = 5
#: Bins added on each side of the job's occupied range to make the next round's window (2 octaves).
WINDOW_MARGIN = 8
#: The per-rank vector, all-gathered.
VECTOR = ("step", "grad_norm", "nonfinite", "step_time", "fwd_time", "loss", "backlog")
#: Sampled steps queued on some rank's job thread beyond which the job merges half as many steps.
BACKLOG_HIGH = 16
#: Rounds in a row with no step queued anywhere before it merges twice as many again.
CALM_ROUNDS = 8
#: Fewest sampled steps merged: 1 in MAX_STRIDE.
MAX_STRIDE = 64
#: Largest histogram buffer (bytes, all bins of every slot: the first round's, and the bound of any
#: round's) that is sent; a bigger table merges statistics only.
MAX_HIST_BYTES = 32 << 20
#: Seconds a round (or the setup) may take before the job is switched off.
DEFAULT_TIMEOUT = 60.0
#: Seconds the probe's close waits at most for the job thread's last rounds.
CLOSE_WAIT = 10.0
#: Sampled steps waiting for the job thread; one more means it fell behind (a peer is slow or gone).
QUEUE_STEPS = 64

_SUM_IDX = [COL[c] for c in SUM_COLS]


def table_keys(params, trainable, act_layers) -> list[tuple[str, str]]:
    """The (layer, kind) slots every rank fills: activations of the hooked modules,
    each parameter's weight and gradient, each trainable weight's update."""
    keys = [(n, "act") for n in act_layers]
    for n, p in params:
        keys.append((n, "weight"))
        if p.requires_grad:
            keys.append((n, "grad"))
    keys += [(n, "update") for n, _ in trainable]
    return keys


def host_label() -> str:
    """This rank's host as alerts name it: the host name, with the launcher's node index when it
    gives one (torchrun's ``GROUP_RANK``, SLURM's ``SLURM_NODEID``), so that nodes that share a
    host name (containers, a test simulating nodes on one machine) still count apart."""
    node = os.environ.get("GROUP_RANK") or os.environ.get("SLURM_NODEID")
    return socket.gethostname() + (f"/node{node}" if node else "")


def _digest(keys) -> int:
    return zlib.crc32("\n".join(f"{a}\t{b}" for a, b in keys).encode())


class Job:
    """The probe's part in the whole job's view (see the module docstring).

    ``publish(messages)`` hands a list of messages to the publisher (the
    probe's ``publisher.submit``). Every rank builds one, at attach, in the
    same order (the group's creation is itself a collective).
    """

    def __init__(self, keys: list[tuple[str, str]], publish, run: str, *, timeout: float = DEFAULT_TIMEOUT,
                 replicated: set[str] | None = None, lora_bases: dict | None = None, every: int = 1) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.keys = keys
        self.slot = {k: i for i, k in enumerate(keys)}
        self.timeout = timeout
        self.replicated = replicated or set()
        self.lora_bases = lora_bases or {}
        self._publish = publish
        self.on = False
        self.why_off = ""
        self.rounds = 0
        self.every = every
        #: the job merges one sampled step in ``stride`` (doubled while rounds fall behind, the
        #: same on every rank: it is decided from the all-gathered backlogs)
        self.stride = 1
        self._calm = 0
        #: wall seconds of the recent rounds on the job thread (packing, the collectives, the waits)
        self.round_times: deque = deque(maxlen=1024)
        self.round_cpu: deque = deque(maxlen=1024)  # and the job thread's CPU seconds in them
        self.hosts: list[str] = []
        n = len(keys)
        self.hist = n * histogram.NUM_BINS * 4 <= MAX_HIST_BYTES  # the same on every rank
        self._window(None)
        #: bytes each collective moved per rank in the last round: all_gather, SUM of statistics,
        #: SUM of histogram counts (windowed, plus any slot sent again whole), MAX
        self.bytes = (len(VECTOR) * 8 * self.world, n * SUM_HEAD * 8, n * histogram.NUM_BINS * 4 * self.hist,
                      n * MAX_WIDTH * 8)
        try:
            self._store = dist.distributed_c10d._get_default_store()
        except Exception:  # a private helper: without it the missing rank goes unnamed
            self._store = None
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
        info: list = [None] * self.world
        dist.all_gather_object(info, (host_label(), _digest(keys), n, time.time()), group=self.group)
        self.hosts = [str(h) for h, _, _, _ in info]
        self._key = f"xray-tui/{run}/{info[0][3]:.6f}/"  # this job's keys in the store (rank 0's clock)
        if len({(d, m) for _, d, m, _ in info}) != 1:
            # every rank sees the same gathered table, so every rank turns off here: no round runs
            self.why_off = "the ranks watch different layers (the slot tables differ): whole-job view off"
            log.warning("xray-tui: %s", self.why_off)
            return
        self.on = True
        self._q: queue.Queue = queue.Queue(maxsize=QUEUE_STEPS)
        self._thread = threading.Thread(target=self._run, name="xray-tui-job", daemon=True)
        self._thread.start()

    @classmethod
    def offline(cls, keys: list[tuple[str, str]], rank: int = 0, world: int = 1) -> "Job":
        """A Job without torch.distributed (no group, no thread): packing and merging only,
        for tests and bench/collectives.py."""
        job = cls.__new__(cls)
        job.rank, job.world, job.keys = rank, world, keys
        job.slot = {k: i for i, k in enumerate(keys)}
        job.hist = len(keys) * histogram.NUM_BINS * 4 <= MAX_HIST_BYTES
        job._window(None)
        job.replicated, job.lora_bases, job.on, job.hosts = set(), {}, False, []
        job.every, job.stride, job._calm, job._publish = 1, 1, 0, lambda build: None
        return job

    def pack(self, meta, rows, hists, hist_n) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """This rank's buffers for one step's rows: statistics (float64, SUM), extremes
        (float64, MAX) and histogram counts (int32, SUM; None when histograms are off)."""
        n = len(self.keys)
        sums = np.zeros((n, SUM_HEAD))
        maxes = np.full((n, MAX_WIDTH), -math.inf)
        counts = np.zeros((n, histogram.NUM_BINS), dtype=np.int32) if self.hist else None
        if meta:
            self._pack(meta, rows, hists, hist_n, sums, maxes, counts)
        return sums, maxes, counts

    @property
    def nodes(self) -> int:
        """Hosts the job runs on."""
        return len(set(self.hosts)) or 1

    # -- training thread --------------------------------------------------

    def submit(self, step: int, work) -> None:
        """Queue sampled step ``step``'s work: a callable (run on the job thread) returning
        ``(own messages, meta, rows, hists, hist_n, vector, finish)``; never blocks.

        A full queue means rounds are stuck on a peer: this rank stops taking
        part for good (the others' next round times out and names it)."""
        self._put(("round", work, step))

    def forward(self, build) -> None:
        """Queue a publisher builder behind the rounds, so the stream keeps step order."""
        self._put(("pass", build))

    def _put(self, item) -> None:
        if not self.on:  # the publisher runs it: this rank's own stream goes on without the job
            self._publish(item[1] if item[0] == "pass" else (lambda work=item[1]: work()[0]))
            return
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self._off(f"rank {self.rank} fell {QUEUE_STEPS} sampled steps behind the job's collectives")
            self._put(item)

    def close(self, timeout: float = CLOSE_WAIT) -> None:
        """Let the queued rounds finish (at most ``timeout`` seconds), then stop the thread.

        A healthy job's last rounds take milliseconds; with a rank gone, the wait covers the
        failed round and the naming of the missing rank (each at most ``self.timeout``), within
        ``timeout``: the probe never holds a finished process longer than that."""
        thread = getattr(self, "_thread", None)
        if thread is None or not thread.is_alive():
            return
        deadline = time.monotonic() + timeout
        try:  # after a failure the thread may still be naming the missing ranks: wait for it too
            self._q.put(("stop", None, None), timeout=timeout)
        except queue.Full:
            pass
        thread.join(max(0.0, deadline - time.monotonic()))
        self.on = False

    # -- job thread -------------------------------------------------------

    def _run(self) -> None:
        while True:
            what, item, *rest = self._q.get()
            if what == "stop":
                return
            if what == "pass":
                self._publish(item)
                continue
            try:
                own, meta, rows, hists, hist_n, vector, finish = item()
            except Exception:  # the round still runs (empty), so the ranks stay in step
                log.exception("xray-tui: a sample could not be built; skipped")
                own, meta, rows, hists, hist_n, finish = [], [], None, None, [], None
                vector = [rest[0]] + [math.nan] * (len(VECTOR) - 2)
            if not self.on:
                self._publish(lambda own=own: own)
                continue
            step = int(vector[0])
            if not self.merges(step):  # skipped by every rank alike (see throttle)
                self._publish(lambda own=own: own)
                continue
            try:
                t0, c0 = time.perf_counter(), time.thread_time()
                gathered, merged = self._round(meta, rows, hists, hist_n, vector)
                self.round_times.append(time.perf_counter() - t0)
                self.round_cpu.append(time.thread_time() - c0)
            except Exception as exc:  # a peer died or hung past the timeout: off for good
                self._publish(lambda own=own: own)
                self._lost(step, exc)
                continue
            if finish is None:
                self._publish(lambda own=own: own)
            else:
                self._publish(lambda own=own, g=gathered, m=merged, f=finish: f(own, g, m))

    def _round(self, meta, rows, hists, hist_n, vector):
        """One round of the collectives; (gathered vectors [world, len(VECTOR)], merged or None)."""
        self.rounds += 1
        sums, maxes, counts = self.pack(meta, rows, hists, hist_n)
        vec = np.asarray([*vector, self._q.qsize()], dtype=np.float64)
        t_vec = torch.from_numpy(vec)
        out = [torch.empty_like(t_vec) for _ in range(self.world)]
        flat = None
        if counts is not None:
            flat, lost = self.cut(counts)
            sums[:, _LOST] = lost
        # issued together, in this order on every rank; waited for together
        works = [dist.all_gather(out, t_vec, group=self.group, async_op=True),
                 dist.all_reduce(torch.from_numpy(sums), dist.ReduceOp.SUM, group=self.group, async_op=True),
                 dist.all_reduce(torch.from_numpy(maxes), dist.ReduceOp.MAX, group=self.group, async_op=True)]
        if flat is not None:  # int32: exact while a bin's count over the job stays below 2**31
            works.append(dist.all_reduce(torch.from_numpy(flat), dist.ReduceOp.SUM, group=self.group,
                                         async_op=True))
        for w in works:
            w.wait()
        if flat is not None:
            def whole(part: np.ndarray) -> np.ndarray:  # the same slots on every rank: the SUM says which
                dist.all_reduce(torch.from_numpy(part), dist.ReduceOp.SUM, group=self.group)
                return part

            counts, again = self.merge_counts(flat, sums, counts, whole)
            self.bytes = (*self.bytes[:2], (flat.size + again) * 4, self.bytes[3])
            self._window(maxes)
        gathered = torch.stack(out).numpy()
        self.throttle(float(np.nanmax(gathered[:, -1])), int(vec[0]))
        steps = gathered[:, 0]
        if not (steps == steps[0]).all():
            # every rank sees the same gathered steps, so all turn off together
            raise RuntimeError(f"the ranks sampled different steps ({sorted(set(steps.tolist()))}): "
                               "give every rank the same every=")
        return gathered, (sums, maxes, counts) if self.rank == 0 else None

    def _pack(self, meta, rows, hists, hist_n, sums, maxes, counts) -> None:
        """This rank's rows into the slots (rows of layers outside the table are left out)."""
        idx = [(i, self.slot[m]) for i, m in enumerate(meta) if m in self.slot]
        if not idx:
            return
        src = np.fromiter((i for i, _ in idx), dtype=np.int64)
        dst = np.fromiter((j for _, j in idx), dtype=np.int64)
        r = rows[src]
        add = r[:, _SUM_IDX]
        # the extra columns are NaN where they do not apply: zeros add nothing
        add[:, -2:] = np.nan_to_num(add[:, -2:], nan=0.0)
        sums[dst, : len(SUM_COLS)] = add
        dead = r[:, COL["dead_units"]]
        known = ~np.isnan(dead)
        sums[dst, _DEAD] = np.where(known, dead, 0.0)
        sums[dst, _DEAD_N] = known
        sums[dst, _PRESENT] = 1.0
        sums[dst, _HIST_N] = np.asarray(hist_n, dtype=np.float64)[src]
        if counts is not None:
            counts[dst] = hists[src]
            occupied = hists[src] != 0
            z = histogram.ZERO_BIN  # both signs folded: column m-1 is magnitude m (bins z+m and z-m)
            fold = occupied[:, z + 1:] | occupied[:, z - 1::-1]
            has = fold.any(1)
            maxes[dst, 3] = np.where(has, histogram.MAG_BINS - fold[:, ::-1].argmax(1), -math.inf)
            maxes[dst, 4] = np.where(has, -(fold.argmax(1) + 1), -math.inf)
        # NaN (a tensor holding one, or an empty one) is neutral here; the NaN count restores it
        mx, mn, init = r[:, COL["max"]], r[:, COL["min"]], r[:, COL["init_dist"]]
        maxes[dst, 0] = np.where(np.isnan(mx), -math.inf, mx)
        maxes[dst, 1] = np.where(np.isnan(mn), -math.inf, -mn)
        maxes[dst, 2] = np.where(np.isnan(init), -math.inf, init)

    # -- pace -------------------------------------------------------------

    def merges(self, step: int) -> bool:
        """Whether the sampled step ``step`` goes through a round (every rank answers the same)."""
        return (step // self.every) % self.stride == 0

    def throttle(self, backlog: float, step: int = 0) -> None:
        """After each round, from the largest backlog of any rank (all ranks see the same): merge
        half as many sampled steps while some rank's job thread falls behind (a slow network,
        a busy CPU, a tiny model sampled every step), twice as many again once all keep up."""
        before = self.stride
        if backlog > BACKLOG_HIGH and self.stride < MAX_STRIDE:
            self.stride *= 2
            self._calm = 0
        elif backlog == 0 and self.stride > 1:
            self._calm += 1
            if self._calm >= CALM_ROUNDS:
                self.stride //= 2
                self._calm = 0
        else:
            self._calm = 0
        if self.stride != before and self.rank == 0:
            note = wire.Note(max(step, 0), wire.JOB_RANK, "job-stride", {
                "stride": self.stride, "why": "the collectives fell behind" if self.stride > before else "caught up"})
            self._publish(lambda: [note])

    # -- histogram windows ------------------------------------------------
    # A slot's counts occupy a few dozen of the 641 bins. After the first round (all bins), each
    # round sends per slot only the zero bin and, on both signs, the magnitudes the job occupied
    # in the previous round plus a margin: the same window on every rank (it comes from the MAX
    # all-reduce). A rank whose counts fall outside says so in the SUM buffer; those slots' counts
    # then go again, whole, in one more all-reduce that every rank issues (each knows the same
    # slots from the SUM): exact, whatever moved.

    def _window(self, maxes) -> None:
        """Set the next round's windows from a round's all-reduced MAX buffer (None: all bins)."""
        n, z, nb = len(self.keys), histogram.ZERO_BIN, histogram.NUM_BINS
        base = np.arange(n) * nb
        if maxes is None or not self.hist:
            starts, widths = base, np.full(n, nb if self.hist else 0)
        else:
            occupied = np.isfinite(maxes[:, 3])
            hi = np.minimum(np.nan_to_num(maxes[:, 3], neginf=0) + WINDOW_MARGIN, histogram.MAG_BINS)
            lo = np.maximum(np.nan_to_num(-maxes[:, 4], posinf=1) - WINDOW_MARGIN, 1)
            side = np.where(occupied, hi - lo + 1, 0).astype(np.int64)
            # per slot: negative magnitudes hi..lo, the zero bin, positive magnitudes lo..hi
            starts = np.stack([base + z - hi, base + z, base + z + lo], 1).reshape(-1).astype(np.int64)
            widths = np.stack([side, np.ones(n, dtype=np.int64), side], 1).reshape(-1)
        widths = np.asarray(widths, dtype=np.int64)
        total = int(widths.sum())
        offsets = np.concatenate([[0], np.cumsum(widths)[:-1]])
        #: flat indices (into [n, NUM_BINS]) of the bins sent, and the slot of each
        self._win_idx = np.repeat(starts - offsets, widths) + np.arange(total)
        self._win_slot = self._win_idx // nb

    def cut(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This rank's counts inside the windows (flat int32), and per slot 1 where some fell outside."""
        flat = counts.reshape(-1)[self._win_idx]
        inside = np.bincount(self._win_slot, weights=flat, minlength=len(self.keys))
        return flat, (counts.sum(1) != inside).astype(np.float64)

    def merge_counts(self, flat, sums, counts, whole) -> tuple[np.ndarray, int]:
        """The job's counts [n, NUM_BINS] from the all-reduced windows; slots some rank lost go
        again whole through ``whole(this rank's counts of those slots)`` (an all-reduce).
        Returns (counts, bins sent again)."""
        merged = np.zeros(len(self.keys) * histogram.NUM_BINS, dtype=np.int32)
        merged[self._win_idx] = flat
        merged = merged.reshape(len(self.keys), histogram.NUM_BINS)
        lost = np.nonzero(sums[:, _LOST] > 0)[0]
        if len(lost):
            merged[lost] = whole(np.ascontiguousarray(counts[lost]))
        return merged, int(len(lost) * histogram.NUM_BINS)

    def merged_rows(self, merged):
        """Rank 0: the job's rows back in reduce.py's layout: (meta, rows [m, NCOL], hists, hist_n)."""
        sums, maxes, counts = merged
        present = np.nonzero(sums[:, _PRESENT] > 0)[0]
        m = len(present)
        rows = np.full((m, NCOL), math.nan)
        s, mx = sums[present], maxes[present]
        rows[:, _SUM_IDX] = s[:, : len(SUM_COLS)]
        bad = (rows[:, COL["count"]] == 0) | (rows[:, COL["nan"]] > 0)  # as one tensor holding a NaN, or none
        rows[:, COL["max"]] = np.where(bad | np.isinf(mx[:, 0]) & (mx[:, 0] < 0), math.nan, mx[:, 0])
        rows[:, COL["min"]] = np.where(bad | np.isinf(mx[:, 1]) & (mx[:, 1] < 0), math.nan, -mx[:, 1])
        rows[:, COL["init_dist"]] = np.where(np.isneginf(mx[:, 2]), math.nan, mx[:, 2])
        with np.errstate(invalid="ignore", divide="ignore"):
            rows[:, COL["dead_units"]] = np.where(s[:, _DEAD_N] > 0, s[:, _DEAD] / s[:, _DEAD_N], math.nan)
        ref = rows[:, COL["ref_sumsq"]]
        rows[:, COL["ref_sumsq"]] = np.where(ref > 0, ref, math.nan)
        hists = (counts[present].astype(np.int64) if counts is not None
                 else np.zeros((m, histogram.NUM_BINS), dtype=np.int64))
        hist_n = s[:, _HIST_N].astype(np.int64).tolist() if counts is not None else [0] * m
        meta = [self.keys[i] for i in present]
        return meta, rows, hists, hist_n

    def rank_stats(self, gathered) -> wire.RankStats:
        """The all-gathered per-rank vector as the wire carries it."""
        col = {name: gathered[:, i].tolist() for i, name in enumerate(VECTOR)}
        return wire.RankStats(grad_norm=col["grad_norm"], nonfinite=col["nonfinite"], step_time=col["step_time"],
                              fwd_time=col["fwd_time"], loss=col["loss"])

    # -- failure ----------------------------------------------------------

    def _off(self, why: str) -> None:
        if self.on:
            self.on = False
            self.why_off = why
            log.warning("xray-tui: whole-job view off: %s; training goes on", why)

    def _missing(self) -> list[int]:
        """Rank 0, after a failed round: the ranks that did not say in the store that they are
        still here (a dead or hung rank cannot). Every surviving rank's round fails too, within
        ``timeout``, and says so; rank 0 waits that long at most (on the job thread)."""
        if self._store is None:
            return []
        keys = [f"{self._key}alive/{r}" for r in range(self.world)]
        deadline = time.monotonic() + min(self.timeout, CLOSE_WAIT / 2)
        while True:
            try:
                here = [self._store.check([k]) for k in keys]
            except Exception:
                return []
            if all(here) or time.monotonic() > deadline:
                return [r for r, ok in enumerate(here) if not ok]
            time.sleep(0.1)

    def _lost(self, step: int, exc: Exception) -> None:
        """A round failed: switch off, and (rank 0) tell the viewers which ranks went missing."""
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if not dist.is_initialized():  # the script tore torch.distributed down first: nobody is missing
            self._off("torch.distributed was shut down before the probe closed")
            return
        self._off(f"a collective failed ({error})")
        if self._store is not None:
            try:  # still here (rank 0 names the ranks that do not say so)
                self._store.set(f"{self._key}alive/{self.rank}", str(self.rounds))
            except Exception:
                self._store = None
        if self.rank != 0:
            return
        missing = self._missing()
        who = ", ".join(f"{r} ({self.hosts[r]})" if r < len(self.hosts) else str(r) for r in missing)
        step = max(step, 0)
        msgs: list[wire.Message] = [wire.Note(step, wire.JOB_RANK, "job-off", {
            "why": error, "missing": ",".join(map(str, missing)), "round": self.rounds})]
        for r in missing:
            host = self.hosts[r] if r < len(self.hosts) else "?"
            msgs.append(wire.Alert(step, r, "critical", "rank-missing", "(all)", "scalar", 1.0, self.timeout,
                                   f"rank {r} on {host} stopped taking part in the probe's collectives at step "
                                   f"{step} (dead, or hung past {self.timeout:g} s); the whole-job view is off"))
        if not missing:
            msgs.append(wire.Alert(step, 0, "warning", "rank-missing", "(all)", "scalar", 1.0, self.timeout,
                                   f"the whole-job view is off at step {step}: {error}"))
        log.warning("xray-tui: ranks missing from the job: %s", who or "unknown")
        self._publish(lambda: msgs)
