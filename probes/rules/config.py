"""Rule thresholds from a TOML file (``xray-tui ... --rules FILE``).

One table per rule id, with the rule's thresholds (without the field
prefix of :class:`~probes.rules.RuleConfig`) and ``enabled``; top-level
``recover_k``; and ``[[layers]]`` entries with a glob ``pattern`` and
per-rule tables that apply to matching layer names (later entries win)::

    recover_k = 3

    [exploding]
    factor = 10.0        # RuleConfig.explode_factor
    k = 2

    [update-too-large]
    abs = 0.1            # RuleConfig.update_abs: weight matrices above it for abs_k samples...
    abs_k = 3
    max = 1.0            # ...or above max at once (and against their own history: factor, k)

    [straggler]
    factor = 1.5         # a rank's step time this many times the other ranks' median...
    min_s = 0.02         # ...and at least this many seconds more...
    k = 3                # ...for this many sampled steps in a row

    [starved]
    factor = 100.0       # update ratio this many times below the median of its kind, k samples
    enabled = true

    [lagging]
    factor = 10.0        # a matrix this many times below its peers' median update ratio (up to starved's)
    k = 4

    [loss-collapse]
    frac = 0.3           # the loss at most this share of its start...
    steps = 50           # ...within this many steps of it

    [frozen]
    enabled = false      # a deliberate linear probe (share = 0.2: the trainable share that warns)

    [spectral]           # WeightWatcher's alpha bands, behind the trust gate
    alpha_low = 2.0      # RuleConfig.spectral_alpha_low
    alpha_high = 6.0
    min_tail = 50        # tail eigenvalues a fit needs before it may alert
    sigmas = 2.0         # standard errors alpha must be past the band edge (0: off)
    max_stable_rank = 2.0  # alpha < alpha_low warns only with a stable rank at most this

    [[layers]]
    pattern = "transformer.wte.*"
    vanishing = { enabled = false }
    dead = { units = 0.8 }

Usage from Python: ``probes.attach(model, opt, rules=RuleEngine(load("rules.toml")))``.
Anything wrong raises :class:`RulesConfigError` with one line naming the file
and the key. Pure Python (tomllib), no torch.
"""

from __future__ import annotations

import dataclasses
import tomllib

from probes.rules.thresholds import RULES, RuleConfig

#: TOML table name -> RuleConfig field prefix.
PREFIX = {
    "exploding": "explode_",
    "vanishing": "vanish_",
    "dead": "dead_",
    "stalled": "stall_",
    "no-grad": "nograd_",
    "update-too-large": "update_",
    "rank-divergence": "rank_",
    "straggler": "straggler_",  # over the whole job's per-rank step times (probes/distributed/job.py)
    "nonfinite": None,  # no thresholds: only ``enabled``
    "loss-spike": "spike_",  # evaluated over every step's Scalars by probes.rules.scalar
    "overflow": "overflow_",
    "instability": "instability_",  # the every-step tier, over every step's Scalars (probes.rules.instability)
    "starved": "starved_",
    "spectral": "spectral_",  # evaluated over spectral passes by probes.rules.spectral
    "frozen": "frozen_",
    "lagging": "lagging_",
    "loss-collapse": "collapse_",  # over every step's loss, by probes.rules.loss_collapse
    "adapter-drift": "drift_",
    "weight-spread": "spread_",
}
_FIELDS = {f.name: f for f in dataclasses.fields(RuleConfig) if f.name not in ("disabled", "overrides")}
_TOP = {"recover_k"}


class RulesConfigError(ValueError):
    """A rules file that cannot be used; the message is one line."""


def _value(where: str, name: str, value):
    """Check a threshold's type: ints for counts, positive numbers for the rest."""
    want = _FIELDS[name].type
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RulesConfigError(f"{where}: expected a number, got {value!r}")
    if want in (int, "int"):
        if not isinstance(value, int) or value < 1:
            raise RulesConfigError(f"{where}: expected an integer >= 1, got {value!r}")
        return value
    if not value > 0 and not (name in ("vanish_zeros_jump", "spectral_sigmas") and value == 0):
        raise RulesConfigError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


