"""torch.compile'd models with the probe attached: statistics on sampled steps, no graph
break (fullgraph=True would raise on one), at most twice the unprobed run's graphs, and
training identical to an unprobed compiled run."""

import shutil

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import probes
from probes.protocol import stats, wire


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))


DATA = torch.randn(6, 16, 12, generator=torch.Generator().manual_seed(1))
EVAL = torch.randn(3, 16, 12, generator=torch.Generator().manual_seed(2))


def train(backend: str, order: str | None):
    """Six steps at every=2 and, after step 2, an evaluation loop of three batches.
    ``order``: "attach-compile", "compile-attach", or None (no probe)."""
    torch._dynamo.reset()
    counters.clear()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    xr, msgs = None, []
    if order == "attach-compile":
        xr = probes.attach(model, opt, every=2, serve=False, spectral_every=None)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    if order == "compile-attach":
        xr = probes.attach(compiled, opt, every=2, serve=False, spectral_every=None)
    if xr is not None:
        xr.publisher.subscribe(msgs.append)
    truth = {}
    for i, x in enumerate(DATA):
        compiled(x).pow(2).mean().backward()
        with torch.no_grad():  # the ground truth, without the hooks: functional calls
            w, b = model[0].weight, model[0].bias
            truth[i] = (w.detach().clone(), w.grad.clone(), nn.functional.linear(x, w, b))
        opt.step()
        opt.zero_grad()
        if i == 2:
            model.eval()
            with torch.no_grad():
                for e in EVAL:
                    compiled(e)
            truth["eval"] = nn.functional.linear(EVAL[0], model[0].weight, model[0].bias).detach()
            model.train()
    if xr is not None:
        xr.close()
    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    return model, [m for m in msgs if isinstance(m, wire.Step)], truth, graphs, breaks


def close(s, t: torch.Tensor, rel=1e-5):
    a = t.detach().double().reshape(-1)
    assert s.count == a.numel()
    assert stats.l2(s) == pytest.approx(a.norm().item(), rel=rel)
    assert stats.mean(s) == pytest.approx(a.mean().item(), rel=rel, abs=1e-7)
    assert (s.min, s.max) == (pytest.approx(a.min().item(), rel=rel), pytest.approx(a.max().item(), rel=rel))


def check(backend, order, exact=True):
    plain, _, _, plain_graphs, _ = train(backend, None)
    model, steps, truth, graphs, breaks = train(backend, order)
    # training is the unprobed compiled run's
    for p, q in zip(model.parameters(), plain.parameters()):
        if exact:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert breaks == 0
    assert graphs <= 2 * plain_graphs  # sampled and unsampled variants of each, nothing per step
    train_steps = [s for s in steps if s.phase == "train"]
    assert [s.step for s in train_steps] == [0, 2, 4]
    for st in train_steps:
        by = {(s.layer, s.kind): s for s in st.samples}
        assert {k for k, _ in by} == {"0", "1", "2", "3"} | {f"{m}.{p}" for m in "013" for p in ("weight", "bias")}
        w, g, out = truth[st.step]
        close(by[("0.weight", "weight")], w)
        close(by[("0.weight", "grad")], g)
        close(by[("0", "act")], out, rel=1e-4)
        assert by[("2", "act")].dead_units is not None
        assert by[("0.weight", "update")].ratio > 0
    (ev,) = [s for s in steps if s.phase == "eval"]
    assert ev.step == 3 and {s.kind for s in ev.samples} == {"act"}
    close({s.layer: s for s in ev.samples}["0"], truth["eval"], rel=1e-4)


