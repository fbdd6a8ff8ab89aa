"""Rules over every step's run-level scalars (:class:`probes.protocol.wire.Scalars`).

``loss-spike``: the loss above a rolling robust band (as OLMo's step
skipping and Lightning's SpikeDetection judge a loss), on any step, sampled
or not: the median of the last few healthy losses plus k robust sigmas of
the step-to-step noise, and a relative margin. The noise is read from the
first differences (their MAD about their own median), which a falling
trend does not widen, so a bad batch is caught during a steep descent too. Its
message names the first movers: the layers whose gradient norm or update
ratio rose most above their own history in the latest sampled step.
A NaN or infinite loss is ``nonfinite`` (critical) on layer ``(loss)``.

``overflow``: a GradScaler skipping steps. Every fp16 run skips a handful
while the scale settles from 2**16 at the start and one every few thousand
steps after; so a warning needs half of a full window skipped, and a
critical alert ``overflow_all_k`` skipped steps in a row or a skipped step
at a scale below ``overflow_min_scale`` (the scale has collapsed).
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from probes.protocol.wire import Alert, Scalars
from probes.rules.base import FIRE, MAD_SIGMA, RECOVER, track
from probes.rules.loss_collapse import LossCollapse
from probes.rules.thresholds import LOSS_LAYER

LOSS = LOSS_LAYER


def band(losses, window: int, recent: int) -> tuple[float, float]:
    """(the median of the last ``recent`` losses, the per-step noise in robust sigmas) over the
    last ``window`` losses. The noise is the MAD of the first differences about their median
    (a trend shifts every difference alike, so it does not count as noise) over sqrt(2): the
    difference of two independent steps has twice the variance of one."""
    v = list(losses)[-window:]
    mid = statistics.median(v[-recent:])
    diffs = [b - a for a, b in zip(v, v[1:])]
    if not diffs:
        return mid, 0.0
    m = statistics.median(diffs)
    return mid, MAD_SIGMA * statistics.median([abs(d - m) for d in diffs]) / math.sqrt(2)


class _RankState:
    """One rank's loss history, skipped steps and firing rules."""

    def __init__(self) -> None:
        self.losses: deque = deque(maxlen=512)  # healthy losses only: a spike must not move the band
        self.first: list[float] = []  # the first losses seen: where the run started
        self.above_start = 0  # steps in a row with the loss far above where it started
        self.skipped: deque = deque(maxlen=512)
        self.skipped_run = 0
        self.active: set[str] = set()  # rules (and conditions: "diverging", "overflow-critical") firing
        self.good: dict[str, int] = {}  # (for base.track) good steps in a row while active...
        self.bad: dict[str, int] = {}  # ...and bad ones


