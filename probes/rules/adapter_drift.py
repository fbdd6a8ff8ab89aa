"""``adapter-drift``: a LoRA adapter moving its base weight far faster than a healthy LoRA run.

Each LoRA B's weight sample carries the adapter's relative shift ``||B A scale|| / ||W_base||``
(:attr:`~probes.protocol.wire.Sample.lora_shift`, 0 while B is zero). At LoRA lr 5e-2 it passes 1
within 10 steps, the adapter then outweighing the pretrained matrix it was meant to nudge, while
the update ratios of A and B stay just under ``update-too-large``'s 0.1 band. A healthy LoRA run's
shift grows by at most 0.03 per step (lr 1e-3, alpha/r 2, on the healthy corpus' LLaMA). Fires
when the shift is at least ``drift_shift`` and grew by at least ``drift_rate`` per step since the
stream's previous sample, for ``drift_k`` samples in a row.
"""

from __future__ import annotations

import math

from probes.rules.base import Finding, SampleRule, Verdict

#: the stream series of (step, shift) at its previous sample
PREV = "lora_shift"


class AdapterDrift(SampleRule):
    """``adapter-drift`` on the weight streams of LoRA B matrices."""

    id = "adapter-drift"
    kinds = frozenset({"weight"})

    def applies(self, ctx, s) -> bool:
        return s.lora_shift is not None

    def judge(self, ctx, s, st, c) -> Verdict | None:
        shift = s.lora_shift
        if not math.isfinite(shift):
            return None
        prev = st.series(PREV)
        last = prev[-1] if prev else None
        prev.append((ctx.step.step, shift))
        if last is None or ctx.step.step <= last[0]:
            return None
        rate = (shift - last[1]) / (ctx.step.step - last[0])

        def finding() -> Finding:
            engine = self.engine
            info = engine.params.get(s.layer)
            base = info[0].adapter_of if info else ""
            lr = engine.lr_text(s.layer)
            pair = info[0].name.rsplit("lora_B", 1)[0] + "lora_" if info else None  # its A and B
            ratios = [f"{'A' if 'lora_A' in x.layer else 'B'} {x.ratio:.2g}" for x in ctx.step.samples
                      if pair and x.kind == "update" and x.ratio is not None and x.layer.startswith(pair)]
            on = f" on {base}" if base else ""
            return Finding(
                "warning", shift, c.drift_shift,
                f"the LoRA adapter{on} shifts its base weight by {shift:.2f} of its norm (||B A scale|| / ||W||) "
                f"and grows {rate:.2g} per step (a healthy LoRA run: under 0.03 per step)"
                + (f"; its update ratios {', '.join(ratios)} (healthy LoRA: ~4e-3)" if ratios else "") + (f"; {lr}" if lr else "")
                + ": the adapter is overwriting the pretrained weight; the LoRA learning rate is far too high "
                "(LoRA usually trains at 1e-4 to 1e-3), or lora_alpha / r too large",
            )

        return shift >= c.drift_shift and rate >= c.drift_rate, c.drift_k, finding
