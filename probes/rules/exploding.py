"""``exploding``: a weight's, gradient's or activation's L2 norm far above its own history.

Each stream is judged against the median of its recent healthy L2 norms (the
``l2`` baseline, which ``vanishing`` reads too), and a gradient also against the
whole model's growth at that step: when a model leaves its starting plateau
every gradient grows together, which is no explosion. Activations and
gradients past an absolute cap on their abs-max fire at once.

Judged on what the optimizer applies: with gradient clipping on (a ``clip``
scalar or Note, :meth:`~probes.rules.run.RunFacts.clip`) the step's whole
gradient is bounded, so a gradient that grew against its own history is an
explosion only when it holds at least ``explode_clip_share`` of the step's
gradient norm (the gradients the probe reads are the clipped ones); a BERT
classifier's attention query/key gradients grow 80x from near zero as it
leaves its plateau, at 1% of the clipped norm. A weight that started at zero
(a bias) grows from nothing and is not judged against its history.
"""

from __future__ import annotations

import math
import statistics

from probes.protocol import stats
from probes.protocol.wire import Sample
from probes.rules.base import MAD_SIGMA, Finding, SampleRule, StepContext, StreamState, Verdict, mad, median

#: the stream series of recent healthy L2 norms
L2 = "l2"


def norm(ctx: StepContext, s: Sample, st: StreamState, c) -> tuple[float, float]:
    """(``s``'s L2 norm, the median of its stream's recent healthy L2 norms: NaN while it is
    too short), computed once per sample for the rules that read them."""
    memo = ctx.memo
    if memo and memo[0] is s:
        return memo[1], memo[2]
    value = stats.l2(s)
    ref = median(st.series(L2), c.explode_window, c.explode_min_history) if math.isfinite(value) else math.nan
    ctx.memo = (s, value, ref)
    return value, ref


class Exploding(SampleRule):
    """``exploding``, and the keeper of the ``l2`` baseline it shares with ``vanishing``."""

    id = "exploding"
    kinds = frozenset({"weight", "grad", "act"})

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.growth = 1.0  # the whole model's gradient growth at the step being judged
        self.peers = 0.0  # and the median L2 of its gradients at that step
        self.total = 0.0  # and their global L2 norm (as clipped, when clipping is on)

    def begin(self, ctx: StepContext) -> None:
        """How much the model's gradients grew at this step, and their median L2 norm.

        The growth is the median over gradient streams of L2 / its own recent
        median (at least 1). When a model leaves its starting plateau every
        gradient grows together, the small ones (LayerNorm's, biases') by
        20-80x; one layer that explodes alone leaves this median near 1, and
        its norm goes far above the median of the others'.
        """
        c = self.engine.config
        growths, norms = [], []
        for s in ctx.step.samples:
            if s.kind != "grad" or stats.nonfinite(s):
                continue
            value = stats.l2(s)
            norms.append(value)
            st = self.engine.streams.get((s.layer, "grad", ctx.step.rank))
            ref = median(st.hist.get(L2, ()), c.explode_window, c.explode_min_history) if st else math.nan
            if ref > 0:
                growths.append(value / ref)
        self.total = math.sqrt(sum(v * v for v in norms))
        self.growth = max(1.0, statistics.median(growths)) if len(growths) >= 3 else 1.0
        self.peers = statistics.median(norms) if len(norms) >= 3 else 0.0

    def judge(self, ctx, s, st, c) -> Verdict | None:
        value = stats.l2(s)
        if not math.isfinite(value):
            ctx.memo = (s, value, math.nan)
            return None  # the nonfinite rule owns this sample
        hist = st.series(L2)
        ref = median(hist, c.explode_window, c.explode_min_history)
        ctx.memo = (s, value, ref)  # for vanishing and settle: norm() without computing them again
        # a gradient is judged against its own history times the whole model's growth at this step
        together = self.growth if s.kind == "grad" else 1.0
        threshold = c.explode_factor * ref * together
        if ref > 0 and value > threshold:  # the noise band only raises the threshold: needed past it alone
            threshold = max(threshold, ref + c.explode_mad * MAD_SIGMA * mad(hist, c.explode_window))
        # ...and a gradient still below the median layer's is no explosion, however fast it grew
        # from a tiny start (a LayerNorm's, 1e-4 at init, reaching 1e-2 as training begins)
        significant = s.kind != "grad" or value > self.peers
        clip = self.engine.clip() if s.kind == "grad" else None
        if clip is not None:
            # clipping bounds the step: a gradient is an explosion only when it dominates what is applied
            significant = significant and value >= c.explode_clip_share * self.total
        if s.kind == "weight" and self.engine.zero_init.get(s.layer, False):
            significant = False  # a zero-initialised weight (a bias) grows from nothing: no history to judge
        rel = ref > 0 and value > threshold and significant
        now = rel and value > max(threshold, c.explode_now * ref * together)
        absmax = stats.absmax(s)
        cap = s.kind in ("act", "grad") and absmax > c.explode_abs_cap

        def finding() -> Finding:
            clip_on = self.engine.clip()
            pre = self.engine.scalars.get("grad_norm_preclip")  # the global norm before clipping, when sent
            before = f"; the gradient norm before clipping was {pre:.3g}" if clip_on and pre is not None else ""
            advice = (f"lower the learning rate (gradient clipping at {clip_on:g} is already on{before})" if clip_on
                      else "lower the learning rate or clip gradients")
            if rel:
                # 10x its own history is a precursor worth a look (early training can grow that
                # much when a plateau breaks); 100x at once is an explosion
                model = f" (the model's gradients grew {together:.1f}x)" if together > 1 else ""
                return Finding(
                    "critical" if now else "warning", value, threshold,
                    f"{s.kind} L2 norm {value:.3g} is {value / ref:.0f}x its recent median "
                    f"{ref:.3g}{model}: {advice}",
                )
            return Finding(
                "critical", absmax, c.explode_abs_cap,
                f"{s.kind} abs-max {absmax:.3g} above the cap {c.explode_abs_cap:g}: "
                f"values are blowing up; {advice}",
            )

        # a jump far out of range, or past the cap, needs no confirmation
        return bool(rel or cap), 1 if (now or cap) else c.explode_k, finding

    def settle(self, ctx, s, st, c, bad) -> None:
        """A stream's history is its healthy past: bad values do not move the baseline."""
        memo = ctx.memo
        value = memo[1] if memo and memo[0] is s else norm(ctx, s, st, c)[0]
        if not math.isfinite(value):
            return
        hist = st.hist[L2]  # (made when the value was read)
        if not (bad & {"exploding", "vanishing"} or st.active & {"exploding", "vanishing"}):
            hist.append(value)
