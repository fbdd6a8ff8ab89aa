"""Pilot and snapshot tests of the Textual app, fed synthetic streams."""

from __future__ import annotations

import asyncio

import pytest

from tui import synthetic
from tui.app import XRayApp
from tui.feed import FeedError, ListSource
from tui.widgets.layer_table import LayerTable, plan_columns, sparkline

N_LAYERS = 12
DEAD = 3


def feed(n_layers: int = N_LAYERS, n_steps: int = 4, *, end: bool = False) -> list[list]:
    """A deterministic stream: hello, steps (one dead layer), two alerts."""
    last = n_steps - 1
    batches = [[synthetic.hello(n_layers, run="unit-run")]]
    batches += [[s] for s in synthetic.steps(n_layers, n_steps, dead_layer=DEAD, elements=256)]
    batches.append([
        synthetic.alert(last, f"model.layers.{DEAD}.fc"),
        synthetic.alert(last, "model.layers.7.fc.weight", rule="exploding", severity="critical", kind="grad"),
    ])
    if end:
        from probes import wire

        batches.append([wire.End(step=last, rank=0)])
    return batches


async def settle(pilot, app: XRayApp, *, step: int = 3, alerts: int = 2) -> None:
    """Wait until the stream is ingested and painted (polls, no long sleep)."""
    for _ in range(200):
        await pilot.pause(0.02)
        if app.state.step >= step and len(app.state.alerts) >= alerts and app.connection != "live":
            break
    # One paint tick (4 Hz) so the widgets show what the state holds.
    app._paint()
    await pilot.pause()


