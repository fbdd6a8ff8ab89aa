"""The xray-tui Textual app: a live X-ray of a training run.

Threads: one reader (a Textual thread worker) runs the source's blocking
``batches()`` generator and posts each batch to the app as a message; it
never touches widgets or the :class:`~tui.state.RunState`. The app's own
thread ingests batches (cheap: ring-buffer appends) and marks the view dirty;
a timer repaints at a fixed rate, and only when something changed, so a
burst of data costs one paint, not one per message.
"""

from __future__ import annotations

import os
import re
import threading
import time

from rich.table import Table
from rich.text import Text
from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Static

import themes
from probes.protocol import wire
from tui.chooser import ChooserScreen
from tui.detail import DetailScreen
from tui.feed import FeedError
from tui.reattach import Status, _short
from tui.state import RunState
from tui.timeline import ReplayTimeline
from tui.widgets.alerts import AlertList, full_message
from tui.widgets.header import HeaderInfo, XRayHeader
from tui.widgets.layer_table import SORTS, LayerTable

#: Repaints per second; data arriving faster is folded into the next paint.
PAINT_HZ = 4
#: Batches the reader may have posted and the app not yet ingested. Bounds the
#: memory a fast replay can queue up; a live probe drops on its own side.
MAX_IN_FLIGHT = 16


class HelpScreen(ModalScreen[None]):
    """Every key binding, with what it does, and what the columns mean."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 110; max-width: 96%; height: auto; max-height: 96%;
        padding: 1 2; background: $panel; border: round $primary;
    }
    HelpScreen Static { width: 100%; }
    """
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def __init__(self, lines: list[tuple[str, str]], legend: list[tuple[str, str]] = ()) -> None:
        super().__init__()
        self.lines = lines
        self.legend = list(legend)

    def _grid(self, rows: list[tuple[str, str]]) -> Table:
        """Keys (or marks) and what they mean; long meanings wrap under themselves."""
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column(ratio=1)
        for key, what in rows:  # Text, not markup: "[min, max]" is meant literally
            grid.add_row(Text(key, style="bold"), Text(what))
        return grid

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static("[b]xray-tui keys[/b]\n")
            yield Static(self._grid(self.lines))
            if self.legend:
                yield Static("\n[b]what the table shows[/b]\n")
                yield Static(self._grid(self.legend))
            yield Static("\n[dim]escape, ? or q closes · ↑ ↓ pgup pgdn scroll[/dim]")


#: Every key and what it does: the help screen lists exactly these.
HELP: list[tuple[str, str]] = [
    ("q", "quit"),
    ("?", "this help"),
    ("↑ ↓ / j k", "move the cursor"),
    ("pgup pgdn", "move a page"),
    ("home end", "first / last row"),
    ("enter", "(table) open the layer's detail screen, which lists its alerts in full; "
              "(alerts) go to the alert's layer"),
    ("tab", "switch focus between the layer table and the alerts"),
    ("n", "jump to the next layer with an active alert"),
    ("/", "filter layers by name (regex); enter keeps it, escape closes; clear the text to show all"),
    ("s", "sort rows: model order → severity → name → depth → grad norm"),
    ("1 2 3", "show / hide the weight, grad, act sparkline columns"),
    ("r", "per-rank vs merged view: merged → rank 0 → rank 1 …"),
    ("p", "pause / resume the screen (data keeps arriving; a live run only)"),
    ("t", "next theme (dark, light, high contrast, colour-blind safe)"),
    ("S", "save a screenshot of the screen as SVG (in the current directory)"),
    ("e", "ask the live run for a spectral pass now (WeightWatcher's alpha; one per 10 s)"),
    ("w g a u", "(detail) show weight / grad / act / update"),
    ("l", "(detail) the histogram's density axis linear / log (the tails show on a log axis)"),
    ("← →", "(replay) one recorded step back / on: the table, alerts and detail show the run as it was"),
    ("[ ]", "(replay) ten recorded steps back / on"),
    ("< >", "(replay) the first / last step still kept"),
    (":", "(replay) type a step to go to (the recorded step at or before it)"),
    ("escape", "(detail) back to the table; close the filter"),
]

