"""The help screen (``?``): every key binding with what it does, and what the table's columns mean.

:data:`HELP` lists exactly the keys the app, the table, the alerts pane and
the detail screen bind (a test holds them to it); :data:`LEGEND` explains
the columns and marks, with the run's own near-zero threshold filled in.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


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
    ("n", "jump to the next layer an active alert names (the earliest alert first)"),
    ("/", "filter layers by name (regex); enter keeps it, escape closes; clear the text to show all"),
    ("s", "sort rows: model order → severity → name → depth → grad norm"),
    ("1 2 3", "show / hide the weight, grad, act sparkline columns"),
    ("r", "per-rank vs merged view: merged → rank 0 → rank 1 …"),
    ("p", "pause / resume the screen (data keeps arriving; a live run only)"),
    ("t", "next theme (dark, light, high contrast, colour-blind safe)"),
    ("S", "save a screenshot of the screen as SVG (in $XRAY_TUI_SCREENSHOTS, else the working directory)"),
    ("N", "notifications of new critical alerts and of the run's end (a toast, the terminal's desktop "
          "notification and bell) off / on"),
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
    ("lost", "(header, when it happened) steps this viewer never got because it fell behind, and when it last did"),
    ("detail", "HOT chart: x = step, y = value bin (signed, log-spaced; bins empty at every step folded "
               "away, ≈ on the axis), colour = count on a log scale (legend under it); histogram as densities "
               "on a linear axis; line charts share one step range"),
]
