"""The cheap tier: every step's loss, lr, scale and rates; GradScaler's skipped steps; resumed
runs' step numbers; and the rules over them (loss-spike, a non-finite loss, overflow).

The rules are checked on hand-made streams (fast) and on real fault-injected trainings of a
small GPT-2 (slow): one corrupted batch on a step that is not sampled, fp16 that overflows every
step under a GradScaler, and their healthy controls, which must raise nothing.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import probes
from probes.demo import training as demo
from probes.protocol import wire
from probes.rules import RuleConfig, RuleEngine
from probes.rules.scalar import LOSS


def _scalars(steps, losses=None, skipped=None, scale=None):
    for i, step in enumerate(steps):
        values = {}
        if losses is not None:
            values["loss"] = losses[i]
        if scale is not None:
            values["scale"] = scale[i]
        yield wire.Scalars(step, 0, float(step), values, bool(skipped[i]) if skipped else False)


def _judge(msgs, config=None):
    engine = RuleEngine(config)
    return [a for m in msgs for a in engine.evaluate_scalars(m)]


def _healthy_losses(n, seed, noise=0.03):
    """A decreasing loss with batch noise, like a char-level LM's first steps."""
    rng = random.Random(seed)
    return [2.5 + 1.8 * math.exp(-i / 150) + rng.gauss(0, noise) for i in range(n)]


# -- rules on hand-made streams ---------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_no_loss_spike_on_a_healthy_noisy_loss(seed):
    losses = _healthy_losses(2000, seed)
    assert _judge(_scalars(range(2000), losses)) == []


def test_loss_spike_fires_once_on_the_step_and_recovers():
    losses = _healthy_losses(300, 0)
    losses[200] = losses[199] * 1.6  # one bad batch
    alerts = _judge(_scalars(range(300), losses))
    fired = [a for a in alerts if a.severity != "info"]
    assert [(a.step, a.rule, a.layer, a.kind) for a in fired] == [(200, "loss-spike", LOSS, "scalar")]
    assert fired[0].value == pytest.approx(losses[200]) and fired[0].threshold < losses[200]
    assert [a.step for a in alerts if a.severity == "info"] == [203]  # recover_k good steps later


def _steep(n, seed, noise=0.03):
    """A loss falling fast (8.5 -> 2.5 in ~60 steps), with multiplicative batch noise."""
    rng = random.Random(seed)
    return [(2.5 + 6 * math.exp(-i / 15)) * (1 + noise * rng.gauss(0, 1)) for i in range(n)]


