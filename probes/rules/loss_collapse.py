"""``loss-collapse``: the loss falling towards zero far faster than a healthy run's.

A loss that collapses is as suspicious as one that explodes: constant targets, the label leaked
into the input, a loss that does not compare what it should. Healthy runs leave their start
slowly: after 50 steps the healthy corpus (GPT-2 and LLaMA from scratch, a BERT classifier, LoRA)
was still at 75-100% of its starting loss (a nanoGPT-shaped run with warm-up at 67%), and the one that later learnt its task well fell to a
quarter only after 300 steps of plateau. With constant labels a BERT classifier's loss was at
21% by step 30. So: the loss (the median of the last 3 steps) at most ``collapse_frac`` of where
the run started (the median of its first 3) within ``collapse_steps`` steps of the start fires a
warning, once per rank. Judged over every step's Scalars (:mod:`probes.rules.scalar` calls it).
"""

from __future__ import annotations

import statistics

from probes.protocol.wire import Alert, Scalars
from probes.rules.thresholds import LOSS_LAYER


class _Run:
    """One rank's start and recent losses."""

    def __init__(self) -> None:
        self.first: list[float] = []  # the first 3 losses
        self.recent: list[float] = []  # the last 3
        self.seen = 0  # steps with a finite loss
        self.first_step = 0
        self.fired = False


class LossCollapse:
    """``loss-collapse`` over each step's finite loss."""

    id = "loss-collapse"

    def __init__(self, engine) -> None:
        self.engine = engine
        self._runs: dict[int, _Run] = {}

    def evaluate(self, msg: Scalars, c, loss: float, out: list[Alert]) -> None:
        """Judge ``loss``, the finite loss of ``msg``'s step, under thresholds ``c``."""
        run = self._runs.setdefault(msg.rank, _Run())
        if run.fired or not c.on(self.id):
            return
        if not run.first:
            run.first_step = msg.step
        run.seen += 1
        if len(run.first) < 3:
            run.first.append(loss)
        run.recent = (run.recent + [loss])[-3:]
        if run.seen <= 3 or msg.step - run.first_step > c.collapse_steps:
            return
        start, now = statistics.median(run.first), statistics.median(run.recent)
        if not (start > 0 and now <= c.collapse_frac * start):
            return
        run.fired = True
        steps = msg.step - run.first_step
        lr = self.engine.scalars.get("lr")
        out.append(Alert(
            msg.step, msg.rank, "warning", self.id, LOSS_LAYER, "scalar", float(now), float(c.collapse_frac * start),
            f"the loss collapsed from {start:.3g} to {now:.3g} ({now / start:.0%} of its start) in {steps} steps"
            + (f" at lr {lr:.3g}" if lr is not None else "")
            + "; healthy runs measured were still at 67% or more of theirs after 50 steps: are the labels constant or leaked into the inputs (a label column left in the features, "
            "labels equal to the inputs unshifted), or is the loss comparing the wrong tensors?"))
