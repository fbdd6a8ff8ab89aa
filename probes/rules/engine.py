"""Alert rules over the statistics stream: the engine that runs them, numpy only.

The probe runs them (so alerts fire with nobody attached); headless mode
can run them again over a stream or a recording with other thresholds
(``--rules FILE``). A :class:`RuleEngine` keeps a little history per stream
(one stream per layer, kind and rank), needs ``k`` consecutive bad samples
before it fires (hysteresis), fires once per (rule, layer, kind, rank) while
the condition lasts, and says once, at severity ``info``, when it recovers
(:mod:`probes.rules.base`).

Each rule is a module of its own, listed in :mod:`probes.rules.registry`
(ids as in DESIGN.md): ``nonfinite``, ``exploding``, ``vanishing``, ``dead``,
``stalled``, ``no-grad``, ``update-too-large``, ``starved``,
``rank-divergence``, ``straggler`` (the whole job's Step, ``rank`` -1). The
every-step tier's ``instability`` (:mod:`probes.rules.instability`) and the
loss rules (``loss-spike``, ``overflow``, a non-finite loss) are judged over
each step's Scalars by :mod:`probes.rules.scalar`; ``spectral`` over spectral
passes by :mod:`probes.rules.spectral`. Thresholds live in
:class:`~probes.rules.thresholds.RuleConfig`; per-layer overrides are glob
patterns over layer names (see :mod:`probes.rules.config` for the TOML file).
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from probes.protocol import stats
from probes.protocol.wire import Alert, Step
from probes.rules.base import FIRE, RECOVER, SampleRule, StepContext, StreamState, alert, recovered, track
from probes.rules.instability import Instability
from probes.rules.registry import REGISTRY
from probes.rules.run import RunFacts
from probes.rules.scalar import ScalarRules
from probes.rules.thresholds import RuleConfig


class RuleEngine(RunFacts):
    """Stateful evaluation of every rule, one :class:`Step` at a time; what it knows of the
    run (:class:`~probes.rules.run.RunFacts`) comes from the Hello, Notes and Scalars."""

    def __init__(self, config: RuleConfig | None = None) -> None:
        super().__init__()
        self.config = config or RuleConfig()
        self._configs: dict[str, RuleConfig] = {}
        #: each stream's state, by (layer, kind, rank); the loss rules read their history too
        self.streams: dict[tuple[str, str, int], StreamState] = {}
        # streams whose values are NaN/inf now, per (kind, rank): the nonfinite alert counts them
        self.affected: dict[tuple[str, int], set[str]] = {}
        self.rules = [rule(self) for rule in REGISTRY]
        self._plan = _plan(self.rules)
        #: the every-step tier's rule; loss-spike names the tensors it saw move first
        self.instability = Instability(self)
        self._scalar_rules = ScalarRules(self)

    def cfg(self, layer: str) -> RuleConfig:
        """The resolved thresholds of ``layer`` (cached)."""
        c = self._configs.get(layer)
        if c is None:
            c = self._configs[layer] = self.config.for_layer(layer) if self.config.overrides else self.config
        return c

    def evaluate_scalars(self, msg) -> list[Alert]:
        """Alerts from one step's :class:`~probes.protocol.wire.Scalars`: ``instability`` (the
        every-step tier), ``loss-spike``, a non-finite loss (``nonfinite`` on ``(loss)``) and
        ``overflow`` (skipped steps)."""
        self.scalars.update(msg.values)
        return self.instability.evaluate(msg) + self._scalar_rules.evaluate(msg)

    def evaluate(self, step: Step) -> list[Alert]:
        """Alerts that fire or recover at this step (none for an evaluation pass's step)."""
        if step.phase != "train":
            return []  # eval activations are another distribution: they must not move training baselines
        self.last_step[step.rank] = step
        if step.skipped:
            # a GradScaler found inf/NaN gradients and skipped the step: its job, judged by the
            # overflow rule (a healthy fp16 run skips a few while the scale settles); the
            # gradients of that step are no baseline and no alarm
            step = msgspec.structs.replace(step, samples=[s for s in step.samples if s.kind != "grad"])
        ctx = StepContext(step)
        out: list[Alert] = []
        for stage in self._plan:
            if isinstance(stage, _SamplePass):
                self._each_sample(ctx, stage, out)
            else:
                stage.evaluate(ctx, out)
        return out

    def _each_sample(self, ctx: StepContext, stage: "_SamplePass", out: list[Alert]) -> None:
        """One pass of sample rules over the step: each sample judged by its kind's rules in turn."""
        step = ctx.step
        for rule in stage.rules:
            rule.begin(ctx)
        by_kind, settles, streams, zero_init = stage.by_kind, stage.settles, self.streams, self.zero_init
        for s in step.samples:
            if s.kind == "weight" and s.layer not in zero_init and s.count:
                zero_init[s.layer] = s.sumsq == 0  # e.g. a LoRA B: its ratio starts at 1/n
            if stats.nonfinite(s):
                continue  # the nonfinite rule owns this sample; others would be collateral
            st = streams.setdefault((s.layer, s.kind, step.rank), StreamState())
            c = self.cfg(s.layer)
            bad = _NONE
            for rule, rid, applies in by_kind.get(s.kind, ()):
                if rid in c.disabled or (applies is not None and not applies(ctx, s)):
                    continue
                verdict = rule.judge(ctx, s, st, c)
                if verdict is None:
                    continue
                is_bad, k, finding = verdict
                if is_bad:
                    bad = bad | {rid}
                change = track(st, rid, is_bad, k, c.recover_k)
                if change == FIRE:
                    out.append(alert(step, s, rid, finding()))
                elif change == RECOVER:
                    out.append(recovered(step, s, rid))
            for rule in settles.get(s.kind, ()):
                rule.settle(ctx, s, st, c, bad)


_NONE: frozenset = frozenset()  # no rule found the sample bad (the usual case: no set built)


class _SamplePass(NamedTuple):
    """A run of consecutive sample rules of the registry, judged in one pass over the samples."""

    rules: list  # in registry order
    # sample kind -> (rule, its id, its applies() if it has one) for the rules that judge it, in
    # registry order: the per-sample loop runs ~100k times a demo run, so it looks nothing up twice
    by_kind: dict
    settles: dict  # sample kind -> those of them with a settle step (most have none: not called)


def _plan(rules: list) -> list:
    """The registry as stages: a step rule alone, or a run of consecutive sample rules as a
    :class:`_SamplePass`."""
    stages: list = []
    for rule in rules:
        if isinstance(rule, SampleRule):
            if not (stages and isinstance(stages[-1], _SamplePass)):
                stages.append(_SamplePass([], {}, {}))
            stages[-1].rules.append(rule)
            for kind in sorted(rule.kinds):
                applies = rule.applies if type(rule).applies is not SampleRule.applies else None
                stages[-1].by_kind.setdefault(kind, []).append((rule, rule.id, applies))
                if type(rule).settle is not SampleRule.settle:
                    stages[-1].settles.setdefault(kind, []).append(rule)
        else:
            stages.append(rule)
    return stages
