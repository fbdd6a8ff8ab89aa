"""The layer table: one row per watched module, drawn with Textual's Line API.

A single :class:`LayerTable` (a ``ScrollView``) paints only the rows that are
on screen, one :class:`~textual.strip.Strip` per row, cached until the data
version changes. One widget per row (or per sparkline) would cost most of a
core at a few hundred layers; this costs a few numpy calls per visible row per
paint. The app decides when to paint (:meth:`LayerTable.refresh_data`, at a
fixed rate); the table never reads the feed itself.

This module is the widget: the rows in view (filter, sort, rank, step),
the cursor and the strip cache. Its lines are drawn by
:mod:`tui.widgets.table_rows` (one run) and :mod:`tui.widgets.compare_rows`
(two), from the cells of :mod:`tui.widgets.table_cells` laid out by
:mod:`tui.widgets.table_columns`.
"""

from __future__ import annotations

import math
import re

from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from probes.protocol import stats
from tui.state import Row, RunState
from tui.state_views import SEVERITY_RANK
from tui.widgets.compare_rows import CompareRows
from tui.widgets.table_columns import NAME_PREF, SPARK_KINDS, TYPE_MAX
from tui.widgets.table_rows import TableRows

#: Row orders the `s` key cycles through ("model" is the forward-definition order).
SORTS = ("model", "severity", "name", "depth", "grad norm")


