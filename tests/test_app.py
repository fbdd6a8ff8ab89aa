"""Pilot and snapshot tests of the Textual app, fed synthetic streams."""

from __future__ import annotations

import asyncio

import pytest

from tui import synthetic
from tui.app import XRayApp
from tui.feed import FeedError, ListSource
from tui.widgets.layer_table import LayerTable
from tui.widgets.table_cells import sparkline
from tui.widgets.table_columns import plan_columns

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
        from probes.protocol import wire

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
        assert "layers.199.fc" in screen_text(app)  # at 80 columns a long name is cut from the left
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
    async with app.run_test(size=(120, 64)) as pilot:
        await settle(pilot, app)
        await pilot.press("question_mark")
        await pilot.pause()
        text = screen_text(app)
        for word in ("quit", "pause", "filter", "focus", "next layer", "help", "sort", "rank", "theme",
                     "screenshot", "detail", "|x| < eps", "update ratio", "spectral pass"):
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


@pytest.mark.parametrize("size", [(80, 24), (160, 50), (60, 15)])
async def test_sizes_render(size):
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=size) as pilot:
        await settle(pilot, app)
        text = screen_text(app)
        assert "layers.0" in text
        assert "unit-run" in text
        assert "too small" not in text


async def test_below_minimum_size_says_so_and_recovers():
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=(40, 12)) as pilot:
        await settle(pilot, app)
        await pilot.pause(0.1)
        text = screen_text(app)
        assert "Terminal too small: 40x12" in text and "60x15" in text
        assert "layers.0" not in text
        await pilot.resize_terminal(80, 24)
        await until(pilot, app, lambda: not app.has_class("-too-small"))
        text = screen_text(app)
        assert "too small" not in text and "model.layers.0.fc" in text


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
    # at 78 columns the weight sparkline makes way for the trend columns (time beats a third picture)
    assert mid.kinds == ("grad", "act") and mid.trend >= 6
    assert wide.trend > mid.trend and wide.name <= 40  # a wide terminal widens the pictures, not the name
    assert len(narrow.kinds) < 3
    assert tiny.name >= 1
    for cols in (wide, mid, narrow, tiny):
        assert cols.name >= 1


def test_sparkline_blocks():
    s = synthetic.sample_of("x", "weight", [0.0, 0.0, 0.0, 1.0])
    line = sparkline(s, 8)
    assert len(line) == 8
    assert line[0] == "▇" and line[-1] in "▁▂▃" and line[3] == " "  # the peak below the cell top (issue 28)
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
        "ok = ('protocol', 'rules', 'publish')  # numpy/msgspec only\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')\n"
        "       or (m.startswith('probes.') and m.split('.')[1] not in ok)]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- issue 5: detail, sort, kinds, ranks, themes, screenshot, re-attach ----

import math
import os
import threading
import time

import msgspec
import numpy as np

import themes
from probes.protocol import histogram, stats, wire
from tui.chooser import ChooserScreen
from tui.detail import MATRIX_PENDING, DetailScreen, current_vs_initial
from tui.merge import merge_samples
from tui.reattach import DISCONNECTED, ENDED, ReattachSource, Status
from tui.state import MIN_DEPTH, RunState
from tui.widgets.heatmap import hot_matrix
from tui.widgets.layer_table import SORTS
from tui.widgets.table_cells import BADGES


async def until(pilot, app, done, tries: int = 50) -> None:
    """Let the app ingest until ``done()`` holds (at most ``tries`` x 20 ms), then paint once."""
    for _ in range(tries):
        await pilot.pause(0.02)
        if done():
            break
    app._paint()
    await pilot.pause()


async def shows(pilot, app, text: str) -> bool:
    """Whether ``text`` appears on screen within a second (toasts fade in)."""
    for _ in range(50):
        if text in screen_text(app):
            return True
        await pilot.pause(0.02)
    return False


class HoldSource:
    """Yields its batches, then stays connected (a live run that is quiet)."""

    label = "held"

    def __init__(self, batches):
        self._batches = batches

    def batches(self, stop=None):
        yield from self._batches
        stop.wait()


