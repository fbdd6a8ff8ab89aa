"""What the app's keys do: a mixin of :class:`tui.app.XRayApp` (the replay's keys are :mod:`tui.timeline`).

Each ``action_*`` here is bound in ``XRayApp.BINDINGS`` and listed in
:data:`tui.help.HELP`. The app keeps the messages that these actions
start or answer (the filter and go-to boxes' input, the alerts pane's
selection, the probe's reply to a request): Textual registers ``@on``
handlers only on its own classes (message pumps), never on a plain mixin.
"""

from __future__ import annotations

from textual.widgets import Input

import themes
from tui import screenshot
from tui.detail import DetailScreen
from tui.help import HELP, LEGEND, HelpScreen
from tui.widgets.layer_table import SORTS


class KeyActions:
    """The main keys' actions; needs the app's ``state``, ``source``, ``table``, ``alert_list`` and ``_paint``."""

    def action_toggle_pause(self) -> None:
        """Freeze the views at the step shown (data keeps arriving) or resume.

        While paused the table shows no sample newer than that step, also
        when it is scrolled, filtered or sorted, and the header says both steps.
        """
        self.paused = not self.paused
        self.table.set_until(self._shown_step if self.paused else None)
        self._paint()

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
        """Save the screen as an SVG file in the screenshot directory, in fonts any machine has."""
        try:
            path = screenshot.save(self, self.screenshot_dir)
        except OSError as exc:
            self.notify(f"screenshot failed: {exc.strerror or exc}", severity="error", timeout=6)
        else:
            # the path broken after a / on lines of the toast's width (it split names mid-word)
            where = screenshot.fold_path(path, screenshot.toast_width(self.size.width))
            self.notify(f"screenshot saved to\n{where}\n(${screenshot.ENV} sets the directory)", timeout=6,
                        markup=False)

    def action_toggle_notify(self) -> None:
        """Turn the toasts and desktop notifications of new alerts off or on (``--no-notify`` starts off)."""
        notes = self.notifications
        if notes.replay:
            self.notify("notifications are off in a replay: a recording is the past", timeout=3)
            return
        on = notes.toggle()
        self.notify(f"notifications {'on' if on else 'off'}", timeout=2)

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
