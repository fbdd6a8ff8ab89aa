"""The layer table's rows for two runs side by side (``xray-tui replay A --vs B``).

A mixin of :class:`~tui.widgets.layer_table.LayerTable`: when the table has
an ``other`` run, every line is drawn here instead (A's and B's weight norms,
their relative change, the histogram distance, gradient norms and update
ratios), from :mod:`tui.compare`'s torch-free measures.
"""

from __future__ import annotations

import math

from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip

from tui import compare as cmp
from tui.state import Row
from tui.widgets.table_cells import BADGES, fit_name, sci
from tui.widgets.table_columns import BADGE_W, NAME_MIN, NUM_W


class CompareRows:
    """Draws the table's lines for two runs; needs the LayerTable's attributes and helpers."""

    def _compare_cols(self, width: int) -> tuple[int, bool]:
        """The name's width and whether the gradient and update columns fit beside the weight ones."""
        fixed = 4 * (NUM_W + 1) + BADGE_W + 1
        more = 4 * (NUM_W + 1)
        full = width - fixed - more >= NAME_MIN + 8
        return max(width - fixed - (more if full else 0), 1), full

    def _compare_line(self, y: int, width: int, base: Style) -> Strip:
        """Line ``y`` of the table in compare mode: the header, or one layer of both runs."""
        name_w, full = self._compare_cols(width)
        if y == 0:
            heads = ["‖W‖ A", "‖W‖ B", "Δ‖W‖", "hist Δ"] + (["‖g‖ A", "‖g‖ B", "upd/w A", "upd/w B"] if full else [])
            text = fit_name("layer (A vs B at the same step)", 0, name_w) + "".join(
                " " + h.rjust(NUM_W) for h in heads) + " " + "status".ljust(BADGE_W)
            return Strip([Segment(text)]).adjust_cell_length(width).apply_style(
                base + self.get_component_rich_style("layer-table--header"))
        pos = round(self.scroll_offset.y) + y - 1
        if pos >= len(self._view):
            return Strip.blank(width, base)
        key = (self._version, width, "compare")
        if key != self._cache_key:
            self._cache, self._cache_key = {}, key
        index = self._view[pos]
        strip = self._cache.get(index)
        if strip is None:
            strip = self._cache[index] = self._compare_strip(self._rows[index], width, name_w, full)
        return strip.apply_style(base + self._style("cursor") if pos == self.cursor else base)

    def _compare_strip(self, row: Row, width: int, name_w: int, full: bool) -> Strip:
        """One layer of both runs: A's and B's figures at A's step shown, and how far apart they are."""
        state, other = self.state, self.other
        step = self.until if self.until is not None else state.step
        other_row = other.rows[other._row_index[row.name]] if row.name in other._row_index else None
        a = {k: state.latest(row, k, self.rank, self.until) for k in ("weight", "grad", "update")}
        b = {k: (other.latest(other_row, k, None, step) if other_row is not None else None)
             for k in ("weight", "grad", "update")}
        sev = self._severity.get(row.name, "ok")
        muted = self._style("muted")
        segs = [Segment(fit_name(row.name, row.depth - self._indent_base, name_w),
                        self._style(sev) if sev in ("warning", "critical") else None)]
        change = cmp.rel_change(cmp.norm(a["weight"]), cmp.norm(b["weight"]))
        dist = cmp.hist_distance(a["weight"], b["weight"])
        big = change is not None and (not math.isfinite(change) or abs(change) >= 0.1)
        cells = [(sci(cmp.norm(a["weight"])), self._style("weight")),
                 (sci(cmp.norm(b["weight"])), self._style("grad")),
                 (cmp.pct(change), self._style("warning") if big else None),
                 ("—" if dist is None else f"{dist * 100:.0f}%",
                  self._style("warning") if dist is not None and dist >= 0.25 else None)]
        if full:
            cells += [(sci(cmp.norm(a["grad"])), None), (sci(cmp.norm(b["grad"])), muted),
                      (sci(a["update"].ratio if a["update"] is not None else None), None),
                      (sci(b["update"].ratio if b["update"] is not None else None), muted)]
        for text, style in cells:
            segs += [Segment(" "), Segment(text.rjust(NUM_W), style)]
        if other_row is None:
            segs += [Segment(" "), Segment("not in B".ljust(BADGE_W), muted)]
        else:
            segs += [Segment(" "), Segment(BADGES[sev].ljust(BADGE_W), self._style("ok" if sev == "info" else sev))]
        return Strip(segs).adjust_cell_length(width)

