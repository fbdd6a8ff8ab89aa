"""The probe on real training loops, against ground truth copied by hand."""

import time

import numpy as np
import pytest
import torch
from torch import nn

import probes
import probes.capture.selection
from probes.protocol import stats, wire
from probes.engines.batch import Batch


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def collect(xr):
    msgs = []
    xr.publisher.subscribe(msgs.append)
    return msgs


def steps_of(msgs):
    return [m for m in msgs if isinstance(m, wire.Step)]


def by_key(step):
    return {(s.layer, s.kind): s for s in step.samples}


def assert_matches(s, t: torch.Tensor):
    a = t.detach().double().numpy().reshape(-1)
    assert s.count == a.size
    # the CPU kernel sums in float32 within blocks of 1,024: the mean is good to ~1e-7 of the spread
    assert stats.mean(s) == pytest.approx(a.mean(), rel=1e-6, abs=1e-6 * a.std() + 1e-12)
    assert stats.l2(s) == pytest.approx(np.linalg.norm(a), rel=1e-6, abs=1e-12)
    assert (s.min, s.max) == (pytest.approx(a.min()), pytest.approx(a.max()))


def test_weights_grads_acts_updates_equal_ground_truth():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    truth, acts = {}, {}
    model.act.register_forward_hook(lambda m, i, o: acts.__setitem__("act", o.detach().clone()))
    xr = probes.attach(model, opt, every=3, name="truth", serve=False)
    msgs = collect(xr)
    for step in range(7):
        loss = model(torch.randn(16, 12)).pow(2).mean()
        loss.backward()
        before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
        opt.step()
        truth[step] = {n: (w, g, p.detach().clone() - w) for (n, (w, g)), p in zip(before.items(), model.parameters())}
        truth[step]["act"] = acts["act"]
        opt.zero_grad()
    xr.close()
    got = steps_of(msgs)
    assert [s.step for s in got] == [0, 3, 6]
    for st in got:
        samples = by_key(st)
        for name, (w, g, dw) in ((n, v) for n, v in truth[st.step].items() if n != "act"):
            assert_matches(samples[(name, "weight")], w)
            assert_matches(samples[(name, "grad")], g)
            assert_matches(samples[(name, "update")], dw)
            ratio = dw.norm().item() / w.norm().item()
            assert samples[(name, "update")].ratio == pytest.approx(ratio, rel=1e-5)
        assert_matches(samples[("act", "act")], truth[st.step]["act"])
        assert samples[("act", "act")].dead_units == pytest.approx(
            1 - (truth[st.step]["act"].abs() > 0.05).any(0).float().mean().item())


def test_unsampled_steps_cost_only_a_flag_check():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xr = probes.attach(model, opt, every=4, serve=False)
    msgs = collect(xr)
    for _ in range(9):
        model(torch.randn(4, 12)).sum().backward()
        if xr.step_index % 4:  # an unsampled step: nothing is gathered
            assert len(xr._hooks._batch) == 0
        opt.step()
        opt.zero_grad()
    xr.close()
    assert [s.step for s in steps_of(msgs)] == [0, 4, 8]


def test_manual_step_without_optimizer_and_context_manager():
    model = Net()
    with probes.attach(model, every=1, name="manual") as xr:
        msgs = collect(xr)
        sock = xr.publisher.socket_path
        assert sock.exists()
        for _ in range(3):
            model(torch.randn(4, 12)).sum().backward()
            xr.step()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
                    p.grad = None
    assert not sock.exists()  # closed on exit: socket and manifest removed
    got = steps_of(msgs)
    assert [s.step for s in got] == [0, 1, 2]
    # updates exist from the second boundary on, and are the SGD step's size
    upd = [s for s in got[2].samples if s.kind == "update"]
    assert upd and all(u.ratio > 0 for u in upd)
    assert isinstance(msgs[-1], wire.End) and msgs[-1].reason == "finished"


def test_gradscaler_gradients_are_unscaled():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    xr = probes.attach(model, opt, every=1, serve=False)
    msgs = collect(xr)
    x = torch.randn(8, 12)
    loss = model(x).pow(2).mean()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    true_grad = model.fc1.weight.grad.clone()
    scaler.step(opt)
    scaler.update()
    xr.close()
    s = by_key(steps_of(msgs)[0])[("fc1.weight", "grad")]
    assert_matches(s, true_grad)