def two_rank_feed(n_layers: int = 6, n_steps: int = 3) -> list[list]:
    """Two ranks of one run, with different data per rank."""
    out = [[synthetic.hello(n_layers, run="ddp", rank=r, world_size=2)] for r in (0, 1)]
    for r in (0, 1):
        out += [[s] for s in synthetic.steps(n_layers, n_steps, elements=128, seed=10 + r, rank=r)]
    return out


async def test_enter_opens_detail_with_every_panel_and_keys_switch_kind():
    app = XRayApp(ListSource(feed(n_steps=6)))
    async with app.run_test(size=(160, 50)) as pilot:
        await settle(pilot, app, step=5)
        await pilot.press("down", "down", "down", "enter")
        await pilot.pause(0.2)
        screen = app.screen
        assert isinstance(screen, DetailScreen)
        assert screen.row.name == f"model.layers.{DEAD}.fc" and screen.kind == "weight"
        text = screen_text(app)
        assert f"model.layers.{DEAD}.fc" in text and "6 samples kept" in text
        assert "HOT weight" in text and "step 0" in text and "step 5" in text
        assert "L2 norm" in text and "mean and std" in text and "near zero" in text
        assert MATRIX_PENDING[:20] in screen.query_one("#matrix").render().plain  # the last panel, may need a scroll
        assert "Spectral figures" in text and "none in this stream" in text
        assert "WARNING" in text and "dead" in text  # the layer's alert
        for key, kind in (("g", "grad"), ("a", "act"), ("u", "update"), ("w", "weight")):
            await pilot.press(key)
            await pilot.pause(0.1)
            assert screen.kind == kind
            assert f"HOT {kind}" in screen_text(app)
        await pilot.press("a")
        await pilot.pause(0.1)
        assert "dead units" in screen_text(app)  # the act plot adds the dead-unit share
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, DetailScreen)
        assert app.table.cursor_row.name == f"model.layers.{DEAD}.fc"


async def test_detail_follows_new_data_and_does_not_crash_at_80x24():
    app = XRayApp(ListSource(feed(n_steps=3)))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app, step=2)
        await pilot.press("enter")
        await pilot.pause(0.2)
        screen = app.screen
        assert " 3 samples " in screen_text(app)
        for s in synthetic.steps(N_LAYERS, 5, elements=64)[3:]:
            app.post_message(XRayApp.Batch([s]))
            app._slots.acquire()
        await pilot.pause(0.2)
        app._paint()
        await pilot.pause(0.1)
        assert " 5 samples " in screen_text(app)
        assert MATRIX_PENDING[:30] in screen.query_one("#matrix").render().plain  # no spectral pass yet
        # a spectral pass brings the weight's heatmap: a 32x48 weight as 16x24 cells, rows 8-15 all zero
        layer = app.table.cursor_row.stream("weight")
        grid = np.full((16, 24), 0.02, dtype="<f2")
        grid[4:8] = 0.0
        app.post_message(XRayApp.Batch([wire.Spectral(
            step=4, rank=0, layer=layer, alpha=3.0, alpha_weighted=1.0, log_norm=0.0, log_spectral_norm=0.0,
            stable_rank=1.0, n_evals=32, shape=[32, 48], heat_shape=[16, 24], heat=grid.tobytes())]))
        app._slots.acquire()
        await pilot.pause(0.2)
        app._paint()
        await pilot.pause(0.1)
        title = str(screen.query_one("#matrix-title").render())  # below the fold of the right column at 80x24
        assert "weight matrix 32x48 at step 4, in 16x24 cells" in title and ".. 0.02" in title
        drawn = screen.query_one("#matrix").render().plain.splitlines()
        assert drawn[0].startswith("   row 0┤") and "row 31" in "".join(drawn) and "col 47" in drawn[-1]
        assert all(set(line.split("┤", 1)[1]) == {"▀"} for line in drawn[:-1])  # half-block cells
        assert np.array_equal(screen.query_one("#matrix").matrix, grid.astype(np.float32))  # zero rows stay 0


