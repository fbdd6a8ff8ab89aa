"""The xray-tui Textual app: a live X-ray of a training run.

Threads: one reader (a Textual thread worker) runs the source's blocking
``batches()`` generator and posts each batch to the app as a message; it
never touches widgets or the :class:`~tui.state.RunState`. The app's own
thread ingests batches (cheap: ring-buffer appends) and marks the view dirty;
a timer repaints at a fixed rate, and only when something changed, so a
burst of data costs one paint, not one per message.

What the keys do is :mod:`tui.keys` (and :mod:`tui.timeline` for a
replay's), the help screen :mod:`tui.help`; this module keeps the App:
its layout, the reader, ingesting, painting and the messages its widgets send.
"""

from __future__ import annotations

import re
import threading
import time

from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Footer, Input, Static

import themes
from probes.protocol import wire
from tui.app_notify import AppNotifications
from tui.chooser import ChooserScreen
from tui.detail import DetailScreen
from tui.feed import FeedError
from tui.keys import KeyActions
from tui.not_a_probe import on_status
from tui.reattach import Status, _short
from tui.state import RunState
from tui.timeline import ReplayTimeline
from tui.widgets.alerts import AlertList, full_message
from tui.widgets.header import HeaderInfo, XRayHeader
from tui.widgets.layer_table import LayerTable

#: Repaints per second; data arriving faster is folded into the next paint.
PAINT_HZ = 4
#: Batches the reader may have posted and the app not yet ingested. Bounds the
#: memory a fast replay can queue up; a live probe drops on its own side.
MAX_IN_FLIGHT = 16

#: Actions that act on the main screen's table, filter or alerts: off (and out of the
#: footer) while another screen is on top, where they would change what nobody sees.
MAIN_SCREEN_ACTIONS = frozenset({"detail", "filter", "close_filter", "cycle_sort", "next_alert",
                                 "toggle_kind", "switch_focus"})

#: The replay timeline's actions (off in a live run).
REPLAY_ACTIONS = frozenset({"seek", "seek_end", "goto"})
#: Samples per stream a replay keeps while the memory budget allows (a live view keeps DEPTH).
REPLAY_DEPTH = 4096

#: Below this many columns x lines the app shows a message instead of the views.
MIN_SIZE = (60, 15)


