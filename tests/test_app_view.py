"""Issue 15, the app a person would rather look at than read: status that agrees
with the cells, trend columns, the alerts pane's full message, the replay timeline.

Fed synthetic streams (no torch); alerts come from the real rule engine where
the point is what a run would show; the screen is read from the compositor.
"""

from __future__ import annotations

import numpy as np

from probes import wire
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
