"""``weight-spread``: a weight matrix's histogram flattening and spreading far past its start.

A learning rate too high from step 0 (no warm-up) drives every element of a matrix by about the lr
per Adam step, so within a few steps the weights forget their initialisation: the bell flattens
(its kurtosis falls towards a uniform's -1.2) and its spread grows many times over. The figure is
the matrix's standard deviation against its first sample's (from the sample's moments,
:mod:`probes.protocol.stats`); at ``spread_factor`` (8x) or more for ``spread_k`` samples it
fires. Healthy runs of the corpus grew at most 3.3x (a LLaMA's lm_head over 200 steps); lr 1e-1
on a tiny GPT-2 gave 10-60x by step 5. Weight matrices only (not biases, norms, embeddings or a
zero-initialised tensor, which has no starting spread).
"""

from __future__ import annotations

import math

from probes.protocol import stats
from probes.rules.base import Finding, SampleRule, Verdict

#: the stream series holding the weight's (std, excess kurtosis) at its first sample
START = "spread_start"


class WeightSpread(SampleRule):
    """``weight-spread`` on weight streams of matrices."""

    id = "weight-spread"
    kinds = frozenset({"weight"})

    def applies(self, ctx, s) -> bool:
        engine = self.engine
        return s.count > 1 and engine.param_kind(s.layer) == "matrix" and not engine.zero_init.get(s.layer, False)

    def judge(self, ctx, s, st, c) -> Verdict | None:
        start = st.series(START)
        sd = stats.std(s)
        if not (math.isfinite(sd) and sd > 0):
            return None
        if not start:
            start.append((sd, stats.kurtosis(s)))
            return None
        sd0, k0 = start[0]
        grown = sd / sd0

        def finding() -> Finding:
            k = stats.kurtosis(s)
            lr = self.engine.lr_text(s.layer)
            return Finding(
                "warning", grown, c.spread_factor,
                f"{s.layer}'s weights spread to {grown:.0f}x their starting std ({sd0:.2g} -> {sd:.2g}; excess "
                f"kurtosis {k0:.2f} -> {k:.2f}: the bell it started as {'flattened' if k < k0 else 'is gone'}); "
                f"healthy runs: within 3.3x. The updates dwarf the initialisation"
                + (f" ({lr})" if lr else "")
                + ": the learning rate is too high for this model (warm-up missing?); the loss will plateau "
                "above where a healthy run goes",
            )

        return grown >= c.spread_factor, c.spread_k, finding