@pytest.mark.parametrize("order", ["attach-compile", "compile-attach"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_keeps_its_graphs_and_its_training(backend, order):
    check(backend, order)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_inductor_compiled_model():
    check("inductor", "attach-compile", exact=False)


class Looping(nn.Module):
    """A forward dynamo cannot compile whole (a graph break inside a loop): it falls back
    to running the frame eagerly, so the probe's hooks run outside any graph while
    dynamo still compiles the frames they call, unless the probe stops it."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
            if x.abs().max().item() > 1e6:  # .item() breaks the graph, in a loop
                x = x / 2
        return x


def traced_frames(steps: int = 10):
    """Train Looping with the probe (every=2) and return, per step, the frames dynamo traced."""
    import logging

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Looping()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xr = probes.attach(model, opt, every=2, serve=False, spectral_every=None)
    msgs, traced = [], []
    xr.publisher.subscribe(msgs.append)
    compiled = torch.compile(model, backend="eager")

    class Frames(logging.Handler):
        def emit(self, record):
            text = record.getMessage()
            if "start tracing" in text:
                traced[-1].append(text.split("start tracing ")[1])

    handler = Frames()
    torch._logging.set_logs(dynamo=logging.INFO)
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        for x in torch.randn(steps, 8, 16, generator=torch.Generator().manual_seed(3)):
            traced.append([])
            compiled(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
        torch._logging.set_logs()
    xr.close()
    return traced, [m for m in msgs if isinstance(m, wire.Step)]


def test_a_forward_dynamo_falls_back_on_does_not_get_the_probe_compiled():
    traced, steps = traced_frames()
    assert [s.step for s in steps] == [0, 2, 4, 6, 8]
    assert {s.layer for s in steps[-1].samples if s.kind == "act"} == {
        f"blocks.{i}{j}" for i in range(3) for j in ("", ".0", ".1")}
    # only the hooks' entry points are traced (and compile to nothing on unsampled steps);
    # never the reductions, which dynamo would compile function by function on every sampled step
    probe_frames = {f.split()[0] for step in traced for f in step if "/probes/" in f}
    assert probe_frames <= {"_begin_forward", "_end_forward", "hook", "_take_act"}, probe_frames
    assert not any(traced[4:]), traced[4:]  # both variants compiled in the first two sampled cycles


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)

    def inner(self, x):
        return self.act(self.a(x))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.b(checkpoint(self.inner, x, use_reentrant=False))


@pytest.mark.parametrize("fullgraph", [False, True])
def test_gradient_checkpointing_inside_a_compiled_model(fullgraph, monkeypatch):
    """Without fullgraph the checkpointed region breaks the graph on sampled steps (cached);
    fullgraph=True needs dynamo told that the hooks' side effect need not be replayed in backward."""
    if fullgraph:
        monkeypatch.setattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint", True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Checkpointed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xr = probes.attach(model, opt, every=2, serve=False, spectral_every=None)
    msgs = []
    xr.publisher.subscribe(msgs.append)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    xs = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(5))
    outs = {}
    for i, x in enumerate(xs):
        with torch.no_grad():
            outs[i] = nn.functional.linear(x, model.a.weight, model.a.bias)
        compiled(x).sum().backward()
        opt.step()
        opt.zero_grad()
    xr.close()
    steps = [m for m in msgs if isinstance(m, wire.Step)]
    assert [s.step for s in steps] == [0, 2]
    for st in steps:
        acts = {s.layer: s for s in st.samples if s.kind == "act"}
        assert set(acts) == {"a", "act", "b"}
        close(acts["a"], outs[st.step], rel=1e-4)  # once, not again for the recomputation


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_inductor_on_the_demo_gpt2():
    """HF GPT-2 under inductor: a held *detached view* of an activation became an aliased graph
    output that inductor replayed with a garbage shape (a RuntimeError in training)."""
    from probes.demo import training as demo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = demo.build_model(vocab=256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    xr = probes.attach(model, opt, every=3, serve=False, spectral_every=None)
    msgs = []
    xr.publisher.subscribe(msgs.append)
    compiled = torch.compile(model, backend="inductor")
    data = torch.randint(0, 256, (7, 8, 64), generator=torch.Generator().manual_seed(1))
    for ids in data:
        compiled(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    xr.close()
    steps = [m for m in msgs if isinstance(m, wire.Step)]
    assert [s.step for s in steps] == [0, 3, 6]
    acts = {s.layer: s for s in steps[-1].samples if s.kind == "act"}
    assert acts["lm_head"].count == 8 * 64 * 256 and acts["transformer.h.0"].count == 8 * 64 * 128
