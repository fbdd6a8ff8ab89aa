"""When attaching keeps failing: the whole reason, said once, and an offer to quit.

A run whose socket is not a probe's (another program's socket under a run
manifest, a probe of an incompatible version, a stale socket something else
now listens on) fails the handshake on every retry. The header has room for
only the start of the reason, and the viewer would retry forever without a
word. :func:`on_status` shows the whole reason in a toast at the first
failure of a streak, and after :data:`~tui.reattach.GIVE_UP_AFTER` in a row
opens :class:`NotAProbeScreen`, which says so and offers to quit (or to go
on retrying). Nothing here reads the stream.
"""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

from tui.reattach import GIVE_UP_AFTER, Status


def _printable(text: str) -> str:
    """A peer's text without control characters (it names paths and what the peer sent)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class NotAProbeScreen(ModalScreen[bool]):
    """``failures`` handshakes in a row failed for ``why``: q quits (True), escape/enter retries (False)."""

    DEFAULT_CSS = """
    NotAProbeScreen { align: center middle; }
    NotAProbeScreen > Vertical {
        width: 90%; max-width: 110; height: auto; max-height: 80%;
        background: $panel; border: round $warning; padding: 1 2;
    }
    NotAProbeScreen #why { margin-top: 1; }
    NotAProbeScreen #not-a-probe-help { color: $xray-muted; margin-top: 1; }
    """
    BINDINGS = [Binding("q", "dismiss(True)", "Quit"), Binding("escape,enter", "dismiss(False)", "Keep retrying")]

    def __init__(self, why: str, failures: int) -> None:
        super().__init__()
        self.why = _printable(why)
        self.failures = failures

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"[b]{self.failures} handshakes in a row failed: this may not be an xray-tui probe[/b]")
            yield Static(self.why, id="why", markup=False)  # the whole reason, wrapped, never cut
            yield Static("q quit · escape keep retrying (the viewer goes on trying by itself)",
                         id="not-a-probe-help")


def on_status(app: App, status: Status) -> None:
    """What the app does with a connection :class:`~tui.reattach.Status`: the first failed
    handshake of a streak gets the whole reason in a toast; the :data:`GIVE_UP_AFTER`-th opens
    :class:`NotAProbeScreen` (once per streak), whose q quits the app."""
    if status.failures == 1:
        app.notify(_printable(status.why), title="cannot attach", severity="warning", timeout=10, markup=False)
    elif status.failures == GIVE_UP_AFTER:
        async def done(quit_: bool | None) -> None:
            if quit_:
                await app.run_action("quit")  # the app's own quit: the reader is stopped too

        app.push_screen(NotAProbeScreen(status.why, status.failures), done)
