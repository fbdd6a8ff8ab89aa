"""Alert rules over the statistics stream: numpy only, never torch.

The public names: :class:`RuleEngine`, :class:`RuleConfig`, and :func:`load`
/ :func:`parse` for a rules TOML file.
"""

from probes.rules.config import RulesConfigError, load, parse
from probes.rules.engine import ALL_LAYERS, LOSS_LAYER, RULES, RuleConfig, RuleEngine

__all__ = ["ALL_LAYERS", "LOSS_LAYER", "RULES", "RuleConfig", "RuleEngine", "RulesConfigError", "load", "parse"]
