"""Alert rules over the statistics stream: one pure module, numpy only.

The probe runs them (so alerts fire with nobody attached); headless mode
and the viewer read the alerts the probe sends. A :class:`RuleEngine` keeps
a little history per stream, needs ``k`` consecutive bad samples before it
fires (hysteresis), fires once per (rule, layer, kind, rank) while the
condition lasts, and says once, at severity ``info``, when it recovers.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import stats
from .wire import Alert, Sample, Step


@dataclass(frozen=True)
class RuleConfig:
    """Thresholds, with the defaults documented in the README."""

    explode_factor: float = 10.0  # l2 above this many times its recent median...
    explode_k: int = 2  # ...for this many samples in a row (gradients of small tensors are spiky)
    explode_now: float = 100.0  # ...or this many times, at once
    explode_window: int = 16  # samples in that median
    explode_min_history: int = 4  # samples needed before the relative test applies
    explode_abs_cap: float = 1e4  # absmax of an activation or gradient above this
    dead_near_zero: float = 0.99  # near-zero fraction of an activation function's output
    dead_zeros: float = 0.99  # exact-zero fraction of any other module's output
    dead_units: float = 0.5  # fraction of units never above eps
    dead_k: int = 3
    stall_ratio: float = 1e-7  # update ratio below this counts as not moving
    stall_k: int = 3
    recover_k: int = 3


@dataclass
class _StreamState:
    history: deque = field(default_factory=lambda: deque(maxlen=64))
    bad: dict = field(default_factory=dict)  # rule -> consecutive bad samples
    good: dict = field(default_factory=dict)  # rule -> consecutive good samples while active
    active: set = field(default_factory=set)


class RuleEngine:
    """Stateful evaluation of every rule, one :class:`Step` at a time."""

    def __init__(self, config: RuleConfig | None = None) -> None:
        self.config = config or RuleConfig()
        self._streams: dict[tuple[str, str, int], _StreamState] = {}
        # kinds with an active nonfinite alert: later layers are collateral
        self._nonfinite_active: dict[tuple[str, int], str] = {}
        self._activations: set[str] = set()

    def set_layers(self, layers) -> None:
        """Tell the engine the model's layers (a Hello's ``layers``): the
        near-zero and dead-unit tests apply to activation functions only,
        since other modules' outputs are legitimately small at init."""
        self._activations = {li.name for li in layers if li.role == "activation"}

    def evaluate(self, step: Step) -> list[Alert]:
        """Alerts that fire or recover at this step."""
        out: list[Alert] = []
        out += self._nonfinite(step)
        for s in step.samples:
            if stats.nonfinite(s):
                continue  # the nonfinite rule owns this sample; others would be collateral
            st = self._streams.setdefault((s.layer, s.kind, step.rank), _StreamState())
            if s.kind in ("weight", "grad", "act"):
                self._exploding(step, s, st, out)
            if s.kind == "act":
                self._dead(step, s, st, out)
            if s.kind == "update":
                self._stalled(step, s, st, out)
        return out

    # -- helpers ---------------------------------------------------------

    def _alert(self, step: Step, s: Sample, severity, rule, value, threshold, message) -> Alert:
        return Alert(
            step=step.step,
            rank=step.rank,
            severity=severity,
            rule=rule,
            layer=s.layer,
            kind=s.kind,
            value=float(value),
            threshold=float(threshold),
            message=message,
        )

    def _track(self, step, s, st, rule, bad, k, fire, out) -> None:
        """Hysteresis and de-duplication shared by every per-stream rule."""
        if bad:
            st.good[rule] = 0
            st.bad[rule] = st.bad.get(rule, 0) + 1
            if rule not in st.active and st.bad[rule] >= k:
                st.active.add(rule)
                out.append(fire())
        else:
            st.bad[rule] = 0
            if rule in st.active:
                st.good[rule] = st.good.get(rule, 0) + 1
                if st.good[rule] >= self.config.recover_k:
                    st.active.discard(rule)
                    out.append(
                        self._alert(step, s, "info", rule, 0.0, 0.0, f"{rule} on {s.layer} ({s.kind}) recovered")
                    )

    # -- rules -----------------------------------------------------------

    def _nonfinite(self, step: Step) -> list[Alert]:
        """Name the first layer that went non-finite: forward order for
        activations and weights, backward order for gradients."""
        out = []
        for kind in ("act", "weight", "grad"):
            bad = [s for s in step.samples if s.kind == kind and stats.nonfinite(s) > 0]
            key = (kind, step.rank)
            if not bad:
                if key in self._nonfinite_active:
                    layer = self._nonfinite_active.pop(key)
                    out.append(
                        Alert(step.step, step.rank, "info", "nonfinite", layer, kind, 0.0, 0.0,
                              f"{kind} values are finite again")
                    )
                continue
            if key in self._nonfinite_active:
                continue
            first = bad[-1] if kind == "grad" else bad[0]
            n = stats.nonfinite(first)
            order = "backward" if kind == "grad" else "forward"
            self._nonfinite_active[key] = first.layer
            out.append(
                self._alert(
                    step, first, "critical", "nonfinite", n, 0,
                    f"{n} non-finite {kind} values (NaN {first.nan}, +inf {first.posinf}, -inf "
                    f"{first.neginf}) in {first.layer}, the first layer in {order} order to go "
                    f"non-finite: check its inputs, the learning rate and loss scaling",
                )
            )
        return out

    def _exploding(self, step, s, st, out) -> None:
        c = self.config
        value = stats.l2(s)
        if not math.isfinite(value):
            return  # the nonfinite rule owns this sample
        hist = [v for v in st.history]
        median = float(np.median(hist[-c.explode_window :])) if len(hist) >= c.explode_min_history else math.nan
        rel = median > 0 and value > c.explode_factor * median
        now = median > 0 and value > c.explode_now * median
        absmax = stats.absmax(s)
        cap = s.kind in ("act", "grad") and absmax > c.explode_abs_cap
        bad = bool(rel or cap)
        if not bad and "exploding" not in st.active:
            st.history.append(value)
        # a jump far out of range, or past the cap, needs no confirmation
        k = 1 if (now or cap) else c.explode_k

        def fire():
            if rel:
                return self._alert(
                    step, s, "critical", "exploding", value, c.explode_factor * median,
                    f"{s.kind} L2 norm {value:.3g} is {value / median:.0f}x its recent median "
                    f"{median:.3g}: lower the learning rate or clip gradients",
                )
            return self._alert(
                step, s, "critical", "exploding", absmax, c.explode_abs_cap,
                f"{s.kind} abs-max {absmax:.3g} above the cap {c.explode_abs_cap:g}: "
                "values are blowing up; lower the learning rate or clip gradients",
            )

        self._track(step, s, st, "exploding", bad, k, fire, out)

    def _dead(self, step, s, st, out) -> None:
        c = self.config
        if s.layer in self._activations:
            near = stats.fraction(s.near_zero, s)
            units = s.dead_units if s.dead_units is not None else 0.0
            bad = near >= c.dead_near_zero or units >= c.dead_units
        else:
            near = stats.fraction(s.zeros, s)
            units = 0.0
            bad = near >= c.dead_zeros

        def fire():
            if units >= c.dead_units:
                return self._alert(
                    step, s, "warning", "dead", units, c.dead_units,
                    f"{units:.0%} of units in {s.layer} never exceed |x| >= eps: dead units; "
                    "check the bias init, the learning rate and the activation function",
                )
            return self._alert(
                step, s, "warning", "dead", near, c.dead_near_zero,
                f"{near:.1%} of {s.layer}'s outputs are {'near ' if s.layer in self._activations else ''}"
                "zero: the layer is dead; "
                "check the bias init, the learning rate and the activation function",
            )

        self._track(step, s, st, "dead", bad, c.dead_k, fire, out)

    def _stalled(self, step, s, st, out) -> None:
        c = self.config
        if s.ratio is None or not math.isfinite(s.ratio):
            return
        bad = s.ratio < c.stall_ratio

        def fire():
            return self._alert(
                step, s, "warning", "stalled", s.ratio, c.stall_ratio,
                f"update ratio {s.ratio:.2g} < {c.stall_ratio:g} for {c.stall_k} samples: "
                "is the parameter in the optimizer, frozen, or at lr=0?",
            )

        self._track(step, s, st, "stalled", bad, c.stall_k, fire, out)
