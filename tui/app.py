"""The xray-tui Textual app: a live X-ray of a training run.

Threads: one reader (a Textual thread worker) runs the source's blocking
``batches()`` generator and posts each batch to the app as a message; it
never touches widgets or the :class:`~tui.state.RunState`. The app's own
thread ingests batches (cheap: ring-buffer appends) and marks the view dirty;
a timer repaints at a fixed rate, and only when something changed, so a
burst of data costs one paint, not one per message.
"""

from __future__ import annotations

import threading

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Static

import themes
from tui.feed import FeedError
from tui.state import RunState
from tui.widgets.alerts import AlertList
from tui.widgets.header import HeaderInfo, XRayHeader
from tui.widgets.layer_table import LayerTable

#: Repaints per second; data arriving faster is folded into the next paint.
PAINT_HZ = 4
#: Batches the reader may have posted and the app not yet ingested. Bounds the
#: memory a fast replay can queue up; a live probe drops on its own side.
MAX_IN_FLIGHT = 16


class HelpScreen(ModalScreen[None]):
    """Every key binding, with what it does."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static {
        width: auto; max-width: 90%; height: auto; max-height: 90%;
        padding: 1 2; background: $panel; border: round $primary;
    }
    """
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def __init__(self, lines: list[tuple[str, str]]) -> None:
        super().__init__()
        self.lines = lines

    def compose(self) -> ComposeResult:
        width = max(len(k) for k, _ in self.lines)
        body = "\n".join(f"[b]{k.ljust(width)}[/b]  {d}" for k, d in self.lines)
        yield Static("[b]xray-tui keys[/b]\n\n" + body + "\n\n[dim]escape closes[/dim]")


