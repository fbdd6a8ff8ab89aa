"""The ``spectral`` alert rule: WeightWatcher's alpha bands, behind a trust gate.

Pure Python (no torch, no numpy), so the probe's spectral monitor and the
viewer's headless mode (``--rules FILE``) judge the same fits the same way:
the rule reads a fit's ``alpha``, ``n_tail`` (eigenvalues >= xmin) and
``n_evals``, from :class:`probes.spectral.analysis.Metrics` or a
:class:`probes.protocol.wire.Spectral` message alike.

WeightWatcher reads alpha < 2 as "over-trained" and alpha > 6 as
"under-trained". On small matrices that reading fires on healthy layers: the
KS choice of xmin often settles on the top handful of eigenvalues, and an
MLE over a handful of points swings by its standard error (alpha-1)/sqrt(n).
:func:`untrusted` says when a fit cannot back an alert (docs/spectral.md,
"When a fit is trusted"); the alpha is still shown, marked with the reason.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from probes.protocol import wire

#: WeightWatcher's bands: alpha below is "over-trained", above "under-trained".
ALPHA_LOW, ALPHA_HIGH = 2.0, 6.0
#: A fit whose tail has fewer eigenvalues than this is not trusted...
MIN_TAIL = 50
#: ...nor one whose alpha lies within this many standard errors
#: (WeightWatcher's sigma = (alpha - 1) / sqrt(n_tail)) of the band it crossed.
BAND_SIGMAS = 2.0
#: alpha below the band is a finding only with a collapsed spectrum: a stable rank
#: (sum(lambda) / lambda_max) at most this, i.e. the top eigenvalue holds half of ||W||_F^2 or more.
#: Healthy char-level GPTs and MLPs trained a few thousand steps reach alpha 1.4-1.8 with stable
#: ranks of 2.5-18 (docs/spectral.md, "Healthy runs below 2"); a matrix of heavy-tailed entries
#: (Student-t, 1 degree of freedom) has alpha ~1.4 and a stable rank ~1.3.
MAX_STABLE_RANK = 2.0


def band(alpha: float | None, low: float = ALPHA_LOW, high: float = ALPHA_HIGH) -> str:
    """WeightWatcher's reading of alpha: below ``low`` over-, above ``high`` under-trained."""
    if alpha is None:
        return ""
    return "over-trained" if alpha < low else ("under-trained" if alpha > high else "")


def alpha_sigma(alpha: float | None, n_tail: int) -> float | None:
    """Standard error of the power-law MLE, (alpha - 1) / sqrt(n_tail).

    Clauset, Shalizi and Newman (2009), eq. 3.2; WeightWatcher's ``sigma``
    column (``WWFit.sigmas``) is the same expression.
    """
    if alpha is None or n_tail < 1:
        return None
    return (alpha - 1.0) / math.sqrt(n_tail)


def untrusted(fit, *, low: float = ALPHA_LOW, high: float = ALPHA_HIGH,
              min_tail: int = MIN_TAIL, sigmas: float = BAND_SIGMAS) -> str:
    """Why ``fit`` cannot back a ``spectral`` alert, or "" when it can.

    ``fit`` has ``alpha``, ``n_tail`` and ``n_evals``. Two conditions:

    - the tail must hold at least ``min_tail`` eigenvalues. WeightWatcher
      itself treats small samples apart: below 20 eigenvalues it switches to
      a bias-corrected estimator with tails of at least 8 and penalises
      small tails (D - 0.868/sqrt(n)) when it picks xmin;
    - when alpha is outside the band, it must be outside by more than
      ``sigmas`` standard errors: a crossing within the fit's own noise is
      not a finding.

    A fit with too small a tail is untrusted inside the band too: it can
    neither raise an alert nor clear one.
    """
    alpha, n_tail = fit.alpha, fit.n_tail
    if alpha is None:
        return "no power-law fit"
    if n_tail < min_tail:
        return f"tail of {n_tail} eigenvalues < {min_tail} (of {fit.n_evals}): too few to fit alpha"
    what = band(alpha, low, high)
    sigma = alpha_sigma(alpha, n_tail)
    if what and sigma is not None:
        edge = low if what == "over-trained" else high
        if abs(alpha - edge) <= sigmas * sigma:
            return (f"alpha {alpha:.2f} is within {sigmas:g} standard errors "
                    f"({sigma:.2f} each, tail of {n_tail}) of {edge:g}")
    return ""