#: What each column and mark means; ``{eps}`` is the run's near-zero threshold.
LEGEND: list[tuple[str, str]] = [
    ("weight grad act", "histogram of the latest sample, over its own [min, max]; a blank cell is an empty bin"),
    ("✖ NaN 3%", "(in a column) the tensor holds NaN or inf: that share of its elements"),
    ("act ≈ 0", "share of activation elements with |x| < eps ({eps}); highlighted at ≥ 99%, which is dead "
                "for an activation function (embeddings and norms can sit there healthily: the status says)"),
    ("‖grad‖", "L2 norm of the gradient of the layer's main weight"),
    ("upd/w", "update ratio ‖ΔW‖/‖W‖ of the last optimizer step (healthy ≈ 1e-3)"),
    ("trend", "beside ‖grad‖ and upd/w: their values over the last sampled steps, one cell per step, newest on "
              "the right, low to high within the window (log scale when it spans 10x or more); ✖ marks a NaN/inf step"),
    ("loss lr", "(header, third line) the newest loss and learning rate, their trend over the last 64 steps, and "
                "↑ ↓ → for the newest against the median before it; 'no loss yet' until the probe sends one"),
    ("●", "(alerts) an active alert, pinned on top, most severe first; the history follows, newest first"),
    ("—", "no such stream: a module without parameters has no gradient or update"),
    ("status", "✓ ok · ▲ warn (warning) · ✖ CRIT (critical): the worst active alert; a row holding "
               "NaN/inf is ✖ CRIT where it began (the nonfinite alert names it) and ↳ NaN / ↳ inf "
               "where it arrived from an earlier layer"),
    ("header", "run · step · training steps/s (the probe's clock) · ranks attached/world size · connection; "
               "a replay says step S of N (replay) instead of a rate"),
    ("samples drops", "statistics received; samples the probe dropped because it fell behind (never slows training)"),
    ("detail", "HOT chart: x = step, y = value bin (signed, log-spaced; bins empty at every step folded "
               "away, ≈ on the axis), colour = count on a log scale (legend under it); histogram as densities "
               "on a linear axis; line charts share one step range"),
]

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


