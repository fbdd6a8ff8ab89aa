"""A newcomer's first hour (issue 28): the command line's paper cuts, each checked as a user meets it."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli_in_process(*argv: str) -> tuple[int, bool, str]:
    """Run ``xray-tui ARGV`` in a fresh interpreter: (exit status, whether torch was imported, stderr)."""
    code = ("import sys\nfrom tui.cli import main\nrc = main(sys.argv[1:])\n"
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    rc, torch_seen, hf_seen = out.stdout.split()[-3:]
    return int(rc), torch_seen == "True" or hf_seen == "True", out.stderr


@pytest.mark.parametrize("argv, said", [
    (["demo", "--theme", "nosuch"], "unknown theme 'nosuch' (known: "),
    (["demo", "--headless", "--theme", "nosuch"], "unknown theme 'nosuch'"),
    (["demo", "--headless", "--status-every", "-1"], "--status-every must be a number of seconds >= 0, got '-1'"),
    (["demo", "--status-every", "soon"], "--status-every must be a number of seconds >= 0"),
    (["demo", "--headless", "--rules", "/nonexistent/rules.toml"], "/nonexistent/rules.toml"),
    (["demo", "--log", "/nonexistent/dir/run.xray"], "--log /nonexistent/dir/run.xray: no such directory"),
    (["demo", "--notify-interval", "-3"], "--notify-interval must be a number of minutes >= 0, got '-3'"),
])
def test_demo_checks_every_option_before_importing_torch(argv, said):
    """A typo costs what --help costs: the one-line error comes with torch never imported (and no
    trainer started); before, the theme was checked by the app after the trainer child was spawned."""
    rc, imported, err = cli_in_process(*argv)
    assert rc == 2 and said in err and err.count("\n") == 1, err
    assert not imported


def _demo_recording(path: Path) -> None:
    """A two-step recording of the demo's own model (its real layer names), kept small: one block
    fewer and narrower than the demo's, the same module paths."""
    import torch

    import probes
    from probes.demo import training

    torch.manual_seed(0)
    model = training.build_model(vocab=12, layers=2, width=16, heads=2, block=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with probes.attach(model, opt, every=1, serve=False, log=str(path)):
        for _ in range(2):
            x = torch.randint(12, (2, 8))
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()


def _export(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tui.cli", "export", *argv], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_export_help_example_matches_the_demos_layers(tmp_path):
    """The --layer example of `export --help` keeps samples of the demo's recording (it used to be
    '^h\\.0\\.', which matches nothing there: the names start with `transformer.`)."""
    from tui.cli import build_parser

    rec = tmp_path / "demo.xray"
    _demo_recording(rec)
    export = build_parser()._subparsers._group_actions[0].choices["export"]
    (layer,) = [a for a in export._actions if "--layer" in a.option_strings]
    example = re.search(r"e\.g\. ('[^']+')", layer.help).group(1)
    (pattern,) = shlex.split(example)
    out = _export(str(rec), "--layer", pattern, "--what", "samples")
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    assert out.returncode == 0 and rows, out.stderr
    assert {r["layer"] for r in rows} and all(r["layer"].startswith("transformer.h.0.") for r in rows)
    assert out.stderr == ""  # no "matched no sample" line


def test_export_filter_that_matches_nothing_names_the_layers_there(tmp_path):
    """A --layer/--kind that keeps no sample says so, with a few of the recording's names."""
    rec = tmp_path / "demo.xray"
    _demo_recording(rec)
    out = _export(str(rec), "--layer", r"^h\.0\.", "-o", str(tmp_path / "o.jsonl"))
    assert out.returncode == 0
    wrote, said = out.stderr.splitlines()
    assert wrote.startswith("wrote 0 samples and ")
    assert said.startswith(r"xray-tui: export: --layer '^h\.0\.' matched no sample; the recording's layers: "
                           "transformer.wte, transformer.wpe, transformer.h.0.ln_1, ")
    assert re.search(r"\.\.\. \(\d+ in all\); their kinds: weight, grad, act, update$", said), said
    # the layer matched but not with that kind: the layers it matched, and the kinds they do have
    out = _export(str(rec), "--layer", r"ln_f$", "--kind", "update", "--what", "samples")
    assert out.returncode == 0 and out.stdout == ""
    assert out.stderr == ("xray-tui: export: --layer 'ln_f$' --kind update matched no sample; the layers it "
                          "matches: transformer.ln_f; their kinds: act\n")


def test_readme_says_what_ci_runs_beyond_pytest():
    """The README's test command section names each thing `.ci/run` does besides pytest."""
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("Run the tests"):readme.index("## In your training script")]
    for tool in ("lint-imports", "tmux", "gdb", "triton"):
        assert tool in ci, tool  # (what .ci/run does)
        assert tool in section, f"the README's test section does not say .ci/run uses {tool}"
    assert "this is what `.ci/run` does" not in section


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_vanishing_on_fp32_says_what_exact_zero_gradients_mean(precision):
    """Exact-zero gradients on an fp32/bf16 run are not underflow (it used to say "gradients
    underflow; the run is fp32, whose exponent range does not underflow here")."""
    from test_rules import fired, grad, hello, run, step

    from probes.rules import RuleEngine

    eng = RuleEngine()
    eng.set_hello(hello([], precision))
    alerts = run(eng, [step(i, grad(1.0)) for i in range(8)] + [step(8 + i, grad(1.0, zeros=0.9)) for i in range(3)])
    (a,) = fired(alerts)
    assert a.rule == "vanishing" and "underflow" not in a.message
    assert a.message.endswith(f"no gradient flows back (the run is {precision}, which does not flush small "
                              "gradients to zero): check for a saturated activation (sigmoid, tanh), a dead "
                              "ReLU/GELU region after it or masking")


# -- headless and replay -------------------------------------------------------------------------


def _watch(live: bool):
    import io

    from tui.headless import AlertPrinter, RunWatch

    out = io.StringIO()
    return RunWatch(AlertPrinter(out=out), live=live, label="t"), out


def test_status_line_after_a_nan_says_loss_nan():
    """A NaN loss is the news: the status line says `loss nan` (it said `loss —`, as if none came);
    `—` stays for a loss not sent yet."""
    from probes.protocol import wire

    watch, out = _watch(live=False)
    watch.status()
    watch.handle(wire.Scalars(step=50, rank=0, time=1.0, values={"loss": float("nan"), "lr": 1e-3}))
    watch.status()
    first, second = out.getvalue().splitlines()
    assert "loss —" in first
    assert "step 50 " in second and "loss nan  lr 0.001" in second


def test_live_status_lines_never_repeat_the_same_line():
    """Live, a status line with no new step since the one before says for how long the run has
    been quiet, rather than printing the previous line again."""
    from probes.protocol import wire

    watch, out = _watch(live=True)
    watch.handle(wire.Scalars(step=70, rank=0, time=1.0, values={"loss": 2.5}))
    watch.status()
    watch.status()
    watch.handle(wire.Scalars(step=75, rank=0, time=2.0, values={"loss": 2.4}))
    watch.status()
    lines = out.getvalue().splitlines()
    assert len(set(lines)) == 3, lines
    assert lines[1] == lines[0] + "  (no new step for 0 s)"
    assert "step 75 " in lines[2] and "no new step" not in lines[2]


async def test_replay_header_counts_to_the_step_the_run_ended_at():
    """A 120-step run sampled every 5 has its last sample at 115 and its End at 120: the header
    says "step 115 of 120", as the headless end line says "run ended at step 120" (it said 115 of 115)."""
    import numpy as np
    from test_app import screen_text, settle

    from probes.protocol import wire
    from tui import synthetic
    from tui.app import XRayApp
    from tui.feed import ListSource

    batches = [[synthetic.hello(2, run="rec")]]
    for step in range(0, 120, 5):
        samples = [synthetic.sample_of(f"model.layers.{i}.fc.weight", "weight", np.linspace(-1, 1, 50))
                   for i in range(2)]
        batches.append([wire.Step(step=step, rank=0, time=1e9 + step, samples=samples)])
    batches.append([wire.End(step=120, rank=0)])
    app = XRayApp(ListSource(batches), replay=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, step=115, alerts=0)
        assert "step 115 of 120 (replay)" in screen_text(app)


@pytest.mark.slow
def test_demo_dead_fault_is_the_first_and_loudest_alert():
    """`demo --fault dead`: the first alert after the fault is `dead` on the layer it names, and
    nothing is louder. It used to be `exploding`, critical, on c_fc's bias: the demo wrote -10 into
    a bias whose norm was near 0.1, a 1600x jump in a weight; now it shifts the activation's input."""
    from probes.demo import training as demo
    from probes.protocol import wire

    msgs = []
    demo.train(steps=45, every=5, fault="dead", fault_step=20, name="demo-dead-first", serve=False,
               listener=msgs.append)
    (note,) = [m for m in msgs if isinstance(m, wire.Note) and m.event == "fault"]
    alerts = [m for m in msgs if isinstance(m, wire.Alert) and m.severity != "info"]
    assert alerts, "no alert"
    first = alerts[0]
    assert (first.rule, first.layer, first.kind) == ("dead", note.data["layer"], "act") == (
        "dead", "transformer.h.1.mlp.act", "act")
    assert first.step - note.step <= 10  # the third sample at every=5
    rank = {"warning": 1, "critical": 2}
    assert max(rank[a.severity] for a in alerts) == rank[first.severity], [(a.rule, a.severity) for a in alerts]


# -- the app -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_the_selected_alerts_message_is_never_cut(size):
    """A long message (~480 characters: 7 lines at 80 columns, 5 at 120) shows whole under the
    pane, focused or not; it was cut after 3 lines (max-height: 3)."""
    from test_app import HoldSource, feed, screen_text, settle

    from probes.protocol import wire
    from tui.app import XRayApp

    tail = "check for a saturated activation (sigmoid, tanh), a dead ReLU/GELU region after it or masking"
    message = ("100% of model.layers.5.fc.weight's gradient is exactly zero (it was 0%): no gradient flows back "
               "(the run is fp32, which does not flush small gradients to zero): " + tail
               + "; 14 other streams of this block and the next hold exact zeros too, model.layers.6.fc.weight "
                 "first, so look at the layer after it before the optimizer, END.")
    long = wire.Alert(step=3, rank=0, severity="warning", rule="vanishing", layer="model.layers.5.fc.weight",
                      kind="grad", value=1.0, threshold=0.5, message=message)
    app = XRayApp(HoldSource(feed()[:-1] + [[long]]))
    async with app.run_test(size=size) as pilot:
        await settle(pilot, app, alerts=1)
        assert message in " ".join(screen_text(app).split())
        app.alert_list.focus()
        await pilot.pause()
        app._paint()
        await pilot.pause()
        assert message in " ".join(screen_text(app).split())


async def test_before_any_data_the_trend_header_counts_no_samples():
    """With a hello and no sample yet, the trend column is headed "trend", not "13 samples" (which,
    beside "‖grad‖", read as samples received); once samples come, it says how many it shows."""
    from test_app import HoldSource, feed, screen_text, settle

    from tui import synthetic
    from tui.app import XRayApp

    app = XRayApp(HoldSource([[synthetic.hello(4, run="quiet")]]))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, step=-1, alerts=0)
        header = next(line for line in screen_text(app).splitlines() if "‖grad‖" in line)
        assert "samples" not in header and "trend" in header, header
    app = XRayApp(HoldSource(feed()[:-1]))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, alerts=0)
        header = next(line for line in screen_text(app).splitlines() if "‖grad‖" in line)
        assert re.search(r"\d+ samples", header), header


