"""The device engine (probes/engines/device.py, Triton): on CUDA tensors where a GPU is here, else in
Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 then).

Its rows against numpy's ground truth on the tensors the C kernel is tested
on, its histograms against the other engines', its fallback, and what a
sampled step costs under ``XRAY_TUI_ENGINE=device`` on GPT-2 small's
dimensions: device ops and launches beyond an unsampled step, and host reads.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import warnings

import numpy as np
import pytest
import torch
from test_cpu_kernel import EPS, POWERS, ROW, TENSORS, numpy_row, same

pytest.importorskip("triton")
from probes import engines  # noqa: E402
from probes.engines import batch, layout  # noqa: E402
from probes.protocol import histogram  # noqa: E402
from probes.engines import reduce as red  # noqa: E402

de = pytest.importorskip("probes.engines.device", reason="the device engine does not load here")

U = 2.0**-24  # float32's unit roundoff
# The device the engine's launches run on: the same tests check the compiled kernels on a GPU box
# (`python -m pytest tests/test_device_engine.py` there) and the interpreter everywhere else.
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Tests that launch on CPU tensors need Triton's interpreter, which a GPU box does not run.
interpreter_only = pytest.mark.skipif(DEV.type == "cuda", reason="launches on CPU tensors: Triton's interpreter")


@pytest.fixture(params=["as-compiled", "gpu-shaped"])
def shapes(request, monkeypatch):
    """The launch shapes: the module's own (the interpreter's one block per chunk, or a GPU's), or on
    the interpreter a small GPU-like shape: several blocks per chunk, flush windows that do not divide
    the chunk, partial blocks, several chunks per tensor."""
    if request.param == "gpu-shaped":
        if DEV.type == "cuda":
            pytest.skip("a GPU runs its own shapes")
        for name, value in {"BLOCK": 64, "ITERS": 8, "FLUSH": 3, "CHUNK": 512}.items():
            monkeypatch.setattr(de, name, value)
    return request.param


@pytest.fixture(autouse=True)
def fresh_engines():
    engines.reset()
    yield
    engines.reset()


def engine_rows(xs, k=65535, units=None, seeds=None):
    """Rows and histograms of ``xs`` from one batched launch of the device engine."""
    plans = [red.sample_plan(x, k, torch.Generator().manual_seed(i if seeds is None else seeds[i]))
             for i, x in enumerate(xs)]
    rows = de.Rows(DEV, EPS)
    rows.add([de.Item(x.to(DEV), p, units=(units or [0] * len(xs))[i]) for i, (x, p) in enumerate(zip(xs, plans))])
    out = rows.finalize().cpu().numpy()
    return out[:, : layout.NCOL], out[:, layout.NCOL:].astype(np.int64), plans


def bound(col: str, x: torch.Tensor) -> float:
    """The engine's error bound for ``col`` (see probes/engines/device.py): per chunk of CHUNK elements,
    float32 sums of (x - c)^p, c the mean of the chunk's first BLOCK finite elements, each lane adding
    FLUSH blocks before a block-wide sum folds them into float64:
    (p + FLUSH + 2 log2(BLOCK) + 3) u sum (|c| + |x - c|)^p, plus float64 rounding."""
    a = x.detach().float().double().reshape(-1).numpy()
    if not a.size:
        return 0.0
    p = POWERS[col]
    steps = p + de.FLUSH + 2 * math.log2(de.BLOCK) + 3
    if col == "abssum":
        return steps * U * np.abs(a).sum() + 1e-300
    term = 0.0
    for at in range(0, a.size, de.CHUNK):
        chunk, first = a[at : at + de.CHUNK], a[at : at + de.BLOCK]
        finite = first[np.isfinite(first)]
        c = np.float32(finite.mean()) if finite.size else 0.0
        term += ((abs(c) + np.abs(chunk - c)) ** p).sum()
    return steps * U * term + 1e-12 * (np.abs(a) ** p).sum() + 1e-300


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_rows_equal_numpy(name, shapes):
    if shapes == "gpu-shaped" and name == "large":
        pytest.skip("thousands of 512-element chunks: minutes in the interpreter")
    x = TENSORS[name]
    rows, hists, plans = engine_rows([x])
    want = numpy_row(x)
    for col, got in zip(ROW, rows[0]):
        if col in POWERS:
            if not want["_finite"]:
                assert not math.isfinite(got), col
            else:
                assert abs(got - want[col]) <= bound(col, x), (col, got, want[col])
        else:
            assert same(got, want[col]), (col, got, want[col])
    off, stride, k = plans[0]
    sample = x.detach().float().reshape(-1).numpy()[off::stride][:k]
    assert np.array_equal(hists[0], histogram.histogram(sample))  # numpy's reference binning
    assert math.isnan(rows[0, layout.COL["dead_units"]])


def test_many_tensors_in_one_launch_equal_each_alone(shapes):
    xs = [TENSORS[n] for n in sorted(TENSORS) if n != "large"]
    together, hists, _ = engine_rows(xs, k=1000)
    for i, x in enumerate(xs):
        alone, h, _ = engine_rows([x], k=1000, seeds=[i])
        assert np.array_equal(h, hists[i : i + 1])
        assert np.allclose(alone, together[i : i + 1], rtol=0, atol=0, equal_nan=True)


def test_unmasked_full_blocks_give_the_masked_loops_rows(shapes, monkeypatch):
    """Windows of full blocks are read without a mask (``SPLIT``, so the loads vectorize on a GPU):
    the rows and histograms are those of the loop that masks every block (``SPLIT = False``), bit for
    bit in the interpreter (the same float32 operations in the same order), within the error bound
    compiled. Several windows per chunk, partial tails, non-finite chunks and strided views."""
    names = ["nonfinite", "huge", "tiny", "transposed", "bfloat16", "eps-edges x 400"]
    xs = [TENSORS[n] for n in names[:-1]] + [TENSORS["zeros-and-eps-edges"].repeat(400)]  # edges in full windows
    split, split_h, _ = engine_rows(xs, k=1000)
    monkeypatch.setattr(de, "SPLIT", False)
    masked, masked_h, _ = engine_rows(xs, k=1000)
    assert np.array_equal(split_h, masked_h)
    for i, x in enumerate(xs):
        for c, col in enumerate(ROW):
            a, b = split[i, c], masked[i, c]
            if col in POWERS and DEV.type == "cuda" and math.isfinite(b):
                assert abs(a - b) <= 2 * bound(col, x), (names[i], col, a, b)
            else:
                assert same(a, b, rel=0), (names[i], col, a, b)
    want = numpy_row(xs[-1])
    for col in ("near_zero", "zeros", "min", "max"):
        assert split[-1, layout.COL[col]] == want[col], col


def test_a_nan_alone_sends_its_chunk_to_float64(shapes):
    """The kernel learns that a chunk held a NaN or an inf from its float32 sum of x - c (NaN or inf
    then), not from a flag per element: a NaN with no inf and no large value beside it, in a full
    window and in a partial tail, is counted and min/max skip it, as numpy's ground truth says."""
    g = torch.Generator().manual_seed(3)
    xs = []
    for n, at in ((3000, [5]), (3000, [2999]), (700, [0, 699])):
        x = torch.randn(n, generator=g)
        x[at] = math.nan
        xs += [x, x.bfloat16()]
    rows, _, _ = engine_rows(xs, k=100)
    for i, x in enumerate(xs):
        want = numpy_row(x)
        for col in ("count", "nan", "posinf", "neginf", "min", "max", "near_zero", "zeros"):
            assert same(rows[i, layout.COL[col]], want[col]), (i, col, rows[i, layout.COL[col]], want[col])
        assert not math.isfinite(rows[i, layout.COL["sum"]])