def test_gradient_checkpointing_counts_activations_once():
    from torch.utils.checkpoint import checkpoint

    class Ckpt(Net):
        def forward(self, x):
            return checkpoint(super().forward, x, use_reentrant=False)

    model = Ckpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xr = probes.attach(model, opt, every=1, serve=False)
    msgs = collect(xr)
    model(torch.randn(8, 12)).sum().backward()
    opt.step()
    xr.close()
    acts = [s.layer for s in steps_of(msgs)[0].samples if s.kind == "act"]
    assert sorted(acts) == ["act", "fc1", "fc2"]


def test_eval_passes_are_their_own_step_and_int_outputs_are_ignored():
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2))
    opt = torch.optim.SGD(emb.parameters(), lr=0.01)
    xr = probes.attach(emb, opt, every=1, serve=False)
    msgs = collect(xr)
    with torch.no_grad():
        emb(torch.tensor([[1, 2]]))  # evaluation: not a training activation
    emb(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    xr.close()
    train = [s for s in steps_of(msgs) if s.phase == "train"]
    acts = {s.layer: s for s in train[0].samples if s.kind == "act"}
    assert acts["0"].count == 3 * 8  # the training forward, not the eval one
    (ev,) = [s for s in steps_of(msgs) if s.phase == "eval"]
    assert {(s.layer, s.kind, s.count) for s in ev.samples} == {("0", "act", 2 * 8), ("1", "act", 2 * 2)}


def test_a_failing_hook_never_reaches_training(monkeypatch, caplog):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xr = probes.attach(model, opt, every=1, serve=False)
    msgs = collect(xr)

    def boom(*a, **k):
        raise RuntimeError("probe bug")

    monkeypatch.setattr(Batch, "hold", boom)
    for _ in range(3):
        model(torch.randn(4, 12)).sum().backward()
        opt.step()
        opt.zero_grad()
    xr.close()
    assert "switched off" in caplog.text
    assert xr.step_index == 3  # training went on
    assert isinstance(msgs[-1], wire.End)


def test_same_name_gets_a_distinct_run():
    a = probes.attach(Net(), every=1, name="twin")
    b = probes.attach(Net(), every=1, name="twin")
    try:
        assert a.run == "twin" and b.run != "twin" and b.run.startswith("twin")
    finally:
        a.close()
        b.close()


def nan_training(xr, model, opt, steps=30, nan_at=5):
    for i in range(steps):
        if i == nan_at:
            with torch.no_grad():
                model.fc2.weight[0, 0] = float("nan")
        model(torch.randn(4, 12)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        time.sleep(0.01)  # alerts are computed off the training thread


def test_on_alert_raise_stops_the_loop_soon_after_the_fault():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xr = probes.attach(model, opt, every=1, serve=False, on_alert="raise")
    with pytest.raises(probes.AlertRaised) as info:
        nan_training(xr, model, opt)
    xr.close()
    assert info.value.alert.rule == "nonfinite" and info.value.alert.step == 5
    assert xr.step_index <= 5 + 5  # raised within a few steps of the fault


def test_on_alert_callable_and_stop():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    xr = probes.attach(model, opt, every=1, serve=False, on_alert=seen.append)
    nan_training(xr, model, opt, steps=10)
    xr.close()
    assert seen and {a.rule for a in seen} == {"nonfinite"} and all(a.severity == "critical" for a in seen)

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xr = probes.attach(model, opt, every=1, serve=False, on_alert="stop")
    nan_training(xr, model, opt, steps=10)
    xr.close()
    assert xr.should_stop


def test_bad_on_alert_is_refused():
    with pytest.raises(ValueError, match="on_alert"):
        probes.attach(Net(), on_alert="explode", serve=False)


@pytest.mark.parametrize("kwargs,what", [({"hist_sample": 0}, "hist_sample"), ({"hist_sample": 2**32}, "hist_sample"),
                                         ({"update_sample": 0}, "update_sample")])
def test_bad_sample_sizes_are_refused(kwargs, what):
    with pytest.raises(ValueError, match=what):
        probes.attach(Net(), serve=False, **kwargs)


class TinyGPT(nn.Module):
    """Embedding, a ModuleList of four blocks, a head: the shape ``layers=`` selects in."""

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.ln = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

        def forward(self, x):
            return x + self.mlp(self.ln(x))

    def __init__(self, d=8, n=4):
        super().__init__()
        self.wte = nn.Embedding(16, d)
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList(self.Block(d) for _ in range(n))
        self.head = nn.Linear(d, 16)

    def forward(self, ids):
        x = self.wte(ids)
        for block in self.transformer.h:
            x = block(x)
        return self.head(x)


def test_layers_keeps_only_the_chosen_blocks():
    model = TinyGPT()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xr = probes.attach(model, opt, every=1, serve=False, layers=[0, 2], spectral_every=None)
    msgs = collect(xr)
    model(torch.randint(0, 16, (2, 5))).sum().backward()
    opt.step()
    xr.close()
    inside = ("transformer.h.0", "transformer.h.2")

    def chosen(path):
        return any(path == b or path.startswith(b + ".") for b in inside)

    want_params = {n for n, _ in model.named_parameters() if chosen(n)}
    want_acts = {n for n, _ in probes.capture.selection.select_modules(model) if chosen(n)}
    assert len(want_params) == 2 * 6 and {"transformer.h.0", "transformer.h.2.mlp.1"} <= want_acts
    samples = steps_of(msgs)[0].samples
    for kind, want in (("weight", want_params), ("grad", want_params), ("update", want_params), ("act", want_acts)):
        assert {s.layer for s in samples if s.kind == kind} == want, kind
    hello = xr.publisher.hello
    assert all(chosen(li.name) for li in hello.layers) and {li.name for li in hello.layers} >= want_acts
    # the selected blocks' statistics are the real ones
    assert_matches(by_key(steps_of(msgs)[0])[("transformer.h.2.mlp.0.weight", "weight")],
                   model.transformer.h[2].mlp[0].weight.detach() + 0.1 * model.transformer.h[2].mlp[0].weight.grad)


@pytest.mark.parametrize("layers, why", [([4], "no block 4; transformer.h has blocks 0..3"),
                                         ([0, -1], "no block -1"), ([], "at least one block index")])
def test_layers_refuses_blocks_the_model_lacks(layers, why):
    with pytest.raises(ValueError, match=why):
        probes.attach(TinyGPT(), every=1, serve=False, layers=layers, spectral_every=None)
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        probes.attach(Net(), every=1, serve=False, layers=[0], spectral_every=None)


def _eval_run(with_eval: bool):
    """Train Net for 8 steps at every=2; with_eval: before training and after every step, an
    evaluation loop of 5 batches whose inputs are 1e5 times larger (they would trip `exploding`
    if they reached a training stream)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.randn(8, 16, 12, generator=torch.Generator().manual_seed(1))
    evals = torch.randn(6, 5, 16, 12, generator=torch.Generator().manual_seed(2)) * 1e5
    xr = probes.attach(model, opt, every=2, serve=False, spectral_every=None)
    msgs = collect(xr)
    truth = []  # (step, fc1 output of the first batch of each evaluation loop)

    def evaluate(i, mode):
        model.eval()
        with mode():
            for j, x in enumerate(evals[i]):
                out = model[0](x) if j == 0 else None
                model(x)
                if out is not None:
                    truth.append((xr.step_index, out))
        model.train()

    if with_eval:
        evaluate(0, torch.inference_mode)
    for step in range(8):
        model.train()
        model(data[step]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if with_eval:
            evaluate(1 + step % 5, torch.no_grad)
    xr.close()
    alerts = [m for m in msgs if isinstance(m, wire.Alert)]
    return steps_of(msgs), alerts, truth


def test_eval_passes_are_sampled_marked_and_kept_out_of_training_streams():
    from tui.state import RunState

    plain, plain_alerts, _ = _eval_run(False)
    steps, alerts, truth = _eval_run(True)
    train = [s for s in steps if s.phase == "train"]
    evals = [s for s in steps if s.phase == "eval"]
    # training streams are exactly those of the run without evaluation
    assert [s.step for s in train] == [s.step for s in plain] == [0, 2, 4, 6]
    for a, b in zip(train, plain):
        assert a.samples == b.samples
    # one sampled evaluation forward before training and after each sampled step; only activations
    assert [s.step for s in evals] == [0, 1, 3, 5, 7]
    assert all(s.kind == "act" for e in evals for s in e.samples)
    assert {s.layer for s in evals[0].samples} == {"0", "1", "3"}
    sampled = {st: out for st, out in truth if st in (0, 1, 3, 5, 7)}
    for e in evals:
        assert_matches(by_key(e)[("0", "act")], sampled[e.step])
        assert stats.absmax(by_key(e)[("0", "act")]) > 1e4  # the cap `exploding` would have fired on
    # no alert came from the 1e5-scaled evaluation inputs: the rules saw training steps only
    assert alerts == plain_alerts == []
    # the viewer keeps them apart too
    state = RunState()
    for m in steps:
        state.ingest(m)
    assert [st for st, _ in state.series("0", "act")] == [0, 2, 4, 6]
    assert [st for st, _ in state.eval_series("0")] == [0, 1, 3, 5, 7]
    assert state.step == 6


class SparseAndMeta(nn.Module):
    """A sparse-gradient embedding, and a submodule left on the meta device (its output too)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6, sparse=True)
        self.fc = nn.Linear(6, 3)
        self.lazy = nn.Linear(4, 4, device="meta")

    def forward(self, ids):
        self.lazy(torch.empty(2, 4, device="meta"))  # an output with no values
        return self.fc(self.emb(ids))


def test_meta_and_sparse_tensors_are_skipped_with_one_note_each(caplog, tmp_path):
    import logging

    torch.manual_seed(0)
    model = SparseAndMeta()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # plain SGD takes sparse gradients
    caplog.set_level(logging.INFO, logger="xray-tui")
    xr = probes.attach(model, opt, every=1, serve=False, spectral_every=None, log=str(tmp_path / "r.xray"))
    ids = torch.tensor([[1, 2, 3, 2]])
    for _ in range(4):
        w_emb, w_fc = model.emb.weight.detach().clone(), model.fc.weight.detach().clone()
        model(ids).pow(2).sum().backward()
        assert model.emb.weight.grad.is_sparse
        g_fc = model.fc.weight.grad.clone()
        opt.step()
        opt.zero_grad()
    xr.close()
    assert xr._failed == set()  # nothing was switched off
    assert xr.step_index == 4
    msgs, _ = wire.read_file(str(tmp_path / "r.xray"))
    notes = [(m.data["layer"], m.data["kind"]) for m in msgs if isinstance(m, wire.Note) and m.event == "skipped"]
    # once each, though 4 steps were sampled: parameters at attach, the rest when first met
    assert notes == [("lazy.weight", "weight"), ("lazy.bias", "weight"), ("lazy", "act"), ("emb.weight", "grad")]
    logged = [r.getMessage() for r in caplog.records if "is not read" in r.getMessage()]
    assert sorted(logged) == sorted([
        "xray-tui: lazy.weight (weight) is not read: on the meta device: it has no values",
        "xray-tui: lazy.bias (weight) is not read: on the meta device: it has no values",
        "xray-tui: emb.weight (grad) is not read: sparse_coo layout: only dense (strided) tensors are read",
        "xray-tui: lazy (act) is not read: on the meta device: it has no values",
    ])
    last = by_key(steps_of(msgs)[-1])
    assert not any(k[0].startswith("lazy") for k in last)
    assert ("emb.weight", "grad") not in last
    assert_matches(last[("emb.weight", "weight")], w_emb)  # the dense weight is read...
    assert_matches(last[("emb.weight", "update")], model.emb.weight.detach() - w_emb)  # ...and its update
    assert_matches(last[("fc.weight", "grad")], g_fc)
    assert_matches(last[("fc.weight", "update")], model.fc.weight.detach() - w_fc)
    # the Hello says what is not read; the no-grad rule does not blame the sparse embedding
    infos = {li.name: li for li in xr.publisher.hello.layers}
    assert infos["emb"].skipped == {"weight.grad": "sparse gradient (sparse=True)"}
    assert set(infos["lazy"].skipped) == {"weight", "bias"} and infos["lazy"].params == []
    assert not [m for m in msgs if isinstance(m, wire.Alert) and m.rule == "no-grad"]
    assert len(steps_of(msgs)) == 4  # 3 samples in a row without a gradient would have fired it


def test_a_pass_with_gradients_under_model_eval_is_training():
    """Dropout-free fine-tuning (and xray-tui inspect) run model.eval() with a backward."""
    model = Net().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xr = probes.attach(model, opt, every=1, serve=False, spectral_every=None)
    msgs = collect(xr)
    x = torch.randn(4, 12)
    model(x).sum().backward()
    opt.step()
    xr.close()
    (st,) = steps_of(msgs)
    assert st.phase == "train"
    assert {(s.layer, s.kind) for s in st.samples} >= {("fc1", "act"), ("fc1.weight", "grad")}