def _alerting_feed(n_layers: int, alerts: list) -> list:
    from tui import synthetic

    batches = [[synthetic.hello(n_layers, run="n-run")]]
    batches += [[s] for s in synthetic.steps(n_layers, 4, elements=64)]
    batches.append(alerts)
    return batches


async def test_n_goes_to_the_layer_the_first_alert_names_then_the_next():
    """`n` follows the alerts, the earliest first (the likeliest origin), not the table's order:
    it used to take the row highest in the table, such as a block above the layer that broke."""
    from test_app import HoldSource, settle

    from tui import synthetic
    from tui.app import XRayApp

    first = synthetic.alert(1, "model.layers.5.fc.weight", rule="exploding", severity="critical", kind="weight")
    later = synthetic.alert(3, "model.layers.2.fc", rule="exploding", severity="critical", kind="act")
    app = XRayApp(HoldSource(_alerting_feed(8, [first, later])))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, alerts=2)
        table = app.table
        seen = []
        for _ in range(3):
            await pilot.press("n")
            seen.append(table.cursor_row.name)
        assert seen == ["model.layers.5.fc", "model.layers.2.fc", "model.layers.5.fc"]


async def test_n_at_80x24_does_not_skip_the_origin_the_table_scrolled_to():
    """At 80x24 the table brings a failing row below the fold into view on its own; the first `n`
    must still go to the first alert's layer (it went to the next one, skipping the origin)."""
    from test_app import HoldSource, settle

    from tui import synthetic
    from tui.app import XRayApp

    origin = synthetic.alert(1, "model.layers.28.fc.weight", rule="exploding", severity="critical", kind="grad")
    after = synthetic.alert(3, "model.layers.29.fc", rule="exploding", severity="critical", kind="act")
    app = XRayApp(HoldSource(_alerting_feed(30, [origin, after])))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app, alerts=2)
        table = app.table
        assert table.scroll_offset.y > 0  # the table scrolled down to the failing rows by itself
        await pilot.press("n")
        assert table.cursor_row.name == "model.layers.28.fc"
        await pilot.press("n")
        assert table.cursor_row.name == "model.layers.29.fc"


