"""``starved``: a weight matrix that learns far slower than the model's other matrices.

A head at a fine-tuning learning rate, or a gradient scaled down: its update
ratio is judged against the median update ratio of its kind of parameter at
the same step (only weight matrices: biases and norm weights spread over 100x
in healthy SGD runs, and embeddings are sparse).
"""

from __future__ import annotations

import math
import statistics

from probes.rules.base import Finding, StepContext, UpdateRule, Verdict


class Starved(UpdateRule):
    """``starved`` on update streams."""

    id = "starved"

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.medians: dict[str, tuple[float, int]] = {}  # at the step being judged

    def begin(self, ctx: StepContext) -> None:
        """Kind of parameter -> (median update ratio at this step, tensors in it)."""
        by: dict[str, list] = {}
        for s in ctx.step.samples:
            if (s.kind == "update" and s.ratio is not None and math.isfinite(s.ratio) and s.ratio > 0
                    and s.layer not in ctx.missing):
                by.setdefault(self.engine.param_kind(s.layer), []).append(s.ratio)
        self.medians = {k: (float(statistics.median(v)), len(v)) for k, v in by.items()}

    def judge(self, ctx, s, st, c) -> Verdict | None:
        if s.ratio is None or not math.isfinite(s.ratio) or s.ratio < c.stall_ratio:
            return None  # no ratio, or not moving at all: stalled's
        kind = self.engine.param_kind(s.layer)
        if kind != "matrix":
            return None  # biases and norm weights spread over 100x in healthy SGD runs; embeddings are sparse
        ref, n = self.medians.get(kind, (math.nan, 0))
        if n < c.starved_min_peers or not ref > 0:
            return None  # nothing to compare with
        ratio = s.ratio

        def finding() -> Finding:
            lr, group = self.engine.lr(s.layer)
            if lr is not None:
                base = self.engine.scalars.get("lr")
                where = (f"; its param group {group}'s lr is {lr:.3g}"
                         + (f" (group 0: {base:.3g})" if group != 0 and base is not None else ""))
            else:
                where = ""
            return Finding(
                "warning", ratio, ref / c.starved_factor,
                f"{s.layer} learns {ref / ratio:.0f}x slower than the model's other {kind} tensors: update "
                f"ratio {ratio:.2g} against their median {ref:.2g} for {c.starved_k} samples{where}: "
                "a param group's lr far below the rest (a new head left at the body's fine-tuning rate?), "
                "or a gradient scaled down",
            )

        return ratio * c.starved_factor < ref, c.starved_k, finding
