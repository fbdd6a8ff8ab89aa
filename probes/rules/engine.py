"""Alert rules over the statistics stream: one pure module, numpy only.

The probe runs them (so alerts fire with nobody attached); headless mode
can run them again over a stream or a recording with other thresholds
(``--rules FILE``). A :class:`RuleEngine` keeps a little history per stream
(one stream per layer, kind and rank), needs ``k`` consecutive bad samples
before it fires (hysteresis), fires once per (rule, layer, kind, rank) while
the condition lasts, and says once, at severity ``info``, when it recovers.

Rules (ids as in DESIGN.md): ``nonfinite``, ``exploding``, ``vanishing``,
``dead``, ``stalled``, ``no-grad``, ``update-too-large``,
``rank-divergence``, ``straggler`` (the whole job's Step, ``rank`` -1). ``spectral`` is evaluated over spectral passes by
:mod:`probes.rules.spectral`, with its thresholds from the same
:class:`RuleConfig` (``spectral_*``). Thresholds live in :class:`RuleConfig`; per-layer overrides
are glob patterns over layer names (see :mod:`probes.rules.config` for the
TOML file).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec
import numpy as np

from probes.protocol import stats
from probes.protocol.wire import Alert, Sample, Step

#: Every rule id this module knows, in the order they are evaluated.
RULES = ("nonfinite", "exploding", "vanishing", "dead", "stalled", "no-grad", "update-too-large",
         "starved", "rank-divergence", "straggler", "overflow", "loss-spike", "spectral")

#: Layer name of alerts about the loss (loss-spike, a non-finite loss).
LOSS_LAYER = "(loss)"

#: Layer name of alerts about a whole rank rather than one layer (rank-divergence).
ALL_LAYERS = "(all)"

_MAD_SIGMA = 1.4826  # MAD -> standard deviation of a normal distribution


@dataclass(frozen=True)
class RuleConfig:
    """Thresholds, with the defaults documented in the README and docs/alerts.md.

    ``disabled`` switches rules off by id. ``overrides`` is a tuple of
    ``(glob pattern, {field: value})`` pairs applied in order to layers whose
    name matches (later ones win); :meth:`for_layer` resolves them.
    """

    explode_factor: float = 10.0  # l2 above this many times its recent median...
    explode_k: int = 2  # ...for this many samples in a row (gradients of small tensors are spiky)
    explode_now: float = 100.0  # ...or this many times, at once
    explode_mad: float = 20.0  # and above median + this many robust sigmas (1.4826 MAD): noisy streams need more
    explode_window: int = 16  # samples in that median
    explode_min_history: int = 4  # samples needed before the relative test applies
    explode_abs_cap: float = 1e4  # absmax of an activation or gradient above this
    vanish_zeros: float = 0.5  # exact-zero fraction of a gradient at least this...
    vanish_zeros_jump: float = 0.4  # ...and this much above its own recent median (underflow)
    vanish_factor: float = 1e-3  # or gradient l2 below this times its recent median
    vanish_k: int = 3
    dead_near_zero: float = 0.99  # near-zero fraction of an activation function's output
    dead_zeros: float = 0.99  # exact-zero fraction of any other module's output
    dead_units: float = 0.5  # fraction of units never above eps
    dead_k: int = 3
    stall_ratio: float = 1e-7  # update ratio below this counts as not moving
    stall_k: int = 3
    nograd_k: int = 3  # sampled steps in a row without a gradient
    update_max: float = 1.0  # update ratio ||dW||/||W|| above this in one step...
    update_factor: float = 30.0  # ...or this many times its own recent median
    update_k: int = 2
    # the absolute band (weight matrices: not biases, norms or zero-initialised tensors), from
    # step 0: above update_max at once, or above update_abs for update_abs_k samples in a row.
    # Healthy runs sit at 1e-3..3e-2 (docs/alerts.md, "The update-ratio band")
    update_abs: float = 0.1
    update_abs_k: int = 3
    starved_factor: float = 100.0  # update ratio this many times below the median of its kind...
    starved_k: int = 4  # ...for this many samples in a row
    starved_min_peers: int = 3  # tensors of that kind (itself included) needed for a median
    rank_factor: float = 2.0  # a rank's total grad norm this many times off the other ranks' median
    rank_k: int = 2
    # straggler (over the whole job's per-rank times, probes/job.py): a rank's step time this many
    # times the other ranks' median, and at least straggler_min_s seconds more, for straggler_k
    # sampled steps in a row
    straggler_factor: float = 1.5
    straggler_min_s: float = 0.02
    straggler_k: int = 3
    # loss-spike and overflow (evaluated by probes.rules.scalar over every step's Scalars):
    spike_sigmas: float = 6.0  # the loss above its rolling median + this many robust sigmas (1.4826 MAD)...
    spike_rel: float = 0.1  # ...and above the median by this fraction of it (a flat loss has a tiny MAD)
    spike_window: int = 64  # steps in that median
    spike_min_history: int = 16  # steps needed before a spike can be judged
    spike_diverge: float = 1.5  # the loss this many times where it started (its first 3 steps)...
    spike_diverge_k: int = 5  # ...for this many steps in a row: diverging (critical)
    overflow_window: int = 50  # steps over which skipped steps are counted
    overflow_share: float = 0.5  # skipped share of a full window that warns
    overflow_all_k: int = 20  # this many skipped steps in a row: critical
    overflow_min_scale: float = 1.0  # a skipped step at a GradScaler scale below this: critical (collapsed)
    # spectral (evaluated by probes.rules.spectral over each spectral pass, not per step):
    spectral_alpha_low: float = 2.0  # WeightWatcher's alpha below this: "over-trained"...
    spectral_alpha_high: float = 6.0  # ...above this: "under-trained"
    spectral_min_tail: int = 50  # a fit with fewer tail eigenvalues (>= xmin) is not trusted
    spectral_sigmas: float = 2.0  # nor one within this many standard errors of the band edge (0: off)
    # alpha < alpha_low warns only when the top eigenvalue holds at least 1/this of ||W||_F^2 (a
    # stable rank at most this): healthy small models sit at alpha 1.4-1.8 with stable ranks of 2.5-18
    spectral_max_stable_rank: float = 2.0
    recover_k: int = 3
    disabled: frozenset = frozenset()
    overrides: tuple = ()

    def __post_init__(self) -> None:
        unknown = set(self.disabled) - set(RULES)
        if unknown:
            raise ValueError(f"unknown rule id(s) {', '.join(sorted(unknown))}; known: {', '.join(RULES)}")
        object.__setattr__(self, "disabled", frozenset(self.disabled))

    def for_layer(self, layer: str) -> "RuleConfig":
        """The thresholds that apply to ``layer`` (overrides resolved)."""
        cfg = self
        for pattern, changes in self.overrides:
            if fnmatch.fnmatchcase(layer, pattern):
                changes = dict(changes)
                # "disabled" adds to the rules already off; "enabled" switches some back on
                off = cfg.disabled | frozenset(changes.pop("disabled", ()))
                changes["disabled"] = off - frozenset(changes.pop("enabled", ()))
                cfg = dataclasses.replace(cfg, **changes)
        return cfg if cfg is self else dataclasses.replace(cfg, overrides=())

    def on(self, rule: str) -> bool:
        """Whether ``rule`` is enabled."""
        return rule not in self.disabled


class _Where(NamedTuple):
    """What an alert is about when it is not one sample (rank-divergence)."""

    layer: str
    kind: str


@dataclass
class _StreamState:
    hist: dict = field(default_factory=dict)  # series name -> recent good values
    bad: dict = field(default_factory=dict)  # rule -> consecutive bad samples
    good: dict = field(default_factory=dict)  # rule -> consecutive good samples while active
    active: set = field(default_factory=set)
    seen_nonzero: bool = False  # a gradient stream that was ever non-zero (dead-from-start test)

    def series(self, name: str) -> deque:
        return self.hist.setdefault(name, deque(maxlen=64))


# statistics.median, not np.median: these windows hold at most a few dozen finite floats, where
# numpy's per-call overhead (~17 us) made the rules cost the publisher ~10 ms per demo step

def _median(values, window: int, need: int) -> float:
    """Median of the last ``window`` values, NaN with fewer than ``need``."""
    if len(values) < need:
        return math.nan
    return float(statistics.median(list(values)[-window:]))


def _mad(values, window: int) -> float:
    v = list(values)[-window:]
    if not v:
        return 0.0
    m = statistics.median(v)
    return float(statistics.median([abs(x - m) for x in v]))


class RuleEngine:
    """Stateful evaluation of every rule, one :class:`Step` at a time."""

    def __init__(self, config: RuleConfig | None = None) -> None:
        self.config = config or RuleConfig()
        self._streams: dict[tuple[str, str, int], _StreamState] = {}
        self._configs: dict[str, RuleConfig] = {}
        # kinds with an active nonfinite alert: later layers are collateral
        self._nonfinite_active: dict[tuple[str, int], str] = {}
        self._activations: set[str] = set()
        self._trainable: set[str] | None = None  # parameter names with requires_grad, once known
        #: parameter name -> (its LayerInfo, its short name), from the Hello
        self._params: dict[str, tuple] = {}
        self._modules: dict[str, object] = {}  # module name -> LayerInfo
        #: training precision as the probe knows it: Hello.precision ("fp32", "bf16", "fp16",
        #: "fp16+scaler"; "" unknown), replaced by a ``precision`` Note (e.g. "bf16-autocast")
        self.precision = ""
        self.param_groups: dict[str, int] = {}  # parameter name -> optimizer param group
        self._zero_init: dict[str, bool] = {}  # parameter -> its first sampled weight was all zero
        self._grad_growth = 1.0  # the whole model's gradient growth at the step being judged
        self._grad_peers = 0.0  # and the median L2 of its gradients at that step
        self.eps = 0.05  # the probe's near-zero threshold (its Hello says), which dead units are counted against
        # streams whose values are NaN/inf now, per (kind, rank): the nonfinite alert counts them
        self.affected: dict[tuple[str, int], set[str]] = {}
        #: the latest value of each run-level scalar (``loss``, ``lr``, ``lr/N``, ``scale``...), per
        #: :meth:`evaluate_scalars`; rules read the learning rate from here for their messages
        self.scalars: dict[str, float] = {}
        #: the latest training Step of each rank (loss-spike names the layers that moved in it)
        self.last_step: dict[int, Step] = {}
        self.hosts: list[str] = []  # every rank's host (Hello.hosts), for the straggler's message
        from probes.rules.scalar import ScalarRules  # a module of its own; it reads this engine's streams

        self._scalar_rules = ScalarRules(self)

    def set_layers(self, layers) -> None:
        """Tell the engine the model's layers (a Hello's ``layers``): the
        near-zero and dead-unit tests apply to activation functions only,
        since other modules' outputs are legitimately small at init; and
        ``no-grad`` watches only parameters that require a gradient."""
        layers = list(layers)
        self._activations = {li.name for li in layers if li.role == "activation"}
        self._modules = {li.name: li for li in layers}
        self._params = {(f"{li.name}.{p}" if li.name else p): (li, p) for li in layers for p in li.params}
        self._trainable = {f"{li.name}.{p}" if li.name else p
                           for li in layers for p in li.params
                           if p not in li.frozen and f"{p}.grad" not in li.skipped}  # e.g. sparse gradients

    def set_hello(self, hello) -> None:
        """Tell the engine about the run (a :class:`~probes.protocol.wire.Hello`): its layers
        (:meth:`set_layers`), precision, parameter groups and unoptimized parameters,
        which the hints and the learning rate in the messages read."""
        self.set_layers(hello.layers)
        self.precision = getattr(hello, "precision", "") or ""
        self.param_groups = dict(getattr(hello, "param_groups", {}) or {})
        self.eps = getattr(hello, "eps", self.eps)
        self.hosts = list(getattr(hello, "hosts", []) or [])

    def note(self, msg) -> None:
        """Take a run :class:`~probes.protocol.wire.Note`; a ``precision`` note (autocast seen in
        forward, e.g. ``{"precision": "bf16-autocast"}``) replaces the precision. Any other
        message is ignored, so the publisher can hand it everything it publishes."""
        if getattr(msg, "event", None) == "precision" and msg.data.get("precision"):
            self.precision = str(msg.data["precision"])

    def lr(self, param: str) -> tuple[float | None, int]:
        """(the learning rate of ``param``'s param group as last reported, or None; the group)."""
        group = self.param_groups.get(param, 0)
        return self.scalars.get("lr" if group == 0 else f"lr/{group}"), group

    def _lr_text(self, param: str) -> str:
        lr, group = self.lr(param)
        if lr is None:
            return ""
        return f"lr {lr:.3g}" + (f" (param group {group})" if self.param_groups else "")

    def _param_kind(self, param: str) -> str:
        """What a parameter is, for comparing like with like: "matrix", "bias", "norm",
        "embedding" (from the module's type when the Hello said it, else from the name)."""
        info = self._params.get(param)
        short = info[1] if info else param.rpartition(".")[2]
        mtype = (info[0].type if info else "").lower()
        if short == "bias" or short.endswith("_bias"):
            return "bias"
        if "norm" in mtype:
            return "norm"
        if "embedding" in mtype:
            return "embedding"
        return "matrix"

    def _lora(self, param: str):
        """(A or B, the other matrix's state: "frozen" / "unoptimized" / "") of a LoRA
        parameter, or None for any other parameter."""
        info = self._params.get(param)
        if info is None or info[0].role != "lora":
            return None
        name = info[0].name
        which = "A" if "lora_A" in name else ("B" if "lora_B" in name else "")
        if not which:
            return None
        other = self._modules.get(name.replace("lora_A", "lora_B") if which == "A" else name.replace("lora_B", "lora_A"))
        state = ""
        if other is not None:
            if info[1] in other.frozen:
                state = "frozen"
            elif info[1] in other.unoptimized:
                state = "unoptimized"
        return which, state

    def _unoptimized(self, param: str) -> bool:
        info = self._params.get(param)
        return info is not None and info[1] in info[0].unoptimized

    def evaluate_scalars(self, msg) -> list[Alert]:
        """Alerts from one step's :class:`~probes.protocol.wire.Scalars`: ``loss-spike``, a
        non-finite loss (``nonfinite`` on ``(loss)``) and ``overflow`` (skipped steps)."""
        self.scalars.update(msg.values)
        return self._scalar_rules.evaluate(msg)

    def cfg(self, layer: str) -> RuleConfig:
        """The resolved thresholds of ``layer`` (cached)."""
        c = self._configs.get(layer)
        if c is None:
            c = self._configs[layer] = self.config.for_layer(layer) if self.config.overrides else self.config
        return c

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
        out: list[Alert] = []
        out += self._nonfinite(step)
        grads = {s.layer for s in step.samples if s.kind == "grad"}
        missing = self._no_grad(step, grads, out)
        medians = self._kind_medians(step, missing)
        self._grad_growth, self._grad_peers = self._model_grad_growth(step)
        for s in step.samples:
            if s.kind == "weight" and s.layer not in self._zero_init and s.count:
                self._zero_init[s.layer] = s.sumsq == 0  # e.g. a LoRA B: its ratio starts at 1/n
            if stats.nonfinite(s):
                continue  # the nonfinite rule owns this sample; others would be collateral
            st = self._streams.setdefault((s.layer, s.kind, step.rank), _StreamState())
            c = self.cfg(s.layer)
            if s.kind in ("weight", "grad", "act"):
                self._norms(step, s, st, c, out)
            if s.kind == "act" and c.on("dead"):
                self._dead(step, s, st, c, out)
            if s.kind == "grad" and c.on("dead"):
                self._dead_grad(step, s, st, c, out)
            if s.kind == "update" and s.layer not in missing:  # no-grad owns a parameter without gradient
                if c.on("stalled"):
                    self._stalled(step, s, st, c, out)
                if c.on("update-too-large"):
                    self._update_too_large(step, s, st, c, out)
                if c.on("starved"):
                    self._starved(step, s, st, c, medians, out)
        self._rank_divergence(step, out)
        self._straggler(step, out)
        return out

    # -- helpers ---------------------------------------------------------

    def _alert(self, step: Step, s: Sample, severity, rule, value, threshold, message, kind=None,
               layer=None, rank=None) -> Alert:
        return Alert(
            step=step.step,
            rank=step.rank if rank is None else rank,
            severity=severity,
            rule=rule,
            layer=s.layer if layer is None else layer,
            kind=kind or s.kind,
            value=float(value),
            threshold=float(threshold),
            message=message,
        )

    def _track(self, step, s, st, rule, bad, k, fire, out, kind=None, layer=None, rank=None) -> None:
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
                if st.good[rule] >= self.cfg(s.layer if layer is None else layer).recover_k:
                    st.active.discard(rule)
                    kind = kind or s.kind
                    layer = s.layer if layer is None else layer
                    out.append(self._alert(step, s, "info", rule, 0.0, 0.0,
                                           f"{rule} on {layer} ({kind}) recovered", kind, layer, rank))

    # -- rules -----------------------------------------------------------

    def _nonfinite(self, step: Step) -> list[Alert]:
        """Name the first layer that went non-finite: forward order for
        activations and weights, backward order for gradients."""
        out = []
        for kind in ("act", "weight", "grad"):
            bad = [s for s in step.samples if s.kind == kind and stats.nonfinite(s) > 0
                   and self.cfg(s.layer).on("nonfinite")]
            key = (kind, step.rank)
            if bad:
                self.affected[key] = {s.layer for s in bad}
            else:
                self.affected.pop(key, None)
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
            others = len(bad) - 1
            also = f"; {others} other {kind} stream{'s' if others != 1 else ''} hold NaN/inf too" if others else ""
            also += self._where_in_job(step)
            out.append(
                self._alert(
                    step, first, "critical", "nonfinite", n, 0,
                    f"{n} non-finite {kind} values (NaN {first.nan}, +inf {first.posinf}, -inf "
                    f"{first.neginf}) in {first.layer}, the first layer in {order} order to go "
                    f"non-finite{also}: {self._nonfinite_hint(kind)}",
                )
            )
        return out

    def _where_in_job(self, step: Step) -> str:
        """On the whole job's step: which ranks (and hosts) hold the NaN/inf, from the per-rank vector."""
        ranks = step.ranks
        if step.rank != -1 or ranks is None:
            return ""
        bad = [r for r, n in enumerate(ranks.nonfinite) if n > 0]
        if not bad:
            return ""
        named = ", ".join(f"{r} ({self.hosts[r]})" if r < len(self.hosts) else str(r) for r in bad[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        return f"; on rank{'s' if len(bad) > 1 else ''} {named}{more}"

    def _nonfinite_hint(self, kind: str) -> str:
        p = self._precision_kind()
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
            return (f"the run is {self.precision}, so this is not a low-precision overflow: check the learning "
                    "rate, this layer's inputs, a log/sqrt/division of a non-positive value")
        return "check its inputs, the learning rate and loss scaling"

    def _norms(self, step, s, st, c, out) -> None:
        """``exploding`` (weights, gradients, activations) and ``vanishing``
        (gradients) against the stream's own recent history."""
        value = stats.l2(s)
        if not math.isfinite(value):
            return  # the nonfinite rule owns this sample
        hist = st.series("l2")
        median = _median(hist, c.explode_window, c.explode_min_history)
        explode = vanish = False
        if c.on("exploding"):
            explode = self._exploding(step, s, st, c, value, median, hist, out)
        if s.kind == "grad" and c.on("vanishing"):
            vanish = self._vanishing(step, s, st, c, value, median, out)
        # a stream's history is its healthy past: bad values do not move the baseline
        if not (explode or vanish or st.active & {"exploding", "vanishing"}):
            hist.append(value)

    def _model_grad_growth(self, step: Step) -> tuple[float, float]:
        """How much the model's gradients grew at this step, and their median L2 norm.

        The growth is the median over gradient streams of L2 / its own recent
        median (at least 1). When a model leaves its starting plateau every
        gradient grows together, the small ones (LayerNorm's, biases') by
        20-80x; one layer that explodes alone leaves this median near 1, and
        its norm goes far above the median of the others'.
        """
        c = self.config
        growths, norms = [], []
        for s in step.samples:
            if s.kind != "grad" or stats.nonfinite(s):
                continue
            value = stats.l2(s)
            norms.append(value)
            st = self._streams.get((s.layer, "grad", step.rank))
            median = _median(st.hist.get("l2", ()), c.explode_window, c.explode_min_history) if st else math.nan
            if median > 0:
                growths.append(value / median)
        growth = max(1.0, statistics.median(growths)) if len(growths) >= 3 else 1.0
        return growth, statistics.median(norms) if len(norms) >= 3 else 0.0

    def _exploding(self, step, s, st, c, value, median, hist, out) -> bool:
        # a gradient is judged against its own history times the whole model's growth at this step
        together = self._grad_growth if s.kind == "grad" else 1.0
        threshold = c.explode_factor * median * together
        if median > 0:
            threshold = max(threshold, median + c.explode_mad * _MAD_SIGMA * _mad(hist, c.explode_window))
        # ...and a gradient still below the median layer's is no explosion, however fast it grew
        # from a tiny start (a LayerNorm's, 1e-4 at init, reaching 1e-2 as training begins)
        significant = s.kind != "grad" or value > self._grad_peers
        rel = median > 0 and value > threshold and significant
        now = rel and value > max(threshold, c.explode_now * median * together)
        absmax = stats.absmax(s)
        cap = s.kind in ("act", "grad") and absmax > c.explode_abs_cap
        bad = bool(rel or cap)
        # a jump far out of range, or past the cap, needs no confirmation
        k = 1 if (now or cap) else c.explode_k

        def fire():
            if rel:
                # 10x its own history is a precursor worth a look (early training can grow that
                # much when a plateau breaks); 100x at once is an explosion
                model = f" (the model's gradients grew {together:.1f}x)" if together > 1 else ""
                return self._alert(
                    step, s, "critical" if now else "warning", "exploding", value, threshold,
                    f"{s.kind} L2 norm {value:.3g} is {value / median:.0f}x its recent median "
                    f"{median:.3g}{model}: lower the learning rate or clip gradients",
                )
            return self._alert(
                step, s, "critical", "exploding", absmax, c.explode_abs_cap,
                f"{s.kind} abs-max {absmax:.3g} above the cap {c.explode_abs_cap:g}: "
                "values are blowing up; lower the learning rate or clip gradients",
            )

        self._track(step, s, st, "exploding", bad, k, fire, out)
        return bad

    def _vanishing(self, step, s, st, c, value, median, out) -> bool:
        zeros = stats.fraction(s.zeros, s)
        zhist = st.series("zeros")
        zmed = _median(zhist, c.explode_window, c.explode_min_history)
        underflow = zmed == zmed and zeros >= c.vanish_zeros and zeros - zmed >= c.vanish_zeros_jump
        shrunk = median > 0 and value < c.vanish_factor * median
        bad = bool(underflow or shrunk)
        if not (bad or "vanishing" in st.active):
            zhist.append(zeros)

        def fire():
            if underflow:
                return self._alert(
                    step, s, "warning", "vanishing", zeros, c.vanish_zeros,
                    f"{zeros:.0%} of {s.layer}'s gradient is exactly zero (it was {zmed:.0%}): gradients "
                    f"underflow; {self._underflow_hint()}",
                )
            p = self._precision_kind()
            hint = ("check loss scaling (fp16 needs a GradScaler), saturated activations, depth" if p == "fp16"
                    else "check saturated activations, depth, a loss scaled down" if p in ("fp32", "bf16")
                    else "check loss scaling, saturated activations, depth")
            return self._alert(
                step, s, "warning", "vanishing", value, c.vanish_factor * median,
                f"gradient L2 norm {value:.3g} fell below {c.vanish_factor:g}x its recent median "
                f"{median:.3g}: gradients vanish; {hint}",
            )

        self._track(step, s, st, "vanishing", bad, c.vanish_k, fire, out)
        return bad

    def _dead(self, step, s, st, c, out) -> None:
        if s.layer in self._activations:
            near = stats.fraction(s.near_zero, s)
            # a unit is "dead" when it never exceeds eps; in a layer whose typical value (RMS) is
            # itself below eps that says nothing (a healthy MLP's last ReLU, RMS 0.044, read 61-69%
            # "dead" at eps 0.05). A truly dead layer is all near zero and fires on ``near``.
            live_scale = stats.rms(s) >= self.eps if s.count else False
            units = s.dead_units if s.dead_units is not None and live_scale else 0.0
            # and dead units stay dead: a share that keeps falling is units waking up as the
            # layer's scale grows (that MLP: 69% -> 36% over its first 60 steps), not dying
            prev = st.series("dead_units")
            waking = bool(prev) and units < prev[-1] - 0.02
            prev.append(units)
            bad = near >= c.dead_near_zero or (units >= c.dead_units and not waking)
        else:
            near = stats.fraction(s.zeros, s)
            units = 0.0
            bad = near >= c.dead_zeros

        def fire():
            lora = self._lora(f"{s.layer}.weight")
            if lora and lora[0] == "B":
                why = {"frozen": "its weight is frozen", "unoptimized": "its weight is in no optimizer param group"}
                state = ("frozen" if "weight" in self._modules[s.layer].frozen else
                         "unoptimized" if "weight" in self._modules[s.layer].unoptimized else "")
                return self._alert(
                    step, s, "warning", "dead", near, c.dead_zeros,
                    f"{near:.1%} of {s.layer}'s outputs are zero: a LoRA B starts at zero and "
                    + (f"{why[state]}, so the adapter can never change the model; train it" if state else
                       "has not moved since: is its lr 0, or its gradient zero (is lora_A's input all zero)?"),
                )
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

    def _dead_grad(self, step, s, st, c, out) -> None:
        """A gradient exactly zero in every sampled step since the first: nothing ever flowed
        back (``vanishing`` watches gradients that fall, which needs a non-zero past)."""
        zero = s.count > 0 and s.sumsq == 0 and s.abssum == 0
        if not zero:
            st.seen_nonzero = True
        elif st.seen_nonzero and "dead" not in st.active:
            return  # zero after being non-zero: vanishing's
        bad = zero

        def fire():
            lora = self._lora(s.layer)
            if lora and lora[0] == "A":
                hint = ({"frozen": "its B is frozen", "unoptimized": "its B is in no optimizer param group"}[lora[1]]
                        + ", so B stays zero and A gets no gradient: the adapter never learns; train B too"
                        if lora[1] else "B is zero at init and has not moved: is B's lr 0?")
            else:
                hint = ("no gradient ever flows back: the units after it are all inactive (a ReLU layer dead "
                        "from init, e.g. a large negative bias), its output is multiplied by zero, or the loss "
                        "does not use it (DDP fills an unused parameter's gradient with zeros)")
            return self._alert(
                step, s, "warning", "dead", 1.0, c.dead_zeros,
                f"{s.layer}'s gradient is exactly zero in all {st.bad.get('dead', 0)} sampled steps since "
                f"the start: {hint}",
            )

        self._track(step, s, st, "dead", bad, c.dead_k, fire, out)

    def _stalled(self, step, s, st, c, out) -> None:
        if s.ratio is None:
            if not (s.count and s.sumsq == 0):
                return  # a zero weight (a LoRA B at init) that moved: no ratio to judge
            ratio = 0.0  # a zero weight that did not move at all
        elif not math.isfinite(s.ratio):
            return
        else:
            ratio = s.ratio
        bad = ratio < c.stall_ratio

        def fire():
            return self._alert(
                step, s, "warning", "stalled", ratio, c.stall_ratio,
                f"update ratio {ratio:.2g} < {c.stall_ratio:g} for {c.stall_k} samples: " + self._stall_hint(s.layer),
            )

        self._track(step, s, st, "stalled", bad, c.stall_k, fire, out)

    def _update_too_large(self, step, s, st, c, out) -> None:
        """Against the tensor's own history, and (weight matrices) against an absolute band
        from step 0: a learning rate too high from the start has no healthy history."""
        if s.ratio is None or not math.isfinite(s.ratio):
            return
        ratio = s.ratio
        hist = st.series("ratio")
        median = _median(hist, c.explode_window, c.explode_min_history)
        threshold = c.update_max
        if median > 0:
            threshold = min(threshold, c.update_factor * median)
        rel = ratio > threshold
        # weight matrices only: biases, norms and embeddings (rows a batch does not touch) move at
        # their own pace, and a zero-initialised tensor's ratio is ~1/n while it grows
        banded = self._param_kind(s.layer) == "matrix" and not self._zero_init.get(s.layer, False)
        now = banded and ratio > c.update_max
        over = banded and ratio > c.update_abs
        bad = rel or over
        if not (bad or "update-too-large" in st.active):
            hist.append(ratio)
        k = 1 if now else (c.update_k if rel else c.update_abs_k)
        lr = self._lr_text(s.layer)
        # a step's lr arrives in its Scalars, after its Step: at the first sampled step it is not
        # known yet, but the update's own size is (under Adam each element moves by about the lr)
        moved = math.sqrt(s.sumsq / s.count) if s.count and s.sumsq >= 0 else math.nan
        lr = (f"; {lr}" if lr else "") + (f"; elements moved by {moved:.2g} (rms) this step" if moved == moved else "")

        def fire():
            if now:
                return self._alert(
                    step, s, "warning", "update-too-large", ratio, c.update_max,
                    f"update ratio ||dW||/||W|| {ratio:.2g}: one step moved {s.layer} by more than its own "
                    f"norm (healthy runs: 1e-3 to 3e-2){lr}: the learning rate is far too high (Adam moves "
                    "every element by about lr per step, a ratio of about lr / rms(W))",
                )
            if rel:
                return self._alert(
                    step, s, "warning", "update-too-large", ratio, threshold,
                    f"update ratio {ratio:.1e} >> {threshold:.1e}, {ratio / median:.0f}x its own recent "
                    f"median (healthy runs sit at 1e-3 to 3e-2){lr}: learning rate too high, or warm-up missing?"
                    if median > 0 else
                    f"update ratio {ratio:.1e} >> {threshold:.1e} (healthy runs sit at 1e-3 to 3e-2){lr}: "
                    "learning rate too high, or warm-up missing?",
                )
            return self._alert(
                step, s, "warning", "update-too-large", ratio, c.update_abs,
                f"update ratio {ratio:.2g} > {c.update_abs:g} for {c.update_abs_k} samples in a row, far above "
                f"healthy training's 1e-3 to 3e-2{lr}: learning rate too high, or warm-up missing?",
            )

        self._track(step, s, st, "update-too-large", bad, k, fire, out)

    def _kind_medians(self, step, missing) -> dict:
        """Kind of parameter -> (median update ratio at this step, tensors in it)."""
        by: dict[str, list] = {}
        for s in step.samples:
            if (s.kind == "update" and s.ratio is not None and math.isfinite(s.ratio) and s.ratio > 0
                    and s.layer not in missing):
                by.setdefault(self._param_kind(s.layer), []).append(s.ratio)
        return {k: (float(statistics.median(v)), len(v)) for k, v in by.items()}

    def _starved(self, step, s, st, c, medians, out) -> None:
        """A tensor that learns far slower than the rest of its kind (a head at a fine-tuning lr)."""
        if s.ratio is None or not math.isfinite(s.ratio) or s.ratio < c.stall_ratio:
            return  # no ratio, or not moving at all: stalled's
        kind = self._param_kind(s.layer)
        if kind != "matrix":
            return  # biases and norm weights spread over 100x in healthy SGD runs; embeddings are sparse
        median, n = medians.get(kind, (math.nan, 0))
        if n < c.starved_min_peers or not median > 0:
            return  # nothing to compare with
        ratio = s.ratio
        bad = ratio * c.starved_factor < median

        def fire():
            lr, group = self.lr(s.layer)
            if lr is not None:
                base = self.scalars.get("lr")
                where = (f"; its param group {group}'s lr is {lr:.3g}"
                         + (f" (group 0: {base:.3g})" if group != 0 and base is not None else ""))
            else:
                where = ""
            return self._alert(
                step, s, "warning", "starved", ratio, median / c.starved_factor,
                f"{s.layer} learns {median / ratio:.0f}x slower than the model's other {kind} tensors: update "
                f"ratio {ratio:.2g} against their median {median:.2g} for {c.starved_k} samples{where}: "
                "a param group's lr far below the rest (a new head left at the body's fine-tuning rate?), "
                "or a gradient scaled down",
            )

        self._track(step, s, st, "starved", bad, c.starved_k, fire, out)

    def _stall_hint(self, param: str) -> str:
        lora = self._lora(param)
        lr, group = self.lr(param)
        if self._unoptimized(param):
            hint = f"{param} requires a gradient but is in none of the optimizer's param groups: add it"
            if lora:
                hint += " (a LoRA adapter: build the optimizer after wrapping the model, e.g. peft's get_peft_model)"
            return hint
        if lora and lora[0] == "A" and lora[1]:
            return (f"this LoRA A's B is {'frozen' if lora[1] == 'frozen' else 'in no optimizer param group'}: "
                    "B stays zero, so A gets no gradient and the adapter never learns; train B too")
        if lr == 0:
            return f"its param group {group}'s learning rate is 0 (a schedule at its end, or warm-up from 0?)"
        if self.param_groups:  # the probe knows the optimizer's groups: it is in one
            return (f"it is in param group {group}" + (f" at lr {lr:.3g}" if lr is not None else "")
                    + ": is its gradient zero, or does the optimizer skip it (weight decay only, a scheduler at 0)?")
        return "is the parameter in the optimizer (a LoRA adapter's too), frozen, or at lr=0?"

    def _precision_kind(self) -> str:
        p = self.precision.lower()
        if "fp16" in p or "float16" in p and "bfloat16" not in p:
            return "fp16+scaler" if "scaler" in p else "fp16"
        if "bf16" in p or "bfloat16" in p:
            return "bf16"
        if "fp32" in p or "float32" in p:
            return "fp32"
        return ""

    def _underflow_hint(self) -> str:
        p = self._precision_kind()
        if p == "fp16":
            return "fp16 without a GradScaler: small gradients flush to zero; use torch.amp.GradScaler (or bf16)"
        if p == "fp16+scaler":
            scale = self.scalars.get("scale")
            return ("a GradScaler is in use" + (f" (scale {scale:.3g})" if scale is not None else "")
                    + ": a scale that kept falling after repeated overflows lets gradients underflow; "
                    "else check for a saturated activation")
        if p in ("fp32", "bf16"):
            return (f"the run is {self.precision}, whose exponent range does not underflow here: check for a "
                    "saturated activation (sigmoid, tanh), a dead ReLU region or masking")
        return "under fp16 use a GradScaler (or bf16), or check for a saturated activation"

    def _no_grad(self, step, grads: set[str], out) -> set[str]:
        """Trainable parameters without a gradient at a step where others
        have one (a detached branch, an unused module); returns them."""
        if self._trainable is None or not grads:
            return set()  # without the model's layers, frozen parameters are not known
        missing = set()
        for s in step.samples:
            if s.kind != "weight" or s.layer not in self._trainable:
                continue
            c = self.cfg(s.layer)
            if not c.on("no-grad"):
                continue
            st = self._streams.setdefault((s.layer, "grad", step.rank), _StreamState())
            bad = s.layer not in grads
            if bad:
                missing.add(s.layer)
            n = st.bad.get("no-grad", 0) + 1

            def fire(n=n, s=s, c=c):
                return self._alert(
                    step, s, "warning", "no-grad", n, c.nograd_k,
                    f"{s.layer} requires a gradient but got none in {n} sampled steps: is it on a "
                    "detached branch (.detach(), torch.no_grad()), or unused in forward?", kind="grad",
                )

            self._track(step, s, st, "no-grad", bad, c.nograd_k, fire, out, kind="grad")
        return missing

    def _rank_divergence(self, step: Step, out) -> None:
        """One rank's total gradient norm far from the other ranks'.

        Every rank ships the same all-gathered list, so only rank 0's step is
        judged (one alert, not one per rank); the alert names the outlying
        rank. With two ranks both are "far from the other": the one further
        from its own history is blamed (ties: the larger norm).
        """
        norms = step.rank_grad_norms
        c = self.cfg(ALL_LAYERS)
        if not norms or len(norms) < 2 or step.rank != 0 or not c.on("rank-divergence"):
            return
        v = np.asarray(norms, dtype=float)
        off = np.zeros(len(v))
        for r in range(len(v)):
            others = np.delete(v, r)
            others = others[np.isfinite(others)]
            if not len(others):
                continue
            ref = float(np.median(others))
            if not math.isfinite(v[r]):
                off[r] = math.inf
            elif ref > 0 and v[r] > 0:
                off[r] = abs(math.log(v[r] / ref))
            elif v[r] != ref:
                off[r] = math.inf
        limit = math.log(c.rank_factor)
        suspects = [r for r in range(len(v)) if off[r] > limit]
        blamed = None
        if suspects:
            def own(r):
                st = self._streams.get((ALL_LAYERS, "grad", r))
                med = _median(st.series("l2"), c.explode_window, 1) if st else math.nan
                if not (math.isfinite(v[r]) and med > 0 and v[r] > 0):
                    return (math.inf, 0.0) if not math.isfinite(v[r]) else (0.0, v[r])
                return (abs(math.log(v[r] / med)), v[r])
            blamed = max(suspects, key=lambda r: (off[r], own(r)))
        for r in range(len(v)):
            st = self._streams.setdefault((ALL_LAYERS, "grad", r), _StreamState())
            bad = r == blamed
            if not bad and "rank-divergence" not in st.active and math.isfinite(v[r]):
                st.series("l2").append(float(v[r]))
            others = np.delete(v, r)
            ref = float(np.median(others[np.isfinite(others)])) if np.isfinite(others).any() else math.nan
            probe = _Where(ALL_LAYERS, "grad")

            def fire(r=r, ref=ref):
                return self._alert(
                    step, probe, "critical", "rank-divergence", v[r], c.rank_factor * ref, rank=r,
                    message=f"rank {r}'s total gradient norm {v[r]:.3g} is far from the other ranks' "
                            f"{ref:.3g}: a corrupted gradient, a rank out of sync, or faulty hardware on it",
                )

            self._track(step, probe, st, "rank-divergence", bad, c.rank_k, fire, out, rank=r)

    def _straggler(self, step: Step, out) -> None:
        """One rank's step time well above the other ranks' median (the whole job's Step only).

        The data + forward time is judged when every rank has one: in a job whose backward
        all-reduces gradients (DDP, FSDP) the fast ranks wait there for the slow one, so
        whole-step times even out while data + forward times still tell them apart; else
        the wall time per step. The alert names the rank and its host.
        """
        ranks = step.ranks
        c = self.cfg(ALL_LAYERS)
        if ranks is None or step.rank != -1 or not c.on("straggler"):
            return
        fwd = np.asarray(ranks.fwd_time, dtype=float)
        use_fwd = len(fwd) >= 2 and bool(np.isfinite(fwd).all())
        v = fwd if use_fwd else np.asarray(ranks.step_time, dtype=float)
        if len(v) < 2:
            return
        what = "data + forward time" if use_fwd else "time per step"
        for r in range(len(v)):
            others = np.delete(v, r)
            others = others[np.isfinite(others)]
            ref = float(np.median(others)) if len(others) else math.nan
            bad = bool(math.isfinite(v[r]) and math.isfinite(ref)
                       and v[r] > c.straggler_factor * ref and v[r] - ref >= c.straggler_min_s)
            st = self._streams.setdefault((ALL_LAYERS, "straggler", r), _StreamState())
            probe = _Where(ALL_LAYERS, "scalar")
            host = self.hosts[r] if r < len(self.hosts) else "?"

            def fire(r=r, ref=ref, host=host):
                return self._alert(
                    step, probe, "warning", "straggler", v[r], c.straggler_factor * ref, rank=r,
                    message=f"rank {r} on {host} is a straggler: its {what} {v[r]:.3g} s is "
                            f"{v[r] / ref:.1f}x the other ranks' median {ref:.3g} s; the job runs at its pace "
                            "(a slow or throttled GPU, data loading or another process on that host)",
                )

            self._track(step, probe, st, "straggler", bad, c.straggler_k, fire, out, rank=r)
