"""The probe under Hugging Face Accelerate: a prepared (wrapped) optimizer and gradient accumulation."""

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import probes  # noqa: E402
from probes.protocol import wire  # noqa: E402


@pytest.fixture
def accelerator_state():
    """Accelerate keeps its state in process-wide singletons: reset them so other tests start clean."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


@pytest.mark.slow
def test_prepared_optimizer_is_hooked_and_counts_optimizer_steps(tmp_path, accelerator_state):
    """``accelerator.prepare`` wraps the optimizer in an AcceleratedOptimizer (no step-hook registry):
    the probe hooks the AdamW inside it, and under ``accelerator.accumulate`` (4 micro-batches a step)
    counts the 3 optimizer steps, with the micro-batches' mean loss and the accumulated gradients."""
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = [torch.arange(8).reshape(1, 8) % (5 + i % 3) for i in range(12)]
    dl = torch.utils.data.DataLoader(data, batch_size=None)
    model, opt, dl = acc.prepare(model, opt, dl)
    assert type(opt).__name__ == "AcceleratedOptimizer"
    path = str(tmp_path / "acc.xray")
    xr = probes.attach(model, opt, every=1, serve=False, log=path, spectral_every=None)
    losses, norms, micro = [], [], []
    for ids in dl:
        with acc.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            micro.append(loss.item())
            acc.backward(loss)
            if acc.sync_gradients:
                norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
                losses.append(sum(micro) / len(micro))
                micro = []
            opt.step()
            opt.zero_grad()
    assert xr.step_index == 3
    xr.close()
    msgs, torn = wire.read_file(path)
    assert torn == 0
    scalars = [m for m in msgs if isinstance(m, wire.Scalars)]
    assert [m.step for m in scalars] == [0, 1, 2]
    assert [m.values["loss"] for m in scalars] == pytest.approx(losses, rel=1e-5)
    steps = [m for m in msgs if isinstance(m, wire.Step)]
    assert [s.step for s in steps] == [0, 1, 2]
    for st, norm in zip(steps, norms):
        grad = sum(s.sumsq for s in st.samples if s.kind == "grad") ** 0.5
        assert grad == pytest.approx(norm, rel=1e-4)  # all 4 micro-batches' gradients, read once
        assert any(s.kind == "update" for s in st.samples)


def test_a_wrapper_holding_the_optimizer_is_unwrapped_with_its_scaler(tmp_path):
    """A user's (or DeepSpeed's) wrapper that holds the optimizer in ``.optimizer`` and a GradScaler:
    the inner optimizer is hooked, the wrapper's scaler ends the steps (a skipped step still counts)."""
    model = torch.nn.Linear(4, 4)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)

    class Wrapper:
        def __init__(self, optimizer, scaler):
            self.optimizer, self.scaler = optimizer, scaler
            self.param_groups = optimizer.param_groups

        def step(self):
            self.scaler.step(self.optimizer)
            self.scaler.update()

    wrapped = Wrapper(inner, scaler)
    xr = probes.attach(model, wrapped, every=1, serve=False, log=str(tmp_path / "w.xray"), spectral_every=None)
    assert xr.optimizer is inner and xr.scaler is scaler
    for bad in (False, True, False):
        out = model(torch.ones(2, 4))
        loss = out.sum() * (float("inf") if bad else 1.0)
        scaler.scale(loss).backward()
        wrapped.step()
        inner.zero_grad()
    assert xr.step_index == 3  # the overflowed step counts too: it ends at scaler.update()
    xr.close()
    msgs, _ = wire.read_file(str(tmp_path / "w.xray"))
    assert [m.skipped for m in msgs if isinstance(m, wire.Scalars)] == [False, True, False]


def test_an_optimizer_that_cannot_be_hooked_is_a_clear_error():
    """Neither a torch optimizer nor a holder of one: TypeError naming xr.step(), not an AttributeError."""
    model = torch.nn.Linear(2, 2)

    class Custom:
        param_groups = []

        def step(self):
            pass

    with pytest.raises(TypeError, match=r"xr\.step\(\)"):
        probes.attach(model, Custom(), serve=False, spectral_every=None)
