"""What every per-step rule shares: the interface, stream state and hysteresis.

A rule says only when a sample is bad, how many bad samples in a row it needs
(``k``), and what its alert says; :func:`track` does the rest, the same for
every rule: fire once per (rule, layer, kind, rank) when ``k`` bad samples come
in a row, stay quiet while the condition lasts, and say once, at severity
``info``, when ``recover_k`` good samples have followed.

Two shapes of rule (:mod:`probes.rules.registry` lists them in the order they run):

- :class:`SampleRule` judges one sample of one stream (layer, kind, rank) and
  returns a :data:`Verdict`; the engine keeps the stream's state and tracks it.
- :class:`StepRule` judges a whole :class:`~probes.protocol.wire.Step` (several
  streams at once, or a stream that is not one sample's) and appends its alerts.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from probes.protocol.wire import Alert, Sample, Step

MAD_SIGMA = 1.4826  # MAD -> standard deviation of a normal distribution


class Where(NamedTuple):
    """What an alert is about when it is not one sample (rank-divergence, straggler)."""

    layer: str
    kind: str


@dataclass
class StreamState:
    """One stream's memory (one per layer, kind and rank): its recent healthy values and each
    rule's run of bad or good samples."""

    hist: dict = field(default_factory=dict)  # series name -> recent good values
    bad: dict = field(default_factory=dict)  # rule -> consecutive bad samples
    good: dict = field(default_factory=dict)  # rule -> consecutive good samples while active
    active: set = field(default_factory=set)
    seen_nonzero: bool = False  # a gradient stream that was ever non-zero (dead-from-start test)

    def series(self, name: str) -> deque:
        """The recent values of series ``name`` (created empty)."""
        return self.hist.setdefault(name, deque(maxlen=64))


# statistics.median, not np.median: these windows hold at most a few dozen finite floats, where
# numpy's per-call overhead (~17 us) made the rules cost the publisher ~10 ms per demo step

def median(values, window: int, need: int) -> float:
    """Median of the last ``window`` values, NaN with fewer than ``need``."""
    if len(values) < need:
        return math.nan
    return float(statistics.median(list(values)[-window:]))


def mad(values, window: int) -> float:
    """Median absolute deviation of the last ``window`` values (0 for none)."""
    v = list(values)[-window:]
    if not v:
        return 0.0
    m = statistics.median(v)
    return float(statistics.median([abs(x - m) for x in v]))


#: What :func:`track` says happened: the rule fired, or recovered.
FIRE, RECOVER = "fire", "recover"


def track(st: StreamState, rule: str, bad: bool, k: int, recover_k: int) -> str | None:
    """Hysteresis and de-duplication shared by every rule: :data:`FIRE` at the ``k``-th bad
    sample in a row (once while it lasts), :data:`RECOVER` at the ``recover_k``-th good one
    after that, else None."""
    if bad:
        st.good[rule] = 0
        st.bad[rule] = st.bad.get(rule, 0) + 1
        if rule not in st.active and st.bad[rule] >= k:
            st.active.add(rule)
            return FIRE
    else:
        st.bad[rule] = 0
        if rule in st.active:
            st.good[rule] = st.good.get(rule, 0) + 1
            if st.good[rule] >= recover_k:
                st.active.discard(rule)
                return RECOVER
    return None


class Finding(NamedTuple):
    """What a firing alert says."""

    severity: str
    value: float
    threshold: float
    message: str


#: A :class:`SampleRule`'s judgement of one sample: ``(bad, k, finding)``, where ``k`` is the bad
#: samples in a row it needs before it fires and ``finding()`` builds what the alert says, called
#: only when it fires (after the run of bad samples is counted, which a message may quote). A
#: plain tuple: it is made for every sample every rule judges, ~100k times in a demo run.
Verdict = tuple[bool, int, Callable[[], Finding]]


def alert(step: Step, where: Sample | Where, rule: str, finding: Finding, *, kind: str | None = None,
          rank: int | None = None) -> Alert:
    """The :class:`Alert` of ``finding`` about ``where`` at ``step``."""
    return Alert(step=step.step, rank=step.rank if rank is None else rank, severity=finding.severity, rule=rule,
                 layer=where.layer, kind=kind or where.kind, value=float(finding.value),
                 threshold=float(finding.threshold), message=finding.message)


