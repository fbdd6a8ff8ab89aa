"""The app as a demanding new user found it in tmux: each test pins one fix.

Fed synthetic streams (no torch); the screen is read from the compositor.
"""

from __future__ import annotations

import threading

import pytest

from probes.protocol import rundir, wire
from test_app import DEAD, N_LAYERS, HoldSource, feed, publisher, screen_text, settle, shows, until, wait_for
from tui import reattach, synthetic
from tui.app import XRayApp
from tui.feed import ListSource
from tui.reattach import DISCONNECTED, ReattachSource, Status


# -- a run that comes back: never a crash, never the last data lost for nothing --


async def test_a_reset_without_a_new_hello_does_not_crash_the_table_or_the_alerts():
    """Seen in tmux: the run was killed, the viewer reset its state for a
    re-attach that never said hello, and the next paint raised IndexError in
    the layer table (its view still indexed the old rows)."""
    gate = threading.Event()

    class Source:
        label = "unit-run"

        def batches(self, stop=None):
            yield from feed()
            gate.wait(5)
            yield [Status("live", fresh=True)]  # the state is reset; no hello follows
            stop.wait()

    app = XRayApp(Source())
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        await pilot.press("end", "tab", "end")  # cursors on the last row and the oldest alert
        gate.set()
        for _ in range(100):
            await pilot.pause(0.02)
            if not app.state.rows:
                break
        assert not app.state.rows and not app.state.alerts
        app._paint()
        await pilot.pause()
        await pilot.press("up", "enter", "tab", "down", "enter", "n", "s")
        app._paint()
        await pilot.pause()
        assert app.is_running and app.table.cursor_row is None
        assert "no alerts" in screen_text(app)


async def test_alerts_pane_keeps_up_after_the_alert_buffer_is_full():
    """The state keeps the newest max_alerts; the pane counted len(), which
    stops growing there, so a long run's newest alerts never appeared."""
    app = XRayApp(HoldSource(feed()))
    app.state.max_alerts = 2
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        assert "alerts · 2 active (● on top, most severe first) · 2 total" in screen_text(app)
        newer = synthetic.alert(9, "model.layers.5.fc", rule="vanishing", kind="grad")
        app.post_message(XRayApp.Batch([newer]))
        app._slots.acquire()
        await until(pilot, app, lambda: app.state.alerts_seen == 3)
        text = screen_text(app)
        assert "3 total" in text and "vanishing" in text and "model.layers.5.fc" in text
        # the active alerts are pinned on top (most severe first); the history under them, newest first
        pinned = app.alert_list.pinned
        assert app.alert_list.alert_at(0).severity == "critical"
        assert pinned == 3 and app.alert_list.alert_at(1) is newer  # critical, then warnings newest first


def test_reattach_says_live_and_fresh_only_once_the_new_run_said_hello(monkeypatch):
    """A listed run whose socket is gone (killed, manifest left behind) must
    not make the viewer forget the last data: no Status('live', fresh=True)
    before a hello arrives."""
    pub = publisher("comeback", started=1.0)
    pub.submit(lambda: synthetic.steps(4, 1, elements=32)[0])
    got, stop = [], threading.Event()
    source = ReattachSource("comeback", poll=0.05)

    def collect():
        for batch in source.batches(stop):
            got.extend(batch)

    reader = threading.Thread(target=collect, daemon=True)
    try:
        reader.start()
        assert wait_for(lambda: any(isinstance(m, wire.Step) for m in got))
        assert got[0] == Status("live", fresh=False) and isinstance(got[1], wire.Hello)
        # The run dies without cleaning up: its manifest still names a socket nobody serves.
        stale = rundir.Run("comeback", [rundir.Manifest("comeback", 999_999, 0, 1, 3.0, [], "/nonexistent/x.sock", 2)])
        monkeypatch.setattr(reattach, "resolve_run", lambda name: stale)
        pub.close()
        assert wait_for(lambda: sum(isinstance(m, Status) and m.connection.startswith(DISCONNECTED)
                                    for m in got) >= 3)
        assert Status("live", fresh=True) not in got
    finally:
        stop.set()
        pub.close()
        reader.join(5)



async def test_a_long_connection_status_leaves_the_run_and_step_on_the_header():
    """Seen in tmux: "disconnected — retrying (cannot connect to /tmp/…sock:
    Connection refused)" pushed everything else off the header ("xr… ●")."""
    why = f"{DISCONNECTED} (cannot connect to /tmp/run/a-1-r0.sock: refused)"
    assert 70 < len(why) < 80  # as in tmux: nearly the width, so it squeezed the left part to nothing
    app = XRayApp(HoldSource(feed() + [[Status(why)]]))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        await until(pilot, app, lambda: app.connection == why)
        top = screen_text(app).splitlines()[0]
        assert "unit-run" in top and "step 3" in top and "disconnected — retrying" in top and "…" in top, top

