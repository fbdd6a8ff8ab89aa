"""The whole job through torch.distributed: rank 0 merges every rank's statistics.

On a sampled training step every rank hands its rows (:mod:`probes.engines.batch`)
to a :class:`Job`, whose own thread packs them into flat buffers, one slot
per (layer, kind) of a table fixed at attach and equal on every rank (the
arithmetic is :mod:`probes.distributed.merge`'s), and runs four collectives
on a gloo group of the probe's own, in the same order on every rank:

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
and the per-rank vector (:class:`~probes.protocol.wire.RankStats`); what
is exact in that merge is said in :mod:`probes.distributed.merge`.

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

from probes.distributed.merge import MAX_WIDTH, SUM_HEAD, VECTOR, Merger
from probes.protocol import histogram, wire

log = logging.getLogger("xray-tui")

#: Sampled steps queued on some rank's job thread beyond which the job merges half as many steps.
BACKLOG_HIGH = 16
#: Rounds in a row with no step queued anywhere before it merges twice as many again.
CALM_ROUNDS = 8
#: Fewest sampled steps merged: 1 in MAX_STRIDE.
MAX_STRIDE = 64
#: Seconds a round (or the setup) may take before the job is switched off.
DEFAULT_TIMEOUT = 60.0
#: Seconds the probe's close waits at most for the job thread's last rounds.
CLOSE_WAIT = 10.0
#: Sampled steps waiting for the job thread; one more means it fell behind (a peer is slow or gone).
QUEUE_STEPS = 64


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


class Job(Merger):
    """The probe's part in the whole job's view (see the module docstring): the group, the job
    thread, its pace and its failure; packing and merging are :class:`Merger`'s.

    ``publish(messages)`` hands a list of messages to the publisher (the
    probe's ``publisher.submit``). Every rank builds one, at attach, in the
    same order (the group's creation is itself a collective).
    """

    def __init__(self, keys: list[tuple[str, str]], publish, run: str, *, timeout: float = DEFAULT_TIMEOUT,
                 replicated: set[str] | None = None, lora_bases: dict | None = None, every: int = 1) -> None:
        super().__init__(keys)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
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
        Merger.__init__(job, keys)
        job.rank, job.world = rank, world
        job.replicated, job.lora_bases, job.on, job.hosts = set(), {}, False, []
        job.every, job.stride, job._calm, job._publish = 1, 1, 0, lambda build: None
        return job

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
        if not thread.is_alive():
            self._release_group()

    def _release_group(self) -> None:
        """Destroy the probe's own gloo group once its thread is done with it (a local act, no
        collective): left to the interpreter's exit, its transport threads were torn down by the
        C++ runtime and a rank could abort ("terminate called without an active exception",
        about one run in five of tests/dist_script.py)."""
        group, self.group = getattr(self, "group", None), None
        dist = torch.distributed
        if group is None or not (dist.is_available() and dist.is_initialized()):
            return
        try:
            dist.destroy_process_group(group)
        except Exception:  # never the training's problem
            log.debug("xray-tui: the probe's gloo group could not be destroyed", exc_info=True)

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
            flat = self.windowed(counts, sums)
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