def recovered(step: Step, where: Sample | Where, rule: str, *, kind: str | None = None,
              rank: int | None = None) -> Alert:
    """The ``info`` alert that says ``rule`` no longer holds on ``where``."""
    kind = kind or where.kind
    return alert(step, where, rule, Finding("info", 0.0, 0.0, f"{rule} on {where.layer} ({kind}) recovered"),
                 kind=kind, rank=rank)


def tracked(step: Step, where: Sample | Where, st: StreamState, rule: str, bad: bool, k: int, recover_k: int,
            finding: Callable[[], Finding], out: list[Alert], *, kind: str | None = None,
            rank: int | None = None) -> None:
    """:func:`track` one judgement and append the alert it calls for, if any (for step rules,
    which judge streams of their own; ``recover_k`` from the thresholds of ``where.layer``)."""
    change = track(st, rule, bad, k, recover_k)
    if change == FIRE:
        out.append(alert(step, where, rule, finding(), kind=kind, rank=rank))
    elif change == RECOVER:
        out.append(recovered(step, where, rule, kind=kind, rank=rank))


@dataclass
class StepContext:
    """What the rules know about the step being judged, beyond the step itself."""

    step: Step
    #: trainable parameters without a gradient at this step (no-grad's: the update rules leave them be)
    missing: set = field(default_factory=set)
    #: figures several rules read from the sample being judged, computed once (see exploding.norm)
    memo: tuple = ()


class SampleRule:
    """A rule judged on every sample of the kinds in :attr:`kinds` (not a non-finite one:
    that is ``nonfinite``'s), on the sample's own stream; one instance per engine.

    Subclasses set :attr:`id` and :attr:`kinds` and implement :meth:`judge`.
    """

    #: the rule id (one of :data:`probes.rules.thresholds.RULES`)
    id: str = ""
    #: the sample kinds it judges ("weight", "grad", "act", "update")
    kinds: frozenset = frozenset()

    def __init__(self, engine) -> None:
        self.engine = engine  # the run's facts (probes.rules.run.RunFacts) and resolved thresholds

    def begin(self, ctx: StepContext) -> None:
        """Called once per step before any of its samples (for whole-step references)."""

    def applies(self, ctx: StepContext, s: Sample) -> bool:
        """Whether to judge ``s`` at all, beyond its kind being one of :attr:`kinds` and the rule
        being on for its layer (both checked by the engine)."""
        return True

    def judge(self, ctx: StepContext, s: Sample, st: StreamState, c) -> Verdict | None:
        """The verdict on ``s`` under thresholds ``c``, or None when there is nothing to judge
        (the stream's run of bad samples is then left as it is)."""
        raise NotImplementedError

    def settle(self, ctx: StepContext, s: Sample, st: StreamState, c, bad: set[str]) -> None:
        """Called after the rules have judged ``s``, whether this rule is on or not, with the ids
        that found it bad: for a baseline several rules share, which must keep moving when one
        of them is switched off (``exploding``'s L2 history, which ``vanishing`` reads)."""


class UpdateRule(SampleRule):
    """A rule over update samples (a parameter's step ``dW`` and its ratio ``||dW||/||W||``)."""

    kinds = frozenset({"update"})

    def applies(self, ctx: StepContext, s: Sample) -> bool:
        return s.layer not in ctx.missing  # no-grad owns a parameter without a gradient


class StepRule:
    """A rule judged on a whole step at once; one instance per engine.

    Subclasses set :attr:`id` and implement :meth:`evaluate`, tracking their
    streams with :func:`tracked` (or a state machine of their own).
    """

    id: str = ""

    def __init__(self, engine) -> None:
        self.engine = engine

    def evaluate(self, ctx: StepContext, out: list[Alert]) -> None:
        """Append the alerts that fire or recover at ``ctx.step``."""
        raise NotImplementedError
