"""``lagging``: a weight matrix (or a whole param group) learning far slower than its peers.

``starved`` needs 100x; a new head left in a param group at 1/20 of the body's learning rate
sits 14-27x below the median update ratio ``||dW||/||W||`` of the model's weight matrices, and
trains 20x slower than it should with no alert. ``lagging`` fires in the band between:
``lagging_factor`` (10x) below that median for ``lagging_k`` samples in a row, up to
``starved_factor`` (past it ``starved`` speaks). The peers are the model's weight matrices
(not biases, norms, embeddings, zero-initialised tensors, nor LoRA adapters, whose A and B
move at paces of their own). Healthy runs of four families (GPT-2, LLaMA, a BERT classifier,
LoRA; and the six of bench/healthy_runs.py) spread at most 5x (docs/alerts.md). The message
names the param group and compares its lr with the peers' own.
"""

from __future__ import annotations

import math
import statistics

from probes.rules.base import Finding, StepContext, UpdateRule, Verdict


class Lagging(UpdateRule):
    """``lagging`` on update streams of weight matrices."""

    id = "lagging"

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.ref = (math.nan, 0)  # (median ratio of the peers at the step being judged, peers)
        self.peer_group = 0  # the param group most peers are in

    def _peer(self, layer: str) -> bool:
        engine = self.engine
        info = engine.params.get(layer)
        return (engine.param_kind(layer) == "matrix" and not engine.zero_init.get(layer, False)
                and not (info is not None and info[0].role == "lora"))

    def begin(self, ctx: StepContext) -> None:
        """The peers' median update ratio at this step, and the param group most of them are in."""
        ratios, groups = [], {}
        for s in ctx.step.samples:
            if (s.kind == "update" and s.ratio is not None and math.isfinite(s.ratio) and s.ratio > 0
                    and s.layer not in ctx.missing and self._peer(s.layer)):
                ratios.append(s.ratio)
                g = self.engine.param_groups.get(s.layer, 0)
                groups[g] = groups.get(g, 0) + 1
        self.ref = (float(statistics.median(ratios)), len(ratios)) if ratios else (math.nan, 0)
        self.peer_group = max(groups, key=groups.get) if groups else 0

    def judge(self, ctx, s, st, c) -> Verdict | None:
        if s.ratio is None or not math.isfinite(s.ratio) or s.ratio < c.stall_ratio or not self._peer(s.layer):
            return None  # no ratio, not moving at all (stalled's), or no peer to compare with
        ref, n = self.ref
        if n < c.starved_min_peers or not ref > 0:
            return None
        ratio = s.ratio
        gap = ref / ratio if ratio > 0 else math.inf
        # past starved's factor it is starved's alert (when starved is on)
        bad = gap >= c.lagging_factor and (gap < c.starved_factor or not c.on("starved"))

        def finding() -> Finding:
            return Finding("warning", ratio, ref / c.lagging_factor,
                           f"{s.layer} learns {gap:.0f}x slower than the model's other weight matrices: update "
                           f"ratio {ratio:.2g} against their median {ref:.2g} for {c.lagging_k} samples "
                           f"(healthy runs: within 5x); " + self._why(s.layer))

        return bad, c.lagging_k, finding

    def _why(self, param: str) -> str:
        """The likeliest cause, from the param groups' learning rates."""
        engine = self.engine
        lr, group = engine.lr(param)
        peer_lr = engine.scalars.get("lr" if self.peer_group == 0 else f"lr/{self.peer_group}")
        if lr is not None and peer_lr and group != self.peer_group and lr < peer_lr:
            return (f"its param group {group} is at lr {lr:.3g}, 1/{peer_lr / lr:.0f} of the lr of the rest "
                    f"(param group {self.peer_group}: {peer_lr:.3g}): raise that group's lr (a new head left at "
                    "a fine-tuning rate, or a typo in its lr?)")
        at = f" at lr {lr:.3g}" if lr is not None else ""
        if not engine.param_groups:
            where = f"its lr is unknown to the probe{at}" if not at else f"it trains{at}"
        elif group == self.peer_group:
            where = f"it is in the same param group as the rest{at}"
        else:
            where = f"it is in param group {group}{at}"
        return where + (": its gradient is small against its weight (a layer behind a saturated one, weights "
                        "initialised far larger than the rest, or a gradient scaled down)")
