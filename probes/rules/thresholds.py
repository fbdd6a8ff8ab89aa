"""The rule ids and their thresholds (:class:`RuleConfig`), with per-layer overrides.

Every rule reads its thresholds from here; :mod:`probes.rules.config` fills a
:class:`RuleConfig` from a rules TOML file (one table per rule id, its fields
without their prefix).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

#: Every rule id. The per-step rules run in the order of probes.rules.registry.REGISTRY; the loss
#: rules over each step's Scalars in probes.rules.scalar; spectral per spectral pass.
RULES = ("nonfinite", "exploding", "vanishing", "dead", "stalled", "no-grad", "update-too-large",
         "starved", "rank-divergence", "straggler", "overflow", "loss-spike", "instability", "spectral",
         "frozen", "lagging", "loss-collapse", "adapter-drift", "weight-spread")

#: Layer name of alerts about the loss (loss-spike, a non-finite loss).
LOSS_LAYER = "(loss)"

#: Layer name of alerts about a whole rank rather than one layer (rank-divergence).
ALL_LAYERS = "(all)"


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
    # with gradient clipping on, a gradient fires only holding at least this share of the step's
    # (clipped) gradient norm: healthy plateau breaks grew 80x at 1% of it
    explode_clip_share: float = 0.3
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
    stall_lr: float = 1e-6  # a stalled parameter's group lr at most this: the message says the lr is too low
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
    # lagging: a weight matrix's update ratio this many times below the median of the model's
    # weight matrices (up to starved_factor) for lagging_k samples; healthy runs spread at most 5x
    lagging_factor: float = 10.0
    lagging_k: int = 4
    # frozen (at a rank's first step): a model without LoRA adapters whose elements requiring a
    # gradient are below this share (the healthy corpus trains 100%; a base frozen by mistake 0.1%)
    frozen_share: float = 0.2
    # adapter-drift: a LoRA adapter's shift ||B A scale||/||W|| at least drift_shift and growing by
    # drift_rate per step, for drift_k samples (a healthy LoRA run grows under 0.03 per step)
    drift_shift: float = 0.5
    drift_rate: float = 0.06
    drift_k: int = 2
    # weight-spread: a weight matrix's std at least this many times its own spread_window samples
    # earlier (or its first), spread_k samples in a row (healthy runs: at most 2.1x over 10 samples)
    spread_factor: float = 8.0
    spread_window: int = 10
    spread_k: int = 2
    rank_factor: float = 2.0  # a rank's total grad norm this many times off the other ranks' median
    rank_k: int = 2
    # straggler (over the whole job's per-rank times, probes/distributed/job.py): a rank's step
    # time this many times the other ranks' median, and at least straggler_min_s seconds more,
    # for straggler_k sampled steps in a row
    straggler_factor: float = 1.5
    straggler_min_s: float = 0.02
    straggler_k: int = 3
    # loss-spike and overflow (evaluated by probes.rules.scalar over every step's Scalars):
    # the loss above the median of its last spike_recent healthy steps + this many robust sigmas of its
    # step-to-step noise (1.4826 MAD of the first differences / sqrt 2, over spike_window steps)...
    spike_sigmas: float = 8.0
    spike_rel: float = 0.15  # ...and above that median by this fraction of it (a flat loss has a tiny MAD)
    spike_window: int = 64  # steps in the noise estimate
    spike_recent: int = 8  # steps in the median (few: a falling loss leaves a long window's median behind)
    spike_min_history: int = 16  # steps needed before a spike can be judged
    spike_diverge: float = 1.5  # the loss this many times where it started (its first 3 steps)...
    spike_diverge_k: int = 5  # ...for this many steps in a row: diverging (critical)
    # instability (probes.rules.instability, over the every-step tier in each step's Scalars): warn at
    # the first step where the median tensor's update ratio is this many times its own recent median...
    instability_update: float = 4.0
    instability_rms: float = 5.0  # ...or the median tensor's Adam RMS(g^2/v) at least this (healthy ~1, at most 3.6)...
    instability_rms_factor: float = 2.5  # ...and this many times its recent median
    instability_window: int = 64  # steps in those medians
    instability_min_history: int = 16  # steps before anything is judged
    # loss-collapse (probes.rules.loss_collapse, over every step's loss): the loss at most this share
    # of where the run started within collapse_steps steps (healthy runs: 67-100% at 50 steps)
    collapse_frac: float = 0.3
    collapse_steps: int = 50
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