def screen_text(app: XRayApp) -> str:
    """The screen as plain text (reads the compositor; patches nothing)."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def test_rows_and_header_appear():
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        assert len(app.state.rows) == N_LAYERS
        assert len(app.query_one(LayerTable).view) == N_LAYERS
        text = screen_text(app)
        assert "unit-run" in text
        assert "step 3" in text
        assert "model.layers.0.fc" in text
        assert "✖ CRIT" in text and "▲ warn" in text
        assert "CRITICAL" in text and "exploding" in text
        assert app.connection == "disconnected"


async def test_run_end_state():
    app = XRayApp(ListSource(feed(end=True)))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        assert app.connection == "run ended"
        assert "run ended" in screen_text(app)


async def test_enter_on_alert_moves_table_cursor():
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        table = app.query_one(LayerTable)
        assert table.cursor_row.name == "model.layers.0.fc"
        await pilot.press("tab")
        assert app.focused is app.alert_list
        # Newest first: the exploding alert (layers.7) on top, the dead one below.
        await pilot.press("enter")
        await pilot.pause()
        assert table.cursor_row.name == "model.layers.7.fc"
        assert app.focused is table
        await pilot.press("tab", "down", "enter")
        await pilot.pause()
        assert table.cursor_row.name == f"model.layers.{DEAD}.fc"


async def test_next_alerting_layer():
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        table = app.query_one(LayerTable)
        await pilot.press("n")
        assert table.cursor_row.name == f"model.layers.{DEAD}.fc"
        await pilot.press("n")
        assert table.cursor_row.name == "model.layers.7.fc"
        await pilot.press("n")  # wraps around
        assert table.cursor_row.name == f"model.layers.{DEAD}.fc"


async def test_navigation_keys():
    app = XRayApp(ListSource(feed(n_layers=200, n_steps=1)))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app, step=0)
        table = app.query_one(LayerTable)
        await pilot.press("down", "down")
        assert table.cursor == 2
        await pilot.press("end")
        assert table.cursor == 199
        assert table.scroll_offset.y > 0  # the cursor row was scrolled into view
        assert "model.layers.199.fc" in screen_text(app)
        await pilot.press("pageup")
        assert table.cursor < 199
        await pilot.press("home")
        assert table.cursor == 0 and table.scroll_offset.y == 0


async def test_pause_freezes_table_but_keeps_ingesting():
    app = XRayApp(ListSource(feed(n_steps=2)))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, step=1)
        await pilot.press("p")
        assert app.paused
        assert "PAUSED" in screen_text(app)
        table = app.query_one(LayerTable)
        version = table._version
        # Data keeps arriving while paused: the state moves, the table does not.
        for s in synthetic.steps(N_LAYERS, 5, elements=64)[2:]:
            app.post_message(XRayApp.Batch([s]))
            app._slots.acquire()  # the handler releases one slot per batch
        await pilot.pause(0.3)
        assert app.state.step == 4
        assert table._version == version
        await pilot.press("p")
        assert not app.paused
        assert table._version > version
        assert "PAUSED" not in screen_text(app)


async def test_filter_by_regex_and_bad_regex():
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        table = app.query_one(LayerTable)
        await pilot.press("slash")
        await pilot.press(*"layers\\.1")
        await pilot.pause()
        names = [r.name for r in table.view]
        assert names == ["model.layers.1.fc", "model.layers.10.fc", "model.layers.11.fc"]
        # A bad regex is reported in the box, keeps the old filter, never crashes.
        await pilot.press("(")
        await pilot.pause()
        box = app.query_one("#filter")
        assert box.has_class("-bad")
        assert "bad regex" in str(box.border_title)
        assert len(table.view) == 3
        await pilot.press("backspace", "enter")
        assert app.focused is table
        assert not box.has_class("visible")
        # Jumping to an alert hidden by the filter clears the filter.
        assert table.select_layer("model.layers.7.fc")
        assert len(table.view) == N_LAYERS


async def test_typing_q_in_filter_does_not_quit():
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        await pilot.press("slash", "q")
        await pilot.pause()
        assert app.is_running
        assert app.query_one("#filter").value == "q"


async def test_help_screen_lists_bindings():
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        await pilot.press("question_mark")
        await pilot.pause()
        text = screen_text(app)
        for word in ("quit", "pause", "filter", "focus", "next layer", "help"):
            assert word in text
        await pilot.press("escape")
        await pilot.pause()
        assert "xray-tui keys" not in screen_text(app)


async def test_q_exits():
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


class FailingSource:
    """Yields the good part of a stream, then fails as a malformed one would."""

    label = "failing"

    def batches(self, stop=None):
        yield from feed()
        raise FeedError("run.xray: malformed frame: expected `str`")


async def test_feed_error_is_shown_and_data_kept():
    app = XRayApp(FailingSource())
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        assert app.connection == "error: run.xray: malformed frame: expected `str`"
        text = screen_text(app)
        assert "error: run.xray" in text
        assert "Traceback" not in text
        assert "model.layers.0.fc" in text  # the last data stays on screen
        assert app.is_running


@pytest.mark.parametrize("size", [(80, 24), (160, 50), (40, 12)])
async def test_sizes_render(size):
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=size) as pilot:
        await settle(pilot, app)
        text = screen_text(app)
        assert "layers.0" in text
        assert "unit-run" in text or size[0] < 60


async def test_light_theme_and_unknown_theme():
    app = XRayApp(ListSource(feed()), theme="xray-light")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        assert app.theme == "xray-light"
        app.theme = "textual-dark"  # a theme without xray variables still works
        await pilot.pause()
        assert "model.layers.0.fc" in screen_text(app)
    with pytest.raises(ValueError, match="unknown theme"):
        XRayApp(ListSource([]), theme="nope")


def test_plan_columns_degrades():
    wide, mid, narrow, tiny = (plan_columns(w) for w in (158, 78, 50, 10))
    assert wide.kinds == ("weight", "grad", "act") and wide.spark >= 12
    assert mid.kinds == ("weight", "grad", "act")
    assert len(narrow.kinds) < 3
    assert tiny.name >= 1
    for cols in (wide, mid, narrow, tiny):
        assert cols.name >= 1


def test_sparkline_blocks():
    s = synthetic.sample_of("x", "weight", [0.0, 0.0, 0.0, 1.0])
    line = sparkline(s, 8)
    assert len(line) == 8
    assert line[0] == "█" and line[-1] in "▁▂▃" and line[3] == " "
    assert sparkline(None, 5) == "     "


# -- snapshots -----------------------------------------------------------

async def _settled(pilot) -> None:
    await settle(pilot, pilot.app)


@pytest.mark.parametrize("size", [(80, 24), (160, 50)])
def test_snapshot(snap_compare, size):
    app = XRayApp(ListSource(feed(n_layers=40, end=True)))
    assert snap_compare(app, terminal_size=size, run_before=_settled)


def test_snapshot_alert_selected(snap_compare):
    app = XRayApp(ListSource(feed(n_layers=40)))

    async def run_before(pilot) -> None:
        await settle(pilot, pilot.app)
        await pilot.press("tab", "down", "enter", "p")
        pilot.app._paint()
        await pilot.pause()

    assert snap_compare(app, terminal_size=(120, 32), run_before=run_before)


async def test_title_shown_in_header():
    app = XRayApp(ListSource(feed()), title="replay: run.xray")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        assert screen_text(app).splitlines()[0].startswith(" replay: run.xray  unit-run")


def test_app_never_imports_torch():
    import subprocess
    import sys

    code = (
        "import sys, tui.app\n"
        "ok = ('wire', 'stats', 'histogram', 'rules', 'rundir')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')\n"
        "       or (m.startswith('probes.') and m.split('.')[1] not in ok)]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