@pytest.mark.parametrize("at", [25, 35, 45])
def test_loss_spike_is_caught_during_a_steep_descent(at):
    # a 64-step median/MAD band of the loss's levels is widened by the descent itself: a bad batch
    # at 1.9x the recent loss sat inside it (issue 29); the band of the last few steps plus the
    # noise of the step-to-step differences, which a trend does not widen, catches it
    losses = _steep(120, 0)
    losses[at] *= 1.9
    fired = [a for a in _judge(_scalars(range(120), losses)) if a.severity != "info"]
    assert [(a.step, a.rule) for a in fired] == [(at, "loss-spike")]
    # what the old band said: the median and MAD of the 64 levels before it
    history = losses[max(0, at - 64):at]
    mid = sorted(history)[len(history) // 2]
    mad = sorted(abs(x - mid) for x in history)[len(history) // 2]
    assert losses[at] < mid + 6 * 1.4826 * mad, "the old band would have caught it: not the case this tests"


@pytest.mark.parametrize("seed", range(5))
def test_no_loss_spike_on_a_steep_healthy_descent(seed):
    assert [a for a in _judge(_scalars(range(300), _steep(300, seed))) if a.severity != "info"] == []


def test_loss_spike_needs_history_and_a_relative_margin():
    flat = [2.0] * 40 + [2.1]  # a flat loss has MAD 0: +5% is noise, not a spike
    assert _judge(_scalars(range(41), flat)) == []
    early = [4.0, 9.0]  # no band yet after one step
    assert _judge(_scalars(range(2), early)) == []


def test_a_loss_that_diverges_from_step_0_is_critical():
    # nanoGPT at lr=1 (recorded on its train.py): chaotic from step 2, so no healthy band exists
    losses = [4.32, 3.29, 6.82, 8.56, 16.65, 19.07, 14.84, 11.31, 14.23, 9.72, 6.16, 7.08, 15.12, 10.09]
    alerts = _judge(_scalars(range(len(losses)), losses))
    assert [(a.step, a.severity, a.rule, a.layer) for a in alerts] == [(7, "critical", "loss-spike", LOSS)]
    assert "diverging" in alerts[0].message and alerts[0].threshold == pytest.approx(1.5 * 4.32)


def test_diverging_is_quiet_on_a_warm_up_bump_and_recovers():
    bump = [4.3, 4.3, 4.3] + [4.3 + 0.6 * math.sin(i / 10) ** 2 for i in range(60)]  # up to 1.14x
    assert _judge(_scalars(range(len(bump)), bump)) == []
    back = [4.0, 4.0, 4.0] + [7.0] * 6 + [4.0] * 4
    alerts = _judge(_scalars(range(len(back)), back))
    assert [(a.step, a.severity) for a in alerts] == [(7, "critical"), (11, "info")]


def test_nonfinite_loss_is_critical_on_the_loss():
    losses = _healthy_losses(50, 1)
    losses[30] = math.nan
    losses[31] = math.inf
    alerts = _judge(_scalars(range(50), losses))
    crit = [a for a in alerts if a.severity == "critical"]
    assert [(a.step, a.rule, a.layer) for a in crit] == [(30, "nonfinite", LOSS)]
    assert any(a.severity == "info" and a.rule == "nonfinite" for a in alerts)


def test_overflow_quiet_while_a_healthy_scale_settles():
    # fp16's usual start: the scale halves from 2**16 for a handful of steps, then one skip per
    # growth interval (2,000 steps)
    n = 3000
    skipped = [i < 10 or i in (2010, 2500) for i in range(n)]
    scale = [2.0 ** max(16 - i, 6) for i in range(n)]
    assert _judge(_scalars(range(n), skipped=skipped, scale=scale)) == []


def test_overflow_critical_when_every_step_is_skipped():
    n = 40
    c = RuleConfig()
    scale = [2.0 ** (16 - i) for i in range(n)]  # halves at every skipped step
    alerts = _judge(_scalars(range(n), skipped=[True] * n, scale=scale))
    assert [a.rule for a in alerts] == ["overflow"] and alerts[0].severity == "critical"
    # the scale goes below 1 at step 17; twenty skipped in a row would be step 19
    assert alerts[0].step == min(17, c.overflow_all_k - 1)


def test_overflow_warns_on_a_high_share_then_recovers():
    n = 200
    skipped = [i >= 60 and i < 120 and i % 3 != 0 for i in range(n)]  # 2 of 3 steps skipped
    alerts = _judge(_scalars(range(n), skipped=skipped, scale=[1024.0] * n))
    warn = [a for a in alerts if a.severity == "warning"]
    assert len(warn) == 1 and warn[0].rule == "overflow" and 60 < warn[0].step < 120
    assert [a for a in alerts if a.severity == "critical"] == []
    assert any(a.severity == "info" and a.rule == "overflow" and a.step > 120 for a in alerts)


def test_rules_off_by_config():
    losses = _healthy_losses(100, 0)
    losses[80] = 50.0
    cfg = RuleConfig(disabled=frozenset({"loss-spike"}))
    assert _judge(_scalars(range(100), losses), cfg) == []


# -- the probe's side --------------------------------------------------------

class _HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (.item(), float(), .tolist())."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def test_scalars_every_step_without_host_reads(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[2].parameters(), "lr": 0.01}])
    log = tmp_path / "s.xray"
    xr = probes.attach(model, opt, every=4, serve=False, log=str(log), spectral_every=None)
    losses = []
    counter = _HostReads()
    for step in range(10):
        x = torch.randn(4, 8)
        loss = model(x).pow(2).mean()
        losses.append(loss.item())  # the test's own read, outside the counted region
        with counter:  # the training thread's part: nothing in it may read a tensor on the host
            xr.log(loss=loss, acc=0.5)
            if step % 4:  # an unsampled step: the probe's hooks and the step boundary
                loss.backward()
                opt.step()
        if step % 4 == 0:
            loss.backward()
            opt.step()
        opt.zero_grad()
    xr.close()
    assert counter.reads == 0
    msgs, _ = wire.read_file(str(log))
    scalars = [m for m in msgs if isinstance(m, wire.Scalars)]
    assert [m.step for m in scalars] == list(range(10))
    for m, loss in zip(scalars, losses):
        assert m.values["loss"] == pytest.approx(loss, rel=1e-6)
        assert m.values["lr"] == 0.1 and m.values["lr/1"] == 0.01 and m.values["acc"] == 0.5
    # the global gradient norm rides with sampled steps and equals the gradients' rows
    steps = {m.step: m for m in msgs if isinstance(m, wire.Step)}
    for m in scalars:
        if m.step in steps:
            g = math.sqrt(sum(s.sumsq for s in steps[m.step].samples if s.kind == "grad"))
            assert m.values["grad_norm"] == pytest.approx(g)
        else:
            assert "grad_norm" not in m.values
    # Scalars follow their sampled step's Step in the stream
    order = [(type(m).__name__, m.step) for m in msgs if isinstance(m, (wire.Step, wire.Scalars))]
    assert order.index(("Step", 4)) < order.index(("Scalars", 4))


def test_loss_from_the_model_output_is_the_mean_over_micro_batches(tmp_path):
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x):
            return {"loss": self.lin(x).pow(2).mean()}

    model = WithLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    log = tmp_path / "m.xray"
    xr = probes.attach(model, opt, every=1, serve=False, log=str(log), spectral_every=None)
    seen = []
    for _ in range(2):
        for _ in range(3):  # gradient accumulation: three forwards per step
            out = model(torch.randn(5, 4))
            seen.append(out["loss"].item())
            (out["loss"] / 3).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        model(torch.randn(5, 4))  # an evaluation pass is not training loss
    xr.close()
    scalars = [m for m in wire.read_file(str(log))[0] if isinstance(m, wire.Scalars)]
    assert [m.values["loss"] for m in scalars] == pytest.approx([sum(seen[:3]) / 3, sum(seen[3:]) / 3])
    assert all(m.values["samples_per_s"] > 0 for m in scalars[1:])


def test_loss_from_a_nanogpt_style_tuple_and_nothing_from_other_tuples(tmp_path):
    """nanoGPT returns ``(logits, loss)``; a model whose tuple holds no tracked 0-d tensor gives no loss."""

    class TupleGPT(nn.Module):
        def __init__(self, with_loss: bool):
            super().__init__()
            self.lin, self.with_loss = nn.Linear(4, 3), with_loss

        def forward(self, x):
            logits = self.lin(x)
            n = torch.tensor(float(x.shape[0]))  # a 0-d tensor autograd does not track: not a loss
            return (logits, logits.square().mean(), n) if self.with_loss else (logits, n)

    for with_loss in (True, False):
        model = TupleGPT(with_loss)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        log = tmp_path / f"t{with_loss}.xray"
        xr = probes.attach(model, opt, every=1, serve=False, log=str(log), spectral_every=None)
        seen = []
        for _ in range(3):
            logits, *rest = model(torch.randn(5, 4))
            seen.append(logits.square().mean().item())
            logits.sum().backward()
            opt.step()
            opt.zero_grad()
        xr.close()
        scalars = [m for m in wire.read_file(str(log))[0] if isinstance(m, wire.Scalars)]
        got = [m.values.get("loss") for m in scalars]
        assert got == (pytest.approx(seen) if with_loss else [None] * 3)


def test_xr_log_of_one_name_within_a_step_is_their_mean(tmp_path):
    """nanoGPT's accumulation loop calling ``xr.log(loss=loss)`` per micro-batch records the step's mean
    loss (it kept only the last one), for tensors and floats alike, and each step starts afresh."""
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    log = tmp_path / "l.xray"
    xr = probes.attach(model, opt, every=2, serve=False, log=str(log), spectral_every=None)
    want = []
    for step in range(3):
        seen = []
        for micro in range(4):
            loss = model(torch.randn(3, 4)).pow(2).mean()
            seen.append(loss.item())
            xr.log(loss=loss, acc=float(step * 10 + micro))
            (loss / 4).backward()
        opt.step()
        opt.zero_grad()
        want.append((sum(seen) / 4, step * 10 + 1.5))
    xr.log(other=1.0)
    opt.step()  # a step with one log: the value itself
    xr.close()
    scalars = [m for m in wire.read_file(str(log))[0] if isinstance(m, wire.Scalars)]
    assert [m.values["loss"] for m in scalars[:3]] == pytest.approx([w[0] for w in want], rel=1e-6)
    assert [m.values["acc"] for m in scalars[:3]] == pytest.approx([w[1] for w in want])
    assert scalars[3].values["other"] == 1.0 and "acc" not in scalars[3].values


def test_bad_log_values_and_arguments_are_refused():
    model = _mlp()
    xr = probes.attach(model, serve=False, spectral_every=None)
    with pytest.raises(ValueError, match="one element"):
        xr.log(loss=torch.ones(3))
    with pytest.raises(ValueError):
        xr.log(loss="high")
    xr.close()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="start_step"):
            probes.attach(model, serve=False, start_step=bad)
    with pytest.raises(ValueError, match="GradScaler"):
        probes.attach(model, serve=False, scaler=object())