def test_only_large_or_tiny_negative_values_take_float64(shapes):
    """The largest |x| comes from the chunk's min and max (max(max, -min)), not from a running |x|
    max per element: chunks of negative values only, too large or too small for float32's powers,
    still take float64, and their power sums match numpy."""
    g = torch.Generator().manual_seed(4)
    xs = [-(torch.randn(3000, generator=g).abs() + 1) * 1e30, -(torch.randn(3000, generator=g).abs() + 1) * 1e-12]
    rows, _, _ = engine_rows(xs, k=100)
    for i, x in enumerate(xs):
        want = numpy_row(x)
        for col in ("sumsq", "sum4"):
            assert abs(rows[i, layout.COL[col]] - want[col]) <= bound(col, x), (i, col)


@pytest.mark.parametrize("name", ["normal", "nonfinite", "zeros-and-eps-edges", "transposed", "float16", "bfloat16",
                                  "float64", "empty", "tiny", "huge"])
def test_histograms_identical_across_engines(name, monkeypatch, cpu_kernel_lib):
    x = TENSORS[name]
    got = {}
    for engine in ("device", "cpu-kernel", "torch"):
        monkeypatch.setenv("XRAY_TUI_ENGINE", engine)
        b = batch.Batch(EPS, 1000, np.random.default_rng(7))
        b.hold("t", "weight", x if engine == "cpu-kernel" else x.to(DEV))  # the C kernel reads host memory
        rows, hists = b.to_host()
        got[engine] = rows, hists, b.hist_n
    for engine in ("cpu-kernel", "torch"):
        assert np.array_equal(got[engine][1], got["device"][1]) and got[engine][2] == got["device"][2], engine
        for col, a, b in zip(ROW, got["device"][0][0], got[engine][0][0]):
            if col not in POWERS:
                assert same(a, b, rel=1e-9), (engine, col, a, b)
    assert got["device"][1][:, -1].sum() == 0 or name != "nonfinite"  # the non-finite bin is never reported


