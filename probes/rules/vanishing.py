"""``vanishing``: a gradient that underflows or shrinks far below its own history.

Two conditions: the share of exact zeros jumps (gradients flushed to zero,
typically fp16 without a GradScaler), or the L2 norm falls below a small
fraction of its recent median (the ``l2`` baseline kept by ``exploding``).
"""

from __future__ import annotations

import math

from probes.protocol import stats
from probes.rules.base import Finding, SampleRule, Verdict, median
from probes.rules.exploding import norm


class Vanishing(SampleRule):
    """``vanishing`` on gradient streams."""

    id = "vanishing"
    kinds = frozenset({"grad"})

    def judge(self, ctx, s, st, c) -> Verdict | None:
        value, ref = norm(ctx, s, st, c)
        if not math.isfinite(value):
            return None  # the nonfinite rule owns this sample
        zeros = stats.fraction(s.zeros, s)
        zhist = st.series("zeros")
        zmed = median(zhist, c.explode_window, c.explode_min_history)
        underflow = zmed == zmed and zeros >= c.vanish_zeros and zeros - zmed >= c.vanish_zeros_jump
        shrunk = ref > 0 and value < c.vanish_factor * ref
        bad = bool(underflow or shrunk)
        if not (bad or "vanishing" in st.active):
            zhist.append(zeros)

        def finding() -> Finding:
            if underflow:
                return Finding(
                    "warning", zeros, c.vanish_zeros,
                    f"{zeros:.0%} of {s.layer}'s gradient is exactly zero (it was {zmed:.0%}): "
                    f"{self._underflow_hint()}",
                )
            p = self.engine.precision_kind()
            hint = ("check loss scaling (fp16 needs a GradScaler), saturated activations, depth" if p == "fp16"
                    else "check saturated activations, depth, a loss scaled down" if p in ("fp32", "bf16")
                    else "check loss scaling, saturated activations, depth")
            return Finding(
                "warning", value, c.vanish_factor * ref,
                f"gradient L2 norm {value:.3g} fell below {c.vanish_factor:g}x its recent median "
                f"{ref:.3g}: gradients vanish; {hint}",
            )

        return bad, c.vanish_k, finding

    def _underflow_hint(self) -> str:
        """Why a gradient became exact zeros, for the run's precision (fp16 flushes small ones to zero)."""
        engine = self.engine
        p = engine.precision_kind()
        if p == "fp16":
            return ("gradients underflow; fp16 without a GradScaler: small gradients flush to zero; "
                    "use torch.amp.GradScaler (or bf16)")
        if p == "fp16+scaler":
            scale = engine.scalars.get("scale")
            return ("gradients underflow; a GradScaler is in use"
                    + (f" (scale {scale:.3g})" if scale is not None else "")
                    + ": a scale that kept falling after repeated overflows lets gradients underflow; "
                    "else check for a saturated activation")
        if p in ("fp32", "bf16"):
            # no underflow in this exponent range: the zeros come from the graph, not from rounding
            return (f"no gradient flows back (the run is {engine.precision}, which does not flush small gradients "
                    "to zero): check for a saturated activation (sigmoid, tanh), a dead ReLU/GELU region after it "
                    "or masking")
        return "gradients underflow; under fp16 use a GradScaler (or bf16), or check for a saturated activation"