# -- pause: one consistent picture of one step ------------------------------------


def _row_line(app: XRayApp, name: str) -> str:
    return next(line for line in screen_text(app).splitlines() if line.strip().startswith(name))


async def test_pause_freezes_rows_at_one_step_even_when_scrolled_filtered_or_sorted():
    """Seen in tmux: paused, the header went on counting steps while the table
    stayed put, and a scroll or filter redrew rows with newer data than the
    rest. Now the rows show the paused step and the header says both."""
    from probes.protocol import stats
    from tui.widgets.table_cells import sci

    app = XRayApp(HoldSource(feed(n_steps=2)))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, step=1)
        await pilot.press("p")
        for s in synthetic.steps(N_LAYERS, 5, elements=64, seed=7)[2:]:
            app.post_message(XRayApp.Batch([s]))
            app._slots.acquire()
        await until(pilot, app, lambda: app.state.step == 4)
        header = screen_text(app).splitlines()[:2]
        assert "step 1 ·" in header[0] and "PAUSED · run at step 4 · p resumes" in header[1]
        name = "model.layers.5.fc"
        series = app.state.series(f"{name}.weight", "grad")
        frozen, live = (sci(stats.l2(series[i][1])) for i in (1, -1))
        assert frozen != live
        await pilot.press("slash", *"layers.5", "enter", "s", "end", "home")  # filter, sort, scroll
        app._paint()
        await pilot.pause()
        assert frozen in _row_line(app, name) and live not in _row_line(app, name)
        await pilot.press("p")
        await pilot.pause()
        assert live in _row_line(app, name)
        assert "PAUSED" not in screen_text(app) and "step 4 ·" in screen_text(app)


# -- non-finite values are said, not left blank -------------------------------------


def _nan_feed() -> list[list]:
    import numpy as np

    batches = feed(n_steps=2)
    x = np.random.default_rng(1).normal(0, 1, 4096)
    x[7] = np.inf
    bad = [synthetic.sample_of("model.layers.2.fc.weight", "weight", x),
           synthetic.sample_of("model.layers.2.fc.weight", "grad", np.full(256, np.nan)),
           synthetic.sample_of("model.layers.2.fc", "act", np.full(256, np.nan))]
    batches.append([wire.Step(step=2, rank=0, time=1_700_000_001.0, samples=bad)])
    return batches


async def test_nonfinite_tensors_say_nan_or_inf_in_their_cells():
    """Seen in tmux with --fault nan: every sparkline went blank (a NaN has
    no [min, max]) and the gauge said 0%, which reads as "fine"."""
    # at 80 columns the weight sparkline makes way for the trend columns: grad and act say it
    for size, weight, grad, gauge in (((160, 40), "✖ inf <1%", "✖ NaN 100%", "✖ NaN"),
                                      ((80, 24), "✖ NaN", "✖ NaN", "✖ NaN")):
        app = XRayApp(ListSource(_nan_feed()))
        async with app.run_test(size=size) as pilot:
            await settle(pilot, app, step=2)
            line = _row_line(app, "model.layers.2.fc")
            cells = [c.strip() for c in line.split("  ") if c.strip()]
            assert weight in line and grad in line, line
            assert cells.count("✖ NaN") + cells.count("✖ NaN 100%") >= 2, line  # grad, act and the gauge
            assert "0%" not in line.replace("100%", ""), line
            assert gauge in line
            # no alert names this row (the feed has none): its status must still not read ok (issue 12)
            assert "✖ CRIT" in line and "✓ ok" not in line, line


# -- every key on screen works where it is shown ----------------------------------


async def test_detail_screen_footer_lists_only_keys_that_work_there():
    """Seen in tmux: the detail footer offered Filter, Sort, Next alert and
    Table/alerts; pressing them changed the hidden table (1 2 3 hid its
    columns) or did nothing."""
    app = XRayApp(HoldSource(feed()))
    async with app.run_test(size=(160, 40)) as pilot:
        await settle(pilot, app)
        main_footer = screen_text(app).splitlines()[-1]
        assert "Filter" in main_footer and "Sort" in main_footer and "Next alert" in main_footer
        await pilot.press("n", "enter")
        await pilot.pause(0.2)
        footer = screen_text(app).splitlines()[-1]
        for gone in ("Filter", "Sort", "Next alert", "Detail", "Table/alerts"):
            assert gone not in footer, footer
        for kept in ("Back", "Weight", "Pause", "Help", "Quit"):  # r, t, tab: in the help (80 columns)
            assert kept in footer, footer
        table = app.table
        before = (table.shown, table.sort, table.cursor, table.filter)
        await pilot.press("1", "2", "s", "n", "slash", "tab")
        await pilot.pause(0.1)
        assert (table.shown, table.sort, table.cursor, table.filter) == before
        assert type(app.screen).__name__ == "DetailScreen"
        await pilot.press("escape")
        await pilot.pause(0.1)
        assert "Filter" in screen_text(app).splitlines()[-1]


