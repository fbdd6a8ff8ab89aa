"""The app's notifications with Textual's Pilot: what is notified and when (the bytes: test_notify_tmux.py).

A source gated by events feeds the app; the notifications' clock is the
test's own, so the catch-up window and the rate limit are exact.
"""

from __future__ import annotations

import threading

from probes.protocol import wire
from tui import synthetic
from tui.app import XRayApp
from tui.app_notify import CATCH_UP
from tui.reattach import DISCONNECTED, Status


def crit(step, layer, rule="nonfinite", severity="critical"):
    return wire.Alert(step=step, rank=0, severity=severity, rule=rule, layer=layer, kind="act", value=1.0,
                      threshold=0.0, message="[bold]literal[/bold] text")


class Gated:
    """Yields each batch after its gate is set (the first at once); then waits for the app to stop."""

    label = "gated"

    def __init__(self, *batches) -> None:
        self.batches_ = batches
        self.gates = [threading.Event() for _ in batches]
        self.gates[0].set()

    def batches(self, stop=None):
        for gate, batch in zip(self.gates, self.batches_):
            while not gate.wait(0.05):
                if stop.is_set():
                    return
            yield batch
        stop.wait()


async def until(pilot, cond, tries=200):
    for _ in range(tries):
        await pilot.pause(0.02)
        if cond():
            return
    raise AssertionError("condition never held")


def start(n_history=3):
    history = [crit(1, f"model.layers.{i}.fc") for i in range(n_history)]
    return [synthetic.hello(4, run="apprun"), *synthetic.steps(4, 2, elements=16), *history]


async def test_history_is_one_summary_then_each_new_alert_then_the_end():
    src = Gated(start(), [crit(3, "model.layers.0.fc", rule="exploding"), crit(3, "model.layers.0.fc",
                                                                              rule="exploding"),
                          crit(3, "model.layers.1.fc", severity="warning")],
                [Status(DISCONNECTED)], [Status("live", fresh=True), *start(0)], [wire.End(4, 0, "crashed", "E")])
    app = XRayApp(src, notify_on="critical")
    now = [100.0]
    app.notifications.clock = lambda: now[0]
    toasts = []
    notify = app.notify
    app.notify = lambda *a, **kw: (toasts.append((a, kw)), notify(*a, **kw))[1]
    async with app.run_test(size=(120, 40)) as pilot:
        notes = app.notifications
        await until(pilot, lambda: len(app.state.alerts) == 3)
        assert notes.sent == []  # the run's history: held for the catch-up
        now[0] += CATCH_UP
        await until(pilot, lambda: notes.sent)
        (summary,) = notes.sent
        assert summary.event == "summary" and summary.title == "xray-tui apprun: 3 alerts in the run's history"
        src.gates[1].set()
        await until(pilot, lambda: len(app.state.alerts) == 6)
        await pilot.pause(0.1)
        # the new critical alert once (the repeat is rate-limited), the warning not (--notify-on critical)
        assert [(n.event, n.fields.get("rule")) for n in notes.sent[1:]] == [("alert", "exploding")]
        src.gates[2].set()
        await until(pilot, lambda: len(notes.sent) == 3)
        assert notes.sent[2].title == "xray-tui apprun: stream LOST"
        src.gates[3].set()  # a new connection: its end is notified again
        src.gates[4].set()
        await until(pilot, lambda: len(notes.sent) == 4)
        assert notes.sent[3].title == "xray-tui apprun: run CRASHED" and "(E)" in notes.sent[3].text
        # toasts: markup off (the probe's "[bold]" is literal text), error severity for critical
        _, kw = toasts[-3]
        assert kw["markup"] is False and kw["severity"] == "error"
        assert "[bold]literal[/bold]" in toasts[-3][0][0]


async def test_off_with_no_notify_and_in_a_replay_and_n_turns_it_on():
    src = Gated(start(0), [crit(3, "model.layers.0.fc")], [crit(4, "model.layers.1.fc")])
    app = XRayApp(src, notify_on=None)
    now = [1000.0]
    app.notifications.clock = lambda: now[0]
    async with app.run_test(size=(120, 40)) as pilot:
        notes = app.notifications
        await until(pilot, lambda: app.state.hellos)
        now[0] += CATCH_UP
        src.gates[1].set()
        await until(pilot, lambda: len(app.state.alerts) == 1)
        await pilot.pause(0.1)
        assert notes.sent == [] and not notes.enabled
        await pilot.press("N")
        assert notes.enabled
        src.gates[2].set()
        await until(pilot, lambda: notes.sent)
        assert notes.sent[0].fields["layer"] == "model.layers.1.fc"

    replay = XRayApp(Gated([*start(3), crit(5, "model.layers.3.fc"), wire.End(5, 0, "crashed")]), replay=True,
                     notify_on="critical")
    async with replay.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: replay.state.finished)
        replay.notifications.clock = lambda: 1e9
        await pilot.pause(0.3)
        await pilot.press("N")
        assert replay.notifications.sent == [] and not replay.notifications.enabled  # a recording is the past