class XRayApp(ReplayTimeline, App):
    """Shows a run's layers and alerts live from ``source``.

    ``source`` is any object with a ``label`` and a blocking
    ``batches(stop_event)`` generator of message lists (see :mod:`tui.feed`);
    batches may carry :class:`tui.reattach.Status` items, and a source with
    ``needs_choice()`` true gets the run chooser first.
    ``state`` (the :class:`RunState`) and ``connection`` are public.
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
                 screenshot_dir: str = ".", replay: bool = False, other: RunState | None = None,
                 other_label: str = "") -> None:
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
        try:
            ingest = self.state.ingest
            for msg in event.messages:
                if isinstance(msg, Status):
                    if msg.fresh:
                        self.state.reset()  # a new connection's backlog repeats the history
                    self.connection = msg.connection
                else:
                    if self._asked and isinstance(msg, wire.Note) and msg.event == "request":
                        self._answered(msg)
                    ingest(msg)
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
        self._paint()

    # -- painting ---------------------------------------------------------

    def _tick(self) -> None:
        if self.size != self._sized:
            self._check_size()  # the App does not always get Resize events; the tick does not miss one
        # While the reader is ahead (a backlog or a replay streaming in) ingesting comes first: one
        # paint a second instead of four, so a 512-step backlog is on screen sooner.
        if self._dirty and (self._posted == self._ingested or time.monotonic() - self._painted_at >= 1.0):
            self._paint()

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
            replay_last=self.state.step if self.replay else None))

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

    # -- actions ----------------------------------------------------------

    def action_toggle_pause(self) -> None:
        """Freeze the views at the step shown (data keeps arriving) or resume.

        While paused the table shows no sample newer than that step, also
        when it is scrolled, filtered or sorted, and the header says both steps.
        """
        self.paused = not self.paused
        self.table.set_until(self._shown_step if self.paused else None)
        self._paint()

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

    def _refocus(self) -> None:
        """Give the focus back to the screen's main view after a box closed."""
        if self.screen is self.screen_stack[0]:
            self.table.focus()
        else:
            self.screen.focus_next()

    def action_filter(self) -> None:
        """Open the name filter."""
        if isinstance(self.screen, DetailScreen):
            return
        box = self.query_one("#filter", Input)
        box.add_class("visible")
        box.focus()

    def action_close_filter(self) -> None:
        """Hide the filter box (the filter stays applied) and the go-to-step box."""
        goto = self.screen_stack[0].query_one("#goto", Input)
        if goto.has_class("visible"):
            goto.remove_class("visible")
            self._refocus()
            return
        if isinstance(self.screen, DetailScreen):
            return
        box = self.query_one("#filter", Input)
        if box.has_class("visible"):
            box.remove_class("visible")
            self.table.focus()

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

    def action_switch_focus(self) -> None:
        """Move the focus between the layer table and the alerts pane."""
        if self.screen is not self.screen_stack[0]:
            return  # tab is a priority binding: do not move focus under a modal or the detail
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

    def action_detail(self) -> None:
        """Open the detail screen of the layer under the cursor."""
        if self.screen is not self.screen_stack[0] or not self.table.has_focus:
            return
        row = self.table.cursor_row
        if row is None:
            self.notify("no layer yet", timeout=3)
            return
        self.push_screen(DetailScreen(self.state, row, rank=self.table.rank, until=self.replay_at,
                                      other=self.other, other_label=self.other_label))

    def action_cycle_sort(self) -> None:
        """Order the rows by the next of model order, severity, name, depth, grad norm."""
        table = self.table
        table.set_sort(SORTS[(SORTS.index(table.sort) + 1) % len(SORTS)])
        self.notify(f"rows sorted by {table.sort}", timeout=2)
        self._paint()

    def action_toggle_kind(self, kind: str) -> None:
        """Show or hide one kind's sparkline column."""
        table = self.table
        shown = set(table.shown)
        shown ^= {kind}
        table.set_shown(tuple(shown))
        self.notify(f"{kind} column {'shown' if kind in shown else 'hidden'}", timeout=2)
        self._paint()

    def action_cycle_rank(self) -> None:
        """Per-rank vs merged: merged, then each rank in turn."""
        ranks = self.state.ranks
        if len(ranks) <= 1 and not self.state.job:
            self.notify("this run has one rank: its view is the merged view", timeout=3)
            return
        views: list[int | None] = [None, *ranks]
        current = self.table.rank
        nxt = views[(views.index(current) + 1) % len(views)] if current in views else None
        self.table.set_rank(nxt)
        if isinstance(self.screen, DetailScreen):
            self.screen.set_rank(nxt)
        whole = "the whole job (every rank of every node)" if self.state.job else "merged view of all ranks"
        self.notify(whole if nxt is None else f"rank {nxt} only", timeout=2)
        self._paint()

    def action_cycle_theme(self) -> None:
        """Switch to the next xray theme."""
        self.theme = themes.next_theme(self.theme)
        self.notify(f"theme {self.theme}", timeout=2)

    def action_screenshot_svg(self) -> None:
        """Save the screen as an SVG file (Textual's own screenshot)."""
        try:
            path = os.path.abspath(self.save_screenshot(path=self.screenshot_dir))
        except OSError as exc:
            self.notify(f"screenshot failed: {exc.strerror or exc}", severity="error", timeout=6)
        else:
            self.notify(f"screenshot saved to {path}", timeout=5)

    def action_request_spectral(self) -> None:
        """Ask the live probe(s) for a spectral pass now; say what happened."""
        ask = getattr(self.source, "request", None)
        if ask is None:
            self.notify("spectral pass not available: this is a replay or recording, not a live run", timeout=4)
            return
        hellos = list(self.state.hellos.values())
        if hellos and not any("spectral" in h.accepts for h in hellos):
            self.notify("spectral pass not available: the run has the spectral monitor off "
                        "(spectral_every=None) or an older probe", severity="warning", timeout=5)
            return
        sent = ask("spectral")
        if not sent:
            self.notify("spectral pass not available: not connected to a live run", severity="warning", timeout=4)
            return
        self._asked = True
        ranks = f" from {sent} ranks" if sent > 1 else ""
        self.notify(f"spectral pass requested{ranks}; figures appear in each layer's detail screen", timeout=4)

    def _answered(self, note) -> None:
        """Show the probe's answer to our request (a ``request`` Note sent to us alone)."""
        data = note.data
        who = f"rank {note.rank}: " if len(self.state.hellos) > 1 else ""
        why = str(data.get("reason") or "")[:200]
        if data.get("accepted"):
            self.notify(f"{who}{why or 'accepted'}", timeout=4, markup=False)
        else:
            self.notify(f"{who}spectral pass refused: {why}", severity="warning", timeout=5, markup=False)

    def action_help(self) -> None:
        """Show every key binding and what the columns mean."""
        if isinstance(self.screen, HelpScreen):
            return
        eps = sorted({h.eps for h in self.state.hellos.values()})
        said = (f"eps = {', '.join(f'{e:g}' for e in eps)} in this run" if eps
                else "eps is set by the probe, 0.05 by default")
        self.push_screen(HelpScreen(HELP, [(k, d.replace("{eps}", said)) for k, d in LEGEND]))

    async def action_quit(self) -> None:
        """Stop the reader and exit."""
        self._stop.set()
        self.exit()
