"""The per-step rules, in the order they run at each step (and so the order of their alerts).

A :class:`~probes.rules.base.StepRule` runs on the whole step where it stands;
each run of consecutive :class:`~probes.rules.base.SampleRule` s runs as one pass
over the step's samples, every rule in turn on each sample. ``nonfinite``
comes first (every later rule leaves a non-finite sample to it) and ``no-grad``
before the update rules (which leave a parameter without a gradient to it).
"""

from __future__ import annotations

from probes.rules.adapter_drift import AdapterDrift
from probes.rules.dead import DeadActivations, DeadGradients
from probes.rules.exploding import Exploding
from probes.rules.frozen import Frozen
from probes.rules.lagging import Lagging
from probes.rules.no_grad import NoGrad
from probes.rules.nonfinite import Nonfinite
from probes.rules.rank_divergence import RankDivergence
from probes.rules.stalled import Stalled
from probes.rules.starved import Starved
from probes.rules.straggler import Straggler
from probes.rules.update_too_large import UpdateTooLarge
from probes.rules.weight_spread import WeightSpread
from probes.rules.vanishing import Vanishing

REGISTRY = (
    Frozen,
    Nonfinite,
    NoGrad,
    Exploding,
    Vanishing,
    DeadActivations,
    DeadGradients,
    WeightSpread,
    AdapterDrift,
    Stalled,
    UpdateTooLarge,
    Starved,
    Lagging,
    RankDivergence,
    Straggler,
)
