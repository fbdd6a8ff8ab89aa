"""Issue 15, the app a person would rather look at than read: status that agrees
with the cells, trend columns, the alerts pane's full message, the replay timeline.

Fed synthetic streams (no torch); alerts come from the real rule engine where
the point is what a run would show; the screen is read from the compositor.
"""

from __future__ import annotations

import numpy as np
import pytest

from probes.protocol import wire
from probes.rules import RuleEngine
from test_app import HoldSource, feed, screen_text, settle
from tui import synthetic
from tui.app import XRayApp


def _row_line(app: XRayApp, name: str) -> str:
    return next(line for line in screen_text(app).splitlines() if line.strip().startswith(name + " "))


def nan_run(n_layers: int = 8, origin: int = 2) -> list[list]:
    """A run whose activations go NaN at layer ``origin`` and stay NaN in every later
    layer (as a forward pass carries them), with the rule engine's own alerts."""
    batches = feed(n_layers=n_layers, n_steps=3)[:-1]  # hello + 3 healthy steps, no canned alerts
    engine = RuleEngine()
    engine.set_hello(batches[0][0])
    for b in batches[1:]:
        engine.evaluate(b[0])
    rng = np.random.default_rng(3)
    samples = []
    for i in range(n_layers):
        name = f"model.layers.{i}.fc"
        act = np.full(256, np.nan) if i >= origin else np.maximum(rng.normal(0, 1, 256), 0)
        samples.append(synthetic.sample_of(name, "act", act))
        samples.append(synthetic.sample_of(name + ".weight", "weight", rng.normal(0, 0.02, 256)))
    step = wire.Step(step=3, rank=0, time=1_700_000_002.0, samples=samples)
    alerts = engine.evaluate(step)
    assert any(a.rule == "nonfinite" for a in alerts)
    return batches + [[step], alerts]


async def test_nan_origin_is_critical_and_every_other_nan_row_says_it_is_affected():
    """Seen in the issue: after a NaN, rows with ✖ NaN 100% in every cell said ✓ ok."""
    app = XRayApp(HoldSource(nan_run()))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, step=3, alerts=1)
        origin = _row_line(app, "model.layers.2.fc")
        assert "✖ CRIT" in origin, origin
        for i in range(3, 8):
            line = _row_line(app, f"model.layers.{i}.fc")
            assert "✖ NaN" in line, line
            assert "↳ NaN" in line and "✓ ok" not in line and "✖ CRIT" not in line, line
        for i in (0, 1):
            assert "✓ ok" in _row_line(app, f"model.layers.{i}.fc")


# -- the replay timeline -------------------------------------------------------------


def _replay_feed(n_layers: int = 6, n_steps: int = 30) -> list[list]:
    """Steps whose gradient norm grows with the step (so each step's value is known), an
    alert at step 20, and the End (a whole recording)."""
    batches = [[synthetic.hello(n_layers, run="rec")]]
    for step in range(n_steps):
        samples = []
        for i in range(n_layers):
            name = f"model.layers.{i}.fc.weight"
            g = np.full(100, (step + 1) * 1e-4)  # ‖g‖ = (step + 1) * 1e-3
            samples.append(synthetic.sample_of(name, "grad", g))
            samples.append(synthetic.sample_of(name, "weight", np.linspace(-1, 1, 100)))
        batches.append([wire.Step(step=step, rank=0, time=1_700_000_000.0 + step, samples=samples)])
    batches.append([synthetic.alert(20, "model.layers.1.fc.weight", rule="exploding", severity="critical",
                                    kind="grad")])
    batches.append([wire.End(step=n_steps - 1, rank=0)])
    return batches


async def test_replay_seeks_and_shows_each_steps_recorded_values():
    from tui.feed import ListSource

    app = XRayApp(ListSource(_replay_feed()), replay=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, step=29, alerts=1)
        text = screen_text(app)
        assert "step 29 of 29 (replay)" in text and "steps/s" not in text
        assert "3.0e-02" in _row_line(app, "model.layers.0.fc")  # ‖g‖ at step 29
        assert "✖ CRIT" in _row_line(app, "model.layers.1.fc")
        await pilot.press("left")
        await pilot.pause()
        assert "step 28 of 29 (replay)" in screen_text(app)
        assert "2.9e-02" in _row_line(app, "model.layers.0.fc")
        await pilot.press("left_square_bracket")  # 10 back: step 18, before the alert
        await pilot.pause()
        text = screen_text(app)
        assert "step 18 of 29 (replay)" in text and "1.9e-02" in _row_line(app, "model.layers.0.fc")
        assert "✓ ok" in _row_line(app, "model.layers.1.fc") and "exploding" not in text
        await pilot.press("less_than_sign")
        await pilot.pause()
        assert "step 0 of 29" in screen_text(app) and "1.0e-03" in _row_line(app, "model.layers.0.fc")
        await pilot.press("colon")
        await pilot.press(*"21", "enter")
        await pilot.pause()
        text = screen_text(app)
        assert "step 21 of 29" in text and "2.2e-02" in _row_line(app, "model.layers.0.fc")
        assert "exploding" in text and "✖ CRIT" in _row_line(app, "model.layers.1.fc")
        # the detail shows the layer as it was at that step, and follows the timeline
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert "22 samples kept" in screen_text(app)
        assert "first kept (step 0)  ━ last (step 29)  ━ step 21" in screen_text(app)  # first vs last vs chosen
        await pilot.press("right")
        await pilot.pause(0.3)
        assert "23 samples kept" in screen_text(app)
        await pilot.press("escape", "greater_than_sign")
        await pilot.pause()
        assert "step 29 of 29" in screen_text(app)


