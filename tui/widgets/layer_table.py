"""The layer table: one row per watched module, drawn with Textual's Line API.

A single :class:`LayerTable` (a ``ScrollView``) paints only the rows that are
on screen, one :class:`~textual.strip.Strip` per row, cached until the data
version changes. One widget per row (or per sparkline) would cost most of a
core at a few hundred layers; this costs a few numpy calls per visible row per
paint. The app decides when to paint (:meth:`LayerTable.refresh_data`, at a
fixed rate); the table never reads the feed itself.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from probes.protocol import histogram, stats
from probes.protocol.wire import Sample
from tui.state import SEVERITY_RANK, Row, RunState
from tui.widgets.compare_rows import CompareRows
from tui.widgets.trend import BAD, trend_line

#: Eighth blocks, index 0 = empty cell (a bin with no count stays blank).
BLOCKS = " ▁▂▃▄▅▆▇█"
SPARK_KINDS = ("weight", "grad", "act")
SPARK_MIN, SPARK_MAX = 6, 32
#: A trend column (gradient norm, update ratio over the last sampled steps): each cell one step.
TREND_MIN, TREND_MAX = 6, 64
NAME_MIN, NAME_PREF = 16, 36
#: The module type column is at most this wide (longer types are cut).
TYPE_MAX = 12
BADGE_W, NUM_W, GAUGE_W = 6, 7, 9
#: Near-zero share at which an activation counts as dead (DESIGN.md: >= 99%).
DEAD_FRACTION = 0.99
BADGES = {"ok": "✓ ok", "info": "✓ ok", "warning": "▲ warn", "critical": "✖ CRIT"}
#: The badge of a row that holds NaN/inf it did not start: the ``nonfinite`` alert names the
#: origin (``✖ CRIT``); every later layer goes non-finite with it, and reading ``✓ ok`` beside
#: ``✖ NaN 100%`` cells, or ``✖ CRIT`` on all of them, would hide where it began.
AFFECTED = {"NaN": "↳ NaN", "inf": "↳ inf"}
#: Row orders the `s` key cycles through ("model" is the forward-definition order).
SORTS = ("model", "severity", "name", "depth", "grad norm")


@dataclass(frozen=True)
class Columns:
    """Which columns fit in a given width, and how wide each is.

    ``name`` includes the type sub-column (``type`` cells plus two spaces)
    when ``type`` > 0; ``trend`` is the width of each of the two trend
    columns beside ``‖grad‖`` and ``upd/w`` (0: not shown).
    """

    width: int
    name: int
    kinds: tuple[str, ...]
    spark: int
    gauge: bool
    norm: bool
    ratio: bool
    trend: int = 0
    type: int = 0


def plan_columns(width: int, shown: tuple[str, ...] = SPARK_KINDS, *, name_need: int = NAME_PREF,
                 type_w: int = 0) -> Columns:
    """Choose the columns for ``width`` cells, dropping the least useful first.

    Order of sacrifice as the terminal narrows: the weight sparkline, the
    trend columns, the gradient sparkline, the update ratio, the activation
    sparkline, the gauge and the grad norm. The name keeps at least
    ``NAME_MIN`` cells when it can and at most what its longest entry needs
    (``name_need``, type included); every cell beyond goes to the
    sparklines and trends (up to their caps), so a wide terminal shows
    wider pictures, not blank space. ``type_w`` is the longest module type:
    the type shows on every row or on none. ``shown`` are the sparkline
    kinds the user has toggled on.
    """
    configs = [
        (SPARK_KINDS, True, True, True, True),
        (("grad", "act"), True, True, True, True),
        (("grad", "act"), True, True, True, False),
        (("act",), True, True, True, False),
        (("act",), True, True, False, False),
        ((), True, True, False, False),
        ((), False, True, False, False),
        ((), False, False, False, False),
    ]
    for kinds, gauge, norm, ratio, trend in configs:
        kinds = tuple(k for k in kinds if k in shown)
        trends = (norm + ratio) if trend else 0
        fixed = BADGE_W + (GAUGE_W + 1) * gauge + (NUM_W + 1) * norm + (NUM_W + 1) * ratio + 1 + trends
        flex = width - fixed - len(kinds) - (SPARK_MIN * len(kinds)) - TREND_MIN * trends
        if flex < NAME_MIN and (kinds or gauge or norm or ratio):
            continue
        # The name takes what it needs (within the room), the pictures the rest up to their caps.
        name = max(min(max(name_need, NAME_MIN), flex), min(flex, NAME_MIN), 1)
        name = min(name, max(NAME_PREF, int(flex * 0.5)))  # a very long path is cut, not the pictures
        spare = flex - name
        spark, tr = (SPARK_MIN if kinds else 0), (TREND_MIN if trends else 0)
        n_flex = len(kinds) + trends
        if n_flex:
            share = spare // n_flex
            spark = min(SPARK_MAX, spark + share) if kinds else 0
            tr = min(TREND_MAX, tr + share) if trends else 0
            spare -= len(kinds) * (spark - SPARK_MIN if kinds else 0) + trends * (tr - TREND_MIN if trends else 0)
        name += spare
        typ = type_w if type_w and name >= NAME_MIN + 2 + type_w else 0
        return Columns(width, max(name, 1), kinds, spark, gauge, norm, ratio, tr, typ)
    raise AssertionError("unreachable: the last config always fits")


def sparkline(sample: Sample | None, width: int) -> str:
    """The sample's histogram re-binned over [min, max] as ``width`` blocks.

    Heights are scaled to the tallest column; an empty column is a blank so
    that gaps in a distribution stay visible.
    """
    if sample is None or not sample.hist.size:
        return " " * width
    cols = histogram.rebin_linear(sample.hist_lo, sample.hist, sample.min, sample.max, width)
    top = cols.max()
    if top <= 0:
        return " " * width
    idx = np.ceil(cols / top * 8).astype(np.int64)
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


def fit_name(name: str, indent: int, width: int) -> str:
    """Indent ``name`` and cut it from the left (the tail tells layers apart)."""
    text = " " * indent + name
    if len(text) <= width:
        return text.ljust(width)
    keep = width - indent - 1
    if keep <= 0:
        return ("…" + name[-max(width - 1, 0):])[:width] if width > 0 else ""
    return " " * indent + "…" + name[-keep:]


class LayerTable(CompareRows, ScrollView, can_focus=True):
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
        self._nonfinite_origin = False  # a nonfinite alert is active: it names where NaN/inf began
        self._indent_base = 0
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
        # What the name column needs: the longest indented name, and the type column beside it.
        self._type_w = min(max((len(rows[i].type) for i in self._view), default=0), TYPE_MAX)
        self._name_need = max((rows[i].depth - self._indent_base + len(rows[i].name) for i in self._view),
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

    def next_alerting(self) -> Row | None:
        """Move to the next row (after the cursor, wrapping) with an active alert."""
        n = len(self._view)
        rows = self._rows
        for step in range(1, n + 1):
            pos = (self.cursor + step) % n
            if self._severity.get(rows[self._view[pos]].name, "ok") in ("warning", "critical"):
                self.touched = True
                self.cursor = pos
                return rows[self._view[pos]]
        return None

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

    # -- painting ---------------------------------------------------------

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
        if self.rank is not None and len(self.state.hellos) > 1:
            label += f" [rank {self.rank}]"
        if cols.type:
            parts = [fit_name(label, 0, cols.name - cols.type - 2) + "  " + "type".ljust(cols.type)]
        else:
            parts = [fit_name(label, 0, cols.name)]
        parts += [k.center(cols.spark) for k in cols.kinds]
        if cols.gauge:
            parts.append("act ≈ 0".center(GAUGE_W))
        n = self._trend_steps(cols)
        for shown, head in ((cols.norm, "‖grad‖"), (cols.ratio, "upd/w")):
            if shown:
                parts.append(head.rjust(NUM_W))
                if cols.trend:
                    # one cell per sampled step (every N-th training step, as the probe samples)
                    heads = (f"last {n} sampled steps", f"last {n} samples", f"{n} samples", "trend") if n else ("",)
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
            segs = [Segment(fit_name(row.name, indent, cols.name - cols.type - 2), name_style),
                    Segment("  " + fit_type(row.type, cols.type), muted)]
        else:
            segs = [Segment(fit_name(row.name, indent, cols.name), name_style)]
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
