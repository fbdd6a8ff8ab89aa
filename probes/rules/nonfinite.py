"""``nonfinite``: NaN or inf in a step's activations, weights or gradients.

It names the first layer to go non-finite (forward order for activations and
weights, backward order for gradients) and counts the others, which are
collateral; every other rule leaves a non-finite sample to this one. A
non-finite loss is judged over the Scalars, by :mod:`probes.rules.scalar`.
"""

from __future__ import annotations

from probes.protocol import stats
from probes.protocol.wire import Alert, Step
from probes.rules.base import Finding, StepContext, StepRule, alert


class Nonfinite(StepRule):
    """One critical alert per (kind, rank) while any of its streams holds NaN/inf; ``info``
    as soon as every stream of that kind is finite again (no hysteresis: one NaN is a finding)."""

    id = "nonfinite"

    def __init__(self, engine) -> None:
        super().__init__(engine)
        # (kind, rank) with an active alert -> the layer it named: later layers are collateral
        self.active: dict[tuple[str, int], str] = {}

    def evaluate(self, ctx: StepContext, out: list[Alert]) -> None:
        step, engine = ctx.step, self.engine
        for kind in ("act", "weight", "grad"):
            bad = [s for s in step.samples if s.kind == kind and stats.nonfinite(s) > 0
                   and engine.cfg(s.layer).on("nonfinite")]
            key = (kind, step.rank)
            if bad:
                engine.affected[key] = {s.layer for s in bad}
            else:
                engine.affected.pop(key, None)
            if not bad:
                if key in self.active:
                    layer = self.active.pop(key)
                    out.append(
                        Alert(step.step, step.rank, "info", "nonfinite", layer, kind, 0.0, 0.0,
                              f"{kind} values are finite again")
                    )
                continue
            if key in self.active:
                continue
            first = bad[-1] if kind == "grad" else bad[0]
            n = stats.nonfinite(first)
            order = "backward" if kind == "grad" else "forward"
            self.active[key] = first.layer
            others = len(bad) - 1
            also = f"; {others} other {kind} stream{'s' if others != 1 else ''} hold NaN/inf too" if others else ""
            also += self._where_in_job(step)
            out.append(alert(step, first, "nonfinite", Finding(
                "critical", n, 0,
                f"{n} non-finite {kind} values (NaN {first.nan}, +inf {first.posinf}, -inf "
                f"{first.neginf}) in {first.layer}, the first layer in {order} order to go "
                f"non-finite{also}: {self._hint(kind)}",
            )))

    def _where_in_job(self, step: Step) -> str:
        """On the whole job's step: which ranks (and hosts) hold the NaN/inf, from the per-rank vector."""
        ranks = step.ranks
        if step.rank != -1 or ranks is None:
            return ""
        bad = [r for r, n in enumerate(ranks.nonfinite) if n > 0]
        if not bad:
            return ""
        hosts = self.engine.hosts
        named = ", ".join(f"{r} ({hosts[r]})" if r < len(hosts) else str(r) for r in bad[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        return f"; on rank{'s' if len(bad) > 1 else ''} {named}{more}"

    def _hint(self, kind: str) -> str:
        """What to look at, for the run's precision."""
        p = self.engine.precision_kind()
        if p == "fp16":
            return ("fp16 overflows above 65504: use a GradScaler (or bf16), lower the learning rate, "
                    "check this layer's inputs")
        if p == "fp16+scaler":
            return ("with a GradScaler an inf gradient now and then is normal (the step is skipped, the scale "
                    "halved); in weights or activations it is not: lower the learning rate, check its inputs"
                    if kind == "grad" else
                    "a GradScaler skips steps with inf gradients, so this came from elsewhere: the learning rate, "
                    "this layer's inputs, a log/sqrt/division of a non-positive value")
        if p in ("fp32", "bf16"):
            return (f"the run is {self.engine.precision}, so this is not a low-precision overflow: check the "
                    "learning rate, this layer's inputs, a log/sqrt/division of a non-positive value")
        return "check its inputs, the learning rate and loss scaling"