async def test_live_runs_have_no_timeline_keys():
    app = XRayApp(HoldSource(feed()))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        await pilot.press("left", "colon")
        await pilot.pause()
        assert app.replay_at is None and "(replay)" not in screen_text(app)
        assert not app.query_one("#goto").has_class("visible")


async def test_the_highlighted_alerts_full_message_shows_under_the_pane_at_80_columns():
    """Seen in the issue: alert messages were cut at the pane's edge."""
    tail = "lower the learning rate or clip the gradient norm (the end of a long message)"
    long = wire.Alert(step=3, rank=0, severity="warning", rule="exploding", layer="model.layers.5.fc.weight",
                      kind="grad", value=1.0, threshold=0.5, message="gradient norm grew 40x in 20 steps: " + tail)
    app = XRayApp(HoldSource(feed()[:-1] + [[long]]))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app, alerts=1)
        pane_line = next(line for line in screen_text(app).splitlines() if "●" in line)
        assert tail not in pane_line  # the pane's line is cut at its edge ...
        words = " ".join(screen_text(app).split())
        assert tail in words  # ... the line under it says it all, wrapped


async def test_a_critical_alert_stays_on_top_of_newer_warnings_in_a_small_pane():
    """Seen at 80x24: alerts came newest first, so the only critical one was off screen."""
    crit = synthetic.alert(3, "model.layers.7.fc.weight", rule="exploding", severity="critical", kind="grad")
    warns = [synthetic.alert(3 + i, f"model.layers.{i}.fc", rule="dead") for i in range(20)]
    app = XRayApp(HoldSource(feed()[:-1] + [[crit], warns]))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app, alerts=21)
        pane = [line for line in screen_text(app).splitlines() if "CRITICAL" in line or "WARNING" in line]
        assert "CRITICAL" in pane[0] and "exploding" in pane[0], pane


# -- the detail's line charts ------------------------------------------------------------


def test_braille_charts_have_readable_ticks_and_no_negative_zero():
    from tui.widgets.braille import fmt_tick, nice_ticks
    from tui.widgets.plots import Series, build_chart

    ticks, step = nice_ticks(-0.0004, 0.0231, 5)
    labels = [fmt_tick(t, step) for t in ticks]
    assert "0" in labels and not any(lb.startswith("-0.0") and set(lb[1:]) <= set("0.") for lb in labels)
    assert fmt_tick(2.5e-3) == "2.5e-03" and fmt_tick(12_500) == "12.5k" and fmt_tick(-1e-20, 0.01) == "0"
    steps = tuple(range(0, 200, 5))
    text = build_chart([Series(steps, tuple(1e-3 * (s - 100) for s in steps), "mean")], 50, 10)
    assert "-0.000" not in text and any(ch in text for ch in "⠁⠂⠄⡀⠈⠐⠠⢀")  # braille dots
    assert text.splitlines()[-1].split() == ["0", "50", "100", "150"]  # whole steps


def test_a_norm_that_spans_decades_gets_a_log_axis():
    from tui.widgets.plots import Series, spans_decades

    steps = tuple(range(10))
    assert spans_decades([Series(steps, tuple(10.0 ** s for s in steps), "‖g‖")])
    assert not spans_decades([Series(steps, tuple(1.0 + s for s in steps), "‖g‖")])
    assert not spans_decades([Series(steps, tuple(s - 5.0 for s in steps), "mean")])  # signed: linear


# -- two runs side by side -------------------------------------------------------------


def _recording(path, batches) -> str:
    with open(path, "wb") as f:
        f.write(wire.MAGIC)
        for batch in batches:
            for msg in batch:
                f.write(wire.encode(msg))
    return str(path)


def _scaled_run(scale: float, n_layers: int = 4, n_steps: int = 5) -> list[list]:
    """Weights of layer 2 scaled by ``scale`` (the others the same as in any run of this seed)."""
    batches = [[synthetic.hello(n_layers, run=f"run-x{scale:g}")]]
    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.02, (n_layers, 400))
    for step in range(n_steps):
        samples = [synthetic.sample_of(f"model.layers.{i}.fc.weight", "weight", base[i] * (scale if i == 2 else 1))
                   for i in range(n_layers)]
        batches.append([wire.Step(step=step, rank=0, time=1_700_000_000.0 + step, samples=samples)])
    return batches


