"""The alerts pane: the active alerts, most severe first, then every alert of
the run, newest first, one line each.

Active warnings and criticals are pinned on top (marked ``●``), so the one
critical alert is never pushed out of a small pane by newer warnings; the
history under them is the run's log as it came. Also a Line-API ``ScrollView``: a week-long run can collect thousands of
alerts, and rebuilding an OptionList to put the newest on top would cost
O(alerts) per paint. Enter (or a click) on an alert posts
:class:`AlertList.Selected`; the app moves the layer table to its layer.
"""

from __future__ import annotations

from rich.segment import Segment
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from probes.protocol.wire import JOB_RANK, Alert
from tui.state import RunState

SEVERITY_LABEL = {"info": "INFO", "warning": "WARNING", "critical": "CRITICAL"}
SEVERITY_ORDER = {"info": 0, "warning": 1, "critical": 2}
#: Active alerts pinned on top at most (a run with every layer warning keeps its history in reach).
MAX_PINNED = 50


def alert_text(alert: Alert, *, multi_rank: bool = False, width: int | None = None) -> tuple[str, str, str]:
    """The three parts of an alert line: step, severity label, the rest.

    With ``width`` (the line's cells) a long layer name is cut from the left
    to a third of the line, so the message still shows on a narrow screen
    (the tail of a module path tells layers apart; the detail has it whole).
    """
    step = f"{alert.step:>7}"
    where = ("job " if alert.rank == JOB_RANK else f"r{alert.rank} ") if multi_rank else ""
    layer = alert.layer
    if width is not None:
        cap = max(20, width // 3)
        if len(layer) > cap:
            layer = "…" + layer[-(cap - 1):]
    rest = f"{alert.rule:<12}  {where}{layer}  {alert.message}"
    return step, f"{SEVERITY_LABEL.get(alert.severity, alert.severity.upper()):<8}", rest


class AlertList(ScrollView, can_focus=True):
    """The run's alerts, newest first, with a cursor."""

    COMPONENT_CLASSES = {
        "alert-list--cursor",
        "alert-list--muted",
        "alert-list--info",
        "alert-list--warning",
        "alert-list--critical",
    }

    DEFAULT_CSS = """
    AlertList {
        background: $surface;
        color: $foreground;
        overflow-x: hidden;
    }
    AlertList > .alert-list--cursor { background: $xray-cursor; }
    AlertList > .alert-list--muted { color: $xray-muted; }
    AlertList > .alert-list--info { color: $xray-info; }
    AlertList > .alert-list--warning { color: $xray-warning; text-style: bold; }
    AlertList > .alert-list--critical { color: $xray-critical; text-style: bold; }
    """

    BINDINGS = [
        Binding("left", "app.seek(-1)", "Step back", show=False),
        Binding("right", "app.seek(1)", "Step on", show=False),
        Binding("up,k", "cursor(-1)", "Up", show=False),
        Binding("down,j", "cursor(1)", "Down", show=False),
        Binding("home", "jump(0)", "Newest", show=False),
        Binding("end", "jump(-1)", "Oldest", show=False),
        Binding("enter", "select", "Go to layer"),
    ]

    #: Index of the highlighted alert, 0 = newest.
    cursor: reactive[int] = reactive(0, always_update=True)

    class Selected(Message):
        """The user chose an alert: show its layer."""

        def __init__(self, alert: Alert) -> None:
            super().__init__()
            self.alert = alert

    def __init__(self, state: RunState, *, name: str | None = None, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.state = state
        self._count = 0  # alerts shown as of the last refresh_data
        self._seen = -1  # state.alerts_seen as of the last refresh_data
        # The deque counted at the last refresh_data: a reset state gets a new, shorter
        # one, which must not be indexed with the old count before the next refresh.
        self._alerts = state.alerts
        self._version = 0
        self._cache: dict[int, Strip] = {}
        self._cache_key: tuple = ()
        self._pinned: list[Alert] = []  # active alerts shown on top, as of the last refresh_data
        self._order: list[Alert] = []  # every line's alert, as of the last refresh_data
        self._key: tuple = ()  # what _order was built from
        #: Show the run as it was at this step (a replay's chosen step); None: as it is now.
        self.until: int | None = None
        self.border_title = "alerts"

    def refresh_data(self) -> None:
        """Catch up with the state's alerts, keeping the cursor on its alert."""
        state = self.state
        seen = state.alerts_seen
        if state.alerts is not self._alerts:  # the state was reset (a new run of the same name)
            self._alerts, self._seen, self._count, self.cursor = state.alerts, -1, 0, 0
            self._order, self._pinned = [], []
        pinned = self._active_list()
        key = (seen, self.until, tuple(id(a) for a in pinned))
        if key == self._key:
            return
        self._key = key
        # Keep the cursor on its alert, unless it sits on the first line (then it
        # follows the news); a line that is gone leaves the cursor where it was.
        current = self._order[self.cursor] if 0 < self.cursor < len(self._order) else None
        # The pinned alerts, then the history newest first without them (each alert
        # once). Rebuilt only when an alert came or the step shown moved: O(alerts kept).
        taken = {id(a) for a in pinned}
        history = [a for a in reversed(self._alerts)
                   if id(a) not in taken and (self.until is None or a.step <= self.until)]
        self._pinned = pinned
        self._order = pinned + history
        self._seen = seen
        self._count = len(self._order)
        if current is not None:
            self.cursor = next((i for i, a in enumerate(self._order) if a is current), self.cursor)
        self._changed()

    def _active_list(self) -> list[Alert]:
        """The active warnings and criticals, most severe first, newest first within a severity."""
        active = self.state.active if self.until is None else self.state.active_at(self.until)
        out = [a for a in active.values() if a.severity in ("warning", "critical")]
        out.sort(key=lambda a: (-SEVERITY_ORDER.get(a.severity, 0), -a.step))
        return out[:MAX_PINNED]

    @property
    def pinned(self) -> int:
        """Lines on top that hold the active alerts (the history starts below them)."""
        return len(self._pinned)

    def set_until(self, step: int | None) -> None:
        """Show the alerts as of ``step`` (None: all of them, as they come)."""
        if step != self.until:
            self.until = step
            self.cursor = 0
            self.refresh_data()

    def _changed(self) -> None:
        self.virtual_size = Size(self.scrollable_content_region.width, max(self._count, 1))
        self._version += 1
        active = len(self.state.active if self.until is None else self.state.active_at(self.until))
        total = len(self._order)
        self.border_title = (f"alerts · {active} active (● on top, most severe first) · {total:,} total"
                             if total else "alerts")
        self.refresh()

    def alert_at(self, pos: int) -> Alert | None:
        """The alert on line ``pos`` (0 = the first pinned, or the newest), as of the last refresh."""
        return self._order[pos] if 0 <= pos < len(self._order) else None

    def validate_cursor(self, value: int) -> int:
        return max(0, min(value, self._count - 1)) if self._count else 0

    class Highlighted(Message):
        """The cursor moved: the app shows this alert's full message under the pane."""

    def watch_cursor(self, old: int, new: int) -> None:
        self.post_message(self.Highlighted())
        top = round(self.scroll_offset.y)
        height = max(self.size.height, 1)
        if new < top:
            self.scroll_to(y=new, animate=False, force=True)
        elif new >= top + height:
            self.scroll_to(y=new - height + 1, animate=False, force=True)
        self.refresh()

    def action_cursor(self, delta: int) -> None:
        """Move the cursor by ``delta`` alerts."""
        self.cursor += delta

    def action_jump(self, where: int) -> None:
        """Go to the newest (0) or oldest (-1) alert."""
        self.cursor = 0 if where == 0 else self._count - 1

    def action_select(self) -> None:
        """Post :class:`Selected` for the highlighted alert."""
        alert = self.alert_at(self.cursor)
        if alert is not None:
            self.post_message(self.Selected(alert))

    def _on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is not None:
            self.cursor = round(self.scroll_offset.y) + offset.y
            self.action_select()

    def on_resize(self, event: events.Resize) -> None:
        self.virtual_size = Size(self.scrollable_content_region.width, max(self._count, 1))

    def notify_style_update(self) -> None:
        # Theme changed: cached colours are stale.
        super().notify_style_update()
        self._cache, self._cache_key = {}, ()

    def _style(self, name: str):
        return self.get_component_rich_style(f"alert-list--{name}", partial=True)

    def render_line(self, y: int) -> Strip:
        """One alert line (or the placeholder when there are none)."""
        # The vertical scrollbar takes its cells out of the content region.
        width = self.scrollable_content_region.width
        base = self.rich_style
        if self._count == 0:
            text = "no alerts" if y == 0 else ""
            return Strip([Segment(" " + text if text else "", self._style("muted"))]).adjust_cell_length(width).apply_style(base)
        pos = round(self.scroll_offset.y) + y
        if pos >= self._count:
            return Strip.blank(width, base)
        key = (self._version, width)
        if key != self._cache_key:
            self._cache, self._cache_key = {}, key
        strip = self._cache.get(pos)
        if strip is None:
            alert = self.alert_at(pos)
            if alert is None:  # dropped from the oldest end since the last refresh
                return Strip.blank(width, base)
            step, sev, rest = alert_text(alert, multi_rank=self.state.world_size > 1, width=width)
            mark = "●" if pos < len(self._pinned) else " "
            strip = Strip([
                Segment(step, self._style("muted")),
                Segment(" "),
                Segment(mark, self._style(alert.severity)),
                Segment(" "),
                Segment(sev, self._style(alert.severity)),
                Segment("  "),
                Segment(rest),
            ]).adjust_cell_length(width)
            self._cache[pos] = strip
        if pos == self.cursor and self.has_focus:
            return strip.apply_style(base + self._style("cursor"))
        return strip.apply_style(base)

    def on_focus(self) -> None:
        self.refresh()
        self.post_message(self.Highlighted())

    def on_blur(self) -> None:
        self.refresh()


def full_message(alert: Alert | None, *, multi_rank: bool = False) -> str:
    """Everything an alert says, for the line under the pane (wrapped there, never cut)."""
    if alert is None:
        return ""
    where = f" · rank {alert.rank}" if multi_rank else ""
    return (f"{SEVERITY_LABEL.get(alert.severity, alert.severity.upper())} {alert.rule} at step {alert.step}"
            f"{where} · {alert.layer} ({alert.kind}): {alert.message}")