def test_a_resumed_run_numbers_steps_from_the_optimizers_count(tmp_path):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(12):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    model2 = _mlp()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(state)  # as nanoGPT's --init_from=resume does
    log = tmp_path / "r.xray"
    xr = probes.attach(model2, opt2, every=5, serve=False, log=str(log), spectral_every=None)
    for _ in range(9):
        model2(torch.randn(4, 8)).pow(2).mean().backward()
        opt2.step()
        opt2.zero_grad()
    xr.close()
    msgs, _ = wire.read_file(str(log))
    assert msgs[0].start_step == 12
    assert [m.step for m in msgs if isinstance(m, wire.Step)] == [15, 20]  # sampled as a fresh run would be
    assert [m.step for m in msgs if isinstance(m, wire.Scalars)] == list(range(12, 21))
    assert isinstance(msgs[-1], wire.End) and msgs[-1].step == 21
    xr = probes.attach(_mlp(), serve=False, start_step=300, spectral_every=None)  # given explicitly
    assert xr.step_index == 300
    xr.close()


def test_gradscaler_update_is_restored_at_close():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    xr = probes.attach(model, opt, scaler=scaler, serve=False, spectral_every=None)
    assert "update" in scaler.__dict__
    xr.close()
    assert "update" not in scaler.__dict__