class XRayApp(KeyActions, ReplayTimeline, App):
    """Shows a run's layers and alerts live from ``source``.

    ``source`` is any object with a ``label`` and a blocking
    ``batches(stop_event)`` generator of message lists (see :mod:`tui.feed`);
    batches may carry :class:`tui.reattach.Status` items, and a source with
    ``needs_choice()`` true gets the run chooser first.
    ``state`` (the :class:`RunState`) and ``connection`` are public.
    ``notify_on`` (a severity; None: off, as tests and benchmarks want it; the
    CLI passes ``critical`` unless ``--no-notify``) turns on the notifications
    of :mod:`tui.app_notify`, at most one per rule and layer per ``notify_interval`` seconds.
    """

    CSS_PATH = themes.CSS_PATH
    TITLE = "xray-tui"

    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("enter", "detail", "Detail"),
        Binding("slash", "filter", "Filter"),
        Binding("s", "cycle_sort", "Sort"),
        Binding("n", "next_alert", "Next alert"),
        Binding("p", "toggle_pause", "Pause"),
        Binding("r", "cycle_rank", "Rank", show=False),
        Binding("t", "cycle_theme", "Theme", show=False),
        Binding("e", "request_spectral", "Spectral pass", show=False),
        Binding("tab", "switch_focus", "Table/alerts", priority=True, show=False),
        Binding("1", "toggle_kind('weight')", "Weight col", show=False),
        Binding("2", "toggle_kind('grad')", "Grad col", show=False),
        Binding("3", "toggle_kind('act')", "Act col", show=False),
        Binding("S", "screenshot_svg", "Screenshot", show=False),
        Binding("N", "toggle_notify", "Notifications", show=False),
        Binding("escape", "close_filter", "Close filter", show=False),
        # the replay timeline (off, and out of the footer, in a live run)
        Binding("left", "seek(-1)", "Step back", show=False),
        Binding("right", "seek(1)", "Step on", show=False),
        Binding("left_square_bracket", "seek(-10)", "10 back", show=False),
        Binding("right_square_bracket", "seek(10)", "10 on", show=False),
        Binding("less_than_sign", "seek_end(0)", "First step", show=False),
        Binding("greater_than_sign", "seek_end(-1)", "Last step", show=False),
        Binding("colon", "goto", "Go to step"),
    ]

    #: "connecting" | "live" | "run ended" | "disconnected" | "error: ..." or a
    #: :class:`~tui.reattach.Status` text such as "disconnected — retrying".
    connection: reactive[str] = reactive("connecting")
    #: While paused the data is still ingested but the views are not repainted.
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

    def __init__(self, source, *, theme: str | None = None, title: str | None = None,
                 screenshot_dir: str | None = None, replay: bool = False, other: RunState | None = None,
                 other_label: str = "", notify_on: str | None = None,
                 notify_interval: float | None = None) -> None:
        super().__init__()
        themes.register(self)
        name = theme or themes.DEFAULT_THEME
        if name not in self.available_themes:
            known = ", ".join(sorted(self.available_themes))
            raise ValueError(f"unknown theme {name!r} (known: {known})")
        self.theme = name
        self.title = title or self.TITLE
        self.source = source
        #: A recording: the timeline keys seek in it and the header says "step S of N (replay)".
        self.replay = replay
        # A replay keeps more of each stream (within the same memory budget) so it can seek far back.
        self.state = RunState(depth=REPLAY_DEPTH, track_steps=True) if replay else RunState()
        #: The replay's chosen step; None follows the newest step read.
        self.replay_at: int | None = None
        #: A second recording shown beside this one (``replay A --vs B``), and its name.
        self.other, self.other_label = other, other_label
        #: Where `S` writes screenshots; None: $XRAY_TUI_SCREENSHOTS, else the working directory.
        self.screenshot_dir = screenshot_dir
        self._stop = threading.Event()
        self._slots = threading.Semaphore(MAX_IN_FLIGHT)
        # batches posted (reader thread) and ingested (app thread): one writer each, so no update is
        # lost between threads; the reader is ahead while they differ
        self._posted = self._ingested = 0
        self._painted_at = 0.0
        self._dirty = True
        self._sized = None
        self._shown_step = -1  # the run's step at the last repaint of the views
        self._asked = False  # a request went to the probe and its answer is awaited
        self._alert_text: str | None = None  # the full alert message shown under the alerts pane
        #: toasts and desktop notifications of new alerts and of the run's end (tui.app_notify)
        self.notifications = AppNotifications(self, min_severity=notify_on, replay=replay,
                                              **({} if notify_interval is None else {"interval": notify_interval}))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Main-screen actions only on the main screen, the timeline only in a replay, pause
        only in a live run (the footer then lists only what works)."""
        if action in MAIN_SCREEN_ACTIONS and self.screen is not self.screen_stack[0]:
            return False
        if action in REPLAY_ACTIONS and not self.replay:
            return False
        if action == "toggle_pause" and self.replay:
            return False  # a recording sends nothing new: the timeline is how it moves
        return True

    def get_theme_variable_defaults(self) -> dict[str, str]:
        """Values for the ``$xray-*`` variables under themes that lack them."""
        return dict(themes.DEFAULTS)

    # -- layout -----------------------------------------------------------

    def compose(self) -> ComposeResult:
        self._header = XRayHeader(id="header")
        self._table = LayerTable(self.state, id="layers")
        self._table.other = self.other
        self._alerts = AlertList(self.state, id="alerts")
        yield self._header
        with Vertical(id="body"):
            yield self._table
            yield self._alerts
            yield Static(id="alert-message", markup=False)
        yield Static(id="too-small")
        yield Input(placeholder="filter layers by regex (enter: keep, escape: close)", id="filter")
        yield Input(placeholder="go to step (enter: go, escape: close)", id="goto", type="integer")
        yield Footer(compact=True)

    @property
    def table(self) -> LayerTable:
        """The layer table widget (on the main screen, whichever screen is on top)."""
        return self._table

    @property
    def alert_list(self) -> AlertList:
        """The alerts pane widget."""
        return self._alerts

    def on_mount(self) -> None:
        self.table.focus()
        self._check_size()
        self._paint()
        self.set_interval(1 / PAINT_HZ, self._tick)
        needs_choice = getattr(self.source, "needs_choice", None)
        if needs_choice is not None and needs_choice():
            self.connection = "choose a run"
            self.push_screen(ChooserScreen(self.source.runs()), self._chosen)
        else:
            self._read()

    def _chosen(self, name: str | None) -> None:
        if name is None:
            self.exit()
            return
        self.source.choose(name)
        self.connection = "connecting"
        self._read()

    def on_unmount(self) -> None:
        self._stop.set()

    def on_resize(self, event: events.Resize) -> None:
        self._check_size()

    def _check_size(self) -> None:
        """Swap the views for a message when the terminal is below MIN_SIZE."""
        w, h = self._sized = self.size
        small = w < MIN_SIZE[0] or h < MIN_SIZE[1]
        if small:
            text = (f"Terminal too small: {w}x{h}.\nxray-tui needs at least {MIN_SIZE[0]}x{MIN_SIZE[1]}; "
                    "enlarge the window (q quits).")
            for screen in self.screen_stack:
                for box in screen.query("#too-small"):
                    box.update(text)
        self.set_class(small, "-too-small")

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
                self._posted += 1
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
        notes = self.notifications
        try:
            ingest = self.state.ingest
            for msg in event.messages:
                if isinstance(msg, Status):
                    if msg.fresh:
                        self.state.reset()  # a new connection's backlog repeats the history
                        notes.reconnected()
                    self.connection = msg.connection
                    on_status(self, msg)  # a failed handshake: the whole reason; quit after a few
                else:
                    if self._asked and isinstance(msg, wire.Note) and msg.event == "request":
                        self._answered(msg)
                    ingest(msg)
                    if isinstance(msg, (wire.Alert, wire.Hello)):
                        notes.message(msg)
            notes.after_batch(self.state, lost=self.connection.startswith("disconnected"))
        finally:
            self._ingested += 1
            self._slots.release()
        if self.connection == "connecting" and self.state.hellos:
            self.connection = "live"
        self._dirty = True

    @on(FeedDone)
    def _feed_done(self, event: FeedDone) -> None:
        if event.error is not None:
            self.connection = f"error: {event.error}"
            self.notify(event.error, title="feed error", severity="error", timeout=10)
        else:
            reason = self.state.end_reason
            self.connection = ("disconnected" if reason is None else
                               "run ended" if reason == "finished" else f"run ended: {_short(reason)}")
        self.notifications.after_batch(self.state, lost=True)
        self._paint()

    # -- painting ---------------------------------------------------------

    def _tick(self) -> None:
        self.notifications.tick()
        if self.size != self._sized:
            self._check_size()  # the App does not always get Resize events; the tick does not miss one
        # While the reader is ahead (a backlog or a replay streaming in) ingesting comes first: one
        # paint a second instead of four, so a 512-step backlog is on screen sooner.
        if self._dirty and (self._posted == self._ingested or time.monotonic() - self._painted_at >= 1.0):
            self._paint()
        for ep in self.state.new_losses():  # once per drop episode (tui/drops.py); the header keeps the sum
            self.notify(ep.text(), title="viewer fell behind", severity="warning", timeout=10)
            self._dirty = True

    def _paint(self) -> None:
        """Bring every widget up to date with the state (the app's thread only)."""
        self._painted_at = time.monotonic()
        self._dirty = False
        table = self.table
        if not self.paused:
            self._shown_step = self.state.step if self.replay_at is None else self.replay_at
            table.refresh_data()
            self.alert_list.refresh_data()
            self._show_alert_message()
            if isinstance(self.screen, DetailScreen):
                self.screen.refresh_data()
        flt = table.filter.pattern if table.filter is not None else ""
        self._header.show(HeaderInfo.from_state(
            self.state, label=getattr(self.source, "label", ""), connection=self.connection,
            paused=self.paused, layers_shown=len(table.view), filter=flt, title=self.title,
            view=self._view_label(),
            shown_step=self._shown_step if self.paused or self.replay_at is not None else None,
            replay_last=self.state.last_step if self.replay else None))

    def _show_alert_message(self) -> None:
        """The full message of the alert under the pane's cursor (the first one when it has no focus)."""
        alerts = self.alert_list
        alert = alerts.alert_at(alerts.cursor if alerts.has_focus else 0)
        text = full_message(alert, multi_rank=self.state.world_size > 1)
        if text == self._alert_text:
            return  # an update would lay the screen out again, at every paint
        self._alert_text = text
        box = self.screen_stack[0].query_one("#alert-message", Static)
        box.update(text)
        box.set_class(alert is not None, "-shown")

    @on(AlertList.Highlighted)
    def _alert_highlighted(self) -> None:
        self._show_alert_message()

    def _view_label(self) -> str:
        if len(self.state.hellos) <= 1 and not self.state.job:
            return ""
        whole = f"whole job ({self.state.world_size} ranks)" if self.state.job else "merged"
        return whole if self.table.rank is None else f"rank {self.table.rank}"

    def watch_connection(self) -> None:
        self._dirty = True

    def watch_paused(self, paused: bool) -> None:
        self._dirty = True
        self.sub_title = "PAUSED" if paused else ""

    # -- the boxes' and the alerts pane's messages (the keys' actions: tui.keys) --

    @on(Input.Submitted, "#goto")
    def _goto_submitted(self, event: Input.Submitted) -> None:
        box = event.input
        try:
            step = int(event.value.replace(",", "").replace("_", "").strip())
        except ValueError:
            box.add_class("-bad")
            box.border_title = "not a step number"
            return
        box.remove_class("-bad")
        box.border_title = None
        box.remove_class("visible")
        self._refocus()
        self.seek(step)

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
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

    @on(AlertList.Selected)
    def _alert_selected(self, event: AlertList.Selected) -> None:
        name = self.state.row_of(event.alert.layer)
        if self.table.select_layer(name):
            self.table.focus()
        else:
            self.notify(f"layer {name!r} is not in the table", severity="warning", timeout=4)

    async def action_quit(self) -> None:
        """Stop the reader and exit."""
        self._stop.set()
        self.exit()
