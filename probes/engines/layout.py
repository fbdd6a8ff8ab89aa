"""What the engines produce: the columns of a statistics row, and the float codes histograms bin by.

Every engine (:mod:`~probes.engines.cpu_kernel`, :mod:`~probes.engines.device`,
the torch path in :mod:`~probes.engines.reduce`) writes rows of ``NCOL``
float64 columns in this order, and bins a histogram sample by the top bits of
its float32 pattern (a float code) looked up in ``CODE_BINS``.
"""

from __future__ import annotations

import numpy as np
import torch

from probes.protocol import histogram

# Column layout of a statistics row (float64).
COLUMNS = (
    "count", "sum", "sumsq", "abssum", "min", "max",
    "near_zero", "zeros", "nan", "posinf", "neginf", "sum3", "sum4",
    "dead_units", "ref_sumsq", "init_dist", "lora_sumsq",
)
COL = {name: i for i, name in enumerate(COLUMNS)}
NCOL = len(COLUMNS)
_NBASE = COL["dead_units"]  # columns every reduction computes (the CPU kernel adds dead_units)

CODE_SHIFT = 23 - histogram.MANTISSA_BITS
NUM_CODES = 1 << (32 - CODE_SHIFT)


def _code_bins() -> torch.Tensor:
    """The bin of every code (numpy's reference binning of the code's smallest value)."""
    codes = (np.arange(NUM_CODES, dtype=np.int64) << CODE_SHIFT).astype(np.uint32)
    return torch.from_numpy(histogram.bin_index(codes.view(np.float32)))


#: Bin of each code; NaN and Inf codes map to ``_TRASH``.
CODE_BINS = _code_bins()
CODE_BINS_INT32 = CODE_BINS.numpy().astype(np.int32)  # for the CPU kernel


def float_codes(sample: torch.Tensor) -> torch.Tensor:
    """The code of each element (two integer ops on the float32 bits)."""
    bits = sample.float().contiguous().view(torch.int32)
    return (bits >> CODE_SHIFT) & (NUM_CODES - 1)


def bin_index(sample: torch.Tensor) -> torch.Tensor:
    """Bin of each element, read from the float32 bits (see probes.protocol.histogram)."""
    return CODE_BINS.to(sample.device)[float_codes(sample).long()]
