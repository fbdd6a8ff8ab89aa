"""The every-step early-warning tier (probes/capture/signals.py) and its rule (probes/rules/instability.py).

The tier's figures are checked against a float64 reference computed here from the same tensors
(the gradient and Adam's exp_avg_sq before the step, updated here as Adam does, the weight before
and after, on the same subsets; the tier reads Adam's own second moment after the step), for the
C kernel and for torch's ops; the training thread must read no tensor on the
host for it; the pre-clip norm must be what clip_grad_norm_ returned; every step's Scalars
must reach the publisher without waiting for a sampled step, in step order. The rule is
checked on hand-made streams and on a real lr jump of a small GPT-2 against its healthy control.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import probes
from probes.capture import signals as tier
from probes.demo import training as demo
from probes.protocol import wire
from probes.rules import RuleConfig, RuleEngine
from probes.rules.thresholds import ALL_LAYERS


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 3))


def _reference(names, params, subsets, grads, moments, before, after, beta2, t):
    """Each tensor's RMS of g^2 / v_hat, update ratio and sum of g^2 (scaled to the whole tensor),
    in float64, from the tensors as they were."""
    rms, ratio, est = [], [], 0.0
    for n in names:
        idx = subsets[n]
        sub = (lambda x: x.reshape(-1).double()) if idx is None else (lambda x: x.reshape(-1).double()[idx])
        g, w0, w1 = sub(grads[n]), sub(before[n]), sub(after[n])
        k = g.numel()
        est += float(g.square().sum()) * params[n].numel() / k
        ratio.append(float((w1 - w0).norm() / w0.norm()))
        b2 = beta2[n]
        v = torch.zeros_like(g) if moments[n] is None else sub(moments[n])  # Adam's state starts at zeros
        v_t = b2 * v + (1 - b2) * g.square()
        v_hat = v_t / (1 - b2 ** t)
        rms.append(float((g.square() / v_hat.clamp_min(tier.EPS2)).mean().sqrt()))
    return np.array(rms), np.array(ratio), math.sqrt(est)


@pytest.mark.parametrize("engine", ["cpu-kernel", "torch"])
def test_the_tier_equals_a_float64_reference(tmp_path, monkeypatch, engine, request):
    if engine == "cpu-kernel":
        request.getfixturevalue("cpu_kernel_lib")  # built (not still building: the tier would take torch's path)
    monkeypatch.setenv("XRAY_TUI_ENGINE", engine)
    monkeypatch.setattr(tier, "TIER_SAMPLE", 32)
    model = _model()
    # two param groups with their own betas; update_sample 64 and the tier's 32: every tensor but the
    # last bias is read on a subset of a subset
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "betas": (0.9, 0.95)},
                             {"params": model[2].parameters()}], lr=3e-2)
    log = tmp_path / "t.xray"
    xr = probes.attach(model, opt, every=1000, update_sample=64, serve=False, log=str(log), spectral_every=None)
    params = dict(model.named_parameters())
    beta2 = {n: (0.95 if n.startswith("0.") else 0.999) for n in params}
    expected = []
    for step in range(7):
        if step == 3:
            opt.state.clear()  # a resume without the optimizer's state: Adam's step count restarts
        x = torch.randn(16, 12)
        model(x).pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in params.items()}
        moments = {n: (opt.state[p]["exp_avg_sq"].clone() if p in opt.state else None) for n, p in params.items()}
        before = {n: p.detach().clone() for n, p in params.items()}
        opt.step()
        after = {n: p.detach().clone() for n, p in params.items()}
        opt.zero_grad()
        subsets = dict(zip(xr._signals.names, xr._signals._indices))
        t = step + 1 if step < 3 else step - 2
        expected.append(_reference(xr._signals.names, params, subsets, grads, moments, before, after, beta2, t))
    assert xr._signals._fast is (engine == "cpu-kernel")  # the C kernel's path, or torch's
    xr.close()
    msgs, _ = wire.read_file(str(log))
    hello = msgs[0]
    assert hello.version == wire.PROTOCOL_VERSION and hello.signal_tensors == list(params)
    got = [m for m in msgs if isinstance(m, wire.Scalars)]
    assert [m.step for m in got] == list(range(7))
    assert sum(1 for i in subsets.values() if i is not None) == 3  # every tensor but the last bias: a subset
    for n, i in subsets.items():  # TIER_SAMPLE elements in distinct whole runs (cache lines), in memory order
        if i is not None:
            runs = i.view(-1, tier.RUN)
            assert i.numel() == 32 and (runs[:, 0] % tier.RUN == 0).all()
            assert (runs - runs[:, :1] == torch.arange(tier.RUN)).all() and (runs[1:, 0] > runs[:-1, 0]).all()
            assert int(i.max()) < params[n].numel()
    for m, (rms, ratio, est) in zip(got, expected):
        r, u = m.signals()
        # float32 elementwise ops (torch) or float64 (C), sums in float64, one float32 rounding of
        # the result: a relative error of a few 2^-24; 1e-5 leaves room and still tells a wrong formula
        np.testing.assert_allclose(r, rms, rtol=1e-5, equal_nan=True)
        np.testing.assert_allclose(u, ratio, rtol=1e-5)
        assert m.values["grad_norm_est"] == pytest.approx(est, rel=1e-5)
    # at AdamW's first step, and the first after its state was cleared, v_hat is g^2 itself: RMS 1
    np.testing.assert_allclose(got[0].signals()[0], 1.0, rtol=1e-5)
    np.testing.assert_allclose(got[3].signals()[0], 1.0, rtol=1e-5)
    assert (got[1].signals()[0] != 1.0).all() and (got[4].signals()[0] != 1.0).all()


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("engine", ["cpu-kernel", "torch"])
def test_the_tier_reads_nothing_on_the_host_and_costs_few_ops(monkeypatch, engine):
    """Counted inside the tier's two halves on the training thread, every step: no host read
    (``_local_scalar_dense``), and a number of torch ops that does not grow with the tensors'
    sizes: 5 for the C kernel's path (its buffers), and for torch's (an index op per tensor
    and subset read, as the device engine's one-launch gather is not run here) at most 16 per tensor."""
    monkeypatch.setenv("XRAY_TUI_ENGINE", engine)
    counter = _HostReads()
    for cls_method in ("_begin", "_end"):
        real = getattr(tier.StepSignals, cls_method)

        def counted(self, *a, _real=real):
            with counter:
                return _real(self, *a)

        monkeypatch.setattr(tier.StepSignals, cls_method, counted)
    per_step = {}
    for width in (40, 64):  # the same tensors, read at subsets of the same size, and 2.6x the elements
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        xr = probes.attach(model, opt, every=1000, serve=False, spectral_every=None)
        for step in range(4):
            model(torch.randn(4, width)).sum().backward()
            if step == 3:
                counter.reads = counter.ops = 0
            opt.step()
            opt.zero_grad()
        xr.close()
        assert counter.reads == 0
        per_step[width] = counter.ops
    assert per_step[40] == per_step[64] <= (5 if engine == "cpu-kernel" else 16 * 8), per_step


def test_the_pre_clip_norm_is_what_clip_grad_norm_returned(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    original = torch.nn.utils.clip_grads_with_norm_
    log = tmp_path / "c.xray"
    xr = probes.attach(model, opt, every=2, serve=False, log=str(log), spectral_every=None)
    returned = []
    for step in range(4):
        model(torch.randn(8, 12)).pow(2).sum().backward()
        if step != 3:  # the last step is not clipped: no pre-clip norm for it
            returned.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)))
        opt.step()
        opt.zero_grad()
    xr.close()
    assert torch.nn.utils.clip_grads_with_norm_ is original  # unwrapped at close
    assert torch.nn.utils.clip_grad._clip_grads_with_norm_ is not None
    scalars = [m for m in wire.read_file(str(log))[0] if isinstance(m, wire.Scalars)]
    for m, norm in zip(scalars, returned):
        assert m.values["grad_norm_preclip"] == pytest.approx(norm, rel=1e-6) and m.values["clip"] == 0.01
        assert norm > 0.01  # so clipping did act: the gradients the optimizer saw are clipped...
        assert m.values["grad_norm_est"] == pytest.approx(0.01, rel=1e-4)  # ...and the tier reads them so
    assert m.step == 2 and scalars[0].values["grad_norm"] == pytest.approx(0.01, rel=1e-4)  # sampled: clipped
    assert "grad_norm_preclip" not in scalars[3].values and "clip" not in scalars[3].values


