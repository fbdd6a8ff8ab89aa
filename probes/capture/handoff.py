"""A pass's statistics handed off the training thread, as builders of its messages.

The training thread starts the one device-to-host copy of a pass's rows and
hands a builder to the publisher thread (or, with the whole-job view, work to
the job thread, :mod:`probes.distributed.job`); the builder waits for the
copy and makes the :class:`~probes.protocol.wire.Step` and the steps'
:class:`~probes.protocol.wire.Scalars` there.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable

import msgspec
import numpy as np

from probes.capture.scalars import grad_norm
from probes.capture.step import build_step
from probes.distributed.job import Job
from probes.engines.batch import Batch
from probes.engines.layout import COL
from probes.protocol import histogram, wire

if TYPE_CHECKING:
    from probes.publish.publisher import Publisher


class Handoff:
    """Hands a rank's passes to the publisher thread, or to the job thread when there is
    a whole-job view (``job``), in step order.

    ``bases``: each LoRA B weight's base weight (for the adapters' shift);
    ``fail``: the probe's, to switch off a part whose host copy fails.
    """

    def __init__(self, publisher: Publisher, job: Job | None, rank: int, bases: dict[str, str],
                 fail: Callable[[str], None]) -> None:
        self.publisher, self.job, self.rank, self.bases = publisher, job, rank, bases
        self._fail = fail

    def step(self, batch: Batch, step: int, norms, scalars, skipped: bool, timing: tuple[float, float]) -> None:
        """A sampled training step: start its host copy, then hand off its builder (its work, with
        the job). ``norms``: every rank's gradient norm or None; ``scalars``: :meth:`ScalarLog.take`'s
        builder; ``timing``: seconds per step since the last sampled one, and its data + forward time."""
        copy = None
        if len(batch):
            try:
                copy = batch.start_copy()  # the one device-to-host copy of the step, waited for by the publisher
            except Exception:
                self._fail("transfer")
        rank, t, bases = self.rank, time.time(), self.bases
        if self.job is not None:
            self.job.submit(step, job_work(step, rank, t, batch, copy, scalars, bases, skipped, self.job, timing))
            return  # every rank takes part in every round, even with nothing to add (the ranks stay in step)
        if copy is None:
            self.publisher.submit(scalars)
            return
        self.publisher.submit(train_step(step, rank, t, batch, copy, norms, scalars, bases, skipped))

    def eval_pass(self, batch: Batch, step: int) -> None:
        """An evaluation pass: its host copy, and the builder of its own Step (``phase="eval"``)."""
        try:
            copy = batch.start_copy()  # one device-to-host copy for the pass, waited for by the publisher
        except Exception:
            self._fail("eval")
            return
        self.publisher.submit(eval_pass(step, self.rank, time.time(), batch, copy))

    def ship(self, build) -> None:
        """Hand a builder to the publisher, behind the job's rounds when there are any (step order)."""
        if self.job is not None:
            self.job.forward(build)
        else:
            self.publisher.submit(build)


def eval_pass(step: int, rank: int, t: float, batch: Batch, copy):
    """The builder of an evaluation pass's Step (``phase="eval"``)."""
    return lambda: build_step(step, rank, t, batch.meta, *copy.wait(), batch.hist_n, phase="eval")


def train_step(step: int, rank: int, t: float, batch: Batch, copy, norms, scalars, bases: dict[str, str],
               skipped: bool):
    """The builder of a sampled training step's Step and of the Scalars since the last one.

    ``norms``: every rank's gradient norm (a device tensor) or None; ``scalars``:
    :meth:`ScalarLog.take`'s builder; ``bases``: each LoRA B weight's base weight."""
    def build() -> list[wire.Message]:
        # every rank's gradient norm comes to the host here, on the publisher thread
        rank_norms = norms.cpu().tolist() if norms is not None else None
        msg = build_step(step, rank, t, batch.meta, *copy.wait(), batch.hist_n, rank_norms,
                         lora_bases=bases, skipped=skipped)
        out = scalars()
        if out and out[-1].step == step:  # the global gradient norm, from the rows just built
            out[-1].values["grad_norm"] = grad_norm(msg)
        return [msg, *out]

    return build


def job_work(step: int, rank: int, t: float, batch: Batch, copy, scalars, bases: dict[str, str], skipped: bool,
             job: Job, timing: tuple[float, float]):
    """The sampled step's work on the job thread (probes/distributed/job.py): build this rank's messages
    and its per-rank vector; ``finish`` (publisher thread) adds the gathered norms and, on
    rank 0, the whole job's Step (``rank=-1``). ``timing``: seconds per step since the last
    sampled step, and this step's data + forward time."""
    step_time, fwd_time = timing

    def work():
        if copy is not None:
            rows, hists = copy.wait()
            meta, hist_n = batch.meta, batch.hist_n
        else:
            rows, hists, meta, hist_n = np.zeros((0, len(COL))), np.zeros((0, histogram.NUM_BINS)), [], []
        msg = build_step(step, rank, t, meta, rows, hists, hist_n, lora_bases=bases, skipped=skipped)
        out = scalars()
        loss = math.nan
        if out and out[-1].step == step:
            out[-1].values["grad_norm"] = grad_norm(msg)
            loss = float(out[-1].values.get("loss", math.nan))
        c = COL
        nonfinite = float(rows[:, [c["nan"], c["posinf"], c["neginf"]]].sum()) if len(rows) else 0.0
        sq = [s.sumsq for s in msg.samples if s.kind == "grad" and s.layer in job.replicated]
        gn = math.sqrt(sum(sq)) if sq else math.nan
        vector = [step, gn, nonfinite, step_time, fwd_time, loss]
        return [msg, *out], meta, rows, hists, hist_n, vector, finish

    def finish(own, gathered, merged) -> list[wire.Message]:
        if own and isinstance(own[0], wire.Step) and job.replicated:
            # the same all-gathered vector on every rank (rank 0's judges rank-divergence)
            own = [msgspec.structs.replace(own[0], rank_grad_norms=gathered[:, 1].tolist()), *own[1:]]
        if merged is None:
            return own
        meta, rows, hists, hist_n = job.merged_rows(merged)
        whole = build_step(step, wire.JOB_RANK, t, meta, rows, hists, hist_n, lora_bases=bases, skipped=skipped)
        return [*own, msgspec.structs.replace(whole, ranks=job.rank_stats(gathered))]

    return work