async def test_a_blocks_detail_footer_lists_only_keys_that_work():
    """A block's detail (activations only) has no `w Weight` or `g Grad` in its footer, and those
    keys do nothing there; a Linear's detail still lists them."""
    import numpy as np
    from test_app import HoldSource, screen_text, settle

    from probes.protocol import wire
    from tui import synthetic
    from tui.app import XRayApp

    hello = synthetic.hello(2, run="blocks")
    hello = wire.Hello(version=hello.version, run=hello.run, rank=0, world_size=1, pid=1, started=hello.started,
                       every=1, layers=[wire.LayerInfo("model.block", "Block", [], True, role="block"),
                                        *hello.layers])
    steps = [wire.Step(step=s.step, rank=0, time=s.time,
                       samples=[*s.samples, synthetic.sample_of("model.block", "act", np.linspace(-1, 1, 64))])
             for s in synthetic.steps(2, 4, elements=64)]
    app = XRayApp(HoldSource([[hello], *[[s] for s in steps]]))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app, alerts=0)
        assert app.table.select_layer("model.block")
        await pilot.press("enter")
        await pilot.pause()
        footer = screen_text(app).splitlines()[-1]
        assert "Back" in footer and "Weight" not in footer and "Grad" not in footer, footer
        await pilot.press("w")
        await pilot.pause()
        assert app.screen.kind == "act"
        await pilot.press("escape")
        assert app.table.select_layer("model.layers.0.fc")
        await pilot.press("enter")
        await pilot.pause()
        footer = screen_text(app).splitlines()[-1]
        assert "Weight" in footer and "Grad" in footer, footer


