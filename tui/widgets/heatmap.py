"""Heatmaps drawn with half-block cells: two pixels per terminal cell.

Each cell prints ``▀`` with the upper pixel's colour as foreground and the
lower pixel's as background, so a 40-line widget shows 80 rows of data. The
colour ramp comes from the theme (``$xray-heat-low`` .. ``$xray-heat-high``);
an empty pixel takes the widget's background, so "nothing here" and "a little
here" stay apart.

:func:`hot_matrix` builds the histogram-over-time ("HOT") matrix of a stream
(x = step, y = histogram bin, value = log(1 + count), as in fastai's
``color_dim``); :class:`Heatmap` draws any matrix with axis labels.
"""

from __future__ import annotations

import math

import numpy as np
from rich.style import Style
from rich.text import Text
from textual.color import Color
from textual.widget import Widget

from probes.protocol import histogram, stats

#: Colours in the ramp; more would not be told apart on a terminal.
LEVELS = 24
HALF = "▀"


def hot_matrix(series: list, max_rows: int, max_cols: int,
               folds: list | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The HOT matrix of ``series`` (list of (step, Sample)), fitted to a size.

    Returns ``(matrix, edges, steps)``: ``matrix[r, c]`` is log(1 + count) of
    row ``r`` (row 0 = the largest values, at the top) at column ``c``;
    ``edges`` the lower value edge of each row from the bottom row up, then
    the top row's upper edge (len rows + 1, ascending); ``steps`` the step of
    each column. The columns cover the whole series (evenly picked when it
    has more samples than ``max_cols``), so the chart spans the same steps
    as the line charts beside it. Only bins that hold a count at some step
    are drawn: the empty stretch between the negative and the positive
    values (a signed log axis runs through 1e-12 .. 1e-1 twice) is folded
    away; ``folds``, when given, receives the row indices (from the bottom)
    below which bins were left out. Adjacent kept bins are summed so the
    rows fit ``max_rows``.
    """
    if max_cols > 0 and len(series) > max_cols:
        picks = np.unique(np.round(np.linspace(0, len(series) - 1, max_cols)).astype(int))
        series = [series[i] for i in picks]
    elif max_cols <= 0:
        series = []
    present = [(st, s) for st, s in series if s.hist.size]
    if not present or max_rows <= 0:
        return np.zeros((0, len(series))), np.zeros(1), [st for st, _ in series]
    lo = min(s.hist_lo for _, s in present)
    hi = max(s.hist_lo + len(s.hist) for _, s in present)
    counts = np.zeros((hi - lo, len(series)))
    for c, (_, s) in enumerate(series):
        if s.hist.size:
            counts[s.hist_lo - lo : s.hist_lo - lo + len(s.hist), c] = s.hist
    kept = np.flatnonzero(counts.sum(axis=1) > 0)  # bins, from the bottom; the empty ones fold away
    counts = counts[kept]
    group = max(1, math.ceil(len(kept) / max_rows))
    pad = (-len(kept)) % group
    bins = lo + kept
    if pad:  # pad on top so the groups line up with the bottom (lowest) bin
        counts = np.vstack([counts, np.zeros((pad, counts.shape[1]))])
    rows = counts.reshape(-1, group, counts.shape[1]).sum(axis=1)
    firsts = bins[::group]  # the lowest bin of each row
    lasts = np.append(bins[group - 1 :: group], bins[-1])[: rows.shape[0]]  # the highest
    edges = np.append(histogram.EDGES[firsts], histogram.EDGES[min(int(lasts[-1]) + 1, histogram.NUM_BINS)])
    if folds is not None:
        # kept index i: a fold between bins[i] and bins[i + 1]; marked when an octave or more is left out
        # (a sparse sample's odd empty bin is not worth a mark on every other line)
        gaps = np.flatnonzero(np.diff(bins) > histogram.BINS_PER_OCTAVE)
        folds[:] = sorted({int((i + 1) // group) for i in gaps})  # the row whose bins start past the gap
    return np.log1p(rows[::-1]), edges, [st for st, _ in series]


def short(value: float) -> str:
    """A tick label of at most 8 cells: ``-1.2e-03``; the zero bin's edges read ``0``."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) <= 2.0**histogram.EXP_LO:
        return "0"
    return f"{value:.1e}"


class Heatmap(Widget):
    """A matrix drawn in half-block cells with a value axis and a step axis.

    Set :attr:`matrix` (rows top to bottom), :attr:`row_labels` (one per text
    line, optional) and :attr:`x_labels` (left and right ends) with
    :meth:`show`; an empty matrix shows :attr:`empty_text`.
    """

    DEFAULT_CSS = """
    Heatmap { height: 1fr; min-height: 4; background: $surface; color: $foreground; }
    """
    GUTTER = 9

    def __init__(self, *, empty_text: str = "no data yet", id: str | None = None) -> None:
        super().__init__(id=id)
        self.matrix = np.zeros((0, 0))
        self.y_top = self.y_bottom = ""
        self.x_labels: tuple[str, str] = ("", "")
        self.empty_text = empty_text
        #: Per matrix column: whether that column's data held NaN or inf. When any
        #: does, the top line is a strip marking those columns in $xray-critical.
        self.flags: list[bool] = []
        self._palette: list[Style] = []
        self._palette_theme = ""

    def show(self, matrix: np.ndarray, *, y_top: str = "", y_bottom: str = "",
             x_labels: tuple[str, str] = ("", ""), empty_text: str | None = None) -> None:
        """Draw ``matrix`` (values >= 0; 0 = empty) with its axis labels."""
        self.matrix = matrix
        self.y_top, self.y_bottom, self.x_labels = y_top, y_bottom, x_labels
        if empty_text is not None:
            self.empty_text = empty_text
        self.refresh()

    def _ramp(self) -> list[Color]:
        """LEVELS colours from the theme's heat variables (low, mid, high)."""
        if self._palette_theme != self.app.theme or not self._palette:
            var = self.app.get_css_variables()
            low, mid, high = (Color.parse(var[f"xray-heat-{k}"]) for k in ("low", "mid", "high"))
            colors = []
            for i in range(LEVELS):
                t = i / (LEVELS - 1)
                colors.append(low.blend(mid, t * 2) if t < 0.5 else mid.blend(high, (t - 0.5) * 2))
            self._palette = colors
            self._palette_theme = self.app.theme
        return self._palette

    def label_for(self, line: int, lines: int) -> str:
        """The value-axis label of text line ``line`` of ``lines`` ("" for none)."""
        return self.y_top if line == 0 else self.y_bottom if line == lines - 1 else ""

    def render(self) -> Text:
        """The matrix resampled to the widget, two rows of data per line."""
        width, height = self.size.width, self.size.height
        plot_w = max(width - self.GUTTER, 1)
        m = self.matrix
        flagged = any(self.flags)
        legend = getattr(self, "legend", False)
        plot_h = max(height - 1 - flagged - legend, 1)  # the last lines hold the step axis (and legend)
        if (m.size == 0 or not np.any(m > 0)) and not flagged:
            return Text(" " + self.empty_text, style="dim")
        if m.size == 0:
            m = np.zeros((1, len(self.flags)))
        # Resample to (2 * plot_h) x plot_w pixels by nearest neighbour.
        rows = np.minimum((np.arange(2 * plot_h) * m.shape[0] / (2 * plot_h)).astype(int), m.shape[0] - 1)
        cols = np.minimum((np.arange(plot_w) * m.shape[1] / plot_w).astype(int), m.shape[1] - 1)
        px = m[np.ix_(rows, cols)]
        top = px.max()
        level = np.where(px > 0, 1 + np.floor(px / max(top, 1e-300) * (LEVELS - 1)).astype(int), 0)
        ramp = self._ramp()
        bg = self.rich_style.bgcolor
        colors = [None] + [c.rich_color for c in ramp] + [ramp[-1].rich_color]
        styles: dict[tuple[int, int], Style] = {}
        out = Text(no_wrap=True, overflow="crop")
        if flagged:
            bad = Style(color=Color.parse(self.app.get_css_variables()["xray-critical"]).rich_color)
            out.append("NaN/inf".rjust(self.GUTTER - 1)[: self.GUTTER - 1] + "┤", style=bad)
            marks = [self.flags[c] if c < len(self.flags) else False for c in cols.tolist()]
            out.append("".join("▄" if f else " " for f in marks), style=bad)
            out.append("\n")
        for line in range(plot_h):
            label = self.label_for(line, plot_h)
            out.append(label.rjust(self.GUTTER - 1)[: self.GUTTER - 1] + self.axis_mark(line, plot_h, rows),
                       style="dim")
            up, down = level[2 * line], level[2 * line + 1]
            for u, d in zip(up.tolist(), down.tolist()):
                st = styles.get((u, d))
                if st is None:
                    st = styles[(u, d)] = Style(color=colors[u] or bg, bgcolor=colors[d] or bg)
                out.append(HALF, st)
            out.append("\n")
        left, right = self.x_labels
        axis = " " * self.GUTTER + left + " " * max(plot_w - len(left) - len(right), 1) + right
        out.append(axis[:width], style="dim")
        if legend:
            out.append("\n")
            out.append_text(self.legend_line(width))
        return out

    def axis_mark(self, line: int, lines: int, rows) -> str:
        """The value axis' character on text line ``line``: ``┤``, or ``≈`` where bins were folded away."""
        return "┤"


class HotChart(Heatmap):
    """The histogram-over-time chart of one stream, fitted to its own size."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.series: list = []
        self._fitted: tuple | None = None
        self._edges = np.zeros(1)
        self._folds: list[int] = []  # matrix rows (from the top) above which empty bins were folded away
        self.legend = True

    def legend_line(self, width: int) -> Text:
        """``colour: count 1 ████ 4,000 (log)``: what a colour means, in the ramp's own colours."""
        top = float(self.matrix.max()) if self.matrix.size else 0.0
        out = Text(" " * self.GUTTER + "count 1 ", style="dim", no_wrap=True, overflow="crop")
        cells = max(min(LEVELS, width - self.GUTTER - 24), 4)
        ramp = self._ramp()
        for i in range(cells):
            out.append("█", Style(color=ramp[min(int(i * LEVELS / cells), LEVELS - 1)].rich_color))
        out.append(f" {math.expm1(top):,.0f} (log)", style="dim")
        return out

    def show_series(self, series: list, *, empty_text: str = "no samples yet") -> None:
        """Draw ``series`` (list of (step, Sample)); the matrix is built at paint time."""
        self.series = series
        self.empty_text = empty_text
        self._fitted = None
        self.refresh()

    def render(self) -> Text:
        """Rebuild the HOT matrix for the current size, then draw it."""
        size = (self.size.width, self.size.height)
        if self._fitted != size:
            self._fitted = size
            rows = max(2 * (size[1] - 2), 2)  # a line each for the step axis and the colour legend
            cols = max(size[0] - self.GUTTER, 1)
            folds: list = []
            matrix, edges, steps = hot_matrix(self.series, rows, cols, folds)
            self.matrix, self._edges = matrix, edges
            self._folds = [matrix.shape[0] - f for f in folds]  # as rows from the top
            self.y_top, self.y_bottom = short(float(edges[-1])), short(float(edges[0]))
            self.x_labels = (f"step {steps[0]}", f"step {steps[-1]}") if steps else ("", "")
            # NaN/inf have no bin: mark their steps on a strip of their own instead of a gap.
            by_step = dict(self.series)
            self.flags = [stats.nonfinite(by_step[st]) > 0 for st in steps]
        return super().render()

    def axis_mark(self, line: int, lines: int, rows) -> str:
        """``≈`` on a line whose pixels cross a fold (empty bins left out between two rows)."""
        if not self._folds:
            return "┤"
        here = set(rows[2 * line : 2 * line + 2].tolist()) if rows is not None else set()
        return "≈" if any(f in here for f in self._folds) else "┤"

    def label_for(self, line: int, lines: int) -> str:
        """The ends, ``0`` on the line that holds zero, and the value at the top of every third line.

        The bins are signed and log-spaced, so a linear guess between two
        end labels would be wrong: more labels are the only honest axis.
        """
        if line == 0 or line == lines - 1:
            return super().label_for(line, lines)
        n = self.matrix.shape[0]
        if n == 0 or len(self._edges) != n + 1:
            return ""
        first = min(int(line * n / lines), n - 1)
        last = max(min(int((line + 1) * n / lines), n), first + 1)
        upper = self._edges[::-1]  # upper[r]: the upper edge of matrix row r (row 0 at the top)
        if any(upper[r + 1] <= 0 <= upper[r] for r in range(first, last)):
            return "0"
        near_end = line >= lines - 2 or line <= 1
        return short(float(upper[first])) if line % 3 == 0 and not near_end else ""
