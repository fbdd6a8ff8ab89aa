"""The run chooser: shown when several runs are live and none was named."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from probes.protocol import rundir


def run_line(run: rundir.Run) -> str:
    """One run as the chooser lists it: name, pid, ranks, start time, command."""
    first = run.ranks[0]
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(first.started))
    cmd = " ".join(first.argv)[:50]
    return f"{run.name:<20} pid {run.pid:<8} ranks {len(run.ranks)}/{first.world_size}  {started}  {cmd}"


class ChooserScreen(ModalScreen[str | None]):
    """Lists the live runs; enter picks one, escape quits (dismisses with None)."""

    DEFAULT_CSS = """
    ChooserScreen { align: center middle; }
    ChooserScreen > Vertical {
        width: 90%; max-width: 110; height: auto; max-height: 80%;
        background: $panel; border: round $primary; padding: 1 2;
    }
    ChooserScreen OptionList { height: auto; max-height: 20; text-wrap: nowrap; text-overflow: ellipsis; }
    ChooserScreen #chooser-help { color: $xray-muted; margin-top: 1; }
    """
    BINDINGS = [Binding("escape,q", "dismiss(None)", "Quit")]

    def __init__(self, runs: list[rundir.Run]) -> None:
        super().__init__()
        self.runs = runs

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"[b]{len(self.runs)} runs are live: which one?[/b]")
            # One line per run, cut at the edge (see the CSS): a wrapped command reads as another run.
            yield OptionList(*(Option(run_line(r), id=r.name) for r in self.runs), id="runs")
            yield Static("↑ ↓ choose · enter attach · escape quit   "
                         "(`xray-tui attach NAME` skips this)", id="chooser-help")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        """Attach to the chosen run."""
        self.dismiss(event.option.id)
