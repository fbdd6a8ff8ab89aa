"""The failures practitioners report, each caught by step 30 of a real (tiny) HF Trainer run and
named with its cause, and a healthy corpus of four model families that raises no warning.

The runs are :mod:`tests.practitioner_runs`' (each trained once per session; the whole file
takes about 16 s of CPU); the rules' own edges are tested on synthetic messages below them.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import msgspec
import pytest

from probes.protocol import wire
from probes.rules import RuleEngine, parse
from probes.rules.subtree import describe, leading, subtrees
from tui.synthetic import sample_of

pytest.importorskip("accelerate")
pytest.importorskip("peft")

import practitioner_runs as runs  # noqa: E402  (tests/ is on sys.path under pytest)


@functools.lru_cache(maxsize=None)
def recorded(name: str) -> tuple:
    """Every message of run ``name`` (trained once per session)."""
    return tuple(runs.train(name))


def warnings_of(msgs) -> list:
    return runs.alerts(msgs)


# -- the healthy corpus ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", runs.HEALTHY)
def test_healthy_corpus_raises_no_warning(name):
    msgs = recorded(name)
    steps = [m.step for m in msgs if isinstance(m, wire.Scalars)]
    assert len(steps) >= 200
    loss = runs.losses(msgs)
    assert sum(v for _, v in loss[-20:]) / 20 < loss[0][1]  # it learns
    assert [(a.step, a.rule, a.layer, a.message) for a in warnings_of(msgs)] == []


@pytest.mark.slow
def test_clipped_bert_fine_tune_is_judged_as_clipped():
    """The issue's false alarm: without the clip facts the same recording fires `exploding` on the
    attention's query/key gradients as they leave their plateau (80x, at 1% of the clipped norm),
    and advises clipping that is on; with them (the HF callback's clip Note, and the every-step
    ``clip`` scalar the probe reads from the Trainer's own clipping), nothing fires."""
    msgs = recorded("bert")
    assert any(isinstance(m, wire.Note) and m.event == "clip" and m.data["max_norm"] == 1.0 for m in msgs)
    scalars = [m for m in msgs if isinstance(m, wire.Scalars)]
    assert scalars[5].values["clip"] == 1.0 and scalars[5].values["grad_norm_preclip"] > 0
    with_note = rejudge(msgs)
    without = rejudge([_unclipped(m) for m in msgs if not (isinstance(m, wire.Note) and m.event == "clip")])
    assert [a for a in with_note if a.rule == "exploding"] == []
    fired = [a for a in without if a.rule == "exploding"]
    assert fired and all(a.kind == "grad" and "attention.self" in a.layer for a in fired)
    assert "clip gradients" in fired[0].message


def _unclipped(m):
    """``m`` as a probe that knew nothing of the clipping would have sent it."""
    if not isinstance(m, wire.Scalars):
        return m
    values = {k: v for k, v in m.values.items() if k not in ("clip", "grad_norm_preclip")}
    return msgspec.structs.replace(m, values=values)


def rejudge(msgs) -> list:
    """The warnings the rules raise over ``msgs`` again (as headless --rules does)."""
    eng, out = RuleEngine(), []
    for m in msgs:
        if isinstance(m, wire.Hello):
            eng.set_hello(m)
        elif isinstance(m, wire.Note):
            eng.note(m)
        elif isinstance(m, wire.Scalars):
            out += eng.evaluate_scalars(m)
        elif isinstance(m, wire.Step):
            out += eng.evaluate(m)
    return [a for a in out if a.severity != "info"]


# -- each failure, caught by step 30 with its cause -----------------------------------

FAILURES = [
    # run, rule, layer (None: any), words the message must hold
    ("frozen-base", "frozen", "(all)", ["66 of 38,850", "(0.17%)", "classifier", "frozen (requires_grad=False): bert ("]),
    ("head-lr", "lagging", "classifier.weight", ["param group 1", "1/20", "raise that group's lr"]),
    ("constant-labels", "loss-collapse", "(loss)", ["collapsed", "constant"]),
    ("lora-lr", "adapter-drift", None, ["LoRA adapter on", "base weight", "far too high"]),
    ("lr-tiny", "stalled", None, ["learning rate is far too low", "lr 1e-08"]),
    ("plateau", "weight-spread", None, ["std at step 0", "kurtosis", "lr 0.1", "plateau"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,rule,layer,words", FAILURES, ids=[f[0] for f in FAILURES])
def test_each_failure_is_caught_by_step_30_with_its_cause(name, rule, layer, words):
    found = [a for a in warnings_of(recorded(name)) if a.rule == rule and (layer is None or a.layer == layer)]
    assert found, f"{rule} did not fire on {name}: {[(a.rule, a.layer) for a in warnings_of(recorded(name))]}"
    first = found[0]
    assert first.step <= 30
    for w in words:
        assert w in first.message, (w, first.message)


@pytest.mark.slow
def test_no_grad_around_an_encoder_layer_is_one_alert_naming_the_subtrees():
    found = [a for a in warnings_of(recorded("no-grad-layer")) if a.rule == "no-grad"]
    assert len(found) == 1  # was 21, one per parameter
    (a,) = found
    assert a.step <= 30 and a.layer == "bert.embeddings.word_embeddings.weight"
    assert "21 parameter tensors" in a.message
    assert "bert.embeddings (5 tensors), bert.encoder.layer.0 (16 tensors)" in a.message
    assert "the gradient stops at bert.encoder.layer.0's output" in a.message


@pytest.mark.slow
def test_lr_far_too_high_does_not_recover_while_the_lr_holds():
    """lr 1e-1 from step 0: update-too-large at step 0, and no "recovered" at step 20 (the ratios
    fell only because Adam's moments grew with the weights)."""
    msgs = recorded("plateau")
    fired = [a for a in runs.alerts(msgs, info=True) if a.rule == "update-too-large"]
    assert fired and fired[0].step == 0
    assert [a for a in fired if a.severity == "info"] == []


# -- the rules on synthetic messages --------------------------------------------------


def test_subtrees_groups_whole_modules_and_leaves_a_lone_parameter_alone():
    universe = ["emb.weight", "l0.a.weight", "l0.a.bias", "l0.b.weight", "l1.a.weight", "l1.a.bias", "head.weight"]
    groups = subtrees(["emb.weight", "l0.a.weight", "l0.a.bias", "l0.b.weight", "l1.a.bias"], universe)
    assert groups == [("emb", ["emb.weight"]), ("l0", ["l0.a.weight", "l0.a.bias", "l0.b.weight"]),
                      ("l1.a.bias", ["l1.a.bias"])]
    assert describe(groups) == "emb (1 tensors), l0 (3 tensors), l1.a.bias"
    assert not leading(groups, universe)
    assert leading(groups[:2], universe)
    # every parameter: grouped by the model's children, not as one "whole model"
    assert [g for g, _ in subtrees(universe, universe)] == ["emb", "l0", "l1", "head"]


def scalars(step, loss, lr=1e-3):
    return wire.Scalars(step=step, rank=0, time=float(step), values={"loss": loss, "lr": lr})


def test_loss_collapse_fires_once_on_a_fast_fall_and_not_on_a_healthy_one():
    eng = RuleEngine()
    healthy = [a for i in range(400) for a in eng.evaluate_scalars(scalars(i, 4.2 * math.exp(-i / 300) + 1.5))]
    assert healthy == []
    eng = RuleEngine()
    out = [a for i in range(60) for a in eng.evaluate_scalars(scalars(i, 0.69 * math.exp(-i / 15)))]
    (a,) = [a for a in out if a.rule == "loss-collapse"]
    assert a.step == 21 and a.layer == "(loss)" and a.kind == "scalar"  # the median of 3 at 30% of the start
    # a fall after the first collapse_steps steps is learning, not a collapse
    eng = RuleEngine()
    late = [a for i in range(200) for a in eng.evaluate_scalars(scalars(i, 0.69 if i < 100 else 0.05))]
    assert [a for a in late if a.rule == "loss-collapse"] == []


def test_new_rules_have_toml_tables():
    cfg = parse({"lagging": {"factor": 5.0, "k": 2}, "loss-collapse": {"frac": 0.1, "steps": 20},
                 "adapter-drift": {"shift": 1.0, "rate": 0.1}, "weight-spread": {"factor": 4.0},
                 "frozen": {"share": 0.5}, "stalled": {"lr": 1e-7}, "exploding": {"clip_share": 0.5}})
    assert (cfg.lagging_factor, cfg.lagging_k, cfg.collapse_frac, cfg.collapse_steps) == (5.0, 2, 0.1, 20)
    assert (cfg.drift_shift, cfg.drift_rate, cfg.spread_factor, cfg.frozen_share) == (1.0, 0.1, 4.0, 0.5)
    assert (cfg.stall_lr, cfg.explode_clip_share) == (1e-7, 0.5)
    assert parse({"frozen": {"enabled": False}}).disabled == {"frozen"}


def _upd(layer, ratio):
    return sample_of(layer, "update", np.full(16, 1e-3), ratio=ratio)


def test_update_too_large_recovers_only_once_the_lr_has_fallen():
    eng = RuleEngine()
    out = []
    lr = 1e-1
    for i in range(12):
        ratio = 5.0 if i == 0 else 0.01  # a first step far too large, then "normal" ratios
        if i == 8:
            lr = 1e-3  # the user lowers the lr
        out += eng.evaluate(wire.Step(step=i, rank=0, time=float(i), samples=[_upd("w.weight", ratio)]))
        out += eng.evaluate_scalars(scalars(i, 3.0, lr))
    fired = [(a.step, a.severity) for a in out if a.rule == "update-too-large"]
    assert fired == [(0, "warning"), (11, "info")]  # not at step 3 (the lr still 1e-1): 3 good steps after it fell


def _grads(i, jump):
    """20 gradients of L2 1, and one of 0.01 that jumps to ``jump`` from step 6."""
    rng = np.random.default_rng(i)
    out = [sample_of(f"p{j}.weight", "grad", rng.normal(0, 1, 64) / 8) for j in range(20)]
    x = rng.normal(0, 1, 64) / 8
    return out + [sample_of("q.weight", "grad", x / np.linalg.norm(x) * (jump if i >= 6 else 0.01))]


def _exploding(clip, jump, pre=None):
    eng, out = RuleEngine(), []
    for i in range(8):
        out += eng.evaluate(wire.Step(step=i, rank=0, time=float(i), samples=_grads(i, jump)))
        values = {"loss": 3.0, "lr": 1e-3} | ({"clip": clip} if clip else {})
        values |= {"grad_norm_preclip": pre} if pre else {}
        out += eng.evaluate_scalars(wire.Scalars(step=i, rank=0, time=float(i), values=values))
    return [a for a in out if a.rule == "exploding"]


def test_exploding_under_clipping_needs_a_gradient_that_dominates_the_step():
    # 0.01 -> 1.2: 120x its history, above the median layer's, but 26% of the step's norm
    (a,) = _exploding(None, 1.2)
    assert a.layer == "q.weight" and "clip gradients" in a.message
    assert _exploding(1.0, 1.2) == []  # clipping bounds the step; this gradient does not dominate it
    (b,) = _exploding(1.0, 8.0)  # 87% of the step's norm: an explosion clipping only hides
    assert b.layer == "q.weight" and "gradient clipping at 1 is already on" in b.message
    assert "or clip gradients" not in b.message
    (c,) = _exploding(1.0, 8.0, pre=20.0)  # with the lead's pre-clip scalar, the message quotes it
    assert "the gradient norm before clipping was 20" in c.message


def test_weight_spread_fires_on_a_jump_not_on_slow_growth():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.02, 256)

    def spread(scales):
        eng, out = RuleEngine(), []
        for i, k in enumerate(scales):
            out += eng.evaluate(wire.Step(step=5 * i, rank=0, time=float(i),
                                          samples=[sample_of("h.w.weight", "weight", x * k)]))
        return [a for a in out if a.rule == "weight-spread"]

    assert spread([1.2 ** i for i in range(30)]) == []  # 237x in 30 samples, 6.2x over any 10
    (a,) = spread([1.0, 10.0, 12.0, 13.0])
    assert a.step == 10 and "12x their std at step 0" in a.message


def test_no_grad_is_one_alert_per_cause_and_recovers_on_its_layer():
    """Two parameters of one module lose their gradient together: one alert on the first, and
    one recovery on that same layer once both have gradients again (a viewer clears it)."""
    layers = [wire.LayerInfo("a", "Linear", ["weight", "bias"]), wire.LayerInfo("b", "Linear", ["weight", "bias"])]
    eng = RuleEngine()
    eng.set_layers(layers)
    out = []
    for i in range(12):
        missing = {"b.weight", "b.bias"} if 2 <= i < 7 else set()
        if i == 7:
            missing = {"b.bias"}  # one comes back a step before the other
        samples = []
        for name in ("a.weight", "a.bias", "b.weight", "b.bias"):
            samples.append(sample_of(name, "weight", np.ones(4)))
            if name not in missing:
                samples.append(sample_of(name, "grad", np.ones(4)))
        out += eng.evaluate(wire.Step(step=i, rank=0, time=float(i), samples=samples))
    got = [(a.step, a.severity, a.layer) for a in out if a.rule == "no-grad"]
    assert got == [(4, "warning", "b.weight"), (10, "info", "b.weight")]
    assert "2 parameter tensors" in out[0].message and "b (2 tensors)" in out[0].message


def test_lagging_covers_10x_to_100x_and_leaves_the_rest_to_starved():
    def judged(head_ratio):
        eng, out = RuleEngine(), []
        for i in range(6):
            samples = [sample_of(f"l{j}.weight", "update", np.full(16, 1e-3), ratio=1e-2 * (1 + 0.1 * j))
                       for j in range(4)]
            samples.append(sample_of("head.weight", "update", np.full(16, 1e-3), ratio=head_ratio))
            out += eng.evaluate(wire.Step(step=i, rank=0, time=float(i), samples=samples))
        return [(a.rule, a.layer, a.step) for a in out]

    assert judged(2e-3) == []  # 5x: within the healthy spread
    assert judged(5e-4) == [("lagging", "head.weight", 3)]  # 21x, 4 samples
    assert judged(5e-5) == [("starved", "head.weight", 3)]  # 210x: starved's, not both
