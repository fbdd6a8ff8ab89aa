"""``weight-spread``: a weight matrix's histogram flattening and spreading far past its start.

A learning rate too high from step 0 (no warm-up) drives every element of a matrix by about the lr
per Adam step, so within a few steps the weights forget their initialisation: the bell flattens
(its kurtosis falls towards a uniform's -1.2) and its spread grows many times over. The figure is
the matrix's standard deviation against its own ``spread_window`` (10) samples earlier (or its
first sample's, before that; from the sample's moments, :mod:`probes.protocol.stats`); at
``spread_factor`` (8x) or more for ``spread_k`` samples it fires. A window, not the start: healthy
weights do grow over a long run (the zoo's GPT-2 under SGD 0.3: 26x in 2,000 steps), but at most
2.1x over 10 samples in any healthy run measured, while lr 1e-1 on a tiny GPT-2 gave 27x in one.
Weight matrices only (not biases, norms, embeddings or a zero-initialised tensor, which has no
starting spread).
"""

from __future__ import annotations

import math

from probes.protocol import stats
from probes.rules.base import Finding, SampleRule, Verdict

#: the stream series of the weight's recent (step, std, sample): the kurtosis is computed only
#: for a message
RECENT = "spread"


class WeightSpread(SampleRule):
    """``weight-spread`` on weight streams of matrices."""

    id = "weight-spread"
    kinds = frozenset({"weight"})

    def applies(self, ctx, s) -> bool:
        engine = self.engine
        return s.count > 1 and engine.param_kind(s.layer) == "matrix" and not engine.zero_init.get(s.layer, False)

    def judge(self, ctx, s, st, c) -> Verdict | None:
        recent = st.series(RECENT)
        sd = stats.std(s)
        if not (math.isfinite(sd) and sd > 0):
            return None
        then = recent[max(0, len(recent) - c.spread_window)] if recent else None  # window samples ago
        recent.append((ctx.step.step, sd, s))
        while len(recent) > c.spread_window + 1:
            recent.popleft()  # the window only: each entry holds a whole sample
        if then is None:
            return None
        step0, sd0, s0 = then
        grown = sd / sd0

        def finding() -> Finding:
            k, k0 = stats.kurtosis(s), stats.kurtosis(s0)
            lr = self.engine.lr_text(s.layer)
            return Finding(
                "warning", grown, c.spread_factor,
                f"{s.layer}'s weights spread to {grown:.0f}x their std at step {step0} ({sd0:.2g} -> {sd:.2g}; "
                f"excess kurtosis {k0:.2f} -> {k:.2f}: the bell {'flattened' if k < k0 else 'is gone'}) in "
                f"{ctx.step.step - step0} steps; healthy runs: within 2.1x over {c.spread_window} samples. The "
                "updates dwarf the weights"
                + (f" ({lr})" if lr else "")
                + ": the learning rate is too high for this model (warm-up missing?); the loss will plateau "
                "above where a healthy run goes",
            )

        return grown >= c.spread_factor, c.spread_k, finding
