"""The alert rules on synthetic streams whose statistics are numpy ground
truth (tui.synthetic.sample_of), the TOML thresholds file, and --rules in
headless mode. Real fault-injected trainings are in test_fault_zoo.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from probes.protocol import wire
from probes.rules import ALL_LAYERS, RuleConfig, RuleEngine
from probes.rules.config import RulesConfigError, load, parse
from tui.headless import AlertPrinter
from tui.synthetic import sample_of

RNG = np.random.default_rng(0)


def step(i, *samples, rank=0, norms=None):
    return wire.Step(step=i, rank=rank, time=float(i), samples=list(samples), rank_grad_norms=norms)


def grad(scale, name="fc.weight", n=256, zeros=0.0):
    x = RNG.normal(0, scale, n)
    x[: int(zeros * n)] = 0.0
    return sample_of(name, "grad", x)


def run(engine, steps):
    return [a for s in steps for a in engine.evaluate(s)]


def fired(alerts, rule=None):
    return [a for a in alerts if a.severity != "info" and (rule is None or a.rule == rule)]


# -- exploding -------------------------------------------------------------

def test_exploding_needs_two_samples_at_10x_and_fires_once_then_recovers_once():
    eng = RuleEngine()
    base = [step(i, grad(1e-3)) for i in range(10)]
    spike = [step(10 + i, grad(3e-2)) for i in range(5)]  # 30x for 5 samples
    back = [step(15 + i, grad(1e-3)) for i in range(5)]
    alerts = run(eng, base) + run(eng, spike[:1])
    assert alerts == []  # one sample is not enough
    alerts = run(eng, spike[1:]) + run(eng, back)
    (a,) = fired(alerts)
    assert (a.rule, a.step, a.severity, a.layer, a.kind) == ("exploding", 11, "warning", "fc.weight", "grad")
    median = np.median([np.sqrt(s.samples[0].sumsq) for s in base])  # numpy ground truth
    assert a.threshold == pytest.approx(max(10 * median, a.threshold))
    assert a.value == pytest.approx(np.sqrt(spike[1].samples[0].sumsq))
    recovered = [x for x in alerts if x.severity == "info"]
    assert [(x.rule, x.step) for x in recovered] == [("exploding", 17)]  # third good sample


def test_exploding_100x_is_critical_at_once():
    eng = RuleEngine()
    alerts = run(eng, [step(i, grad(1e-3)) for i in range(6)] + [step(6, grad(0.5))])
    (a,) = fired(alerts)
    assert (a.step, a.severity) == (6, "critical")


def test_exploding_is_robust_to_a_noisy_stream():
    """A spiky stream (small tensors' gradients) needs a bigger jump: median + 20 MAD-sigmas."""
    vals = [1.0, 8.0] * 8
    eng = RuleEngine()
    alerts = run(eng, [step(i, sample_of("b", "grad", np.full(1, v))) for i, v in enumerate(vals)])
    assert alerts == []
    med = np.median(vals)
    mad = np.median(np.abs(np.array(vals) - med))
    jump = 12 * med  # above 10x the median, inside the MAD band
    assert jump < med + 20 * 1.4826 * mad
    alerts = run(eng, [step(20 + i, sample_of("b", "grad", np.full(1, jump))) for i in range(3)])
    assert alerts == []
    far = med + 25 * 1.4826 * mad
    eng = RuleEngine()
    run(eng, [step(i, sample_of("b", "grad", np.full(1, v))) for i, v in enumerate(vals)])
    alerts = run(eng, [step(30 + i, sample_of("b", "grad", np.full(1, far))) for i in range(2)])
    assert [a.rule for a in fired(alerts)] == ["exploding"]


def test_activation_abs_cap_fires_at_once():
    eng = RuleEngine()
    alerts = run(eng, [step(0, sample_of("blk", "act", np.array([1.0, 2e4])))])
    assert [(a.rule, a.severity, a.value) for a in alerts] == [("exploding", "critical", 2e4)]


# -- vanishing -------------------------------------------------------------

def test_underflow_to_exact_zeros_fires_vanishing_with_the_gradscaler_hint():
    eng = RuleEngine()
    alerts = run(eng, [step(i, grad(1e-3)) for i in range(8)])
    alerts += run(eng, [step(8 + i, grad(1e-3, zeros=0.7)) for i in range(3)])
    (a,) = fired(alerts)
    assert (a.rule, a.step, a.kind, a.severity) == ("vanishing", 10, "grad", "warning")
    assert a.value == pytest.approx(0.7, abs=1 / 256)
    assert "GradScaler" in a.message


def test_a_gradient_that_is_always_mostly_zero_is_not_vanishing():
    """An embedding's gradient: most rows are not in the batch, every step."""
    eng = RuleEngine()
    assert run(eng, [step(i, grad(1e-3, name="wte.weight", zeros=0.95)) for i in range(30)]) == []


def test_a_gradient_norm_collapsing_1000x_fires_vanishing():
    eng = RuleEngine()
    alerts = run(eng, [step(i, grad(1e-2)) for i in range(8)] + [step(8 + i, grad(1e-6)) for i in range(3)])
    assert [(a.rule, a.step) for a in fired(alerts)] == [("vanishing", 10)]


# -- dead, nonfinite -------------------------------------------------------

def test_dead_fires_once_over_a_long_run():
    eng = RuleEngine()
    eng.set_layers([wire.LayerInfo("mlp.act", "ReLU", [], True, "activation")])
    alerts = run(eng, [step(i, sample_of("mlp.act", "act", np.zeros(64), dead_units=1.0)) for i in range(1000)])
    assert [(a.rule, a.step) for a in alerts] == [("dead", 2)]


def test_nonfinite_names_the_first_layer_forward_for_acts_and_backward_for_grads():
    bad = np.array([1.0, np.nan])
    ok = np.ones(2)
    s = step(0, sample_of("a", "act", ok), sample_of("b", "act", bad), sample_of("c", "act", bad),
             sample_of("a.w", "grad", bad), sample_of("b.w", "grad", bad), sample_of("c.w", "grad", ok))
    alerts = RuleEngine().evaluate(s)
    assert {(a.kind, a.layer) for a in alerts} == {("act", "b"), ("grad", "b.w")}
    assert all(a.rule == "nonfinite" and a.severity == "critical" for a in alerts)


# -- stalled, no-grad, update-too-large --------------------------------------

def upd(name, ratio, x=None):
    return sample_of(name, "update", np.full(16, 1e-3) if x is None else x, ratio=ratio)


def test_stalled_fires_on_a_parameter_that_does_not_move():
    eng = RuleEngine()
    alerts = run(eng, [step(i, upd("w", 0.0, np.zeros(16))) for i in range(5)])
    assert [(a.rule, a.step, a.value) for a in alerts] == [("stalled", 2, 0.0)]
    assert "optimizer" in alerts[0].message


def test_stalled_sees_a_zero_initialised_lora_b_that_never_moves():
    """ratio is undefined for a zero weight; a zero update of it is still 'not moving'."""
    eng = RuleEngine()
    stuck = run(eng, [step(i, upd("lora_B.weight", None, np.zeros(16))) for i in range(3)])
    assert [(a.rule, a.layer) for a in stuck] == [("stalled", "lora_B.weight")]
    moving = run(RuleEngine(), [step(i, upd("lora_B.weight", None)) for i in range(5)])
    assert moving == []


def layers_with(frozen=()):
    return [wire.LayerInfo("a", "Linear", ["weight", "bias"], True, "", list(frozen)),
            wire.LayerInfo("b", "Linear", ["weight"], True)]


def params_step(i, with_grad):
    samples = []
    for name in ("a.weight", "a.bias", "b.weight"):
        samples.append(sample_of(name, "weight", np.ones(4)))
        if name in with_grad:
            samples.append(sample_of(name, "grad", np.ones(4)))
        samples.append(upd(name, 1e-3 if name in with_grad else 0.0, None if name in with_grad else np.zeros(16)))
    return step(i, *samples)


def test_no_grad_fires_for_a_trainable_parameter_without_gradient_and_owns_its_stall():
    eng = RuleEngine()
    eng.set_layers(layers_with())
    alerts = run(eng, [params_step(i, {"a.weight", "a.bias"}) for i in range(5)])
    assert [(a.rule, a.layer, a.kind, a.step) for a in alerts] == [("no-grad", "b.weight", "grad", 2)]
    assert "detached" in alerts[0].message


def test_no_grad_ignores_frozen_parameters_and_steps_without_any_gradient():
    eng = RuleEngine()
    eng.set_layers(layers_with(frozen=["bias"]))
    # a.bias is frozen: no gradient, no update sample (the probe does not snapshot it)
    steps = []
    for i in range(5):
        s = params_step(i, {"a.weight", "b.weight"})
        steps.append(step(i, *[x for x in s.samples if not (x.layer == "a.bias" and x.kind == "update")]))
    assert run(eng, steps) == []
    assert run(eng, [step(10 + i, sample_of("b.weight", "weight", np.ones(4))) for i in range(5)]) == []


def test_no_grad_is_off_without_the_model_layers():
    alerts = run(RuleEngine(), [params_step(i, {"a.weight"}) for i in range(5)])
    assert [a.rule for a in alerts] == ["stalled", "stalled"]  # frozen or not is unknown: no no-grad


def test_update_too_large_against_history_and_the_absolute_cap():
    eng = RuleEngine()
    alerts = run(eng, [step(i, upd("w", 1e-3)) for i in range(8)] + [step(8 + i, upd("w", 3e-1)) for i in range(2)])
    (a,) = fired(alerts)
    assert (a.rule, a.step, a.threshold) == ("update-too-large", 9, pytest.approx(30 * 1e-3))
    assert "3.0e-01 >>" in a.message and "learning rate" in a.message
    alerts = run(RuleEngine(), [step(i, upd("v", 2.0)) for i in range(2)])
    assert [a.rule for a in alerts] == ["update-too-large"]


# -- rank-divergence -------------------------------------------------------

def rank_steps(norms_per_step, rank=0):
    return [step(i, rank=rank, norms=list(n)) for i, n in enumerate(norms_per_step)]


def test_rank_divergence_names_the_corrupted_rank_of_two():
    healthy = [(1.0 + 0.01 * i, 1.0 + 0.01 * i) for i in range(6)]
    corrupt = [(1.05, 40.0)] * 3
    eng = RuleEngine()
    alerts = run(eng, rank_steps(healthy + corrupt + [(1.0, 1.0)] * 3))
    fired_ = fired(alerts)
    assert [(a.rule, a.rank, a.step, a.layer, a.severity) for a in fired_] == \
        [("rank-divergence", 1, 7, ALL_LAYERS, "critical")]
    assert fired_[0].value == 40.0 and "rank 1" in fired_[0].message
    assert [(a.rank, a.step) for a in alerts if a.severity == "info"] == [(1, 11)]
    # every rank ships the same all-gathered list: only rank 0's step is judged
    assert run(RuleEngine(), rank_steps(healthy + corrupt, rank=1)) == []


def test_rank_divergence_outlier_of_four_and_nonfinite_rank():
    eng = RuleEngine()
    alerts = run(eng, rank_steps([(1, 1.1, 0.9, 1)] * 4 + [(1, 1.1, 0.2, 1)] * 2))
    assert [(a.rank, a.step) for a in fired(alerts)] == [(2, 5)]
    alerts = run(RuleEngine(), rank_steps([(1.0, 1.0)] * 3 + [(1.0, float("nan"))] * 2))
    assert [(a.rank, a.step) for a in fired(alerts)] == [(1, 4)]


def test_ranks_within_the_factor_never_fire():
    rng = np.random.default_rng(1)
    norms = np.exp(rng.normal(0, 0.2, (500, 4)))  # +-20% per-rank noise
    assert run(RuleEngine(), rank_steps(norms)) == []


# -- configuration -----------------------------------------------------------

def test_per_layer_overrides_and_disabled_rules():
    cfg = RuleConfig(disabled={"update-too-large"},
                     overrides=(("emb.*", {"disabled": {"dead"}}), ("mlp.*", {"dead_k": 1})))
    eng = RuleEngine(cfg)
    eng.set_layers([wire.LayerInfo(n, "ReLU", [], True, "activation") for n in ("emb.act", "mlp.act", "x.act")])
    dead = [sample_of(n, "act", np.zeros(8), dead_units=1.0) for n in ("emb.act", "mlp.act", "x.act")]
    alerts = run(eng, [step(i, *dead, upd("w", 5.0)) for i in range(3)])
    assert [(a.layer, a.step) for a in alerts] == [("mlp.act", 0), ("x.act", 2)]
    with pytest.raises(ValueError, match="unknown rule"):
        RuleConfig(disabled={"nope"})


TOML = """
recover_k = 5
[exploding]
factor = 20.0
k = 3
[update-too-large]
enabled = false
[[layers]]
pattern = "transformer.wte.*"
vanishing = { enabled = false }
dead = { units = 0.8, k = 1 }
[[layers]]
pattern = "*.lora_*"
update-too-large = { enabled = true, max = 0.5 }
"""


def test_toml_file_sets_thresholds_globally_and_per_layer_pattern(tmp_path):
    f = tmp_path / "rules.toml"
    f.write_text(TOML)
    cfg = load(str(f))
    assert (cfg.recover_k, cfg.explode_factor, cfg.explode_k) == (5, 20.0, 3)
    assert cfg.disabled == {"update-too-large"}
    wte = cfg.for_layer("transformer.wte.weight")
    assert wte.disabled == {"update-too-large", "vanishing"} and (wte.dead_units, wte.dead_k) == (0.8, 1)
    lora = cfg.for_layer("h.0.attn.lora_A.weight")
    assert lora.disabled == frozenset() and lora.update_max == 0.5
    plain = cfg.for_layer("h.0.mlp.c_fc.weight")  # no pattern matches: the global thresholds
    assert (plain.disabled, plain.dead_units, plain.update_max) == ({"update-too-large"}, 0.5, 1.0)


@pytest.mark.parametrize("doc, why", [
    ({"exploding": {"factr": 2}}, "exploding.factr: unknown threshold; exploding has:"),
    ({"dead": {"k": 0}}, "dead.k: expected an integer >= 1"),
    ({"dead": {"k": 2.5}}, "dead.k: expected an integer >= 1"),
    ({"stalled": {"ratio": "small"}}, "stalled.ratio: expected a number"),
    ({"stalled": {"enabled": 1}}, "stalled.enabled: expected true or false"),
    ({"explode": {}}, "unknown key 'explode'"),
    ({"layers": [{"dead": {}}]}, "layers[0]: needs pattern"),
    ({"layers": [{"pattern": "x", "deadd": {}}]}, "layers[0]: unknown key 'deadd'"),
])
def test_bad_rules_documents_give_one_line_errors(doc, why):
    with pytest.raises(RulesConfigError) as exc:
        parse(doc, where="r.toml")
    assert why in str(exc.value) and "\n" not in str(exc.value)


def test_unreadable_or_malformed_files(tmp_path):
    with pytest.raises(RulesConfigError, match="No such file"):
        load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[dead\n")
    with pytest.raises(RulesConfigError, match="not valid TOML"):
        load(str(bad))


# -- headless --rules --------------------------------------------------------

def recording(path, steps, alerts=()):
    layers = [wire.LayerInfo("fc", "Linear", ["weight"], True)]
    hello = wire.Hello(version=wire.PROTOCOL_VERSION, run="r", every=1, layers=layers)
    with open(path, "wb") as f:
        f.write(wire.MAGIC + wire.encode(hello))
        for m in [*steps, *alerts]:
            f.write(wire.encode(m))


def test_printer_with_rules_reevaluates_and_keeps_spectral_alerts():
    import io

    out = io.StringIO()
    eng = RuleEngine(RuleConfig(stall_ratio=1e-2))
    p = AlertPrinter(out=out, as_json=True, rules=eng)
    p.handle(wire.Hello(version=wire.PROTOCOL_VERSION, run="r", layers=[]))
    for i in range(3):
        p.handle(step(i, upd("fc.weight", 1e-3)))
    p.handle(wire.Alert(3, 0, "critical", "dead", "fc", "act", 1.0, 0.99, "from the probe"))
    p.handle(wire.Alert(3, 0, "warning", "spectral", "fc", "weight", 1.5, 2.0, "alpha < 2"))
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(x["rule"], x["step"]) for x in lines] == [("stalled", 2), ("spectral", 3)]
    assert p.worst == "warning"


def test_cli_replay_headless_rules(tmp_path):
    rec = tmp_path / "r.xray"
    recording(rec, [step(i, upd("fc.weight", 1e-3)) for i in range(4)])
    rules = tmp_path / "rules.toml"
    rules.write_text("[stalled]\nratio = 1e-2\nk = 2\n")
    cmd = [sys.executable, "-m", "tui.cli", "replay", str(rec), "--headless", "--json"]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    # no alert; the recording has no End, so the last line says it stops without one (exit 1)
    assert plain.returncode == 1 and [json.loads(x)["type"] for x in plain.stdout.splitlines()] == ["end"]
    tuned = subprocess.run(cmd + ["--rules", str(rules), "--fail-on", "warning"], capture_output=True, text=True,
                           timeout=60)
    assert tuned.returncode == 3, tuned.stderr
    line, end = [json.loads(x) for x in tuned.stdout.splitlines()]
    assert end["type"] == "end" and end["reason"] == "fail-on"
    assert (line["rule"], line["step"], line["threshold"]) == ("stalled", 1, 0.01)
    rules.write_text("[stalled]\nratio = -1\n")
    bad = subprocess.run(cmd + ["--rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "stalled.ratio" in bad.stderr
    app = subprocess.run(cmd[:-2] + ["--rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert app.returncode == 2 and "--rules works with --headless" in app.stderr


# -- the spectral rule's bands and trust gate from TOML --------------------------------

SPECTRAL_TOML = """
[spectral]
alpha_low = 1.5
min_tail = 20
sigmas = 0
[[layers]]
pattern = "transformer.wte.*"
spectral = { enabled = false }
[[layers]]
pattern = "*.c_fc.weight"
spectral = { alpha_high = 8.0, min_tail = 100 }
"""


def spectral_fit(layer, alpha, n_tail, step=500, rank=0):
    return wire.Spectral(step=step, rank=rank, layer=layer, alpha=alpha, alpha_weighted=0.0, log_norm=0.0,
                         log_spectral_norm=0.0, stable_rank=1.0, n_evals=128, n_tail=n_tail)


def test_spectral_defaults_are_the_rules_own_and_documented():
    from probes.rules import spectral as spectral_rule

    cfg = RuleConfig()
    assert (cfg.spectral_alpha_low, cfg.spectral_alpha_high, cfg.spectral_min_tail, cfg.spectral_sigmas) == (
        spectral_rule.ALPHA_LOW, spectral_rule.ALPHA_HIGH, spectral_rule.MIN_TAIL, spectral_rule.BAND_SIGMAS)
    assert parse({}).spectral_min_tail == 50


def test_toml_sets_the_spectral_bands_and_gate_globally_and_per_layer(tmp_path):
    from probes.rules.spectral import SpectralAlerts

    f = tmp_path / "rules.toml"
    f.write_text(SPECTRAL_TOML)
    cfg = load(str(f))
    assert (cfg.spectral_alpha_low, cfg.spectral_alpha_high, cfg.spectral_min_tail, cfg.spectral_sigmas) == (
        1.5, 6.0, 20, 0.0)
    rule = SpectralAlerts(config=cfg)
    # global: alpha 1.7 is inside [1.5, 6] now; 1.4 from a 25-eigenvalue tail fires (min_tail 20, no sigma margin)
    assert rule.evaluate(spectral_fit("h.0.attn.c_attn.weight", 1.7, 25), 500, 0) is None
    a = rule.evaluate(spectral_fit("h.0.attn.c_proj.weight", 1.4, 25), 500, 0)
    assert (a.rule, a.threshold, a.layer) == ("spectral", 1.5, "h.0.attn.c_proj.weight")
    # [[layers]]: switched off for the embedding; its own bands and gate for c_fc
    assert rule.evaluate(spectral_fit("transformer.wte.weight", 1.0, 500), 500, 0) is None
    assert rule.evaluate(spectral_fit("h.0.mlp.c_fc.weight", 7.0, 500), 500, 0) is None  # below 8
    assert rule.evaluate(spectral_fit("h.1.mlp.c_fc.weight", 9.0, 60), 500, 0) is None  # tail < 100
    assert "< 100" in rule.untrusted(spectral_fit("h.1.mlp.c_fc.weight", 9.0, 60))
    assert rule.evaluate(spectral_fit("h.1.mlp.c_fc.weight", 9.0, 150), 500, 0).threshold == 8.0


@pytest.mark.parametrize("doc, why", [
    ({"spectral": {"alpha_low": 6.0}}, "spectral: alpha_low 6 must be below alpha_high 6"),
    ({"spectral": {"alpha_high": 1.0}}, "alpha_low 2 must be below alpha_high 1"),
    ({"layers": [{"pattern": "x", "spectral": {"alpha_low": 7.0}}]}, "layers[0] (x): spectral: alpha_low 7"),
    ({"spectral": {"min_tail": 0}}, "spectral.min_tail: expected an integer >= 1"),
    ({"spectral": {"min_tail": 8.5}}, "spectral.min_tail: expected an integer >= 1"),
    ({"spectral": {"sigmas": -1}}, "spectral.sigmas: expected a positive number"),
    ({"spectral": {"alpha": 2}}, "spectral has: alpha_high, alpha_low, max_stable_rank, min_tail, sigmas, enabled"),
])
def test_bad_spectral_tables_give_one_line_errors(doc, why):
    with pytest.raises(RulesConfigError) as exc:
        parse(doc, where="r.toml")
    assert why in str(exc.value) and "\n" not in str(exc.value)


def test_printer_with_rules_rejudges_spectral_fits_with_the_files_bands():
    import io

    def printed(cfg, msgs):
        out = io.StringIO()
        p = AlertPrinter(out=out, as_json=True, rules=RuleEngine(cfg))
        for m in msgs:
            p.handle(m)
        return [(x["rule"], x["layer"], x["threshold"]) for x in map(json.loads, out.getvalue().splitlines())]

    hello = wire.Hello(version=wire.PROTOCOL_VERSION, run="r", layers=[])
    small = spectral_fit("fc.weight", 1.6, 12)  # the probe (default gate) marked it untrusted and sent no alert
    assert printed(RuleConfig(), [hello, small]) == []
    assert printed(RuleConfig(spectral_min_tail=8, spectral_sigmas=0.0), [hello, small]) == [
        ("spectral", "fc.weight", 2.0)]
    # the probe's own spectral alert on a layer we judge again is not printed twice
    probe_alert = wire.Alert(500, 0, "warning", "spectral", "fc.weight", "weight", 1.6, 2.0, "from the probe")
    assert printed(RuleConfig(), [hello, small, probe_alert]) == []
    # an older probe's Spectral has no tail size: its alert passes through as sent
    old = wire.Spectral(step=500, rank=0, layer="fc.weight", alpha=1.6, alpha_weighted=0.0, log_norm=0.0,
                        log_spectral_norm=0.0, stable_rank=1.0, n_evals=32)
    assert printed(RuleConfig(), [hello, old, probe_alert]) == [("spectral", "fc.weight", 2.0)]


# -- issue 12: update-too-large's band, starved, dead from the start, nonfinite's count, hints ----

def hello(layers, precision="", groups=None):
    return wire.Hello(version=1, run="t", layers=layers, precision=precision, param_groups=groups or {})


def mlp_layers(n=5, head_group=None):
    return [wire.LayerInfo(f"l{i}", "Linear", ["weight", "bias"], True) for i in range(n)]


def wsample(name, scale=0.02):
    return sample_of(name, "weight", RNG.normal(0, scale, 64))


def test_update_band_fires_from_step_zero_at_once_above_one_with_the_lr():
    eng = RuleEngine()
    eng.set_hello(hello(mlp_layers(1), groups={"l0.weight": 0, "l0.bias": 0}))
    eng.evaluate_scalars(wire.Scalars(step=0, rank=0, time=0.0, values={"lr": 1.0}))
    alerts = run(eng, [step(0, wsample("l0.weight"), upd("l0.weight", 50.0))])
    (a,) = fired(alerts)
    assert (a.rule, a.step, a.layer, a.threshold) == ("update-too-large", 0, "l0.weight", 1.0)
    assert "lr 1 (param group 0)" in a.message


def test_update_band_needs_three_samples_above_0_1_and_recovers():
    eng = RuleEngine()
    eng.set_layers(mlp_layers(1))
    ratios = [0.2, 0.2, 0.05, 0.2, 0.2, 0.3, 0.3, 0.01, 0.01, 0.01, 0.01]
    alerts = run(eng, [step(i, wsample("l0.weight"), upd("l0.weight", r)) for i, r in enumerate(ratios)])
    assert [(a.severity, a.step) for a in alerts] == [("warning", 5), ("info", 9)]
    assert "0.3 > 0.1 for 3 samples" in alerts[0].message


def test_update_band_spares_biases_norms_and_zero_initialised_weights():
    layers = mlp_layers(1) + [wire.LayerInfo("ln", "LayerNorm", ["weight", "bias"], True),
                              wire.LayerInfo("lora_B", "Linear", ["weight"], True, "lora")]
    eng = RuleEngine()
    eng.set_layers(layers)
    steps = []
    for i in range(10):
        w0 = sample_of("lora_B.weight", "weight", np.zeros(64) if i == 0 else RNG.normal(0, 1e-3, 64))
        # a zero-init B's ratio is ~1/n; a bias or a norm moves fast at first: none of it is a band alert
        steps.append(step(i, w0, upd("lora_B.weight", None if i == 0 else 1.0 / i),
                          upd("l0.bias", 0.5), upd("ln.weight", 0.4), upd("ln.bias", 0.5),
                          wsample("l0.weight"), upd("l0.weight", 0.01)))
    assert fired(run(eng, steps)) == []


def test_update_band_is_quiet_on_healthy_noise():
    eng = RuleEngine()
    eng.set_layers(mlp_layers(4))
    rng = np.random.default_rng(5)
    # healthy Adam-family ratios: 1e-3..3e-2, lognormal around 5e-3, first step up to 0.1
    steps = [step(i, *[upd(f"l{j}.weight", 0.1 if i == 0 else float(np.clip(rng.lognormal(np.log(5e-3), 0.6), 0, 0.05)))
                       for j in range(4)]) for i in range(500)]
    assert fired(run(eng, steps)) == []


def starved_step(i, head, body=3e-3, n=5, rng=np.random.default_rng(7)):
    samples = [upd(f"l{j}.weight", body * float(rng.uniform(0.7, 1.4))) for j in range(n)]
    return step(i, *samples, upd("head.weight", head))


def test_starved_names_both_ratios_and_the_groups_lr_after_four_samples():
    layers = mlp_layers(5) + [wire.LayerInfo("head", "Linear", ["weight"], True)]
    eng = RuleEngine()
    eng.set_hello(hello(layers, groups={"head.weight": 1}))
    eng.evaluate_scalars(wire.Scalars(step=0, rank=0, time=0.0, values={"lr": 1e-3, "lr/1": 1e-6}))
    alerts = run(eng, [starved_step(i, 1e-5) for i in range(6)])
    (a,) = fired(alerts)
    assert (a.rule, a.layer, a.step) == ("starved", "head.weight", 3)
    assert "1e-05" in a.message and "param group 1's lr is 1e-06 (group 0: 0.001)" in a.message
    assert a.value == pytest.approx(1e-5) and 2e-5 < a.threshold < 5e-5  # the median / 100
    back = run(eng, [starved_step(10 + i, 2e-3) for i in range(3)])  # (a 200x jump: update-too-large too)
    assert [(x.severity, x.step) for x in back if x.rule == "starved"] == [("info", 12)]


@pytest.mark.parametrize("head", [3e-4, 3e-3, 0.0])
def test_starved_is_quiet_within_100x_and_leaves_a_still_tensor_to_stalled(head):
    alerts = fired(run(RuleEngine(), [starved_step(i, head) for i in range(10)]))
    assert [a.rule for a in alerts] == (["stalled"] if head == 0 else [])


def test_starved_needs_peers_of_its_own_kind():
    # a bias and a norm weight are not compared with matrices; two matrices are no median
    layers = [wire.LayerInfo("l0", "Linear", ["weight", "bias"], True),
              wire.LayerInfo("l1", "Linear", ["weight"], True), wire.LayerInfo("ln", "LayerNorm", ["weight"], True)]
    eng = RuleEngine()
    eng.set_layers(layers)
    steps = [step(i, upd("l0.weight", 3e-3), upd("l1.weight", 1e-6), upd("l0.bias", 1e-6),
                  upd("ln.weight", 1e-6)) for i in range(10)]
    assert fired(run(eng, steps)) == []


def zero_grad(name):
    return sample_of(name, "grad", np.zeros(64))


def test_dead_fires_on_a_gradient_exactly_zero_from_the_start_and_recovers():
    eng = RuleEngine()
    alerts = run(eng, [step(i, zero_grad("l1.weight"), grad(1.0, "l2.weight")) for i in range(4)])
    (a,) = fired(alerts)
    assert (a.rule, a.layer, a.kind, a.step) == ("dead", "l1.weight", "grad", 2)
    assert "exactly zero in all 3 sampled steps" in a.message and "ReLU" in a.message
    back = run(eng, [step(10 + i, grad(1.0, "l1.weight")) for i in range(3)])
    assert [(x.severity, x.rule, x.kind) for x in back] == [("info", "dead", "grad")]


def test_a_gradient_that_falls_to_zero_later_is_vanishing_not_dead():
    eng = RuleEngine()
    alerts = run(eng, [step(i, grad(1.0, "l1.weight")) for i in range(8)]
                 + [step(8 + i, zero_grad("l1.weight")) for i in range(4)])
    assert [a.rule for a in fired(alerts)] == ["vanishing"]


def test_nonfinite_counts_the_other_streams_and_marks_them_affected():
    bad, ok = np.array([1.0, np.nan]), np.ones(2)
    eng = RuleEngine()
    alerts = eng.evaluate(step(0, sample_of("a", "act", ok), sample_of("b", "act", bad), sample_of("c", "act", bad),
                               sample_of("d", "act", bad)))
    (a,) = alerts
    assert a.layer == "b" and "2 other act streams hold NaN/inf" in a.message
    assert eng.affected[("act", 0)] == {"b", "c", "d"}
    assert eng.evaluate(step(1, sample_of("b", "act", ok)))[0].severity == "info"
    assert ("act", 0) not in eng.affected


@pytest.mark.parametrize("precision, says, never", [
    ("fp32", "the run is fp32", "GradScaler"),
    ("bf16", "the run is bf16", "GradScaler"),
    ("fp16", "use torch.amp.GradScaler", "the run is"),
    ("fp16+scaler", "a GradScaler is in use (scale 1)", "use torch.amp"),
])
def test_underflow_hint_follows_the_precision(precision, says, never):
    eng = RuleEngine()
    eng.set_hello(hello([], precision))
    eng.evaluate_scalars(wire.Scalars(step=0, rank=0, time=0.0, values={"scale": 1.0}))
    alerts = run(eng, [step(i, grad(1.0)) for i in range(8)] + [step(8 + i, grad(1.0, zeros=0.9)) for i in range(3)])
    (a,) = fired(alerts)
    assert a.rule == "vanishing" and says in a.message and never not in a.message


def test_precision_note_replaces_the_hellos_precision():
    eng = RuleEngine()
    eng.set_hello(hello([], "fp32"))
    eng.note(wire.Note(step=3, rank=0, event="precision", data={"precision": "fp16-autocast"}))
    assert eng.precision == "fp16-autocast"
    eng.note(wire.Note(step=4, rank=0, event="fault", data={"precision": "x"}))  # other notes: ignored
    alerts = run(eng, [step(i, grad(1.0)) for i in range(8)] + [step(8 + i, grad(1.0, zeros=0.9)) for i in range(3)])
    assert "fp16 without a GradScaler" in fired(alerts)[0].message


def lora_layers(b_frozen=False, b_unoptimized=False, a_unoptimized=False):
    return [wire.LayerInfo("q", "Linear", ["weight"], True, frozen=["weight"]),
            wire.LayerInfo("q.lora_A", "Linear", ["weight"], True, "lora", adapter_of="q",
                           unoptimized=["weight"] if a_unoptimized else []),
            wire.LayerInfo("q.lora_B", "Linear", ["weight"], True, "lora", adapter_of="q",
                           frozen=["weight"] if b_frozen else [], unoptimized=["weight"] if b_unoptimized else [])]


@pytest.mark.parametrize("state, says", [(dict(b_frozen=True), "its B is frozen"),
                                         (dict(b_unoptimized=True), "its B is in no optimizer param group")])
def test_lora_a_without_gradient_says_b_is_frozen_or_left_out(state, says):
    eng = RuleEngine()
    eng.set_layers(lora_layers(**state))
    alerts = fired(run(eng, [step(i, zero_grad("q.lora_A.weight"), upd("q.lora_A.weight", 0.0, np.zeros(16)))
                             for i in range(3)]))
    assert {a.rule for a in alerts} == {"dead", "stalled"}
    assert all(says in a.message or "B is" in a.message for a in alerts), [a.message for a in alerts]
    assert all("bias" not in a.message for a in alerts)


def test_lora_b_dead_output_hint_is_about_b_not_bias_init():
    eng = RuleEngine()
    eng.set_layers(lora_layers(b_frozen=True))
    alerts = fired(run(eng, [step(i, sample_of("q.lora_B", "act", np.zeros(64))) for i in range(3)]))
    (a,) = alerts
    assert a.rule == "dead" and "LoRA B" in a.message and "frozen" in a.message
    assert "bias init" not in a.message


def test_stalled_names_a_parameter_in_no_param_group():
    eng = RuleEngine()
    eng.set_layers(lora_layers(a_unoptimized=True))
    (a,) = fired(run(eng, [step(i, upd("q.lora_A.weight", 0.0, np.zeros(16))) for i in range(3)]))
    assert "none of the optimizer's param groups" in a.message and "get_peft_model" in a.message


def test_toml_sets_the_band_and_starved_thresholds(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('[update-too-large]\nabs = 0.5\nabs_k = 2\n[starved]\nfactor = 10.0\nk = 2\nmin_peers = 4\n')
    cfg = load(str(f))
    got = (cfg.update_abs, cfg.update_abs_k, cfg.starved_factor, cfg.starved_k, cfg.starved_min_peers)
    assert got == (0.5, 2, 10.0, 2, 4)


@pytest.mark.parametrize("precision, says", [
    ("fp32", "the run is fp32, so this is not a low-precision overflow"),
    ("fp16", "fp16 overflows above 65504"),
    ("fp16+scaler", "an inf gradient now and then is normal"),
    ("", "check its inputs, the learning rate and loss scaling"),
])
def test_nonfinite_hint_follows_the_precision(precision, says):
    eng = RuleEngine()
    eng.set_hello(hello([], precision))
    (a,) = eng.evaluate(step(0, sample_of("a.w", "grad", np.array([1.0, np.inf]))))
    assert a.rule == "nonfinite" and says in a.message