class _Bands(NamedTuple):
    on: bool
    low: float
    high: float
    min_tail: int
    sigmas: float
    max_stable_rank: float = MAX_STABLE_RANK


class SpectralAlerts:
    """The ``spectral`` rule: a trusted fit with alpha outside WeightWatcher's bands.

    Each pass is a full measurement, so one bad pass fires (warning); the alert
    fires once per layer while it lasts and says once, at ``info``, when alpha
    is back in the band. A fit that :func:`untrusted` rejects neither fires
    nor recovers: its alpha is still sent, marked ``untrusted`` with the reason.
    ``evaluate`` takes a :class:`probes.spectral.analysis.Metrics` (``name``) or a
    :class:`probes.protocol.wire.Spectral` (``layer``).

    The thresholds are the arguments, or, with ``config`` (a
    :class:`probes.rules.RuleConfig`, e.g. from a rules TOML file), its
    ``spectral_*`` fields, resolved per layer (``[[layers]]`` overrides,
    ``enabled = false``) as for every other rule.
    """

    def __init__(self, low: float = ALPHA_LOW, high: float = ALPHA_HIGH, *,
                 min_tail: int = MIN_TAIL, sigmas: float = BAND_SIGMAS,
                 max_stable_rank: float = MAX_STABLE_RANK, config=None) -> None:
        if config is not None:
            low, high = config.spectral_alpha_low, config.spectral_alpha_high
            min_tail, sigmas = config.spectral_min_tail, config.spectral_sigmas
            max_stable_rank = config.spectral_max_stable_rank
        self.low, self.high = low, high
        self.min_tail, self.sigmas = min_tail, sigmas
        self.max_stable_rank = max_stable_rank
        self.config = config
        self.active: set[str] = set()
        self._bands: dict[str, _Bands] = {}

    def bands(self, name: str) -> _Bands:
        """Whether the rule is on for layer ``name``, and its thresholds there."""
        b = self._bands.get(name)
        if b is None:
            c = self.config.for_layer(name) if self.config is not None else None
            b = (_Bands(True, self.low, self.high, self.min_tail, self.sigmas, self.max_stable_rank) if c is None
                 else _Bands(c.on("spectral"), c.spectral_alpha_low, c.spectral_alpha_high,
                             c.spectral_min_tail, c.spectral_sigmas, c.spectral_max_stable_rank))
            self._bands[name] = b
        return b

    def untrusted(self, fit) -> str:
        """Why ``fit`` cannot back an alert under its layer's thresholds ("" when it can)."""
        b = self.bands(getattr(fit, "name", None) or fit.layer)
        return untrusted(fit, low=b.low, high=b.high, min_tail=b.min_tail, sigmas=b.sigmas)

    def evaluate(self, fit, step: int, rank: int) -> wire.Alert | None:
        """An alert for ``fit`` if its state changed, else None."""
        name = getattr(fit, "name", None) or fit.layer
        b = self.bands(name)
        if not b.on or self.untrusted(fit):
            return None
        alpha = fit.alpha
        what = band(alpha, b.low, b.high)
        stable_rank = getattr(fit, "stable_rank", None)  # None: an older probe's message, judged on alpha
        if what == "over-trained" and stable_rank is not None and stable_rank > b.max_stable_rank:
            # heavy-tailed but not collapsed onto a few directions: what healthy small models show.
            # Neither a finding nor a recovery: an active alert stays until alpha is back in the band
            return None
        if what and name not in self.active:
            self.active.add(name)
            thr = b.low if what == "over-trained" else b.high
            side = "below" if what == "over-trained" else "above"
            hint = ("heavy-tailed and collapsed onto a few directions: the layer may be over-fitting, or its "
                    "weights corrupted by a few huge values; check its learning rate"
                    if what == "over-trained" else "close to random: the layer has learnt little yet")
            sigma = alpha_sigma(alpha, fit.n_tail)
            sr = f", stable rank {stable_rank:.2g}" if what == "over-trained" and stable_rank is not None else ""
            return wire.Alert(step, rank, "warning", "spectral", name, "weight", float(alpha), thr,
                              f"alpha {alpha:.2f} ± {sigma:.2f} {side} {thr:g} ({what}; WeightWatcher; "
                              f"tail of {fit.n_tail} eigenvalues{sr}): {hint}")
        if not what and name in self.active:
            self.active.discard(name)
            return wire.Alert(step, rank, "info", "spectral", name, "weight", float(alpha), b.low,
                              f"alpha {alpha:.2f} back in [{b.low:g}, {b.high:g}]")
        return None
