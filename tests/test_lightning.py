"""The PyTorch Lightning callback on real (tiny) Trainer runs, against ground truth.

The reference values come from the test's own hooks on the torch optimizer:
its step pre-hook sees the weights before the update, its post-hook the
gradients the optimizer used (after Lightning's unscaling and clipping; the
optimizer does not change them) and the weights after the update.
"""

import numpy as np
import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from probes.protocol import wire  # noqa: E402
from probes.lightning import XRayCallback  # noqa: E402


class Tiny(L.LightningModule):
    """Linear-ReLU-Linear regression; records ground truth around every optimizer step."""

    def __init__(self, fail_at: int = -1, loss_scale: float = 100.0):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 1)
        self.fail_at = fail_at
        self.loss_scale = loss_scale  # large gradients, so clipping bites
        self.truth = {}  # optimizer step -> {param name: (weight before, grad used, weight after)}
        self.before_step = {}  # on_before_optimizer_step's view of fc1.weight.grad, per step
        self.val_acts = []

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def training_step(self, batch, i):
        if self.global_step == self.fail_at:
            raise RuntimeError("boom")
        return self(batch).pow(2).mean() * self.loss_scale

    def validation_step(self, batch, i):
        out = self.fc1(batch)
        self.val_acts.append(out)
        self(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def on_train_start(self):
        opt = self.trainer.optimizers[0]
        names = {id(p): n for n, p in self.named_parameters()}
        pre = {}

        def before(o, args, kwargs):
            pre.clear()
            pre.update({names[id(p)]: p.detach().clone() for g in o.param_groups for p in g["params"]})

        def after(o, args, kwargs):
            self.truth[self.global_step] = {
                names[id(p)]: (pre[names[id(p)]], p.grad.clone(), p.detach().clone())
                for g in o.param_groups for p in g["params"]}

        opt.register_step_pre_hook(before)
        opt.register_step_post_hook(after)

    def on_before_optimizer_step(self, optimizer):
        self.before_step[self.global_step] = self.fc1.weight.grad.clone()


def loader(n=48, seed=0):
    data = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(data, batch_size=8)


def fit(model, cb, steps=6, val=None, **trainer_kwargs):
    opts = dict(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1)
    trainer = L.Trainer(**{**opts, **trainer_kwargs})
    trainer.fit(model, loader(), val)
    return trainer


def recorded(path):
    msgs, torn = wire.read_file(str(path))
    assert torn == 0
    return msgs


def check(s, t: torch.Tensor):
    """The sample's statistics are those of ``t`` (numpy, float64)."""
    a = t.detach().double().numpy().reshape(-1)
    assert s.count == a.size
    assert s.sum == pytest.approx(a.sum(), rel=1e-5, abs=1e-9)
    assert s.sumsq == pytest.approx(np.square(a).sum(), rel=1e-5, abs=1e-15)
    assert (s.min, s.max) == (pytest.approx(a.min(), rel=1e-6), pytest.approx(a.max(), rel=1e-6))


def check_step(st: wire.Step, truth: dict, updates: bool = True) -> dict:
    """Each parameter's weight, gradient (and update) samples in ``st`` are ``truth``'s
    ``(w, g, w_after)``; returns the samples by (layer, kind)."""
    got = {(s.layer, s.kind): s for s in st.samples}
    for name, (w, g, w_after) in truth.items():
        check(got[(name, "weight")], w)
        check(got[(name, "grad")], g)
        if updates:
            check(got[(name, "update")], w_after - w)
    return got


def test_grads_are_read_after_clipping_weights_before_the_update(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    cb = XRayCallback(every=2, serve=False, spectral_every=None, log=str(tmp_path / "l.xray"))
    fit(model, cb, callbacks=[cb], gradient_clip_val=1e-2)
    msgs = recorded(tmp_path / "l.xray")
    steps = [m for m in msgs if isinstance(m, wire.Step)]
    assert [s.step for s in steps] == [0, 2, 4]
    assert isinstance(msgs[-1], wire.End) and msgs[-1].reason == "finished"
    assert "configure_gradient_clipping" not in model.__dict__  # the module is as it was
    # every step's loss (what training_step returned) and lr, none skipped
    scalars = [m for m in msgs if isinstance(m, wire.Scalars)]
    assert [m.step for m in scalars] == list(range(len(scalars))) and len(scalars) >= 5
    assert all(m.values["loss"] > 0 and "lr" in m.values and not m.skipped for m in scalars)
    for st in steps:
        truth = model.truth[st.step]
        assert set(truth) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
        got = check_step(st, truth)
        # clipped to gradient_clip_val: the total norm the optimizer used
        total = sum(got[(n, "grad")].sumsq for n in truth) ** 0.5
        assert total == pytest.approx(1e-2, rel=1e-4)
        # Lightning's own on_before_optimizer_step saw them before clipping, much larger
        assert model.before_step[st.step].norm() > 10 * truth["fc1.weight"][1].norm()
        assert got[("act", "act")].count == 8 * 16


def test_gradscaler_gradients_are_unscaled_and_eval_passes_sampled(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    torch.manual_seed(1)
    model = Tiny(loss_scale=1.0)
    cb = XRayCallback(every=1, serve=False, spectral_every=None, log=str(tmp_path / "amp.xray"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)  # no fp16 overflow: no step is skipped
    # Lightning refuses precision="16-mixed" on the CPU; a plugin with a CPU GradScaler is accepted
    fit(model, cb, steps=3, val=loader(8, seed=2), callbacks=[cb], val_check_interval=2, check_val_every_n_epoch=None,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    msgs = recorded(tmp_path / "amp.xray")
    train = [m for m in msgs if isinstance(m, wire.Step) and m.phase == "train"]
    assert [s.step for s in train] == sorted(model.truth) == [0, 1, 2]
    for st in train:
        got = check_step(st, model.truth[st.step], updates=False)
        # not the scaled gradients (4096 times larger), which backward left in .grad
        assert got[("fc1.weight", "grad")].sumsq ** 0.5 < 10
    (ev,) = [m for m in msgs if isinstance(m, wire.Step) and m.phase == "eval"]
    check({s.layer: s for s in ev.samples}["fc1"], model.val_acts[0].float())


def test_an_exception_closes_the_probe_and_restores_the_module(tmp_path):
    model = Tiny(fail_at=3)
    cb = XRayCallback(every=1, serve=False, spectral_every=None, log=str(tmp_path / "x.xray"))
    with pytest.raises(RuntimeError, match="boom"):
        fit(model, cb, callbacks=[cb])
    msgs = recorded(tmp_path / "x.xray")
    assert [m.step for m in msgs if isinstance(m, wire.Step)] == [0, 1, 2]
    assert isinstance(msgs[-1], wire.End) and msgs[-1].reason == "crashed" and msgs[-1].error == "RuntimeError: boom"
    assert cb.xray is None and "configure_gradient_clipping" not in model.__dict__


def test_on_alert_stop_stops_the_trainer(tmp_path):
    model = Tiny()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    cb = XRayCallback(every=1, serve=False, spectral_every=None, on_alert="stop", log=str(tmp_path / "s.xray"))
    trainer = fit(model, cb, steps=40, callbacks=[cb])
    assert trainer.should_stop and trainer.global_step < 40
    end = recorded(tmp_path / "s.xray")[-1]
    assert isinstance(end, wire.End) and end.reason == "stopped" and end.error == ""


class Manual(Tiny):
    """Manual optimization: the module clips, then steps, itself."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, i):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self(batch).pow(2).mean() * self.loss_scale)
        self.clip_gradients(opt, gradient_clip_val=1e-2, gradient_clip_algorithm="norm")
        opt.step()


def test_manual_optimization_reads_what_the_module_clipped(tmp_path):
    torch.manual_seed(3)
    model = Manual()
    cb = XRayCallback(every=1, serve=False, spectral_every=None, log=str(tmp_path / "m.xray"))
    fit(model, cb, steps=3, callbacks=[cb])
    steps = [m for m in recorded(tmp_path / "m.xray") if isinstance(m, wire.Step)]
    assert [s.step for s in steps] == sorted(model.truth) == [0, 1, 2]
    for st in steps:
        got = check_step(st, model.truth[st.step])
        assert sum(got[(n, "grad")].sumsq for n in model.truth[st.step]) ** 0.5 == pytest.approx(1e-2, rel=1e-4)


def test_a_step_gradscaler_skipped_reads_as_a_zero_update(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    torch.manual_seed(4)
    model = Tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = XRayCallback(every=1, serve=False, spectral_every=None, log=str(tmp_path / "s.xray"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 gradients overflow: the step is skipped
    fit(model, cb, steps=2, callbacks=[cb], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    msgs = recorded(tmp_path / "s.xray")
    steps = [m for m in msgs if isinstance(m, wire.Step)]
    assert model.truth == {} and len(steps) == 2  # the optimizer never ran; the probe still closed each step
    for st in steps:  # marked skipped, with the gradients that overflowed and no update
        assert st.skipped and not any(s.kind == "update" for s in st.samples)
        assert any(s.kind == "grad" for s in st.samples)
    scalars = [m for m in msgs if isinstance(m, wire.Scalars)]
    assert [(m.step, m.skipped) for m in scalars] == [(0, True), (1, True)]
    assert scalars[0].values["scale"] == 2.0**40 and scalars[1].values["scale"] == 2.0**39  # backed off
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