def test_hot_matrix_keeps_counts_and_puts_large_values_on_top():
    rng = np.random.default_rng(1)
    series = [(st, synthetic.sample_of("w", "weight", rng.normal(0, 0.1 * (1 + st), 4000))) for st in range(7)]
    m, edges, steps = hot_matrix(series, max_rows=20, max_cols=5)
    assert len(steps) == 5 and steps[0] == 0 and steps[-1] == 6  # the whole range, as the line charts
    assert m.shape == (len(edges) - 1, 5) and m.shape[0] <= 20
    # Grouping bins loses no element: each column sums back to its sample size.
    np.testing.assert_allclose(np.expm1(m).sum(axis=0), 4000, rtol=1e-9)
    # Row 0 is the top of the value axis: compare with numpy's own count above the top edges.
    x = rng.normal(0, 1, 4000)
    m1, e1, _ = hot_matrix([(0, synthetic.sample_of("w", "weight", x))], 8, 1)
    top_lo = e1[-2]
    assert round(np.expm1(m1[0, 0])) == np.sum(x.astype(np.float32) >= top_lo)
    assert e1[0] <= x.min() and e1[-1] >= x.max()


def test_hot_matrix_folds_the_empty_bins_between_the_signs():
    """Issue 15: the signed log axis ran through 1e-12..1e-1 twice, ~40% of the chart empty."""
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.uniform(0.5, 1.0, 500), -rng.uniform(0.5, 1.0, 500)])  # nothing near zero
    folds: list = []
    m, edges, _ = hot_matrix([(0, synthetic.sample_of("w", "weight", x))], 200, 1, folds)
    assert np.all(m[:, 0] > 0)  # every row drawn holds values
    assert m.shape[0] <= 8 and folds  # the two occupied octaves of each sign, and one fold between
    np.testing.assert_allclose(np.expm1(m).sum(), 1000, rtol=1e-9)


def test_current_vs_initial_matches_numpy_shares():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, 3000), rng.normal(1, 0.5, 3000)
    series = [(0, synthetic.sample_of("w", "weight", a)), (9, synthetic.sample_of("w", "weight", b))]
    x, now, first = current_vs_initial(series, width=10)
    assert len(x) == 10
    dx = x[1] - x[0]  # densities: each integrates to 1 over the common range
    assert math.isclose(sum(now) * dx, 1) and math.isclose(sum(first) * dx, 1)
    # The shifted distribution's mass sits to the right of the first one's.
    assert np.dot(x, now) > np.dot(x, first)
    assert abs(np.dot(x, first) * dx - a.mean()) < 0.1 and abs(np.dot(x, now) * dx - b.mean()) < 0.1


def test_histogram_density_of_a_normal_tensor_is_a_bell_like_numpys():
    """Issue 15: the share per log-width bin drew a bell curve as a jagged comb."""
    x = np.random.default_rng(5).normal(0, 1, 20_000)
    s = synthetic.sample_of("w", "weight", x)
    xs, now, _ = current_vs_initial([(0, s), (1, s)], width=30)
    ref, _ = np.histogram(x.astype(np.float32), bins=30, range=(s.min, s.max), density=True)
    assert np.corrcoef(now, ref)[0, 1] > 0.98
    peak = int(np.argmax(now))
    assert all(np.diff(now[: peak + 1]) > -0.05) and all(np.diff(now[peak:]) < 0.05)  # up, then down


@pytest.mark.parametrize("sort", SORTS)
async def test_sort_orders(sort):
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        for _ in range(SORTS.index(sort)):
            await pilot.press("s")
        table = app.table
        assert table.sort == sort
        names = [r.name for r in table.view]
        rows = {r.name: r for r in app.state.rows}
        if sort == "model":
            assert names == [f"model.layers.{i}.fc" for i in range(N_LAYERS)]
        elif sort == "severity":
            assert names[:2] == ["model.layers.7.fc", f"model.layers.{DEAD}.fc"]  # critical, then warning
            assert names[2:] == [n for n in (f"model.layers.{i}.fc" for i in range(N_LAYERS)) if n not in names[:2]]
        elif sort == "name":
            assert names == sorted(names)
        elif sort == "depth":
            assert [rows[n].depth for n in names] == sorted(rows[n].depth for n in names)
        else:
            norms = [math.sqrt(app.state.latest(rows[n], "grad").sumsq) for n in names]
            assert norms == sorted(norms, reverse=True)
        if sort != "model":
            assert f"layer ↓{sort}" in screen_text(app)