async def test_help_wraps_long_meanings_keeps_brackets_and_gives_the_runs_eps():
    """The help cut long lines at the box edge, ate "[min, max]" as markup, and
    said eps is 0.05 whatever the run set."""
    import msgspec

    from tui.help import HelpScreen

    batches = feed()
    batches[0] = [msgspec.structs.replace(batches[0][0], eps=0.01)]
    app = XRayApp(ListSource(batches))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        await pilot.press("question_mark")
        await pilot.pause(0.1)
        help_screen = app.screen
        assert isinstance(help_screen, HelpScreen)
        assert any("eps = 0.01 in this run" in what for _, what in help_screen.legend)
        seen: set[str] = set()
        for key in ("home", *["down"] * 90, "end"):  # line by line: a page step can skip a boundary line
            await pilot.press(key)
            await pilot.pause(0.01)
            seen |= set(screen_text(app).replace("│", " ").split())
        # Every word of every line of the help is on screen at some scroll position: nothing cut.
        for key, what in help_screen.lines + help_screen.legend:
            missing = [w for w in what.split() if w not in seen]
            assert not missing, (key, missing)
        assert {"[min,", "max];"} <= seen


async def test_chooser_shows_one_line_per_run_however_long_its_command(monkeypatch):
    """Seen in tmux at 100 columns: each run's command wrapped onto a second
    line, so two runs looked like four."""
    from textual.widgets import OptionList

    from tui.chooser import ChooserScreen

    pubs = [publisher("alpha", started=1.0), publisher("beta", started=2.0)]
    try:
        runs = ReattachSource(None).runs()
        long = [rundir.Run(r.name, [__import__("dataclasses").replace(
            r.ranks[0], argv=["/very/long/path/to/python", "-m", "my.training.script", "--config", "x" * 60])])
            for r in runs]
        app = XRayApp(ListSource([]))
        async with app.run_test(size=(100, 30)) as pilot:
            app.push_screen(ChooserScreen(long))
            await pilot.pause(0.2)
            options = app.screen.query_one(OptionList)
            assert options.option_count == 2
            lines = [line for line in screen_text(app).splitlines() if "▊" in line and "▔" not in line
                     and "▁" not in line]
            assert len(lines) == 2, "\n".join(lines)
            assert "alpha" in lines[0] and "pid" in lines[0] and "beta" in lines[1]
    finally:
        for p in pubs:
            p.close()


async def test_screenshot_says_the_full_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XRAY_TUI_SCREENSHOTS", raising=False)
    app = XRayApp(ListSource(feed()))
    said = []
    notify = app.notify
    monkeypatch.setattr(app, "notify", lambda message, **kw: (said.append(message), notify(message, **kw)))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        await pilot.press("S")
        await pilot.pause()
        (svg,) = tmp_path.glob("*.svg")
        # not "./xray-tui_….svg": where is "."? (the path comes folded after a "/", issue 28)
        (message,) = said
        assert message.splitlines()[0] == "screenshot saved to"
        assert "".join(message.splitlines()[1:-1]) == str(svg)


def test_replay_is_labelled_a_replay_in_the_header(tmp_path, monkeypatch):
    """`xray-tui replay run.xray` looked exactly like a live run."""
    from tui import cli
    from tui.commands import viewer

    seen = {}

    def fake_run_app(source, args, title=None, replay=False):
        seen["title"], seen["replay"] = title, replay
        return 0

    path = tmp_path / "week.xray"
    path.write_bytes(wire.MAGIC + wire.encode(wire.Hello(version=wire.PROTOCOL_VERSION, run="week")))
    monkeypatch.setattr(viewer, "run_app", fake_run_app)
    assert cli.main(["replay", str(path)]) == 0
    assert seen["title"] == "replay: week.xray" and seen["replay"]


# -- the alerts pane: as tall as it needs, readable when narrow ---------------------


async def test_alerts_pane_is_as_tall_as_its_alerts_up_to_a_third_of_the_screen():
    """A healthy run gave a third of the screen to "no alerts" and blank lines."""
    quiet = feed(n_layers=40)[:-1]
    app = XRayApp(HoldSource(quiet))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, alerts=0)
        assert app.alert_list.outer_size.height == 2  # its top border and "no alerts"
        rows_quiet = app.table.size.height
        many = [synthetic.alert(3, f"model.layers.{i % 40}.fc") for i in range(200)]
        app.post_message(XRayApp.Batch(many))
        app._slots.acquire()
        await until(pilot, app, lambda: app.state.alerts_seen == 200)
        await pilot.pause(0.1)
        assert app.alert_list.outer_size.height == int(0.3 * app.query_one("#body").size.height)
        assert app.table.size.height < rows_quiet
        await pilot.press("tab", "end")  # the oldest alert is scrolled into view
        await pilot.pause(0.1)
        assert app.alert_list.cursor == 199 and app.alert_list.scroll_offset.y > 0