def _rule_table(where: str, rule: str, table) -> tuple[dict, set, set]:
    """(field changes, rules disabled, rules enabled) of one ``[rule]`` table."""
    if not isinstance(table, dict):
        raise RulesConfigError(f"{where}: [{rule}] must be a table")
    changes, off, on = {}, set(), set()
    for key, value in table.items():
        w = f"{where}: {rule}.{key}"
        if key == "enabled":
            if not isinstance(value, bool):
                raise RulesConfigError(f"{w}: expected true or false, got {value!r}")
            (on if value else off).add(rule)
            continue
        name = (PREFIX[rule] or "\0") + key
        if name not in _FIELDS:
            known = sorted(f[len(PREFIX[rule]):] for f in _FIELDS if PREFIX[rule] and f.startswith(PREFIX[rule]))
            raise RulesConfigError(f"{w}: unknown threshold; {rule} has: {', '.join(known + ['enabled'])}")
        changes[name] = _value(w, name, value)
    return changes, off, on


def parse(doc: dict, where: str = "rules") -> RuleConfig:
    """A :class:`RuleConfig` from a parsed TOML document."""
    changes: dict = {}
    disabled: set = set()
    overrides = []
    for key, value in doc.items():
        if key in _TOP:
            changes[key] = _value(f"{where}: {key}", key, value)
        elif key in PREFIX:
            c, off, on = _rule_table(where, key, value)
            changes.update(c)
            disabled = (disabled | off) - on
        elif key == "layers":
            if not isinstance(value, list):
                raise RulesConfigError(f"{where}: layers must be an array of tables ([[layers]])")
            for i, entry in enumerate(value):
                overrides.append(_layer_entry(f"{where}: layers[{i}]", entry))
        else:
            raise RulesConfigError(f"{where}: unknown key {key!r}; expected one of: "
                                   f"{', '.join(list(PREFIX) + sorted(_TOP) + ['layers'])}")
    try:
        cfg = RuleConfig(**changes, disabled=frozenset(disabled), overrides=tuple(overrides))
    except (TypeError, ValueError) as exc:  # pragma: no cover - every key was checked above
        raise RulesConfigError(f"{where}: {exc}") from None
    _check_bands(f"{where}: spectral", cfg)
    for i, (pattern, changes) in enumerate(overrides):
        numbers = {k: v for k, v in changes.items() if k not in ("disabled", "enabled")}
        _check_bands(f"{where}: layers[{i}] ({pattern}): spectral", dataclasses.replace(cfg, **numbers))
    return cfg


def _check_bands(where: str, cfg: RuleConfig) -> None:
    if not cfg.spectral_alpha_low < cfg.spectral_alpha_high:
        raise RulesConfigError(f"{where}: alpha_low {cfg.spectral_alpha_low:g} must be below "
                               f"alpha_high {cfg.spectral_alpha_high:g}")


def _layer_entry(where: str, entry) -> tuple[str, dict]:
    if not isinstance(entry, dict):
        raise RulesConfigError(f"{where}: expected a table")
    pattern = entry.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise RulesConfigError(f"{where}: needs pattern = \"glob over layer names\"")
    changes: dict = {}
    off: set = set()
    on: set = set()
    for key, value in entry.items():
        if key == "pattern":
            continue
        if key in _TOP:
            changes[key] = _value(f"{where}: {key}", key, value)
        elif key in PREFIX:
            c, o, e = _rule_table(where, key, value)
            changes.update(c)
            off, on = (off | o) - e, (on | e) - o
        else:
            raise RulesConfigError(f"{where}: unknown key {key!r}; expected pattern or a rule id "
                                   f"({', '.join(PREFIX)})")
    if off:
        changes["disabled"] = frozenset(off)
    if on:
        changes["enabled"] = frozenset(on)
    return pattern, changes


def load(path: str) -> RuleConfig:
    """Read a rules TOML file into a :class:`RuleConfig`."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise RulesConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RulesConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(doc, where=path)


assert set(PREFIX) == set(RULES)
