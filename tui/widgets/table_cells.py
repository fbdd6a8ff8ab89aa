"""The text of the layer table's cells: sparklines, the near-zero gauge, numbers, names and badges.

Each function turns one value (a sample, a fraction, a number, a name)
into a fixed-width string; styling and layout are the table's
(:mod:`tui.widgets.table_rows`, :mod:`tui.widgets.table_columns`).
"""

from __future__ import annotations

import math

import numpy as np

from probes.protocol import histogram, stats
from probes.protocol.wire import Sample
from tui.widgets.table_columns import GAUGE_W

#: Eighth blocks, index 0 = empty cell (a bin with no count stays blank).
BLOCKS = " ▁▂▃▄▅▆▇█"
#: The tallest sparkline column: ``▇``, leaving a gap below the row above.
PEAK = 7
#: Near-zero share at which an activation counts as dead (DESIGN.md: >= 99%).
DEAD_FRACTION = 0.99
#: The status column's text for a row's worst active alert.
BADGES = {"ok": "✓ ok", "info": "✓ ok", "warning": "▲ warn", "critical": "✖ CRIT"}
#: The badge of a row that holds NaN/inf it did not start: the ``nonfinite`` alert names the
#: origin (``✖ CRIT``); every later layer goes non-finite with it, and reading ``✓ ok`` beside
#: ``✖ NaN 100%`` cells, or ``✖ CRIT`` on all of them, would hide where it began.
AFFECTED = {"NaN": "↳ NaN", "inf": "↳ inf"}


def sparkline(sample: Sample | None, width: int) -> str:
    """The sample's histogram re-binned over [min, max] as ``width`` blocks.

    Heights are scaled so the tallest column is ``▇``, 7/8 of the cell: a full
    ``█`` touches the row above, and on a healthy run the peaks of
    neighbouring rows merged into solid towers. An empty column is a blank so
    that gaps in a distribution stay visible.
    """
    if sample is None or not sample.hist.size:
        return " " * width
    cols = histogram.rebin_linear(sample.hist_lo, sample.hist, sample.min, sample.max, width)
    top = cols.max()
    if top <= 0:
        return " " * width
    idx = np.ceil(cols / top * PEAK).astype(np.int64)
    return "".join(BLOCKS[i] for i in idx)


def nonfinite_cell(sample: Sample, width: int) -> str:
    """What a cell says instead of a sparkline or gauge when the tensor holds NaN or inf.

    ``✖ NaN 100%``, shortened to ``✖ NaN`` and ``✖`` as the cell narrows; the
    share is of all elements (``<1%`` for a few). A sparkline of the finite
    rest would hide the one thing that matters.
    """
    bad = stats.nonfinite(sample)
    what = "NaN" if sample.nan else "inf"
    share = min(bad / sample.count * 100, 100.0) if sample.count else 100.0
    pct = f"{share:.0f}%" if share >= 1 else "<1%"
    for text in (f"✖ {what} {pct}", f"✖ {what}", "✖"):
        if len(text) <= width:
            return text.center(width)
    return "✖"[:width]


def gauge(fraction: float) -> str:
    """A four-cell near-zero gauge with its percentage, e.g. ``▮▮▯▯  42%``."""
    if math.isnan(fraction):
        return "—".center(GAUGE_W)
    filled = min(4, max(0, round(fraction * 4)))
    return "▮" * filled + "▯" * (4 - filled) + f" {fraction * 100:3.0f}%"


def sci(value: float | None) -> str:
    """A number in the table's fixed-width scientific notation (``1.2e-03``)."""
    if value is None:
        return "—"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.1e}"


def fit_type(type_name: str, width: int) -> str:
    """A module type in ``width`` cells, cut at the end with ``…`` (``NewGELUActi…``)."""
    if len(type_name) <= width:
        return type_name.ljust(width)
    return type_name[: width - 1] + "…"


def fit_path(path: str, indent: int, width: int) -> str:
    """A module path in ``width`` cells, leading components dropped whole (``…h.1.mlp.c_fc``)
    so what is kept reads as names, the block number with them; :func:`fit_name` when even the
    last two components do not fit."""
    parts = path.split(".")
    for start in range(len(parts) - 1):
        text = ("…" if start else "") + ".".join(parts[start:])
        if indent + len(text) <= width:
            return (" " * indent + text).ljust(width)
    return fit_name(path, indent, width)


def fit_name(name: str, indent: int, width: int) -> str:
    """Indent ``name`` and cut it from the left (the tail tells layers apart)."""
    text = " " * indent + name
    if len(text) <= width:
        return text.ljust(width)
    keep = width - indent - 1
    if keep <= 0:
        return ("…" + name[-max(width - 1, 0):])[:width] if width > 0 else ""
    return " " * indent + "…" + name[-keep:]