async def test_alert_lines_cut_long_layer_names_so_the_message_shows_at_80_columns():
    layer = "transformer.h.1.mlp.c_proj.weight.with.a.very.long.module.path"
    alert = synthetic.alert(60, layer, rule="vanishing", kind="grad")
    app = XRayApp(HoldSource(feed()[:-1] + [[alert]]))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app, alerts=1)
        line = next(line for line in screen_text(app).splitlines() if "vanishing" in line)
        assert "…" in line and "module.path  vanishing on" in line, line


# -- the detail screen's charts: legends beside the data, whole steps, NaN said ------


def test_step_axes_have_whole_number_ticks():
    """Seen in tmux: step axes read 0.0 53.3 106.7 160.0."""
    import re

    from tui.widgets.braille import step_ticks
    from tui.widgets.plots import Series, build_chart

    assert step_ticks(list(range(0, 321, 5)), 40) == [0, 100, 200, 300]
    assert step_ticks([0, 1, 2], 40) == [0, 1, 2]
    assert step_ticks([7], 40) == [7]
    steps = tuple(range(0, 321, 5))
    axis = build_chart([Series(steps, tuple(float(s) for s in steps), "x")], 40, 8).splitlines()[-1]
    assert re.search(r"\d\.\d", re.sub(r"\x1b\[[0-9;]*m", "", axis)) is None, axis


async def test_chart_legends_sit_on_their_own_line_not_over_the_data():
    """Seen in tmux: plotext's legend box covered the left third of each chart,
    and at 80x24 hid the peak of the histogram it labelled."""
    app = XRayApp(HoldSource(feed(n_steps=6)))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, step=5)
        await pilot.press("enter")
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "━ first kept (step 0)  ━ now (step 5)" in text
        assert "━ mean  ━ std" in text
        assert "▚ first kept" not in text and "▚ mean" not in text  # no plotext legend box


async def test_detail_says_where_values_went_nonfinite():
    """Seen in tmux with --fault nan: the HOT chart went blank after the NaN
    step and the norm chart simply stopped, with nothing saying why."""
    app = XRayApp(HoldSource(_nan_feed()))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, step=2)
        await pilot.press("down", "down", "enter", "a")
        await pilot.pause(0.3)
        lines = screen_text(app).splitlines()
        text = "\n".join(lines)
        assert "NaN/inf from step 2 (1 of 3) not drawn" in text
        assert "now (step 2), 100% NaN/inf unbinned" in text
        strip = next(line for line in lines if line.lstrip().startswith("NaN/inf┤"))
        marks = strip.split("┤", 1)[1].split("│")[0]
        assert marks.strip() and marks.rstrip() != marks.rstrip().lstrip()  # the last step's columns only
        assert marks.strip("▄ ") == "" and marks.startswith(" ")


async def test_hot_chart_value_axis_labels_zero_and_more_than_its_ends():
    """The HOT chart's value axis had two labels, so nobody could tell where
    zero was on its signed, log-spaced bins."""
    app = XRayApp(HoldSource(feed(n_steps=6)))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, step=5)
        await pilot.press("enter")
        await pilot.pause(0.3)
        hot = app.screen.query_one("#hot")
        labels = [hot.label_for(i, 30) for i in range(30)]
        shown = [x for x in labels if x]
        assert "0" in shown and len(shown) >= 6, labels
        zero = labels.index("0")
        above = [float(x) for x in labels[:zero] if x]
        below = [float(x) for x in labels[zero + 1:] if x]
        assert all(v > 0 for v in above) and all(v < 0 for v in below)
        assert above == sorted(above, reverse=True)  # largest on top


# -- how a run gone non-finite looks (snapshots; the header shows the probe's clock) --


@pytest.mark.parametrize("view", ["table-80x24", "detail-120x40"])
def test_snapshot_nonfinite(snap_compare, view):
    app = XRayApp(HoldSource(_nan_feed()))
    size = (80, 24) if view.startswith("table") else (120, 40)

    async def run_before(pilot) -> None:
        await settle(pilot, pilot.app, step=2)
        if view.startswith("detail"):
            await pilot.press("down", "down", "enter", "a")
            await pilot.pause(0.3)
        pilot.app._paint()
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=run_before)
