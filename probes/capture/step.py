"""A step's rows, copied to the host, made into a :class:`~probes.protocol.wire.Step`.

Runs on the publisher thread (or the job thread), never on the training thread.
"""

from __future__ import annotations

import math

import numpy as np

from probes.engines.layout import COL
from probes.protocol import wire


def build_step(step: int, rank: int, t: float, meta, rows: np.ndarray, hists: np.ndarray, hist_n,
               rank_grad_norms: list[float] | None = None, phase: str = "train",
               lora_bases: dict[str, str] | None = None, skipped: bool = False) -> wire.Step:
    """Turn the host copy of a step's rows into a :class:`wire.Step` (publisher thread).

    ``lora_bases`` maps each LoRA B weight to its base weight, whose row gives
    the ||W|| of the adapter's relative shift."""
    # Python floats and one vectorised trim: per-element numpy scalars made this ~11 us a sample,
    # publisher time that holds the GIL the training thread needs
    table = rows.tolist()
    occupied = hists != 0
    first = occupied.argmax(1)
    last = hists.shape[1] - occupied[:, ::-1].argmax(1)
    empty = ~occupied.any(1)
    first[empty] = last[empty] = 0
    c = COL
    weight_sumsq = {layer: r[c["sumsq"]] for (layer, kind), r in zip(meta, table) if kind == "weight"} \
        if lora_bases else {}
    samples = []
    for i, ((layer, kind), r, n) in enumerate(zip(meta, table, hist_n)):
        lo, hi, n = int(first[i]), int(last[i]), int(n)
        dead, ref = r[c["dead_units"]], r[c["ref_sumsq"]]
        ratio = init_dist = shift = None
        if kind == "update":
            if ref > 0:
                ratio = math.sqrt(r[c["sumsq"]] / ref)
            if math.isfinite(r[c["init_dist"]]):
                init_dist = r[c["init_dist"]]  # NaN/inf: a weight that was all zeros at attach
        elif kind == "weight" and lora_bases and layer in lora_bases and math.isfinite(r[c["lora_sumsq"]]):
            base = weight_sumsq.get(lora_bases[layer], math.nan)
            if base > 0:
                shift = math.sqrt(r[c["lora_sumsq"]] / base)
        samples.append(
            wire.Sample(
                layer=layer,
                kind=kind,
                count=int(r[c["count"]]),
                sum=r[c["sum"]],
                sumsq=r[c["sumsq"]],
                abssum=r[c["abssum"]],
                min=r[c["min"]],
                max=r[c["max"]],
                near_zero=int(r[c["near_zero"]]),
                zeros=int(r[c["zeros"]]),
                nan=int(r[c["nan"]]),
                posinf=int(r[c["posinf"]]),
                neginf=int(r[c["neginf"]]),
                hist_lo=lo,
                hist_counts=wire.encode_counts(hists[i, lo:hi], n),
                hist_n=n,
                dead_units=None if math.isnan(dead) else dead,
                ratio=ratio,
                sum3=r[c["sum3"]],
                sum4=r[c["sum4"]],
                init_dist=init_dist,
                lora_shift=shift,
            )
        )
    return wire.Step(step=step, rank=rank, time=t, samples=samples, rank_grad_norms=rank_grad_norms, phase=phase,
                     skipped=skipped)