class XRayApp(App):
    """Shows a run's layers and alerts live from ``source``.

    ``source`` is any object with a ``label`` and a blocking
    ``batches(stop_event)`` generator of message lists (see :mod:`tui.feed`).
    ``state`` (the :class:`RunState`) and ``connection`` are public.
    """

    CSS_PATH = themes.CSS_PATH
    TITLE = "xray-tui"

    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("p", "toggle_pause", "Pause"),
        Binding("slash", "filter", "Filter"),
        Binding("tab", "switch_focus", "Table/alerts", priority=True),
        Binding("n", "next_alert", "Next alert"),
        Binding("question_mark", "help", "Help"),
        Binding("escape", "close_filter", "Close filter", show=False),
    ]

    #: "connecting" | "live" | "run ended" | "disconnected" | "error: ..."
    connection: reactive[str] = reactive("connecting")
    #: While paused the data is still ingested but the table is not repainted.
    paused: reactive[bool] = reactive(False)

    class Batch(Message):
        """Messages the reader thread read, in order."""

        def __init__(self, messages: list) -> None:
            super().__init__()
            self.messages = messages

    class FeedDone(Message):
        """The source's generator returned (``error`` None) or failed."""

        def __init__(self, error: str | None) -> None:
            super().__init__()
            self.error = error

    def __init__(self, source, *, theme: str | None = None, title: str | None = None) -> None:
        super().__init__()
        themes.register(self)
        name = theme or themes.DEFAULT_THEME
        if name not in self.available_themes:
            known = ", ".join(sorted(self.available_themes))
            raise ValueError(f"unknown theme {name!r} (known: {known})")
        self.theme = name
        self.title = title or self.TITLE
        self.source = source
        self.state = RunState()
        self._stop = threading.Event()
        self._slots = threading.Semaphore(MAX_IN_FLIGHT)
        self._dirty = True

    def get_theme_variable_defaults(self) -> dict[str, str]:
        """Values for the ``$xray-*`` variables under themes that lack them."""
        return dict(themes.DEFAULTS)

    # -- layout -----------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield XRayHeader(id="header")
        with Vertical(id="body"):
            yield LayerTable(self.state, id="layers")
            yield AlertList(self.state, id="alerts")
        yield Input(placeholder="filter layers by regex (enter: keep, escape: close)", id="filter")
        yield Footer()

    @property
    def table(self) -> LayerTable:
        """The layer table widget."""
        return self.query_one(LayerTable)

    @property
    def alert_list(self) -> AlertList:
        """The alerts pane widget."""
        return self.query_one(AlertList)

    def on_mount(self) -> None:
        self.table.focus()
        self._paint()
        self.set_interval(1 / PAINT_HZ, self._tick)
        self._read()

    def on_unmount(self) -> None:
        self._stop.set()

    # -- reader thread ----------------------------------------------------

    @work(thread=True, exclusive=True, group="reader", exit_on_error=False)
    def _read(self) -> None:
        """Run the source on this worker thread; hand batches over by message."""
        try:
            for batch in self.source.batches(self._stop):
                # Wait for a free slot, but give up promptly when the app stops.
                while not self._slots.acquire(timeout=0.2):
                    if self._stop.is_set():
                        return
                self.post_message(self.Batch(batch))
                if self._stop.is_set():
                    return
        except FeedError as exc:
            self.post_message(self.FeedDone(str(exc)))
        except Exception as exc:
            # A bug, not bad input: keep the data on screen, say what happened,
            # and let the worker record the traceback in the log.
            self.post_message(self.FeedDone(f"{type(exc).__name__}: {exc}"))
            raise
        else:
            self.post_message(self.FeedDone(None))

    @on(Batch)
    def _ingest(self, event: Batch) -> None:
        try:
            ingest = self.state.ingest
            for msg in event.messages:
                ingest(msg)
        finally:
            self._slots.release()
        if self.connection == "connecting":
            self.connection = "live"
        self._dirty = True

    @on(FeedDone)
    def _feed_done(self, event: FeedDone) -> None:
        if event.error is not None:
            self.connection = f"error: {event.error}"
            self.notify(event.error, title="feed error", severity="error", timeout=10)
        else:
            self.connection = "run ended" if self.state.finished else "disconnected"
        self._paint()

    # -- painting ---------------------------------------------------------

    def _tick(self) -> None:
        if self._dirty:
            self._paint()

    def _paint(self) -> None:
        """Bring every widget up to date with the state (the app's thread only)."""
        self._dirty = False
        table = self.table
        if not self.paused:
            table.refresh_data()
        self.alert_list.refresh_data()
        flt = table.filter.pattern if table.filter is not None else ""
        self.query_one(XRayHeader).show(HeaderInfo.from_state(
            self.state, label=getattr(self.source, "label", ""), connection=self.connection,
            paused=self.paused, layers_shown=len(table.view), filter=flt, title=self.title))

    def watch_connection(self) -> None:
        self._dirty = True

    def watch_paused(self, paused: bool) -> None:
        self._dirty = True
        self.sub_title = "PAUSED" if paused else ""

    # -- actions ----------------------------------------------------------

    def action_toggle_pause(self) -> None:
        """Freeze the table (data keeps arriving) or resume."""
        self.paused = not self.paused
        self._paint()

    def action_filter(self) -> None:
        """Open the name filter."""
        box = self.query_one("#filter", Input)
        box.add_class("visible")
        box.focus()

    def action_close_filter(self) -> None:
        """Hide the filter box; the filter stays applied."""
        box = self.query_one("#filter", Input)
        if box.has_class("visible"):
            box.remove_class("visible")
            self.table.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        import re

        box = event.input
        try:
            self.table.set_filter(event.value)
        except re.error as exc:
            box.add_class("-bad")
            box.border_title = f"bad regex: {exc}"
        else:
            box.remove_class("-bad")
            box.border_title = None
        self._paint()

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self) -> None:
        self.action_close_filter()

    def action_switch_focus(self) -> None:
        """Move the focus between the layer table and the alerts pane."""
        if isinstance(self.screen, HelpScreen):
            return  # tab is a priority binding: do not move focus under the modal
        if self.table.has_focus:
            self.alert_list.focus()
        else:
            self.query_one("#filter", Input).remove_class("visible")
            self.table.focus()

    def action_next_alert(self) -> None:
        """Jump to the next layer with an active warning or critical alert."""
        if self.table.next_alerting() is None:
            self.notify("no layer has an active alert", timeout=3)

    @on(AlertList.Selected)
    def _alert_selected(self, event: AlertList.Selected) -> None:
        name = self.state.row_of(event.alert.layer)
        if self.table.select_layer(name):
            self.table.focus()
        else:
            self.notify(f"layer {name!r} is not in the table", severity="warning", timeout=4)

    def action_help(self) -> None:
        """Show every key binding."""
        lines = [
            ("q", "quit"),
            ("p", "pause / resume the table (data keeps arriving)"),
            ("/", "filter layers by name (regex); enter keeps it, escape closes"),
            ("tab", "switch focus between the layer table and the alerts"),
            ("n", "jump to the next layer with an active alert"),
            ("?", "this help"),
            ("↑ ↓ / j k", "move the cursor"),
            ("pgup pgdn", "move a page"),
            ("home end", "first / last row"),
            ("enter", "(alerts) go to the alert's layer"),
        ]
        self.push_screen(HelpScreen(lines))

    async def action_quit(self) -> None:
        """Stop the reader and exit."""
        self._stop.set()
        self.exit()