def test_a_clip_of_another_model_is_not_taken():
    model, other = _model(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xr = probes.attach(model, opt, every=1000, serve=False, spectral_every=None)
    other(torch.randn(2, 12)).sum().backward()
    torch.nn.utils.clip_grad_norm_(other.parameters(), 1.0)
    assert "clip" not in xr._scalars._current
    xr.close()


def test_every_step_reaches_the_publisher_without_waiting_for_a_sample():
    """every=1000: only step 0 is sampled. Each later step's Scalars (with its tier arrays) is
    published within the step after it (steps here are slower than SHIP_INTERVAL), in order."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xr = probes.attach(model, opt, every=1000, serve=False, spectral_every=None)
    seen = []
    xr.publisher.subscribe(lambda m: seen.append(m.step) if isinstance(m, wire.Scalars) else None)
    lag = []
    for step in range(8):
        model(torch.randn(4, 12)).sum().backward()
        opt.step()
        opt.zero_grad()
        time.sleep(0.06)  # a 60 ms step: past SHIP_INTERVAL, so each step ships at its end
        deadline = time.monotonic() + 5
        while (not seen or seen[-1] < step) and time.monotonic() < deadline:
            time.sleep(0.005)  # the publisher thread's part
        lag.append(step - (seen[-1] if seen else -1))
    xr.close()
    assert lag == [0] * 8 and seen == sorted(seen) == list(range(8))


# -- the rule on hand-made streams -------------------------------------------------------------

def _hello(n):
    return wire.Hello(version=wire.PROTOCOL_VERSION, run="r", signal_tensors=[f"t{i}.weight" for i in range(n)])


def _stream(n_steps, n=6, seed=0, jump_at=None, jump=20.0, rms_at=None, lr=1e-3):
    rng = np.random.default_rng(seed)
    for step in range(n_steps):
        ratio = 1e-3 * np.exp(rng.normal(0, 0.3, n))
        rms = np.exp(rng.normal(0, 0.25, n))
        values = {"lr": lr, "grad_norm_est": float(np.exp(rng.normal(0, 0.2)))}
        if jump_at is not None and step >= jump_at:
            ratio = ratio * jump
            values["lr"] = lr * jump
        if rms_at is not None and step == rms_at:
            rms = rms * 6
        yield wire.Scalars(step, 0, float(step), values, False, rms.astype("<f4").tobytes(),
                           ratio.astype("<f4").tobytes())


def _judge(msgs, n=6, config=None):
    engine = RuleEngine(config)
    engine.set_hello(_hello(n))
    return [a for m in msgs for a in engine.evaluate_scalars(m) if a.rule == "instability"]


@pytest.mark.parametrize("seed", range(4))
def test_instability_is_quiet_on_healthy_noise(seed):
    assert _judge(_stream(2000, seed=seed)) == []


def test_instability_warns_at_an_lr_jump_names_it_and_recovers():
    alerts = _judge(_stream(300, jump_at=200))
    fired = [a for a in alerts if a.severity == "warning"]
    assert [(a.step, a.layer, a.kind) for a in fired] == [(200, ALL_LAYERS, "scalar")]
    msg = fired[0].message
    assert "update ratio" in msg and "the lr went from 0.001 to 0.02" in msg and "moved first: t" in msg
    assert "Lower the learning rate" in msg and "clip gradients" in msg
    # every value joins the baseline: the new lr becomes the normal within half a window
    recovered = [a.step for a in alerts if a.severity == "info"]
    assert len(recovered) == 1 and 200 < recovered[0] < 200 + 64


def test_instability_warns_when_adams_second_moment_lags():
    fired = [a for a in _judge(_stream(200, rms_at=150)) if a.severity == "warning"]
    assert [a.step for a in fired] == [150] and "RMS(g^2/v)" in fired[0].message


def test_instability_can_be_switched_off_and_needs_history():
    off = RuleConfig(disabled=frozenset({"instability"}))
    assert _judge(_stream(300, jump_at=200), config=off) == []
    assert _judge(_stream(16, jump_at=10)) == []  # judged from the 17th step on: 16 steps of baseline first


def test_loss_spike_names_what_the_tier_saw_move():
    engine = RuleEngine()
    engine.set_hello(_hello(6))
    alerts = []
    for m in _stream(120, jump_at=100):
        values = dict(m.values, loss=2.0 + 0.01 * (m.step % 3) if m.step != 101 else 5.0)
        alerts += engine.evaluate_scalars(wire.Scalars(m.step, 0, m.time, values, False, m.adam_rms,
                                                       m.update_ratio))
    spike = next(a for a in alerts if a.rule == "loss-spike")
    assert spike.step == 101 and "first movers: t" in spike.message and "update" in spike.message


# -- on a real run -------------------------------------------------------------------------------

def _gpt_run(steps, jump_at=None):
    """bench/lead_time.py's model and recipe (2 blocks, width 64, 64-token windows, batch 16,
    AdamW 1e-3 after a warm-up), shortened; the lr x20 from ``jump_at`` on."""
    torch.manual_seed(0)
    data = demo.CharData(demo.corpus(), 64, seed=0)
    model = demo.build_model(len(data.chars), layers=2, width=64, heads=4, block=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    alerts, losses = [], []
    xr = probes.attach(model, opt, every=10, serve=False, spectral_every=None, on_alert=alerts.append)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 50) * (20 if jump_at is not None and step >= jump_at else 1)
        x = data.batch(16)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    xr.close()
    return alerts, losses


@pytest.mark.slow
def test_an_lr_jump_is_warned_before_the_loss_spikes():
    """At the jump's own step, an unsampled one, the tier warns (the updates surge at once);
    the loss, computed before that step's update, has not moved yet: no loss rule speaks then."""
    alerts, losses = _gpt_run(160, jump_at=153)  # 153: a step the probe does not sample (every=10)
    warned = [a for a in alerts if a.severity == "warning"]
    assert warned and (warned[0].step, warned[0].rule) == (153, "instability"), warned[:3]
    assert "the lr went from 0.001 to 0.02" in warned[0].message and "moved first: transformer." in warned[0].message
    assert losses[153] < 1.1 * statistics.median(losses[137:153])  # the loss had not moved at the warning
    assert max(losses[154:]) > 1.2 * statistics.median(losses[137:153])  # and then it did


