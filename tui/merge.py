"""One sample from several ranks' samples of one stream: what the merged view shows.

Sufficient statistics add across ranks (counts, sums, power sums,
histograms), extremes take the extremes, and the per-rank ratios take the
worst rank, so the merged sample reads as if one process had seen every
rank's tensor. Pure numpy; the probe's own job-wide merge does the same
across nodes (``probes.distributed``).
"""

from __future__ import annotations

import math

import numpy as np

from probes.protocol import wire


def merge_samples(samples: list[wire.Sample]) -> wire.Sample | None:
    """One sample from several ranks' samples of one stream (sufficient stats add).

    Counts, sums and histograms add, min/max take the extremes; the dead-unit
    fraction is averaged and the update ratio, distance from initialisation
    and LoRA shift take the worst (largest) rank.
    Fields added to :class:`~probes.protocol.wire.Sample` later add up when they are
    numbers (power sums, counts). Returns the single sample itself when there
    is one, None for none.
    """
    if not samples:
        return None
    if len(samples) == 1:
        return samples[0]
    with_hist = [s for s in samples if s.hist.size]
    lo = min((s.hist_lo for s in with_hist), default=0)
    hi = max((s.hist_lo + len(s.hist) for s in with_hist), default=lo)
    hist = np.zeros(hi - lo, dtype=np.int64)
    for s in with_hist:
        hist[s.hist_lo - lo : s.hist_lo - lo + s.hist.size] += s.hist
    hist_n = sum(s.hist_n for s in samples)
    first = samples[0]
    out = {}
    for name in wire.Sample.__struct_fields__:
        values = [getattr(s, name) for s in samples]
        if name in ("layer", "kind"):
            out[name] = values[0]
        elif name in ("min", "max"):
            # an empty rank's (an empty FSDP shard's) NaN says nothing; a NaN of a tensor holding one wins
            known = [v for s, v in zip(samples, values) if s.count]
            pick = min if name == "min" else max
            out[name] = math.nan if not known or any(math.isnan(v) for v in known) else pick(known)
        elif name == "hist_lo":
            out[name] = lo
        elif name == "hist_counts":
            out[name] = wire.encode_counts(hist, hist_n)
        elif name == "dead_units":
            known = [v for v in values if v is not None]
            out[name] = sum(known) / len(known) if known else None
        elif name in ("ratio", "init_dist", "lora_shift"):
            known = [v for v in values if v is not None]
            out[name] = max(known) if known else None
        elif all(isinstance(v, (int, float)) for v in values):
            out[name] = sum(values)
        else:
            out[name] = getattr(first, name)
    return wire.Sample(**out)
