"""``instability``: the every-step tier's warning that a loss spike is coming.

Judged over each step's :class:`~probes.protocol.wire.Scalars` that carry
the tier's arrays (probes/capture/signals.py): per trainable weight, Adam's
RMS_t = sqrt(mean(g^2 / v_hat)) and the update ratio ||dW||/||W||, and the
global gradient norm (before clipping when the loop clips, else estimated
from the subsets). It warns on the first step at which either holds:

- **updates surge**: the median tensor's update ratio is ``instability_update``
  times its own recent median (the lr jumped, or Adam's step grew: every
  layer moves more at once, a step or two before the loss does);
- **Adam's second moment lags**: the median tensor's RMS_t is at least
  ``instability_rms`` and ``instability_rms_factor`` times its own recent
  median (in a healthy run g^2 and v_hat agree, RMS_t ~ 1; StableAdamW
  clips the lr once it passes 1; Wortsman et al. 2023 see it rise one to
  eight steps before a spike).

The global gradient norm (before clipping when the loop clips) is quoted
when it stands 2x or more above its recent median, but never warns alone:
the field sees the gradient norm jump *after* the updates do, and a
healthy fine-tune leaving a plateau grows it 9x (the BERT classifier of
tests/practitioner_runs.py).

The bands were set on healthy runs of four families (docs/alerts.md, "The
early-warning tier"): after their first ``instability_min_history`` steps
the median update factor stayed at most 2.1 (BERT through the Trainer) and
the median RMS_t at most 3.6 (GPT-2 through the Trainer, 6.5x its own
median as its gradients grew back after a fall). Every value joins the
history, so a lasting change (a new lr held for good) becomes the new normal within half
a window and the warning recovers; it names the tensors that moved first
and what to do.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections import deque

import numpy as np

from probes.protocol.wire import Alert, Scalars
from probes.rules.base import FIRE, RECOVER, StreamState, track
from probes.rules.thresholds import ALL_LAYERS

RULE = "instability"
#: steps back that "moved first" looks (the tensors that crossed earliest within them are named)
LOOKBACK = 4
#: steps between two recomputations of the per-tensor baselines (medians over the window): a
#: median of 64 steps moves little in a few, and recomputing it every step cost the publisher
#: thread ~0.6 ms a step for 50 tensors (and every 4 steps still ~15 us a step)
REFRESH = 8


class _Rank:
    """One rank's tier history."""

    def __init__(self, n: int, window: int) -> None:
        self.rms = np.full((window, n), np.nan)  # rings of the last ``window`` steps' values
        self.ratio = np.full((window, n), np.nan)
        self.grad: deque = deque(maxlen=window)
        self.filled = 0
        self.at = 0
        self.crossed: dict[int, int] = {}  # tensor -> the step its own factor first crossed, recently
        self.lr: deque = deque(maxlen=window)
        self.state = StreamState()
        # (1 / ratio median, 1 / rms median, grad norm median, lr median), refreshed every REFRESH
        # steps; a reciprocal is NaN where its median is not > 0 (no baseline: NaN factors, no warning)
        self.base: tuple | None = None
        self.base_at = -REFRESH


