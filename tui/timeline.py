"""The replay timeline: seek a recording step by step (a mixin of :class:`tui.app.XRayApp`).

``←`` ``→`` one recorded step, ``[`` ``]`` ten, ``<`` ``>`` the first and last
step still kept, ``:`` a typed step. Seeking sets the step the views show
(``replay_at``) on the table, the alerts pane and any detail screen; the
samples themselves stay in the :class:`~tui.state.RunState` rings, so a seek
costs a repaint, not a re-read of the file.
"""

from __future__ import annotations

import bisect

from textual.widgets import Input

from tui.detail import DetailScreen


class ReplayTimeline:
    """Seeking in a replay; needs the app's ``state``, ``table``, ``alert_list`` and ``_paint``."""

    def _timeline(self) -> tuple[list[int], int]:
        """The recorded steps and the index of the first one whose samples are still kept."""
        steps = self.state.steps_recorded
        oldest = self.state.oldest_full_step()
        return steps, (bisect.bisect_left(steps, oldest) if oldest is not None else 0)

    def action_seek(self, delta: int) -> None:
        """Show the run as it was ``delta`` recorded steps later (or earlier)."""
        steps, first = self._timeline()
        if not steps:
            self.notify("no steps recorded yet", timeout=3)
            return
        current = steps[-1] if self.replay_at is None else self.replay_at
        i = max(bisect.bisect_right(steps, current) - 1, 0)
        self.seek(steps[min(max(i + delta, first), len(steps) - 1)])

    def action_seek_end(self, where: int) -> None:
        """Go to the first (0) or last (-1) recorded step still kept."""
        steps, first = self._timeline()
        if steps:
            self.seek(steps[first] if where == 0 else steps[-1])

    def seek(self, step: int) -> None:
        """Show the table, alerts and detail as they were at ``step`` (a replay).

        A step between two recorded ones shows the one before it; a step
        before the oldest kept, that one (and says why). The last step
        follows the recording as it is read.
        """
        steps, first = self._timeline()
        if not steps:
            return
        i = bisect.bisect_right(steps, step) - 1
        if i < first:
            if step < steps[first]:
                self.notify(f"steps before {steps[first]:,} are no longer kept (the viewer keeps "
                            f"{self.state.stream_depth or self.state.depth} per stream)", timeout=4)
            i = first
        target = steps[i]
        self.replay_at = None if target >= steps[-1] else target
        until = target if self.replay_at is not None else None
        self.table.set_until(until)
        self.alert_list.set_until(until)
        for screen in self.screen_stack:
            if isinstance(screen, DetailScreen):
                screen.set_until(until)
        self._paint()

    def action_goto(self) -> None:
        """Open the box to type a step to go to."""
        if self.screen is not self.screen_stack[0]:
            self.pop_screen()  # the box lives on the main screen; the detail follows the step chosen
        box = self.screen_stack[0].query_one("#goto", Input)
        if box.has_class("visible"):
            return
        box.value = ""
        box.add_class("visible")
        box.focus()