def test_non_contiguous_views_are_read_in_place_and_dead_units_match_torch(shapes):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, 24, generator=g)
    x[..., :5] = 0.01  # five units never top eps
    x[0, 0, 5] = math.nan  # a NaN beside large values: alive
    x[..., 6] = math.nan  # all NaN: tops nothing, dead
    x = x.to(DEV)  # the views below are taken on the engine's device, so they stay views there
    cases = [x, x.bfloat16(), x.transpose(0, 1), x.permute(2, 0, 1), x[:, ::2, 3:], torch.randn(3, 3000, generator=g).to(DEV),
             torch.randn(2, 3, 4, 5, generator=g).to(DEV).permute(3, 1, 2, 0), torch.empty(0, 4, device=DEV)]
    rows, hists, plans = engine_rows(cases, k=100, units=[c.shape[-1] if c.numel() else 0 for c in cases])
    for i, c in enumerate(cases):
        c = c.cpu()
        want = numpy_row(c)
        for col in ("count", "min", "max", "near_zero", "zeros", "nan"):
            assert same(rows[i, layout.COL[col]], want[col]), (i, col)
        off, stride, k = plans[i]
        assert np.array_equal(hists[i], histogram.histogram(c.float().reshape(-1).numpy()[off::stride][:k]))
        truth = float(red.dead_units(c, EPS)) if c.numel() else math.nan
        assert same(rows[i, layout.COL["dead_units"]], truth, rel=1e-7), i
    assert rows[0, layout.COL["dead_units"]] == 6 / 24


@interpreter_only
def test_extra_columns_and_split_pieces(monkeypatch):
    monkeypatch.setenv("XRAY_TUI_ENGINE", "device")
    g = torch.Generator().manual_seed(2)
    flat = torch.randn(1000, generator=g)
    lengths = [10, 0, 500, 490]
    b = batch.Batch(EPS, 64, np.random.default_rng(0))
    b.hold("w", "weight", torch.randn(5, 5, generator=g), lora_sumsq=2.5, ref_sumsq=torch.tensor(4.0))
    b.hold_split(["a", "b", "c", "d"], "update", flat, lengths, ref_sumsq=torch.arange(4.0), init_dist=None)
    rows, hists = b.to_host()
    assert b.meta == [("w", "weight"), ("a", "update"), ("b", "update"), ("c", "update"), ("d", "update")]
    assert rows[0, layout.COL["lora_sumsq"]] == 2.5 and rows[0, layout.COL["ref_sumsq"]] == 4.0
    assert list(rows[1:, layout.COL["ref_sumsq"]]) == [0, 1, 2, 3] and np.isnan(rows[:, layout.COL["init_dist"]]).all()
    at = 0
    for i, n in enumerate(lengths):
        piece = flat[at : at + n].double().numpy()
        assert rows[1 + i, layout.COL["count"]] == n
        assert rows[1 + i, layout.COL["sum"]] == pytest.approx(piece.sum(), abs=1e-5)
        assert hists[1 + i].sum() == b.hist_n[1 + i]
        at += n


