"""``update-too-large``: one optimizer step that moves a tensor too far for its size.

Judged against the tensor's own history of update ratios ``||dW||/||W||``, and
(weight matrices) against an absolute band from step 0: a learning rate too
high from the start has no healthy history. Healthy runs sit at 1e-3 to 3e-2
(docs/alerts.md, "The update-ratio band").

It does not say "recovered" while the learning rate that set it off is unchanged: under Adam at
a rate far too high the ratios fall after a few steps only because the weights have grown and the
moments with them (nanoGPT at lr 1e-1 "recovered" at step 30 and sat on a plateau). The lr of the
parameter's group when the alert fired (or, at step 0, the first reported after) must have fallen
by half first; a run that reports no lr recovers on its ratios as before.
"""

from __future__ import annotations

import math

from probes.rules.base import Finding, UpdateRule, Verdict, median


#: the stream series holding the lr of the parameter's group when the alert fired
FIRED_LR = "fired_lr"


class UpdateTooLarge(UpdateRule):
    """``update-too-large`` on update streams."""

    id = "update-too-large"

    def _lr_unchanged(self, param: str, st) -> bool:
        """Whether the lr that set the alert off still holds (at least half of it): then good ratios
        are Adam's moments grown with the weights, not a recovery."""
        lr, _ = self.engine.lr(param)
        if lr is None:
            return False
        fired = st.series(FIRED_LR)
        if not fired:
            fired.append(lr)  # the first lr known since it fired (at step 0 the Scalars come after)
        return lr >= 0.5 * fired[0]

    def judge(self, ctx, s, st, c) -> Verdict | None:
        if s.ratio is None or not math.isfinite(s.ratio):
            return None
        engine = self.engine
        ratio = s.ratio
        hist = st.series("ratio")
        ref = median(hist, c.explode_window, c.explode_min_history)
        threshold = c.update_max
        if ref > 0:
            threshold = min(threshold, c.update_factor * ref)
        rel = ratio > threshold
        # weight matrices only: biases, norms and embeddings (rows a batch does not touch) move at
        # their own pace, and a zero-initialised tensor's ratio is ~1/n while it grows
        banded = engine.param_kind(s.layer) == "matrix" and not engine.zero_init.get(s.layer, False)
        now = banded and ratio > c.update_max
        over = banded and ratio > c.update_abs
        bad = rel or over
        active = "update-too-large" in st.active
        if active:
            bad = bad or self._lr_unchanged(s.layer, st)
        elif not bad:
            st.hist.pop(FIRED_LR, None)
        if not (bad or active):
            hist.append(ratio)
        k = 1 if now else (c.update_k if rel else c.update_abs_k)
        lr = engine.lr_text(s.layer)
        # a step's lr arrives in its Scalars, after its Step: at the first sampled step it is not
        # known yet, but the update's own size is (under Adam each element moves by about the lr)
        moved = math.sqrt(s.sumsq / s.count) if s.count and s.sumsq >= 0 else math.nan
        lr = (f"; {lr}" if lr else "") + (f"; elements moved by {moved:.2g} (rms) this step" if moved == moved else "")

        def finding() -> Finding:
            if now:
                return Finding(
                    "warning", ratio, c.update_max,
                    f"update ratio ||dW||/||W|| {ratio:.2g}: one step moved {s.layer} by more than its own "
                    f"norm (healthy runs: 1e-3 to 3e-2){lr}: the learning rate is far too high (Adam moves "
                    "every element by about lr per step, a ratio of about lr / rms(W))",
                )
            if rel:
                return Finding(
                    "warning", ratio, threshold,
                    f"update ratio {ratio:.1e} >> {threshold:.1e}, {ratio / ref:.0f}x its own recent "
                    f"median (healthy runs sit at 1e-3 to 3e-2){lr}: learning rate too high, or warm-up missing?"
                    if ref > 0 else
                    f"update ratio {ratio:.1e} >> {threshold:.1e} (healthy runs sit at 1e-3 to 3e-2){lr}: "
                    "learning rate too high, or warm-up missing?",
                )
            return Finding(
                "warning", ratio, c.update_abs,
                f"update ratio {ratio:.2g} > {c.update_abs:g} for {c.update_abs_k} samples in a row, far above "
                f"healthy training's 1e-3 to 3e-2{lr}: learning rate too high, or warm-up missing?",
            )

        return bad, k, finding
