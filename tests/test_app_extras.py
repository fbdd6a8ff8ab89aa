"""The detail screen shows the distance from initialisation, LoRA shifts and eval passes."""

import msgspec
import numpy as np

from probes.protocol import wire
from tui import synthetic
from tui.app import XRayApp
from tui.detail import DetailScreen
from tui.feed import ListSource

BASE, LORA_B = "m.q.base_layer", "m.q.lora_B"


def feed() -> list[list]:
    layers = [wire.LayerInfo(BASE, "Linear", ["weight"], True),
              wire.LayerInfo(LORA_B, "Linear", ["weight"], False, "lora", adapter_of=BASE)]
    hello = msgspec.structs.replace(synthetic.hello(1, run="extras"), layers=layers)
    rng = np.random.default_rng(0)
    batches = [[hello]]
    for step in range(3):
        w = synthetic.sample_of(f"{BASE}.weight", "weight", rng.normal(0, 0.02, 256))
        up = msgspec.structs.replace(synthetic.sample_of(f"{BASE}.weight", "update", rng.normal(0, 2e-5, 256),
                                                         ratio=1e-3), init_dist=0.125 * (step + 1))
        b = msgspec.structs.replace(synthetic.sample_of(f"{LORA_B}.weight", "weight", rng.normal(0, 1e-3, 64)),
                                    lora_shift=0.0123 * step)
        act = synthetic.sample_of(BASE, "act", rng.normal(0, 1, 256))
        batches.append([wire.Step(step=step, rank=0, time=1e9 + step, samples=[w, up, b, act])])
        ev = synthetic.sample_of(BASE, "act", rng.normal(0, 50, 256))
        batches.append([wire.Step(step=step + 1, rank=0, time=1e9 + step, samples=[ev], phase="eval")])
    return batches


def text(app) -> str:
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def test_detail_shows_lora_shift_distance_from_init_and_eval_passes():
    app = XRayApp(ListSource(feed()))
    async with app.run_test(size=(160, 50)) as pilot:
        for _ in range(200):
            await pilot.pause(0.02)
            if app.state.step >= 2 and app.connection != "live":
                break
        rows = {r.name: r for r in app.state.rows}
        assert rows[LORA_B].adapter_of == BASE
        app.push_screen(DetailScreen(app.state, rows[LORA_B]))
        await pilot.pause(0.2)
        shown = text(app)
        assert f"LoRA adapter of {BASE}" in shown
        assert "LoRA shift" in shown and "now 0.0246" in shown, shown
        await pilot.press("escape")
        app.push_screen(DetailScreen(app.state, rows[BASE], kind="update"))
        await pilot.pause(0.2)
        assert "from init ‖W−W₀‖/‖W₀‖ 0.375" in text(app)
        assert "LoRA adapter" not in text(app)
        await pilot.press("a")
        await pilot.pause(0.2)
        assert "‖x‖₂ eval" in text(app)
        # the training stream holds the training passes only
        assert [st for st, _ in app.state.series(BASE, "act")] == [0, 1, 2]
        assert [st for st, _ in app.state.eval_series(BASE)] == [1, 2, 3]