async def test_sort_keeps_cursor_on_its_layer():
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        await pilot.press("down", "down", "down", "down", "down")
        name = app.table.cursor_row.name
        await pilot.press("s", "s")
        assert app.table.cursor_row.name == name


async def test_kind_columns_toggle():
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        header = lambda: screen_text(app).splitlines()[3]  # noqa: E731 (the table's header line)
        assert "weight" in header() and "grad" in header()
        await pilot.press("1")
        await pilot.pause()
        assert "weight" not in header() and "grad" in header()
        await pilot.press("2", "3")
        await pilot.pause()
        assert app.table.shown == ()
        assert "grad " not in header() and "‖grad‖" in header()
        await pilot.press("1", "2", "3")
        assert app.table.shown == ("weight", "grad", "act")


def test_merge_samples_equals_numpy_on_the_concatenation():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 500), rng.normal(0, 1e-3, 700)
    b[:3] = 0.0
    sa, sb = synthetic.sample_of("w", "grad", a), synthetic.sample_of("w", "grad", b)
    merged = merge_samples([sa, sb])
    truth = synthetic.sample_of("w", "grad", np.concatenate([a, b]))
    for f in ("count", "near_zero", "zeros", "nan", "posinf", "neginf", "hist_n"):
        assert getattr(merged, f) == getattr(truth, f), f
    assert merged.min == truth.min and merged.max == truth.max
    assert math.isclose(merged.sumsq, truth.sumsq, rel_tol=1e-12)
    np.testing.assert_array_equal(histogram.expand(merged.hist_lo, merged.hist),
                                  histogram.expand(truth.hist_lo, truth.hist))
    assert merge_samples([sa]) is sa and merge_samples([]) is None
    bad = synthetic.sample_of("w", "grad", np.array([np.nan, np.inf, 1.0]))
    assert merge_samples([bad, bad]).nan == 2 and merge_samples([bad, bad]).posinf == 2


async def test_rank_view_cycles_merged_and_each_rank():
    app = XRayApp(ListSource(two_rank_feed()))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, step=2, alerts=0)
        row = app.state.rows[0]
        assert app.table.rank is None
        assert "(merged)" in screen_text(app)
        shown = lambda: app.table._grad_norm(row)  # noqa: E731 (what the ‖grad‖ column and its sort use)
        r0, r1 = (app.state.latest(row, "grad", r) for r in (0, 1))
        assert math.isclose(shown(), math.sqrt(r0.sumsq + r1.sumsq))
        await pilot.press("r")
        assert app.table.rank == 0 and math.isclose(shown(), stats.l2(r0))
        assert "(rank 0)" in screen_text(app)
        await pilot.press("r")
        assert app.table.rank == 1 and math.isclose(shown(), stats.l2(r1))
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert app.screen.rank == 1 and "rank 1" in screen_text(app)
        await pilot.press("r")
        assert app.table.rank is None and app.screen.rank is None


async def test_rank_key_with_one_rank_says_so():
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        await settle(pilot, app)
        await pilot.press("r")
        await pilot.pause()
        assert app.table.rank is None
        assert await shows(pilot, app, "one rank")


async def test_theme_key_cycles_all_xray_themes():
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        seen = [app.theme]
        for _ in themes.THEMES:
            await pilot.press("t")
            await pilot.pause()
            seen.append(app.theme)
            assert "model.layers.0.fc" in screen_text(app)
        assert set(seen) == set(themes.THEMES) and seen[-1] == seen[0]
        assert {"xray-dark", "xray-light", "xray-high-contrast", "xray-colorblind"} <= set(themes.THEMES)


def test_themes_define_every_meaning_and_badges_do_not_rely_on_colour():
    for theme in themes.THEMES.values():
        assert set(themes.DEFAULTS) <= set(theme.variables), theme.name
    cb = themes.THEMES["xray-colorblind"].variables
    assert len({cb["xray-ok"], cb["xray-warning"], cb["xray-critical"], cb["xray-dead"]}) == 4
    # Each severity has its own symbol and word, so it reads in monochrome too.
    labels = {BADGES[s] for s in ("ok", "warning", "critical")}
    assert len({b.split()[0] for b in labels}) == 3 and all(any(c.isalpha() for c in b) for b in labels)