@pytest.mark.slow
def test_a_healthy_run_raises_no_instability():
    alerts, _ = _gpt_run(400)
    assert [a for a in alerts if a.severity != "info"] == []


@pytest.mark.parametrize("engine", ["cpu-kernel", "torch"])
def test_a_tensor_without_a_gradient_this_step_has_no_rms(tmp_path, monkeypatch, engine, request):
    """A weight with Adam state but no gradient at a step (a branch this batch did not use):
    Adam leaves it be, so its update ratio is 0 and its RMS is NaN, not one computed from the
    weight standing in for the gradient; the other tensors are read as usual."""
    if engine == "cpu-kernel":
        request.getfixturevalue("cpu_kernel_lib")
    monkeypatch.setenv("XRAY_TUI_ENGINE", engine)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    log = tmp_path / "g.xray"
    xr = probes.attach(model, opt, every=1000, serve=False, log=str(log), spectral_every=None)
    for step in range(3):
        model(torch.randn(8, 12)).pow(2).mean().backward()
        if step == 2:
            model[2].bias.grad = None  # AdamW skips it this step
        opt.step()
        opt.zero_grad()
    xr.close()
    got = [m for m in wire.read_file(str(log))[0] if isinstance(m, wire.Scalars)]
    names = xr._signals.names
    rms, ratio = got[2].signals()
    i = names.index("2.bias")
    assert math.isnan(rms[i]) and ratio[i] == 0.0
    others = [j for j in range(len(names)) if j != i]
    assert np.isfinite(rms[others]).all() and (ratio[others] > 0).all()