# -- real fault-injected trainings (slow) ------------------------------------

def _gpt(seed=0):
    torch.manual_seed(seed)
    data = demo.CharData(demo.corpus(), 32, seed=seed)
    return data, demo.build_model(len(data.chars), layers=2, width=32, heads=2, block=32)


@pytest.mark.slow
@pytest.mark.parametrize("corrupt_at", [113, None], ids=["one-bad-batch", "healthy"])
def test_loss_spike_from_one_corrupted_batch_on_an_unsampled_step(tmp_path, corrupt_at):
    data, model = _gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    alerts = []
    xr = probes.attach(model, opt, every=5, serve=False, spectral_every=None, on_alert=alerts.append)
    steps = 130 if corrupt_at else 400
    for step in range(steps):
        x = data.batch(8)
        if step == corrupt_at:
            x = torch.randint(len(data.chars), x.shape, generator=torch.Generator().manual_seed(1))  # garbage
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    xr.close()
    spikes = [a for a in alerts if a.rule in ("loss-spike", "nonfinite") and a.layer == LOSS]
    if corrupt_at is None:
        assert spikes == []
        return
    assert corrupt_at % 5  # the spike is on a step the probe does not sample
    assert [(a.step, a.rule) for a in spikes] == [(corrupt_at, "loss-spike")]
    assert "first movers:" in spikes[0].message


def _fp16_run(tmp_path, fault: bool, steps: int):
    data, model = _gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    alerts = []
    log = tmp_path / "fp16.xray"
    xr = probes.attach(model, opt, every=5, serve=False, spectral_every=None, on_alert=alerts.append,
                       scaler=scaler, log=str(log))
    if fault:  # activations past fp16's 65,504: inf in forward, NaN gradients at any loss scale
        with torch.no_grad():
            model.transformer.h[1].mlp.c_fc.weight.mul_(3e3)
    for _ in range(steps):
        x = data.batch(8)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=x, labels=x).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    xr.close()
    return alerts, wire.read_file(str(log))[0]


@pytest.mark.slow
def test_fp16_overflow_every_step_under_a_gradscaler(tmp_path):
    alerts, msgs = _fp16_run(tmp_path, fault=True, steps=25)
    scalars = [m for m in msgs if isinstance(m, wire.Scalars)]
    assert [m.step for m in scalars] == list(range(25))  # skipped steps are still steps
    assert all(m.skipped for m in scalars)
    assert scalars[-1].values["scale"] < scalars[0].values["scale"] / 2**20
    steps = [m for m in msgs if isinstance(m, wire.Step)]
    assert [m.step for m in steps] == [0, 5, 10, 15, 20] and all(m.skipped for m in steps)
    assert all(any(s.kind == "grad" for s in m.samples) for m in steps)  # the overflowing gradients are shown
    assert not any(s.kind == "update" for m in steps for s in m.samples)
    fired = [a for a in alerts if a.severity != "info"]
    assert [(a.rule, a.layer, a.severity) for a in fired if a.rule == "overflow"] == [("overflow", LOSS, "critical")]
    assert next(a.step for a in fired if a.rule == "overflow") < 20
    assert not any(a.rule == "nonfinite" and a.kind == "grad" for a in fired)  # the scaler's job, not a NaN alarm
    assert any(isinstance(m, wire.Note) and m.event == "precision" and m.data["precision"] == "fp16-autocast+scaler"
               for m in msgs)


@pytest.mark.slow
def test_fp16_healthy_control_under_a_gradscaler(tmp_path):
    alerts, msgs = _fp16_run(tmp_path, fault=False, steps=40)
    assert [a for a in alerts if a.rule in ("overflow", "nonfinite", "loss-spike")] == []
    assert all("scale" in m.values for m in msgs if isinstance(m, wire.Scalars))