def test_compare_helpers_measure_how_far_two_weight_distributions_moved():
    from tui import compare

    x = np.random.default_rng(1).normal(0, 1, 5000)
    a, b = synthetic.sample_of("w", "weight", x), synthetic.sample_of("w", "weight", 4 * x)
    assert compare.hist_distance(a, a) == 0
    assert 0.5 < compare.hist_distance(a, b) <= 1  # 4x wider: most elements sit in other bins
    assert abs(compare.rel_change(1.0, 1.5) - 0.5) < 1e-12 and compare.pct(0.5) == "+50%"
    assert compare.pct(-0.034) == "-3.4%" and compare.pct(0.0001) == "0%"
    assert compare.rel_change(None, 1.0) is None and compare.pct(None) == "—"


async def test_replay_vs_shows_both_runs_side_by_side_and_overlays_the_histograms(tmp_path):
    from tui import compare
    from tui.feed import FileSource

    a = _recording(tmp_path / "a.xray", _scaled_run(1.0))
    b = _recording(tmp_path / "b.xray", _scaled_run(3.0))
    app = XRayApp(FileSource(a), replay=True, other=compare.load_state(b), other_label="b.xray")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, step=4, alerts=0)
        text = screen_text(app)
        assert "‖W‖ A" in text and "‖W‖ B" in text and "Δ‖W‖" in text
        assert "+200%" in _row_line(app, "model.layers.2.fc")  # 3x the norm
        assert " 0% " in _row_line(app, "model.layers.1.fc") + " "
        await pilot.press("down", "down", "enter")
        await pilot.pause(0.3)
        assert "━ A (step 4)  ━ B b.xray" in screen_text(app)


def test_vs_with_headless_or_a_missing_file_is_a_one_line_error(tmp_path, capsys):
    from tui import cli

    a = _recording(tmp_path / "a.xray", _scaled_run(1.0))
    assert cli.main(["replay", a, "--vs", str(tmp_path / "nope.xray")]) == 2
    assert "nope.xray: no such file" in capsys.readouterr().err
    assert cli.main(["replay", a, "--vs", a, "--headless"]) == 2
    assert "--vs" in capsys.readouterr().err


# -- snapshots: the sizes and states (the header shows the probe's clock, never the wall clock) --


def _snap_app(view: str, tmp_path):
    from tui import compare
    from tui.feed import FileSource, ListSource

    if view == "live":
        return XRayApp(HoldSource(feed(n_layers=40, n_steps=24)[:-1]))
    if view == "nan":
        return XRayApp(HoldSource(nan_run(n_layers=24)))
    if view == "replay":
        return XRayApp(ListSource(_replay_feed(n_layers=24)), replay=True)
    a = _recording(tmp_path / "a.xray", _scaled_run(1.0, n_layers=24))
    b = _recording(tmp_path / "b.xray", _scaled_run(3.0, n_layers=24))
    return XRayApp(FileSource(a), replay=True, other=compare.load_state(b), other_label="b.xray")


@pytest.mark.parametrize(("view", "size"), [
    ("live", (200, 60)), ("nan", (120, 40)), ("nan", (200, 60)), ("replay", (80, 24)),
    ("replay", (120, 40)), ("compare", (120, 40)), ("compare", (200, 60)),
], ids=lambda v: v if isinstance(v, str) else f"{v[0]}x{v[1]}")
def test_snapshot_views(snap_compare, tmp_path, view, size):
    app = _snap_app(view, tmp_path)

    async def run_before(pilot) -> None:
        step = {"live": 23, "nan": 3, "replay": 29, "compare": 4}[view]
        await settle(pilot, pilot.app, step=step, alerts=1 if view in ("nan", "replay") else 0)
        if view == "replay":
            await pilot.press("colon", *"21", "enter")  # just after the alert at step 20
        pilot.app._paint()
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=run_before)


async def test_at_80x24_a_failing_row_below_the_fold_is_brought_into_view_until_the_user_moves():
    """Seen in the issue: at 80x24 the failing rows were off screen."""
    from tui.feed import ListSource

    batches = feed(n_layers=40, n_steps=3)[:-1]
    batches.append([synthetic.alert(2, "model.layers.35.fc.weight", rule="exploding", severity="critical",
                                    kind="grad")])
    app = XRayApp(ListSource(batches))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app, step=2, alerts=1)
        assert app.table.cursor_row.name == "model.layers.35.fc"
        assert "✖ CRIT" in screen_text(app)
        await pilot.press("home")  # the user's own move is kept
        app._paint()
        await pilot.pause()
        assert app.table.cursor == 0