def test_no_hard_coded_colours_in_widgets():
    import re
    import tui.widgets

    folder = os.path.dirname(tui.widgets.__file__)
    paths = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py")]
    paths += [os.path.join(os.path.dirname(folder), f) for f in ("app.py", "detail.py", "chooser.py")]
    for path in paths:
        src = open(path, encoding="utf-8").read()
        assert not re.search(r"#[0-9a-fA-F]{6}\b|\b(red|green|yellow|blue|magenta|cyan)\b", src), path


async def test_screenshot_key_writes_svg(tmp_path):
    app = XRayApp(ListSource(feed()), screenshot_dir=str(tmp_path))
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        await settle(pilot, app)
        await pilot.press("S")
        await pilot.pause()
        files = list(tmp_path.glob("*.svg"))
        assert len(files) == 1
        assert files[0].read_text().lstrip().startswith("<svg") and "model.layers" in files[0].read_text()
        assert await shows(pilot, app, "screenshot saved")


def test_help_lists_every_binding():
    from tui.help import HELP
    from tui.widgets.alerts import AlertList

    shown = " ".join(k for k, _ in HELP)
    names = {"question_mark": "?", "slash": "/", "up": "↑", "down": "↓", "pageup": "pgup",
             "pagedown": "pgdn", "backspace": "escape", "left": "←", "right": "→",
             "left_square_bracket": "[", "right_square_bracket": "]", "less_than_sign": "<",
             "greater_than_sign": ">", "colon": ":"}
    for cls in (XRayApp, LayerTable, AlertList, DetailScreen):
        for binding in cls.BINDINGS:
            for key in binding.key.split(","):
                assert names.get(key, key) in shown.split() + list(shown), (cls.__name__, key)


async def test_status_items_show_state_keep_data_and_reset_on_a_new_run():
    first = feed(n_steps=4)
    again = [[synthetic.hello(N_LAYERS, run="unit-run")], [synthetic.steps(N_LAYERS, 1, elements=64)[0]]]
    gate = threading.Event()

    class Source:
        label = "unit-run"

        def batches(self, stop=None):
            yield from first
            yield [Status(DISCONNECTED)]
            gate.wait(5)
            yield [Status("live", fresh=True)]
            yield from again
            stop.wait()

    app = XRayApp(Source())
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, app, lambda: app.connection == DISCONNECTED, tries=100)
        text = screen_text(app)
        assert "disconnected — retrying" in text and "step 3" in text and "model.layers.0.fc" in text
        assert len(app.state.alerts) == 2
        gate.set()
        await until(pilot, app, lambda: app.connection == "live" and app.state.step == 0, tries=100)
        assert app.state.step == 0 and len(app.state.alerts) == 0  # the old run's data is gone
        assert "● live" in screen_text(app)


def test_state_memory_budget_shrinks_rings_but_keeps_a_minimum():
    state = RunState(depth=64, budget=1000)
    state.ingest(synthetic.hello(50))
    steps = synthetic.steps(50, 70, elements=16)
    for s in steps:
        state.ingest(s)
    # 200 streams x 64 > 1000: rings halve down to the minimum, never below.
    assert state.stream_depth == MIN_DEPTH
    assert all(len(b) == MIN_DEPTH for b in state.history.values())
    assert state.series("model.layers.0.fc.weight", "weight")[-1][0] == 69  # the newest are kept
    small = RunState(depth=64, budget=10_000)
    small.ingest(synthetic.hello(10))
    for s in steps[:70]:
        small.ingest(msgspec.structs.replace(s, samples=s.samples[:40]))
    assert small.stream_depth == 64 and len(small.history[("model.layers.0.fc.weight", "weight", 0)]) == 64


# -- live sources: re-attach and the chooser ---------------------------------

def publisher(name: str, started: float, n_layers: int = 4):
    from probes.publish.publisher import Publisher

    hello = msgspec.structs.replace(synthetic.hello(n_layers, run=name), pid=os.getpid(), started=started)
    return Publisher(hello)


