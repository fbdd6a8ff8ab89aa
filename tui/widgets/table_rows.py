"""The layer table's lines: its header and one strip per row, coloured by meaning.

A mixin of :class:`~tui.widgets.layer_table.LayerTable` (as
:class:`~tui.widgets.compare_rows.CompareRows` is for two runs): the widget
keeps the view, the cursor and the strip cache; this draws what a line
shows from the state's newest samples at the table's rank and step.
"""

from __future__ import annotations

import math

from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip

from probes.protocol import stats
from tui.state import Row
from tui.widgets.table_cells import (AFFECTED, BADGES, DEAD_FRACTION, fit_name, fit_path, fit_type, gauge,
                                     nonfinite_cell, sci, sparkline)
from tui.widgets.table_columns import BADGE_W, GAUGE_W, NUM_W, Columns, plan_columns
from tui.widgets.trend import BAD, trend_line


class TableRows:
    """Draws the table's lines for one run; needs the LayerTable's view, cache and settings."""

    def _style(self, name: str) -> Style:
        return self.get_component_rich_style(f"layer-table--{name}", partial=True)

    def render_line(self, y: int) -> Strip:
        """Line ``y`` of the viewport: the header, or one row from the cache."""
        # The vertical scrollbar takes its cells out of the content region.
        width = self.scrollable_content_region.width
        base = self.rich_style
        cols = self.columns(width)
        if self.other is not None:
            return self._compare_line(y, width, base)
        if y == 0:
            return self._header(cols).apply_style(base + self.get_component_rich_style("layer-table--header"))
        pos = round(self.scroll_offset.y) + y - 1
        if pos >= len(self._view):
            return Strip.blank(width, base)
        key = (self._version, width, self.shown)
        if key != self._cache_key:
            self._cache, self._cache_key = {}, key
        index = self._view[pos]
        strip = self._cache.get(index)
        if strip is None:
            strip = self._cache[index] = self._row_strip(self._rows[index], cols)
        if pos == self.cursor:
            return strip.apply_style(base + self._style("cursor"))
        return strip.apply_style(base)

    def columns(self, width: int | None = None) -> Columns:
        """The column plan for ``width`` cells (default: the table's content width)."""
        if width is None:
            width = self.scrollable_content_region.width
        return plan_columns(width, self.shown, name_need=self._name_need, type_w=self._type_w)

    def _header(self, cols: Columns) -> Strip:
        label = "layer" if self.sort == "model" else f"layer ↓{self.sort}"
        row = self.cursor_row
        if row is not None and self.label(row) != row.name:
            label = row.name  # rows show names relative to their parent: the header has the full path
        if self.rank is not None and len(self.state.hellos) > 1:
            label += f" [rank {self.rank}]"
        fit = fit_path if row is not None and label == row.name else fit_name
        if cols.type and fit is fit_path and len(label) > cols.name - cols.type - 2:
            parts = [fit_path(label, 0, cols.name)]  # the path over the "type" heading: it says more
        elif cols.type:
            parts = [fit(label, 0, cols.name - cols.type - 2) + "  " + "type".ljust(cols.type)]
        else:
            parts = [fit(label, 0, cols.name)]
        parts += [k.center(cols.spark) for k in cols.kinds]
        if cols.gauge:
            parts.append("act ≈ 0".center(GAUGE_W))
        n = self._trend_steps(cols)
        for shown, head in ((cols.norm, "‖grad‖"), (cols.ratio, "upd/w")):
            if shown:
                parts.append(head.rjust(NUM_W))
                if cols.trend:
                    # one cell per sampled step (every N-th training step, as the probe samples)
                    # before any sample a count would read as samples received ("‖grad‖ 13 samples")
                    heads = ((f"last {n} sampled steps", f"last {n} samples", f"{n} samples", "trend")
                             if n and self.state.samples_seen else ("trend",) if n else ("",))
                    parts.append(next((h for h in heads if len(h) <= cols.trend), "").ljust(cols.trend))
        parts.append("status".ljust(BADGE_W))
        return Strip([Segment(" ".join(parts))]).adjust_cell_length(cols.width)

    def _trend_steps(self, cols: Columns) -> int:
        """How many sampled steps a trend cell row covers: the ring's depth, at most one per cell."""
        depth = self.state.stream_depth or self.state.depth
        return min(cols.trend, depth) if cols.trend else 0

    def _trend_segments(self, row: Row, kind: str, cols: Columns) -> list[Segment]:
        """One trend column: the newest values of ``kind``'s norm or ratio, one cell per sampled step."""
        values = self.state.trend(row, kind, cols.trend, self.rank, self.until)
        line = trend_line(values, cols.trend)
        style = self._style("critical") if BAD in line else self._style("grad" if kind == "grad" else "weight")
        return [Segment(" "), Segment(line, style)]

    def _row_strip(self, row: Row, cols: Columns) -> Strip:
        """The segments of one row, coloured by meaning but without a background."""
        state = self.state
        muted = self._style("muted")
        sev = self._severity.get(row.name, "ok")
        latest = {k: state.latest(row, k, self.rank, self.until) for k in ("weight", "grad", "act", "update")}
        badge = BADGES[sev]
        bad = [x for x in latest.values() if x is not None and stats.nonfinite(x) > 0]
        if bad and sev != "critical":
            if self._nonfinite_origin:
                # Another row is where it began (its alert says so): this one is collateral.
                badge = AFFECTED["NaN" if any(x.nan for x in bad) else "inf"]
            else:
                # No active nonfinite alert (the rule is off for it, or none came yet): nobody
                # can tell where it began, and NaN/inf cells never read as fine.
                badge = BADGES["critical"]
            sev = "critical"
        name_style = self._style(sev) if sev in ("warning", "critical") else None
        indent = row.depth - self._indent_base
        if cols.type:
            # The type in a column of its own on every row (or on none): "0  Linear" says more
            # than "0", and a type that shows on some rows only reads as a difference between them.
            segs = [Segment(fit_name(self.label(row), indent, cols.name - cols.type - 2), name_style),
                    Segment("  " + fit_type(row.type, cols.type), muted)]
        else:
            segs = [Segment(fit_name(self.label(row), indent, cols.name), name_style)]
        critical = self._style("critical")
        for kind in cols.kinds:
            s = latest[kind]
            if s is not None and stats.nonfinite(s) > 0:
                segs += [Segment(" "), Segment(nonfinite_cell(s, cols.spark), critical)]
            else:
                segs += [Segment(" "), Segment(sparkline(s, cols.spark), self._style(kind))]
        if cols.gauge:
            act = latest["act"]
            if act is not None and stats.nonfinite(act) > 0:
                segs += [Segment(" "), Segment(nonfinite_cell(act, GAUGE_W), critical)]
            else:
                frac = stats.fraction(act.near_zero, act) if act is not None else math.nan
                style = self._style("dead") if frac >= DEAD_FRACTION else (muted if math.isnan(frac) else None)
                segs += [Segment(" "), Segment(gauge(frac), style)]
        if cols.norm:
            g = latest["grad"]
            bad = g is not None and stats.nonfinite(g) > 0
            text = sci(stats.l2(g) if g is not None else None)
            segs += [Segment(" "), Segment(text.rjust(NUM_W), self._style("critical") if bad else None)]
            if cols.trend:
                segs += self._trend_segments(row, "grad", cols)
        if cols.ratio:
            u = latest["update"]
            segs += [Segment(" "), Segment(sci(u.ratio if u is not None else None).rjust(NUM_W))]
            if cols.trend:
                segs += self._trend_segments(row, "update", cols)
        segs += [Segment(" "), Segment(badge.ljust(BADGE_W), self._style("ok" if sev == "info" else sev))]
        return Strip(segs).adjust_cell_length(cols.width)