@interpreter_only
def test_a_failure_falls_back_to_torch_with_one_warning_and_tells_listeners(monkeypatch, caplog):
    monkeypatch.setenv("XRAY_TUI_ENGINE", "device")
    told = []
    remove = engines.on_fallback(lambda device, why: told.append((device, why)))

    def broken(*a, **k):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(de, "_launch", broken)
    x = torch.arange(10.0)
    with caplog.at_level(logging.WARNING, logger="xray-tui"):
        for _ in range(2):
            b = batch.Batch(EPS, 64)
            b.hold("t", "weight", x)
            rows, _ = b.to_host()
            assert rows[0, layout.COL["sum"]] == 45.0  # torch's ops answered
    remove()
    assert told == [("cpu", "RuntimeError: no kernel today")]
    assert len([r for r in caplog.records if "device engine failed" in r.getMessage()]) == 1


@interpreter_only
def test_the_probe_sends_the_fallback_to_viewers(monkeypatch):
    from probes.capture import probe
    from probes.protocol import wire

    monkeypatch.setenv("XRAY_TUI_ENGINE", "device")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xr = probe.attach(model, opt, every=1, serve=False, spectral_every=None)
    sent = []
    xr.publisher.subscribe(sent.append)
    monkeypatch.setattr(de, "_launch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    xr.close()
    notes = [m for m in sent if isinstance(m, wire.Note) and m.event == "engine-fallback"]
    steps = [m for m in sent if isinstance(m, wire.Step)]
    assert len(notes) == 1 and "boom" in notes[0].data["why"]
    assert steps and steps[0].samples  # never a silently empty stream


def test_unknown_engine_name_and_missing_triton(monkeypatch, caplog):
    monkeypatch.setenv("XRAY_TUI_ENGINE", "gpu-please")
    with caplog.at_level(logging.WARNING, logger="xray-tui"):
        assert engines.choice() == "auto"
    monkeypatch.setenv("XRAY_TUI_ENGINE", "device")
    monkeypatch.setattr(engines, "_triton", False)
    with caplog.at_level(logging.WARNING, logger="xray-tui"):
        assert engines.for_device(torch.device("cpu")) == "torch"
        assert engines.for_device(torch.device("cpu")) == "torch"
    assert len([r for r in caplog.records if "Triton is not available" in r.getMessage()]) == 1
    monkeypatch.setenv("XRAY_TUI_ENGINE", "auto")
    assert engines.for_device(torch.device("cuda")) == "torch"  # auto without Triton: quietly torch
    assert engines.for_device(torch.device("mps")) == "torch"


def test_gather_equals_torch_indexing():
    g = torch.Generator().manual_seed(2)
    flats = [torch.randn(1000, generator=g), torch.randn(7, generator=g), torch.empty(0), torch.randn(50, generator=g)]
    indices = [torch.randperm(1000, generator=g)[:100].sort().values, None, None, torch.tensor([49, 0, 0])]
    want = torch.cat([f if i is None else f[i] for f, i in zip(flats, indices)])
    flats = [f.to(DEV) for f in flats]
    indices = [None if i is None else i.to(DEV) for i in indices]
    assert torch.equal(de.gather(flats, indices).cpu(), want)


# -- what a sampled step costs ---------------------------------------------------------------------


class Counter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten ops (outside the engine's launches) and host reads (_local_scalar_dense)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.reads = 0
        self.names: collections.Counter = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops += 1
            self.names[str(func)] += 1
            if func is torch.ops.aten._local_scalar_dense.default:
                self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
def test_a_sampled_step_on_gpt2_small_dimensions_stays_under_budget(monkeypatch):
    """GPT-2 small's real dimensions (12 layers, 768 wide, 50,257 tokens: 148 parameters) at batch 1 x 16.

    The kernels are not run here (the interpreter would take minutes over 124 M parameters; the
    tests above check what they compute): each launch is counted and skipped. Activations are
    held up to the same share of the budget as at batch 16 x 1024 (the hold limit is scaled by
    the 1,024 times fewer tokens), so each is reduced in its hook as it would be there. Counted:
    every aten op on the training thread outside a launch, plus the launches, in a sampled step
    minus an unsampled one; host reads are ``aten::_local_scalar_dense`` and any
    ``tolist``/``numpy``/``item`` on the training thread.
    """
    transformers = pytest.importorskip("transformers")
    from probes.capture import activations, probe

    monkeypatch.setenv("XRAY_TUI_ENGINE", "device")
    monkeypatch.setattr(activations, "ACT_HOLD_BYTES", activations.ACT_HOLD_BYTES // 1024)
    counter = Counter()
    launched = []

    def launch(kernel, grid, *args, **kwargs):
        launched.append(kernel)
        if kernel is de._finalize_kernel:  # rows the publisher can read (zeros), not counted
            counter.paused = True
            args[4].zero_()
            counter.paused = False

    monkeypatch.setattr(de, "_launch", launch)
    main = threading.current_thread()
    reads = []
    for name in ("tolist", "numpy", "item", "cpu"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            if threading.current_thread() is main and counting[0]:
                reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    counting = [False]
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    model = transformers.GPT2LMHeadModel(cfg)
    assert len(list(model.parameters())) == 148
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    ids = torch.randint(0, 50257, (1, 16))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW creates its state in its first step: not the probe's cost
    # start_step=0: numbered from AdamW's own count the first step would be 1, and unsampled
    xr = probe.attach(model, opt, every=2, serve=False, spectral_every=None, start_step=0)

    figures, names, kinds = [], [], []
    try:
        for i in range(6):  # sampled, unsampled, sampled, ...: the second pair is counted
            counter.ops = counter.reads = 0
            counter.names = collections.Counter()
            del launched[:], reads[:]
            counting[0] = True
            with counter:
                step()
            counting[0] = False
            figures.append((counter.ops, len(launched), counter.reads, len(reads)))
            names.append(counter.names)
            kinds.append(collections.Counter(k.__name__ if hasattr(k, "__name__") else str(k) for k in launched))
    finally:
        xr.close()
    (s_ops, s_launch, s_reads, s_py), (u_ops, u_launch, u_reads, u_py) = figures[2], figures[3]
    # the counted pair is a sampled and an unsampled step; an unsampled step launches only the
    # every-step tier's gathers (probes/capture/signals.py: weights, gradients, Adam's second
    # moments before the step, weights after it), one launch each
    assert s_launch > 0 and u_launch == 4, figures
    s_reads, s_py = s_reads - u_reads, s_py - u_py  # AdamW's own step counters are read in every step
    extra = s_ops - u_ops + s_launch - u_launch
    print(f"\nGPT-2 small dims, XRAY_TUI_ENGINE=device: unsampled step {u_ops} ops; sampled step {s_ops} ops + "
          f"{s_launch} launches = {extra} beyond an unsampled one (which makes {u_ops} ops + {u_launch} launches); host reads {s_reads} (+{s_py} tolist/numpy/item/cpu); "
          f"first sampled step (workspace growing): {figures[0][0] - u_ops + figures[0][1]} beyond; launches by kernel "
          f"{dict(kinds[2])}")
    added = sorted((names[2] - names[3]).items(), key=lambda kv: -kv[1])
    assert extra <= 300, (figures, added)
    assert s_reads == 0 and s_py == 0, (s_reads, reads)
    assert figures[0][0] - u_ops + figures[0][1] <= 300
    assert figures[0][2] == u_reads


def test_the_viewer_shows_the_fallback_note():
    """Headless mode prints it; the app's header carries it."""
    import io

    pytest.importorskip("textual")

    from probes.protocol import wire
    from tui import headless
    from tui.state import RunState
    from tui.widgets.header import engine_fallback

    note = wire.Note(7, 0, "engine-fallback", {"device": "cuda", "why": "RuntimeError: boom"})
    out = io.StringIO()
    headless.AlertPrinter(out=out).handle(note)
    assert "fell back to torch on cuda: RuntimeError: boom" in out.getvalue()
    state = RunState()
    assert engine_fallback(state) == ""
    state.ingest(note)
    assert engine_fallback(state) == "engine fell back to torch on cuda: RuntimeError: boom"


@interpreter_only
def test_a_dtype_the_engine_does_not_read_takes_torch_and_keeps_the_engine_on(monkeypatch):
    monkeypatch.setenv("XRAY_TUI_ENGINE", "device")
    told = []
    remove = engines.on_fallback(lambda device, why: told.append(why))
    b = batch.Batch(EPS, 64, np.random.default_rng(0))
    b.hold("a", "weight", torch.arange(4.0))
    b.hold("b", "weight", torch.arange(4.0).to(torch.float8_e4m3fn))
    b.hold("c", "weight", torch.arange(5.0))
    rows, _ = b.to_host()
    remove()
    assert told == [] and engines.for_device(torch.device("cpu")) == "device"
    assert sorted(zip(b.meta, rows[:, layout.COL["sum"]].tolist())) == [
        (("a", "weight"), 6.0), (("b", "weight"), 6.0), (("c", "weight"), 10.0)]


class _LoRA(torch.nn.Module):
    def __init__(self, d: int, r: int) -> None:
        super().__init__()
        self.base_layer = torch.nn.Linear(d, d)
        self.lora_A = torch.nn.Linear(d, r, bias=False)
        self.lora_B = torch.nn.Linear(r, d, bias=False)
        self.scaling = 0.5

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def _lora_ops(n: int) -> int:
    from probes.capture import probe

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_LoRA(16, 4) for _ in range(n)])
    for m in model:
        torch.nn.init.normal_(m.lora_B.weight)
    xr = probe.attach(model, None, every=1, serve=False, spectral_every=None)
    try:
        counter = Counter()
        with counter:
            got = xr._reads.lora_sumsq()
    finally:
        xr.close()
    for i, m in enumerate(model):
        vec, at = got[f"{i}.lora_B.weight"]
        want = ((m.lora_B.weight @ m.lora_A.weight) * 0.5).square().sum()
        assert float(vec[at]) == pytest.approx(float(want), rel=1e-5)
    return counter.ops


def test_lora_shifts_cost_the_same_ops_for_two_or_eight_adapters():
    """Adapters of the same shapes share one batched product: the ops do not grow with their number."""
    assert _lora_ops(2) == _lora_ops(8) <= 30


@pytest.mark.skipif(DEV.type != "cuda", reason="host syncs exist only on a GPU")
def test_a_sampled_step_on_cuda_makes_no_host_sync(monkeypatch):
    """A sync on the training thread drains the GPU's queue (``torch.cuda.set_sync_debug_mode`` sees each)."""
    from probes.capture import probe

    monkeypatch.setenv("XRAY_TUI_ENGINE", "device")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.LayerNorm(256),
                                torch.nn.Linear(256, 64)).to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randn(32, 64, device=DEV)

    def step():
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    xr = probe.attach(model, opt, every=1, serve=False, spectral_every=None)
    syncs, main = [], threading.current_thread()
    try:
        step(), step()  # the workspace has grown
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda m, *a, **k: syncs.append(str(m)) if (
                threading.current_thread() is main and "synchronizing CUDA operation" in str(m)) else 0
            torch.cuda.set_sync_debug_mode(1)
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
    finally:
        xr.close()
    assert syncs == []  # every=1: the step was sampled


def test_every_launch_compiles_for_a_hopper_gpu_without_spills():
    """Triton's interpreter runs code its compiler refuses: compile each launch the engine makes for
    sm_90 here (tests/compile_sm90.py), and read its registers and local memory from the cubin."""
    import json
    import os
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.access(os.path.join(bin_dir, "ptxas"), os.X_OK):
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "compile_sm90.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    launches = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [x for x in launches if "error" in x] == []
    assert {x["kernel"] for x in launches} == {"_stats_kernel", "_units_kernel", "_finalize_kernel", "_gather_kernel"}
    stats = {(x["SINGLE"], x["CONTIG"], x["x"]): x for x in launches if x["kernel"] == "_stats_kernel"}
    assert len(stats) == 16  # one or many tensors, contiguous or strided, four dtypes
    assert all(x["local"] == 0 for x in launches), [x for x in launches if x["local"]]  # nothing spilled
    # the launch that reads a step's activations, one each: its registers set how many warps an SM
    # keeps in flight (65,536 registers / (128 threads x this)), and so the bandwidth
    assert max(x["registers"] for k, x in stats.items() if k[0] and k[1]) <= 96
