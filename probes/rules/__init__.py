"""Alert rules over the statistics stream: numpy only, never torch.

The public names: :class:`RuleEngine`, :class:`RuleConfig`, and :func:`load`
/ :func:`parse` for a rules TOML file.

Each per-step rule is a module of its own behind one interface
(:mod:`probes.rules.base`: a :class:`~probes.rules.base.SampleRule` says when a
sample is bad, how many in a row it takes and what the alert says; the shared
hysteresis fires and recovers). To add one: write ``probes/rules/<id>.py``
with its class, add the class to ``REGISTRY`` in :mod:`probes.rules.registry`
where it should run, its id to ``RULES`` and its thresholds to
:class:`RuleConfig` (:mod:`probes.rules.thresholds`), and its TOML table's
field prefix to ``PREFIX`` in :mod:`probes.rules.config`.
"""

from probes.rules.config import RulesConfigError, load, parse
from probes.rules.engine import RuleEngine
from probes.rules.thresholds import ALL_LAYERS, LOSS_LAYER, RULES, RuleConfig

__all__ = ["ALL_LAYERS", "LOSS_LAYER", "RULES", "RuleConfig", "RuleEngine", "RulesConfigError", "load", "parse"]