class ScalarRules:
    """``loss-spike``, ``nonfinite`` on the loss and ``overflow``, one Scalars message at a time."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._ranks: dict[int, _RankState] = {}
        self._collapse = LossCollapse(engine)  # loss-collapse: a module of its own

    def evaluate(self, msg: Scalars) -> list[Alert]:
        """Alerts that fire or recover at this step."""
        st = self._ranks.setdefault(msg.rank, _RankState())
        c = self.engine.cfg(LOSS)
        out: list[Alert] = []
        loss = msg.values.get("loss")
        if loss is not None:
            if c.on("nonfinite"):
                self._judge(msg, st, "nonfinite", not math.isfinite(loss), out,
                            lambda: self._alert(msg, "critical", "nonfinite", loss, 0,
                                                f"the loss is {loss}: training has diverged "
                                                f"{self._where(msg.rank)}; {self._hint()}"),
                            "the loss is finite again")
            if math.isfinite(loss):
                self._loss_spike(msg, st, c, loss, out)
                if c.on("loss-spike"):
                    self._diverging(msg, st, c, loss, out)
                self._collapse.evaluate(msg, c, loss, out)
        if c.on("overflow") and ("scale" in msg.values or msg.skipped):
            self._overflow(msg, st, c, out)
        return out

    # -- helpers ---------------------------------------------------------

    def _alert(self, msg, severity, rule, value, threshold, message) -> Alert:
        return Alert(msg.step, msg.rank, severity, rule, LOSS, "scalar", float(value), float(threshold), message)

    def _judge(self, msg, st, rule, bad, out, fire, recovered: str, key: str = "") -> None:
        """Fire once while ``bad`` holds (hysteresis is the caller's: :func:`~probes.rules.base.track`
        with ``k`` 1), say once, at severity ``info``, when it has not held for ``recover_k``
        steps. ``key`` tells apart two conditions of one rule."""
        change = track(st, key or rule, bad, 1, self.engine.cfg(LOSS).recover_k)
        if change == FIRE:
            out.append(fire())
        elif change == RECOVER:
            out.append(self._alert(msg, "info", rule, 0.0, 0.0, recovered))

    def _lr(self) -> str:
        lr = self.engine.scalars.get("lr")
        return f" (lr {lr:.3g})" if lr is not None and math.isfinite(lr) else ""

    def _hint(self) -> str:
        return f"lower the learning rate{self._lr()}, add warm-up or gradient clipping"

    def _where(self, rank: int) -> str:
        movers = self.first_movers(rank)
        return f"(moved most at the last sampled step: {movers})" if movers else ""

    def first_movers(self, rank: int = 0, top: int = 3) -> str:
        """The tensors that moved most: from the every-step tier when the run has it (update
        ratio or Adam RMS against their own recent median, at this step), else the layers whose
        gradient L2 norm or update ratio stood furthest above their own recent median in the
        latest sampled step, e.g. ``h.1.attn.c_attn.weight grad 41x``."""
        tier = self.engine.instability.movers(rank, top)
        if tier:
            return tier
        step = self.engine.last_step.get(rank)
        if step is None:
            return ""
        from probes.protocol import stats  # numpy; imported here, as the viewer may never need it

        moved = []
        for s in step.samples:
            if s.kind not in ("grad", "update"):
                continue
            st = self.engine.streams.get((s.layer, s.kind, rank))
            if st is None:
                continue
            value, series = (stats.l2(s), "l2") if s.kind == "grad" else (s.ratio, "ratio")
            hist = [v for v in st.hist.get(series, ()) if v > 0]
            if value is None or not hist:
                continue
            ref = statistics.median(hist[-16:])
            factor = value / ref if math.isfinite(value) else math.inf
            if factor > 1.5:
                moved.append((factor, s.layer, s.kind))
        moved.sort(reverse=True)
        return ", ".join(f"{layer} {kind} {f:.0f}x" if math.isfinite(f) else f"{layer} {kind} non-finite"
                         for f, layer, kind in moved[:top])

    # -- rules -----------------------------------------------------------

    def _loss_spike(self, msg, st, c, loss, out) -> None:
        bad = False
        threshold = math.nan
        if min(len(st.losses), c.spike_window) >= c.spike_min_history and c.on("loss-spike"):
            mid, noise = band(st.losses, c.spike_window, c.spike_recent)
            threshold = max(mid + c.spike_sigmas * noise, mid + c.spike_rel * abs(mid))
            bad = loss > threshold

            def fire():
                movers = self.first_movers(msg.rank)
                return self._alert(
                    msg, "warning", "loss-spike", loss, threshold,
                    f"loss {loss:.4g} spiked above its recent band (recent median {mid:.4g}, limit {threshold:.4g})"
                    + (f"; first movers: {movers}" if movers else "")
                    + f": a bad batch, or instability; {self._hint()}")

            self._judge(msg, st, "loss-spike", bad, out, fire, f"the loss is back within its band ({loss:.4g})")
        if not bad:
            st.losses.append(loss)

    def _diverging(self, msg, st, c, loss, out) -> None:
        """The loss far above where the run started, step after step: a learning rate too high
        from step 0 makes the loss chaotic at once, so no band of healthy steps exists to
        spike out of; an untrained model's loss is the ceiling a healthy run stays under."""
        if len(st.first) < 3:
            st.first.append(loss)
            return
        start = statistics.median(st.first)
        limit = c.spike_diverge * start
        st.above_start = st.above_start + 1 if start > 0 and loss > limit else 0

        def fire():
            return self._alert(
                msg, "critical", "loss-spike", loss, limit,
                f"the loss {loss:.4g} has stayed above {c.spike_diverge:g}x where the run started "
                f"({start:.4g}) for {st.above_start} steps: training is diverging"
                + (f" (moved most: {self.first_movers(msg.rank)})" if self.first_movers(msg.rank) else "")
                + f"; {self._hint()}")

        # shares loss-spike's once-while-active: a spike and a divergence are one story
        # k steps in a row to fire; once firing, recovered after recover_k steps back under the limit
        bad = st.above_start > 0 if "diverging" in st.active else st.above_start >= c.spike_diverge_k
        if bad or "diverging" in st.active:
            self._judge(msg, st, "loss-spike", bad, out, fire,
                        f"the loss is back below {c.spike_diverge:g}x where the run started ({loss:.4g})",
                        key="diverging")

    def _overflow(self, msg, st, c, out) -> None:
        st.skipped.append(bool(msg.skipped))
        st.skipped_run = st.skipped_run + 1 if msg.skipped else 0
        window = list(st.skipped)[-c.overflow_window:]
        share = sum(window) / len(window)
        scale = msg.values.get("scale", math.nan)
        collapsed = msg.skipped and scale < c.overflow_min_scale
        critical = st.skipped_run >= c.overflow_all_k or collapsed
        warn = len(window) >= c.overflow_window and share >= c.overflow_share

        def fire():
            precision = getattr(self.engine, "precision", "") or "fp16"
            if critical:
                what = (f"the loss scale collapsed to {scale:.3g}" if collapsed
                        else f"the last {st.skipped_run} steps were all skipped")
                return self._alert(
                    msg, "critical", "overflow", st.skipped_run if not collapsed else scale,
                    c.overflow_all_k if not collapsed else c.overflow_min_scale,
                    f"GradScaler: {what} (inf/NaN gradients every step): the model is not training. "
                    f"Under {precision} the gradients overflow at any scale: look for the first non-finite "
                    f"layer, lower the learning rate{self._lr()}, or train in bf16")
            return self._alert(
                msg, "warning", "overflow", share, c.overflow_share,
                f"GradScaler skipped {share:.0%} of the last {len(window)} steps (scale {scale:.3g}): "
                "gradients overflow fp16 often; lower the learning rate, clip gradients, or train in bf16")

        # a critical overflow fires even if the warning is already active
        if critical and "overflow" in st.active and "overflow-critical" not in st.active:
            st.active.add("overflow-critical")
            out.append(fire())
            return
        self._judge(msg, st, "overflow", warn or critical, out, fire,
                    f"GradScaler steps again (scale {scale:.3g})")
        if not (warn or critical):
            st.active.discard("overflow-critical")
        elif critical:
            st.active.add("overflow-critical")