async def test_a_charts_wrapped_message_keeps_its_indent():
    """A chart's message wider than the chart wraps with every line one column in, as its title
    ("no spread / to draw" started the second line at column 0 in the detail at 80x24)."""
    from textual.app import App

    from tui.widgets.plots import Chart

    class One(App):
        CSS = "Chart { width: 30; height: 6; }"

        def compose(self):
            yield Chart(title="histogram", empty_text="every value is 0.5 now (min = max): no spread to draw")

    app = One()
    async with app.run_test(size=(40, 8)) as pilot:
        await pilot.pause()
        lines = [strip.text[:30].rstrip() for strip in app.screen._compositor.render_strips()][:6]
        shown = [line for line in lines if line.strip()]
        assert len(shown) >= 3 and all(line.startswith(" ") and not line.startswith("  ") for line in shown), lines
        assert " ".join(" ".join(shown).split()) == "histogram every value is 0.5 now (min = max): no spread to draw"


async def test_screenshot_goes_where_the_variable_says_in_local_fonts_and_the_toast_keeps_names_whole(
        tmp_path, monkeypatch):
    """`S` writes into $XRAY_TUI_SCREENSHOTS (it was always the working directory), the SVG asks
    for no font from the network and names fonts with braille, and the toast breaks the path after
    a / only (it split a name mid-word)."""
    from test_app import ListSource, feed, settle

    from tui.app import XRayApp

    where = tmp_path / "shots" / "a-long-directory-for-screenshots"
    monkeypatch.setenv("XRAY_TUI_SCREENSHOTS", str(where))
    monkeypatch.chdir(tmp_path)
    app = XRayApp(ListSource(feed()))
    said = []
    app.notify = lambda message, **kw: said.append(message)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        await pilot.press("S")
        await pilot.pause()
    (svg,) = where.glob("*.svg")
    assert list(tmp_path.glob("*.svg")) == []
    text = svg.read_text()
    assert text.lstrip().startswith("<svg") and "model.layers" in text
    assert "url(\"http" not in text and "@font-face" not in text
    assert '"DejaVu Sans Mono"' in text and "font-family: Fira Code, monospace;" not in text
    (message,) = said
    lines = message.splitlines()
    assert lines[0] == "screenshot saved to" and "".join(lines[1:-1]) == str(svg)
    width = min(60, 80 // 2) - 3
    assert all(len(line) <= width and (line.endswith("/") or line == lines[-2]) for line in lines[1:-1]), lines
    assert lines[-2] == svg.name  # the file's name whole on its line
    assert lines[-1] == "($XRAY_TUI_SCREENSHOTS sets the directory)"


def test_relative_labels_follow_the_tree():
    from tui.widgets.layer_table import relative_labels

    names = ["transformer.wte", "transformer.h.0", "transformer.h.0.ln_1", "transformer.h.0.attn.c_attn",
             "transformer.h.1", "transformer.h.10.mlp", "transformer.h.10.mlp.act", "lm_head"]
    assert relative_labels(names) == {"transformer.h.0.ln_1": "ln_1", "transformer.h.0.attn.c_attn": "attn.c_attn",
                                      "transformer.h.10.mlp.act": "act"}


async def test_rows_show_names_relative_to_their_parent_and_the_header_the_full_path():
    """Under `transformer.h.0` a row reads `attn.c_attn` (it was `…ormer.h.0.attn.c_attn` at 80
    columns, the block number cut off); the selected row's full path is in the column's header,
    and the detail's title has it too. Sorted by name (no tree) rows show full paths again."""
    import numpy as np
    from test_app import HoldSource, screen_text, settle

    from probes.protocol import wire
    from tui import synthetic
    from tui.app import XRayApp

    names = ["transformer.wte"] + [n for b in range(3) for n in (
        f"transformer.h.{b}", f"transformer.h.{b}.ln_1", f"transformer.h.{b}.attn.c_attn",
        f"transformer.h.{b}.mlp.c_fc", f"transformer.h.{b}.mlp.act")]
    layers = [wire.LayerInfo(n, "Block" if n.count(".") == 2 else "Linear",
                             [] if n.count(".") == 2 or n.endswith("act") else ["weight"], True) for n in names]
    hello = wire.Hello(version=wire.PROTOCOL_VERSION, run="tree", rank=0, world_size=1, pid=1,
                       started=1e9, every=1, layers=layers)
    x = np.linspace(-1, 1, 64)
    steps = [[wire.Step(step=i, rank=0, time=1e9 + i,
                        samples=[synthetic.sample_of(n, "act", x) for n in names]
                        + [synthetic.sample_of(f"{li.name}.weight", "weight", x) for li in layers if li.params])]
             for i in range(3)]
    app = XRayApp(HoldSource([[hello], *steps]))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app, step=2, alerts=0)
        lines = screen_text(app).splitlines()
        row = next(line for line in lines if "attn.c_attn" in line)
        assert "…" not in row and "transformer.h.0.attn" not in row and row.lstrip().startswith("attn.c_attn")
        assert any(line.lstrip().startswith("transformer.h.2 ") for line in lines)
        assert app.table.select_layer("transformer.h.1.mlp.c_fc")
        await pilot.pause()
        header = next(line for line in screen_text(app).splitlines() if "‖grad‖" in line)
        # at 80 columns the path loses leading names whole, never the block number
        assert header.lstrip().startswith("…h.1.mlp.c_fc ") or header.lstrip().startswith(
            "transformer.h.1.mlp.c_fc "), header
        await pilot.resize_terminal(120, 40)
        await pilot.pause()
        app._paint()
        await pilot.pause()
        header = next(line for line in screen_text(app).splitlines() if "‖grad‖" in line)
        assert header.lstrip().startswith("transformer.h.1.mlp.c_fc "), header
        await pilot.press("enter")
        await pilot.pause()
        assert "transformer.h.1.mlp.c_fc" in screen_text(app)
        await pilot.press("escape")
        await pilot.pause()
        app.table.set_sort("name")
        await pilot.pause()
        assert all(app.table.label(r) == r.name for r in app.state.rows)  # no tree: full paths


def test_sparkline_peaks_stay_below_the_cell_top():
    """The tallest column is ▇ (7/8), never █: neighbouring rows' peaks no longer merge into towers."""
    import numpy as np

    from tui import synthetic
    from tui.widgets.table_cells import sparkline

    rng = np.random.default_rng(0)
    for x in (rng.normal(0, 1, 4096), np.ones(10), [0.0, 0.0, 1.0]):
        line = sparkline(synthetic.sample_of("x", "weight", np.asarray(x, dtype=float)), 12)
        assert "█" not in line and "▇" in line, line


def test_trend_peaks_stay_below_the_cell_top():
    from tui.widgets.trend import trend_line

    line = trend_line([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], 9)
    assert "█" not in line and line[-1] == "▇" and line[0] == "▁", line
    assert trend_line([2.0, 2.0], 2) == "▄▄"  # a flat line at mid height, as before