def collect(source, stop, out):
    for batch in source.batches(stop):
        out.extend(batch)


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_reattach_source_follows_a_run_across_restarts(tmp_path):
    steps = synthetic.steps(4, 3, elements=32)
    pub = publisher("again", started=1.0)
    for s in steps:
        pub.submit(lambda s=s: s)
    got, stop = [], threading.Event()
    source = ReattachSource("again", poll=0.05, record=str(tmp_path / "rec.xray"))
    reader = threading.Thread(target=collect, args=(source, stop, got), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: sum(isinstance(m, wire.Step) for m in got) == 3)
        pub.submit(lambda: wire.End(step=2, rank=0))
        pub.close()
        assert wait_for(lambda: Status(ENDED) in got)
        assert got[0] == Status("live", fresh=False)
        # The same name comes back as a new run: re-attached by itself, marked fresh.
        pub = publisher("again", started=2.0)
        pub.submit(lambda: steps[0])
        assert wait_for(lambda: Status("live", fresh=True) in got)
        assert wait_for(lambda: sum(isinstance(m, wire.Hello) for m in got) == 2)
        # Killed without an End: "disconnected — retrying", never "run ended".
        pub.close()
        assert wait_for(lambda: got[-1] == Status(DISCONNECTED))
    finally:
        stop.set()
        pub.close()
        reader.join(5)
    msgs, torn = wire.read_file(str(tmp_path / "rec.xray"))
    assert torn == 0
    assert [type(m).__name__ for m in msgs].count("Hello") == 2
    assert not any(isinstance(m, Status) for m in msgs)


async def test_chooser_lists_live_runs_and_attaches_to_the_chosen_one():
    pubs = [publisher("alpha", started=1.0), publisher("beta", started=2.0)]
    for p in pubs:
        p.submit(lambda: synthetic.steps(4, 1, elements=32)[0])
    try:
        source = ReattachSource(None, poll=0.05)
        assert source.needs_choice()
        app = XRayApp(source)
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot.pause(0.2)
            assert isinstance(app.screen, ChooserScreen)
            text = screen_text(app)
            assert "2 runs are live" in text and "alpha" in text and "beta" in text
            await pilot.press("down", "enter")
            for _ in range(200):
                await pilot.pause(0.02)
                if app.state.run == "beta" and app.state.step >= 0:
                    break
            assert source.name == "beta" and app.state.run == "beta"
            assert app.connection == "live"
    finally:
        for p in pubs:
            p.close()


async def test_chooser_escape_quits():
    pubs = [publisher("one", started=1.0), publisher("two", started=2.0)]
    try:
        app = XRayApp(ReattachSource(None, poll=0.05))
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot.pause(0.2)
            await pilot.press("escape")
            await pilot.pause(0.1)
            assert not app.is_running
    finally:
        for p in pubs:
            p.close()


# -- snapshots over sizes and states (the header shows the probe's clock, never the wall clock) --

async def _live(pilot) -> None:
    await settle(pilot, pilot.app)


async def _paused(pilot) -> None:
    await settle(pilot, pilot.app)
    await pilot.press("p")
    await pilot.pause()


async def _detail(pilot) -> None:
    await settle(pilot, pilot.app)
    await pilot.press("n", "enter")
    await pilot.pause(0.3)


def _state_feed(state: str) -> object:
    batches = feed(n_layers=40, n_steps=6)
    if state == "live":
        return HoldSource(batches[:-1])  # no alerts yet
    if state == "disconnected":
        return ListSource(batches + [[Status(DISCONNECTED)]])
    return HoldSource(batches)  # alerting, paused, detail


@pytest.mark.parametrize("size", [(80, 24), (160, 50)], ids=["80x24", "160x50"])
@pytest.mark.parametrize("state", ["live", "paused", "disconnected", "alerting", "detail"])
def test_snapshot_states(snap_compare, size, state):
    app = XRayApp(_state_feed(state))

    async def run_before(pilot) -> None:
        if state == "live":
            await settle(pilot, pilot.app, step=5, alerts=0)
        elif state == "paused":
            await _paused(pilot)
        elif state == "detail":
            await _detail(pilot)
        else:
            await settle(pilot, pilot.app, step=5)
        pilot.app._paint()
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=run_before)