class LayerTable(TableRows, CompareRows, ScrollView, can_focus=True):
    """Every layer of the run, one line each, with a sticky column header."""

    COMPONENT_CLASSES = {
        "layer-table--header",
        "layer-table--cursor",
        "layer-table--muted",
        "layer-table--weight",
        "layer-table--grad",
        "layer-table--act",
        "layer-table--ok",
        "layer-table--warning",
        "layer-table--critical",
        "layer-table--dead",
    }

    DEFAULT_CSS = """
    LayerTable {
        background: $surface;
        color: $foreground;
        overflow-x: hidden;
    }
    LayerTable > .layer-table--header { background: $panel; color: $foreground; text-style: bold; }
    LayerTable > .layer-table--cursor { background: $xray-cursor; }
    LayerTable:focus > .layer-table--cursor { background: $xray-cursor; text-style: bold; }
    LayerTable > .layer-table--muted { color: $xray-muted; }
    LayerTable > .layer-table--weight { color: $xray-weight; }
    LayerTable > .layer-table--grad { color: $xray-grad; }
    LayerTable > .layer-table--act { color: $xray-act; }
    LayerTable > .layer-table--ok { color: $xray-ok; }
    LayerTable > .layer-table--warning { color: $xray-warning; text-style: bold; }
    LayerTable > .layer-table--critical { color: $xray-critical; text-style: bold; }
    LayerTable > .layer-table--dead { color: $xray-dead; text-style: bold; }
    """

    BINDINGS = [
        Binding("left", "app.seek(-1)", "Step back", show=False),
        Binding("right", "app.seek(1)", "Step on", show=False),
        Binding("up,k", "cursor(-1)", "Up", show=False),
        Binding("down,j", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "jump(0)", "First layer", show=False),
        Binding("end", "jump(-1)", "Last layer", show=False),
    ]

    #: Index of the highlighted row within the (filtered) view.
    cursor: reactive[int] = reactive(0, always_update=True, layout=False)

    def __init__(self, state: RunState, *, name: str | None = None, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.state = state
        self.filter: re.Pattern | None = None
        self._view: list[int] = []  # indices into self._rows that pass the filter
        # The row list the view was built from. The state may replace its rows (a new
        # run of the same name resets it) between two paints; until the next rebuild
        # every lookup goes through this list, never a newer, shorter one.
        self._rows: list[Row] = []
        self._rows_seen: tuple[int, int] = (0, 0)  # (id(rows), len(rows)) the view was built from
        self._version = 0
        self._cache: dict[int, Strip] = {}  # row index -> unstyled strip at _version
        self._cache_key: tuple = ()
        self._severity: dict[str, str] = {}  # row name -> worst active severity
        self._alerting: list[str] = []  # rows the active alerts name, in alert order
        self._nonfinite_origin = False  # a nonfinite alert is active: it names where NaN/inf began
        self._indent_base = 0
        self._labels: dict[str, str] = {}  # row name -> the name it shows (see label)
        self._name_need, self._type_w = NAME_PREF, 0
        #: Row order, one of :data:`SORTS`.
        self.sort = "model"
        #: Sparkline kinds toggled on (the width may still drop some).
        self.shown: tuple[str, ...] = SPARK_KINDS
        #: Rank whose samples are shown; None merges every rank.
        self.rank: int | None = None
        #: Show no sample newer than this step (the app's pause); None: the newest.
        self.until: int | None = None
        #: The user moved the cursor: the table no longer brings failing rows into view.
        self.touched = False
        #: A second run shown beside this one (``replay A --vs B``); None: one run.
        self.other: RunState | None = None

    # -- data -------------------------------------------------------------

    @property
    def view(self) -> list[Row]:
        """The rows shown, in order (after the filter)."""
        rows = self._rows
        return [rows[i] for i in self._view]

    @property
    def cursor_row(self) -> Row | None:
        """The highlighted row, if any."""
        if not self._view:
            return None
        return self._rows[self._view[min(self.cursor, len(self._view) - 1)]]

    def label(self, row: Row) -> str:
        """The name ``row`` shows in the table: relative to the row above it that is its
        ancestor in model order (``attn.c_attn`` under ``transformer.h.0``), else its full path."""
        return self._labels.get(row.name, row.name)

    def severity(self, row: Row) -> str:
        """Worst active severity of ``row`` as of the last data refresh."""
        return self._severity.get(row.name, "ok")

    def refresh_data(self) -> None:
        """Take the state's current contents: new version, repaint visible rows.

        Called by the app at its paint rate, never from a reader thread.
        """
        state = self.state
        sev: dict[str, str] = {}
        # A replay's chosen step (or a pause) shows the alerts that were active then.
        active = state.active if self.until is None else state.active_at(self.until)
        for (_, layer, _, _), alert in active.items():
            name = state.row_of(layer)
            if SEVERITY_RANK[alert.severity] > SEVERITY_RANK[sev.get(name, "ok")]:
                sev[name] = alert.severity
        self._severity = sev
        # The rows the active alerts name, the earliest alert first (ties in arrival order): the
        # alert that fired first is the likeliest origin (an exploding c_fc before its block's
        # output, which the table lists above it). `n` follows this order, not the table's.
        named = sorted((a for a in active.values() if a.severity in ("warning", "critical")),
                       key=lambda a: a.step)
        self._alerting = list(dict.fromkeys(state.row_of(a.layer) for a in named))
        # A NaN's origin is the row its active nonfinite alert names; with one active, other
        # rows holding NaN/inf are marked affected, not critical (see AFFECTED).
        self._nonfinite_origin = any(a.rule == "nonfinite" for a in active.values())
        # Data-driven orders move rows as the data changes: re-sort each paint.
        if (id(state.rows), len(state.rows)) != self._rows_seen or self.sort in ("severity", "grad norm"):
            self._rebuild_view()
        self._keep_failing_in_view()
        self._version += 1
        self.refresh()

    def _keep_failing_in_view(self) -> None:
        """Until the user moves the cursor, bring the first failing row into view when none is.

        On a small terminal the broken layer can sit below the fold; the
        cursor goes to the first critical row (else the first warning) once
        no failing row is on screen. A cursor the user moved stays put.
        """
        if self.touched or not self._severity or not self._view or self.size.height < 2:
            return  # (not laid out yet: every row would look off screen)
        top = round(self.scroll_offset.y)
        body = max(self.size.height - 1, 1)
        rows = self._rows
        failing = [pos for pos, i in enumerate(self._view) if self._severity.get(rows[i].name, "ok")
                   in ("warning", "critical")]
        if not failing or any(top <= pos < top + body for pos in failing):
            return
        crit = [pos for pos in failing if self._severity[rows[self._view[pos]].name] == "critical"]
        self.cursor = (crit or failing)[0]

    def set_filter(self, pattern: str) -> None:
        """Show only rows whose name matches ``pattern`` (a case-insensitive regex).

        Raises ``re.error`` for a bad pattern and then keeps the old filter.
        """
        self.filter = re.compile(pattern, re.IGNORECASE) if pattern else None
        self._rebuild_view()
        self._version += 1
        self.refresh()

    def set_sort(self, sort: str) -> None:
        """Order rows by one of :data:`SORTS`; the cursor stays on its layer."""
        if sort not in SORTS:
            raise ValueError(f"unknown sort {sort!r} (known: {', '.join(SORTS)})")
        self.sort = sort
        self._changed()

    def set_shown(self, kinds: tuple[str, ...]) -> None:
        """Show the sparklines of ``kinds`` only (in the fixed column order)."""
        self.shown = tuple(k for k in SPARK_KINDS if k in kinds)
        self._changed()

    def set_rank(self, rank: int | None) -> None:
        """Show one rank's samples, or None for every rank merged."""
        self.rank = rank
        self._changed()

    def set_until(self, step: int | None) -> None:
        """Freeze the rows at ``step`` (samples after it are kept but not shown), or None to follow the run."""
        self.until = step
        self._changed()

    def _changed(self) -> None:
        self._rebuild_view()
        self._version += 1
        self.refresh()

    def _grad_norm(self, row: Row) -> float:
        g = self.state.latest(row, "grad", self.rank, self.until)
        if g is None:
            return -1.0
        v = stats.l2(g)
        return math.inf if math.isnan(v) or stats.nonfinite(g) else v

    def _order(self, rows: list[Row], indices: list[int]) -> list[int]:
        if self.sort == "severity":
            sev = self._severity
            return sorted(indices, key=lambda i: -SEVERITY_RANK[sev.get(rows[i].name, "ok")])
        if self.sort == "name":
            return sorted(indices, key=lambda i: rows[i].name)
        if self.sort == "depth":
            return sorted(indices, key=lambda i: rows[i].depth)
        if self.sort == "grad norm":
            return sorted(indices, key=lambda i: -self._grad_norm(rows[i]))
        return indices  # model order; sorted() above is stable, so ties keep it too

    def _rebuild_view(self) -> None:
        current = self.cursor_row.name if self._view else None
        rows = self.state.rows
        self._rows = rows
        self._rows_seen = (id(rows), len(rows))
        flt = self.filter
        self._view = self._order(rows, [i for i, r in enumerate(rows) if flt is None or flt.search(r.name)])
        # Indent relative to the shallowest row so a flat model is not pushed right.
        self._indent_base = min((rows[i].depth for i in self._view), default=0)
        self._labels = relative_labels([rows[i].name for i in self._view]) if self.sort == "model" else {}
        # What the name column needs: the longest indented label, and the type column beside it.
        self._type_w = min(max((len(rows[i].type) for i in self._view), default=0), TYPE_MAX)
        self._name_need = max((rows[i].depth - self._indent_base + len(self.label(rows[i])) for i in self._view),
                              default=0) + (2 + self._type_w if self._type_w else 0)
        self.virtual_size = Size(self.scrollable_content_region.width, len(self._view) + 1)
        names = [rows[i].name for i in self._view]
        self.cursor = names.index(current) if current in names else min(self.cursor, max(len(names) - 1, 0))

    # -- cursor -----------------------------------------------------------

    def select_layer(self, name: str) -> bool:
        """Move the cursor to the row called ``name``; clear a filter that hides it.

        Returns False when the run has no such row.
        """
        rows = self._rows
        for pos, i in enumerate(self._view):
            if rows[i].name == name:
                self.touched = True
                self.cursor = pos
                return True
        if self.filter is not None and any(r.name == name for r in rows):
            self.set_filter("")
            return self.select_layer(name)
        return False

    def _alerting_positions(self) -> list[int]:
        """View positions of the rows active alerts name, in alert order (see refresh_data)."""
        where = {self._rows[i].name: pos for pos, i in enumerate(self._view)}
        return [where[name] for name in self._alerting if name in where]

    def next_alerting(self) -> Row | None:
        """Move to the next row an active alert names, in alert order (the earliest first),
        wrapping; the first press goes to the first alert's layer, even when the table had
        already brought the cursor there on its own."""
        targets = self._alerting_positions()
        if not targets:
            return None
        pos = (targets[(targets.index(self.cursor) + 1) % len(targets)]
               if self.touched and self.cursor in targets else targets[0])
        self.touched = True
        self.cursor = pos
        return self._rows[self._view[pos]]

    def validate_cursor(self, value: int) -> int:
        return max(0, min(value, len(self._view) - 1)) if self._view else 0

    def watch_cursor(self, old: int, new: int) -> None:
        self._scroll_to_cursor()
        self.refresh()

    def _scroll_to_cursor(self) -> None:
        body = max(self.size.height - 1, 1)  # lines under the sticky header
        top = round(self.scroll_offset.y)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, force=True)
        elif self.cursor >= top + body:
            self.scroll_to(y=self.cursor - body + 1, animate=False, force=True)

    def action_cursor(self, delta: int) -> None:
        """Move the cursor by ``delta`` rows."""
        self.touched = True
        self.cursor += delta

    def action_page(self, direction: int) -> None:
        """Move the cursor by one screenful."""
        self.touched = True
        self.cursor += direction * max(self.size.height - 2, 1)

    def action_jump(self, where: int) -> None:
        """Go to the first (0) or last (-1) row."""
        self.touched = True
        self.cursor = 0 if where == 0 else len(self._view) - 1

    def _on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is not None and offset.y >= 1:
            self.touched = True
            self.cursor = round(self.scroll_offset.y) + offset.y - 1

    def on_resize(self, event: events.Resize) -> None:
        self.virtual_size = Size(self.scrollable_content_region.width, len(self._view) + 1)
        self._scroll_to_cursor()
        # A recording is often read in before the table has its size: look again now that it has one.
        self._keep_failing_in_view()

    def notify_style_update(self) -> None:
        # A theme change alters every colour: drop the cached strips.
        super().notify_style_update()
        self._cache = {}
        self._cache_key = ()


def relative_labels(names: list[str]) -> dict[str, str]:
    """Each name relative to the nearest earlier name that is its ancestor (a module path
    prefix followed by a dot), for rows listed in model order; names without one are left out.

    The tree's indentation already says which block a row is in, so the row need not repeat
    it: at 80 columns the full paths were cut from the left and the block number was lost."""
    out: dict[str, str] = {}
    stack: list[str] = []
    for name in names:
        while stack and not name.startswith(stack[-1] + "."):
            stack.pop()
        if stack:
            out[name] = name[len(stack[-1]) + 1:]
        stack.append(name)
    return out