class Instability:
    """The ``instability`` rule of one engine; :meth:`evaluate` per Scalars message."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._ranks: dict[int, _Rank] = {}
        # each rank's latest per-tensor factors (rise, whether the update's, names), for movers()
        self._latest: dict[int, tuple] = {}

    def evaluate(self, msg: Scalars) -> list[Alert]:
        """The alert that fires or recovers at this step, if any."""
        arrays = msg.signals() if hasattr(msg, "signals") else None
        names = self.engine.signal_tensors
        c = self.engine.cfg(ALL_LAYERS)
        if arrays is None or not names or len(arrays[0]) != len(names) or not c.on(RULE):
            return []
        rms, ratio = arrays
        st = self._ranks.get(msg.rank)
        if st is None or st.rms.shape != (c.instability_window, len(names)):
            st = self._ranks[msg.rank] = _Rank(len(names), c.instability_window)
        grad = msg.values.get("grad_norm_preclip", msg.values.get("grad_norm_est", math.nan))
        lr = msg.values.get("lr", math.nan)
        out: list[Alert] = []
        if st.filled >= c.instability_min_history:
            finding = self._judge(msg, st, c, rms, ratio, grad, lr, names)
            change = track(st.state, RULE, finding is not None, 1, c.recover_k)
            if change == FIRE:
                out.append(Alert(msg.step, msg.rank, "warning", RULE, ALL_LAYERS, "scalar", *finding))
            elif change == RECOVER:
                out.append(Alert(msg.step, msg.rank, "info", RULE, ALL_LAYERS, "scalar", 0.0, 0.0,
                                 "the early-warning signals are back within their recent range"))
        st.rms[st.at], st.ratio[st.at] = rms, ratio
        st.at = (st.at + 1) % c.instability_window
        st.filled += 1
        st.grad.append(grad)
        st.lr.append(lr)
        return out

    def _judge(self, msg, st: _Rank, c, rms, ratio, grad, lr, names):
        """(value, threshold, message) when the step is unstable, else None."""
        if st.filled - st.base_at >= REFRESH or st.base is None:
            st.base = (_inverse(_nanmedian(st.ratio)), _inverse(_nanmedian(st.rms)), _median(list(st.grad)),
                       _median(list(st.lr)))
            st.base_at = st.filled
        inv_ratio, inv_rms, base_grad, was = st.base
        f_ratio, f_rms = ratio * inv_ratio, rms * inv_rms  # NaN propagates quietly: no errstate a step
        up, rms_now, rms_up = _medians(np.stack([f_ratio, rms, f_rms]))
        g_up = grad / base_grad if math.isfinite(grad) and base_grad > 0 else math.nan
        self._latest[msg.rank] = (f_ratio, f_rms, names)  # each tensor's own rise, for movers()
        low = min(c.instability_update, c.instability_rms_factor)
        for i in np.flatnonzero((f_ratio >= low) | (f_rms >= low)).tolist():
            st.crossed.setdefault(i, msg.step)
        if st.crossed:
            st.crossed = {i: s for i, s in st.crossed.items() if msg.step - s < LOOKBACK}
        reasons = []
        value = threshold = math.nan
        if up >= c.instability_update:
            change = (f" (the lr went from {was:.3g} to {lr:.3g})"
                      if math.isfinite(lr) and math.isfinite(was) and was > 0 and lr / was > 1.5 else "")
            reasons.append(f"the median tensor's update ratio ||dW||/||W|| is {up:.0f}x its recent median{change}")
            value, threshold = up, c.instability_update
        if rms_now >= c.instability_rms and rms_up >= c.instability_rms_factor:
            share = int(np.sum(np.nan_to_num(f_rms) >= c.instability_rms_factor))
            reasons.append(f"Adam's RMS(g^2/v) is {rms_now:.1f} in the median tensor ({rms_up:.1f}x its recent "
                           f"median; healthy ~1; {share} of {len(names)} tensors up): the gradients grew faster "
                           "than Adam's second moment follows")
            if not math.isfinite(value):
                value, threshold = rms_now, c.instability_rms
        if not reasons:
            return None
        if math.isfinite(g_up) and g_up >= 2:  # after the updates, not before: a supporting figure only
            pre = "before clipping " if "grad_norm_preclip" in msg.values else ""
            reasons.append(f"the gradient norm {pre}is {grad:.3g}, {g_up:.1f}x its recent median")
        own = np.fmax(f_ratio, f_rms)
        first = sorted(st.crossed, key=lambda i: (st.crossed[i], -np.nan_to_num(own[i])))[:3]
        movers = ", ".join(f"{names[i]} {own[i]:.0f}x" for i in first if np.isfinite(own[i]))
        return (float(value), float(threshold),
                "a loss spike may follow within a few steps: " + "; ".join(reasons)
                + (f"; moved first: {movers}" if movers else "") + f". {self._hint(msg, lr)}")

    def _hint(self, msg, lr) -> str:
        clip = msg.values.get("clip")
        lr_text = f" (lr {lr:.3g})" if math.isfinite(lr) else ""
        clip_text = (f"lower the clipping threshold (gradients are clipped at {clip:g})" if clip is not None
                     else "clip gradients (torch.nn.utils.clip_grad_norm_, e.g. max_norm 1.0)")
        return (f"Lower the learning rate{lr_text}, add or lengthen warm-up, {clip_text}, "
                "or skip the batch if one bad batch caused it")

    def movers(self, rank: int, top: int = 3) -> str:
        """The tensors whose update ratio or Adam RMS stood furthest above their own recent
        median at the latest step, e.g. ``h.0.attn.c_attn.weight update 20x``; "" when none."""
        latest = self._latest.get(rank)
        if latest is None:
            return ""
        f_ratio, f_rms, names = latest
        own, by_update = np.fmax(f_ratio, f_rms), f_ratio >= f_rms
        moved = sorted(((float(f), names[i], "update" if by_update[i] else "rms")
                        for i, f in enumerate(own.tolist()) if f > 1.5), reverse=True)  # NaN > 1.5 is False
        return ", ".join(f"{name} {what} {f:.0f}x" for f, name, what in moved[:top])


def _median(values) -> float:
    """The median of the finite values (NaN for none): a sort of a few dozen floats, where
    ``np.median``'s own overhead was most of the rule's time."""
    v = [x for x in (values.tolist() if isinstance(values, np.ndarray) else values) if math.isfinite(x)]
    return statistics.median(v) if v else math.nan


def _medians(rows: np.ndarray) -> list[float]:
    """Each row's median over its finite values (NaN for a row with none): one sort of the rows
    when all are finite (the usual case), in place of a median call per row."""
    n = rows.shape[1]
    if n and np.isfinite(rows).all():
        mid = np.sort(rows, axis=1)
        return ((mid[:, (n - 1) // 2] + mid[:, n // 2]) / 2).tolist()
    return [_median(r) for r in rows]


def _inverse(x: np.ndarray) -> np.ndarray:
    """1 / x, NaN where x is not a positive finite number."""
    out = np.full_like(x, np.nan)
    np.divide(1.0, x, out=out, where=np.isfinite(x) & (x > 0))
    return out


def _nanmedian(ring: np.ndarray) -> np.ndarray:
    """Each column's median over the ring's finite values (NaN for a column with none);
    ``np.median`` when there is no NaN (the usual case: several times faster)."""
    if not np.isnan(ring).any():
        return np.median(ring, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: no baseline, NaN factor
        return np.nanmedian(ring, axis=0)
