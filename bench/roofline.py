"""The device engine's roofline: what a sampled step must read, the launches it makes, and (on a GPU) how fast.

A sampled step must read each watched tensor once: the outputs of the hooked
modules at the given batch x seq and dtype, every parameter and every
gradient. At a GPU's memory bandwidth that is the floor of the probe's cost;
issue 26 asks for the engine within 3x of it.

How the figures are made, with nothing large allocated:

1. **Shapes.** The model is built from a ``transformers`` config and run
   forward and backward under ``FakeTensorMode`` (shapes, dtypes and strides,
   no memory), with bf16 autocast when asked (CPU autocast: for GPT-2 and
   LLaMA the same dtypes as CUDA's: matmuls in bf16, norms and the residual
   stream in float32). The probe's own selection (``capture.selection``)
   chooses the modules and parameters, so the tensors are the probe's.
2. **Launches.** The sampled step's reductions are replayed through the
   engine's real host side (``engines.batch.Batch``, ``engines.device.Rows``,
   ``gather``) in the order ``capture`` makes them: activations held until
   ``ACT_HOLD_BYTES`` and reduced in their hook, the rest at the forward's
   end; weights and gradients before the optimizer step; the update subsets
   gathered before and after it; their deltas; one finalize. On the CPU the
   tensors are on the ``meta`` device and each launch is recorded, not run;
   the engine is loaded *compiled* (as ``tests/compile_sm90.py`` does), so
   the chunk sizes and grids are a GPU's, not the interpreter's.
3. **On a CUDA GPU** (``--device cuda``) the same launches run on real
   tensors of those shapes (random normal), each timed with CUDA events
   (median of ``--repeat`` runs after a warm-up), against the device's
   nominal peak and a measured streaming read (``torch.sum`` of 2 GiB).

    python bench/roofline.py                        # GPT-2 small, bf16, 16 x 1024: the launch table
    python bench/roofline.py --scaling              # small, medium, LLaMA-style 1B at an H100's and H200's bandwidth
    python bench/roofline.py --model llama-1b --json
    python bench/roofline.py --config path/to/config.json --batch 8 --seq 2048   # your own model
    python bench/roofline.py --device cuda --repeat 5   # on a GPU: achieved GB/s per launch and in all
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

#: Nominal HBM bandwidth (bytes/s) by device name (vendor datasheets), and the machines the
#: scaling table is priced at.
PEAK = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
        "A100": 1.555e12}
SCALING_AT = (("H100 SXM", 3.35e12), ("H200", 4.8e12))
#: Hopper's streaming multiprocessors (H100 SXM and H200), and the stats kernel's resident CTAs per SM
#: at 64 registers x 128 threads (``--sm90``): 65,536 // (64 * 128) = 8.
SMS, CTAS_PER_SM = 132, 8
#: GPU clock cycles of ``torch.cuda._sleep`` queued before each timed launch (~0.1 ms at ~2 GHz).
_SLEEP_CYCLES = 200_000


def _models() -> dict:
    """Name -> (description, a function building its ``transformers`` config and model class)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    return {
        "gpt2-small": ("GPT-2 small (12 x 768)", lambda: (GPT2Config(), GPT2LMHeadModel)),
        "gpt2-medium": ("GPT-2 medium (24 x 1024)",
                        lambda: (GPT2Config(n_embd=1024, n_layer=24, n_head=16), GPT2LMHeadModel)),
        # Llama 3.2 1B's shape: 16 x 2048, MLP 8192, 32 heads / 8 KV heads, 128,256 tokens, tied embeddings
        "llama-1b": ("LLaMA-style 1.2 B (16 x 2048, Llama-3.2-1B's shape)",
                     lambda: (LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                          max_position_embeddings=4096, tie_word_embeddings=True),
                              LlamaForCausalLM)),
    }


def tiny_gpt2(layers: int = 1, width: int = 8, vocab: int = 16, positions: int = 64):
    """A tiny GPT-2 ``(config, class)`` (tests)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2Config(n_layer=layers, n_embd=width, n_head=2, vocab_size=vocab, n_positions=positions,
                      bos_token_id=0, eos_token_id=0), GPT2LMHeadModel


# -- 1. shapes ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Spec:
    """One watched tensor: a hooked module's output, a parameter or a gradient."""

    name: str
    kind: str  # "act", "weight", "grad"
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    units: bool = False  # an activation function's output: its dead units are counted

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclasses.dataclass
class Trace:
    """The tensors one sampled step reads, in the order the probe reads them."""

    acts: list[Spec]
    params: list[Spec]
    grads: list[Spec]  # in parameter order, one per parameter with a gradient
    trainable: list[tuple[str, int]]  # (name, elements) of the parameters the optimizer updates
    nparams: int
    tokens: int


def trace(config, cls, batch: int, seq: int, bf16: bool = True) -> Trace:
    """Shapes and dtypes of everything the probe watches in one training step of ``cls(config)``
    on ``batch x seq`` tokens, from a forward and backward under ``FakeTensorMode``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers.utils import logging as hf_logging

    from probes.capture.activations import first_tensor
    from probes.capture.selection import Watched
    from probes.engines.reduce import _has_units

    hf_logging.set_verbosity_error()
    acts: list[Spec] = []
    with FakeTensorMode():
        model = cls(config)
        watched = Watched(model, None, None, None, lambda *a: None)
        seen: set[str] = set()

        def hook(name):
            def record(module, inputs, output):
                x = first_tensor(output)
                if x is None or not x.is_floating_point() or name in seen:
                    return  # what Activations.hold skips
                seen.add(name)
                acts.append(Spec(name, "act", tuple(x.shape), tuple(x.stride()), x.dtype,
                                 name in watched.activations and _has_units(x)))
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in watched.modules]
        ids = torch.randint(0, config.vocab_size, (batch, seq))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for h in handles:
            h.remove()
        params = [Spec(n, "weight", tuple(p.shape), tuple(p.stride()), p.dtype) for n, p in watched.params]
        grads = [Spec(n, "grad", tuple(p.grad.shape), tuple(p.grad.stride()), p.grad.dtype)
                 for n, p in watched.params if p.grad is not None]
        trainable = [(n, p.numel()) for n, p in watched.trainable]
        nparams = sum(p.numel() for _, p in watched.params)
    return Trace(acts, params, grads, trainable, nparams, batch * seq)


# -- 2. launches ----------------------------------------------------------------------------------


def load_engine(compiled: bool = True):
    """``probes.engines.device``, loaded compiled where possible: on a machine without CUDA the
    engine is imported with ``torch.cuda.is_available`` answering True for the import only (its
    constants are then a GPU's; launches are recorded, never run). Already imported: as it is."""
    if "probes.engines.device" in sys.modules or not compiled or torch.cuda.is_available():
        from probes.engines import device
        return device
    real = torch.cuda.is_available
    os.environ.pop("TRITON_INTERPRET", None)
    torch.cuda.is_available = lambda: True
    try:
        from probes.engines import device
    finally:
        torch.cuda.is_available = real
    return device


@dataclasses.dataclass
class Launch:
    """One kernel launch of the sampled step."""

    kernel: str
    phase: str
    programs: int  # CTAs in the grid
    tensors: int  # tensors (or pieces) it reads
    dtypes: str
    elements: int
    nbytes: int  # tensor data read (each element once)
    time_s: float | None = None  # on a GPU: the median of the timed runs

    def gbps(self) -> float | None:
        return None if not self.time_s else self.nbytes / self.time_s / 1e9


class _Recorder:
    """Wraps the engine's launch points: which tensors each launch reads, and (on CUDA) its time."""

    def __init__(self, de, run: bool, warps: int | None = None, cuda: bool = True) -> None:
        self.de, self.run, self.warps, self.cuda = de, run, warps, cuda
        self.launches: list[Launch] = []
        self.events: list[tuple] = []
        self.phase = ""
        self._what: tuple | None = None  # (tensors, dtypes, elements, bytes) of the launch being made

    @contextlib.contextmanager
    def installed(self):
        de, rec = self.de, self
        real_launch, real_stats, real_units = de._launch, de.Rows._launch_stats, de.Rows._launch_units

        def launch(kernel, grid, *args, **kwargs):
            tensors, dtypes, elements, nbytes = rec._what or (0, "", 0, 0)
            rec._what = None
            rec.launches.append(Launch(kernel.__name__, rec.phase, math.prod(grid), tensors, dtypes, elements, nbytes))
            if not rec.run:
                return
            if rec.warps and kernel is de._stats_kernel:
                kwargs = {**kwargs, "num_warps": rec.warps}  # a variant (--variants): Triton's launch option
            if not rec.cuda:  # Triton's interpreter on CPU tensors (tests): the wall clock
                t0 = time.perf_counter()
                real_launch(kernel, grid, *args, **kwargs)
                rec.events.append((len(rec.launches) - 1, t0, time.perf_counter()))
                return
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            # keep the GPU busy while the host enqueues: the events then time the kernel, not the
            # host's launch path (tens of microseconds, as long as a small launch's kernel)
            torch.cuda._sleep(_SLEEP_CYCLES)
            start.record()
            real_launch(kernel, grid, *args, **kwargs)
            end.record()
            rec.events.append((len(rec.launches) - 1, start, end))

        def stats(rows, group):
            items = [it for _, it, _ in group if it.n]
            rec._what = (len(items), ",".join(sorted({_dt(it.x.dtype) for it in items})),
                         sum(it.n for it in items), sum(it.n * it.x.element_size() for it in items))
            return real_stats(rows, group)

        def units(rows, it, shape):
            rec._what = (1, _dt(it.x.dtype), it.n, it.n * it.x.element_size())
            return real_units(rows, it, shape)

        real_finalize = de.Rows.finalize

        def finalize(rows):  # its traffic: the chunk partials and bin counters read, the rows written
            chunks = sum(r[1] for r in rows.table)
            rec._what = (0, "f64", 0, chunks * de.NP * 8 + len(rows.table) * (2 * de.HW * 4 + 8 * (
                de.NCOL + de.NUM_BINS)))
            return real_finalize(rows)

        de._launch, de.Rows._launch_stats, de.Rows._launch_units = launch, stats, units
        de.Rows.finalize = finalize
        try:
            yield self
        finally:
            de._launch, de.Rows._launch_stats, de.Rows._launch_units = real_launch, real_stats, real_units
            de.Rows.finalize = real_finalize

    def times(self) -> list[float]:
        """Seconds per launch of the last run (CUDA), then forgets the events."""
        if self.cuda:
            torch.cuda.synchronize()
        out = [0.0] * len(self.launches)
        for i, start, end in self.events:
            out[i] = start.elapsed_time(end) / 1e3 if self.cuda else end - start
        self.events = []
        return out


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float", "f").replace("bf16", "bf16")


def _tensor(spec: Spec, device: torch.device) -> torch.Tensor:
    if device.type == "meta":
        return torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype, device=device)
    x = torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype, device=device)
    return x.normal_()


def replay(tr: Trace, de, device: torch.device, hist_k: int = 65535, update_k: int = 4096, eps: float = 0.05,
           rec: _Recorder | None = None) -> list[Launch]:
    """The launches of one sampled step of ``tr``, in the order capture/ makes them (see the module's
    docstring); on CUDA each one runs (``rec.run``). Returns the recorder's launches."""
    from probes import engines
    from probes.capture import activations
    from probes.engines import batch as batch_mod

    rec = rec or _Recorder(de, run=device.type == "cuda")
    if device.type == "cpu" and not de.INTERPRET:
        raise ValueError("CPU tensors run only in Triton's interpreter (TRITON_INTERPRET=1)")
    old_env = os.environ.get("XRAY_TUI_ENGINE")
    os.environ["XRAY_TUI_ENGINE"] = "device"  # the device engine for these tensors (meta or CUDA)
    real_copy = batch_mod._to_host_async
    batch_mod._to_host_async = lambda t: (t, None)  # the rows stay where they are: nothing reads them here
    fell: list[str] = []
    remove = engines.on_fallback(lambda device_type, why: fell.append(why))  # torch's ops would count nothing
    try:
        with rec.installed():
            b = batch_mod.Batch(eps, hist_k, np.random.default_rng(0))
            rec.phase = "activations"
            for spec in tr.acts:  # Activations.hold: reduced in the hook past the hold limit
                b.hold(spec.name, "act", _tensor(spec, device), units=spec.units)
                if b.held_bytes > activations.ACT_HOLD_BYTES:
                    b.reduce()
            b.reduce()  # the forward's end (Hooks._end_forward)
            rec.phase = "weights+grads"  # WeightReads.read_params
            params = {s.name: _tensor(s, device) for s in tr.params}
            for s in tr.params:
                b.hold(s.name, "weight", params[s.name])
                g = next((g for g in tr.grads if g.name == s.name), None)
                if g is not None:
                    b.hold(s.name, "grad", _tensor(g, device))
            b.reduce()
            rec.phase = "update subsets"  # keep_snapshot, then take_subsets after the optimizer step
            flats = [params[n].reshape(-1) for n, _ in tr.trainable]
            idx = [None if n <= update_k else torch.arange(update_k, device=device) * (n // update_k)
                   for _, n in tr.trainable]
            lengths = [min(n, update_k) for _, n in tr.trainable]
            gathered = (len(flats), ",".join(sorted({_dt(f.dtype) for f in flats})), sum(lengths),
                        sum(lengths) * (flats[0].element_size() if flats else 0)
                        + 8 * sum(len(i) for i in idx if i is not None))
            rec._what = gathered
            before = de.gather(flats, idx)
            rec._what = gathered
            after = de.gather(flats, idx)
            rec._what = None
            if before is not None:
                rec.phase = "updates"  # reduced at start_copy in the probe: the same launch
                refs = torch.zeros(len(lengths), dtype=torch.float64, device=device)
                b.hold_split([n for n, _ in tr.trainable], "update", after - before, lengths, ref_sumsq=refs,
                             init_dist=refs)
                b.reduce()
            rec.phase = "finalize"
            b.start_copy()
            del params, flats
    finally:
        remove()
        batch_mod._to_host_async = real_copy
        if old_env is None:
            os.environ.pop("XRAY_TUI_ENGINE", None)
        else:
            os.environ["XRAY_TUI_ENGINE"] = old_env
    if fell:
        raise RuntimeError(f"the device engine fell back to torch's ops on {device.type}: {fell[0]}")
    return rec.launches


@contextlib.contextmanager
def variant(de, block: int | None = None, iters: int | None = None, tail: int | None = None):
    """The engine with another summation block or chunk (``BLOCK`` x ``ITERS`` elements per program),
    or (``tail=0``) with every block of the loop masked, as before the unmasked full blocks, for a
    timing sweep on a GPU; the module's own values come back after."""
    saved = de.BLOCK, de.ITERS, de.CHUNK, de.SPLIT
    de.BLOCK, de.ITERS = block or de.BLOCK, iters or de.ITERS
    de.CHUNK = de.BLOCK * de.ITERS
    if tail is not None:
        de.SPLIT = bool(tail)
    try:
        yield
    finally:
        de.BLOCK, de.ITERS, de.CHUNK, de.SPLIT = saved


def parse_variant(text: str) -> dict:
    """``"iters=16+warps=8"`` -> ``{"iters": 16, "warps": 8}`` (``"base"``: the engine as it is;
    ``tail=0``: every block masked)."""
    out: dict = {}
    if text.strip() in ("", "base"):
        return out
    for part in text.split("+"):
        key, _, value = part.partition("=")
        if key == "tail" and value in ("0", "1"):
            out[key] = int(value)
            continue
        if key not in ("block", "iters", "warps") or not value.isdigit() or int(value) < 1:
            raise ValueError(f"variant {text!r}: give base, or block=N, iters=N, warps=N, tail=0 joined by +")
        out[key] = int(value)
    if "block" in out and out["block"] & (out["block"] - 1):
        raise ValueError(f"variant {text!r}: block must be a power of two")
    return out


def measure(tr: Trace, de, repeat: int, hist_k: int = 65535, warps: int | None = None,
            device: torch.device = torch.device("cuda")) -> list[Launch]:
    """The launches of ``tr`` run on CUDA (on the CPU in Triton's interpreter: tests): one warm-up
    (compiles), then ``repeat`` timed runs; each launch's time is the median of its runs."""
    cuda = device.type == "cuda"
    replay(tr, de, device, hist_k, rec=_Recorder(de, run=True, warps=warps, cuda=cuda))  # compiles, grows the workspace
    runs = []
    launches = None
    for _ in range(repeat):
        rec = _Recorder(de, run=True, warps=warps, cuda=cuda)
        launches = replay(tr, de, device, hist_k, rec=rec)
        runs.append(rec.times())
        if cuda:
            torch.cuda.empty_cache()
    for i, launch in enumerate(launches):
        launch.time_s = statistics.median(r[i] for r in runs)
    return launches


def stream_read(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes/s of ``torch.sum`` over a ``nbytes`` float32 tensor: a practical streaming-read peak."""
    x = torch.ones(nbytes // 4, device=device)
    for _ in range(2):
        x.sum()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(5):
        torch.cuda._sleep(_SLEEP_CYCLES)
        start.record()
        x.sum()
        end.record()
        torch.cuda.synchronize()
        ts.append(start.elapsed_time(end) / 1e3)
    del x
    torch.cuda.empty_cache()
    return nbytes / statistics.median(ts)


def nominal_peak(name: str) -> float | None:
    """The datasheet bandwidth of a CUDA device named ``name`` (None when unknown)."""
    for key, bw in PEAK.items():  # longest names first in PEAK where they share a prefix
        if key in name:
            return bw
    return None


# -- 3. figures -----------------------------------------------------------------------------------


def summary(tr: Trace, launches: list[Launch]) -> dict:
    """Must-read bytes (each watched tensor once) against what the launches read, and the launches."""
    act = sum(s.nbytes for s in tr.acts)
    par = sum(s.nbytes for s in tr.params)
    grad = sum(s.nbytes for s in tr.grads)
    by_kernel = collections.Counter(launch.kernel for launch in launches)
    read = sum(launch.nbytes for launch in launches)
    by_bytes = collections.Counter()
    for launch in launches:
        by_bytes[launch.kernel] += launch.nbytes
    biggest = max(tr.acts, key=lambda s: s.nbytes) if tr.acts else None
    act_dtypes = collections.Counter()
    for s in tr.acts:
        act_dtypes[_dt(s.dtype)] += s.nbytes
    return {
        "parameters": tr.nparams, "tokens": tr.tokens,
        "tensors": {"activations": len(tr.acts), "weights": len(tr.params), "grads": len(tr.grads)},
        "must_read_bytes": {"activations": act, "weights": par, "grads": grad, "total": act + par + grad},
        "activation_bytes_by_dtype": dict(act_dtypes),
        "activation_bytes_per_token": act / tr.tokens,
        "largest_activation": None if biggest is None else {"name": biggest.name, "bytes": biggest.nbytes},
        "engine_read_bytes": read,
        "engine_bytes_by_kernel": dict(by_bytes),
        # the dead-unit kernel reads the activation functions' outputs a second time
        "units_reread_bytes": by_bytes.get("_units_kernel", 0),
        "launches": dict(by_kernel), "launches_total": len(launches),
        "programs": sum(launch.programs for launch in launches),
        "launches_under_one_wave": sum(1 for launch in launches if launch.kernel == "_stats_kernel"
                                       and launch.programs < SMS * CTAS_PER_SM),
    }


def _mb(b: float) -> str:
    return f"{b / 1e6:,.1f}"


def launch_table(launches: list[Launch], peak: float | None) -> str:
    """The launches as a markdown table (time and GB/s where they ran)."""
    timed = any(launch.time_s for launch in launches)
    head = "| # | kernel | phase | tensors | dtypes | elements | MB moved | programs | waves |"
    rule = "|---:|---|---|---:|---|---:|---:|---:|---:|"
    if timed:
        head += " us | GB/s | of peak |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for i, launch in enumerate(launches):
        waves = launch.programs / (SMS * CTAS_PER_SM)
        line = (f"| {i} | {launch.kernel} | {launch.phase} | {launch.tensors} | {launch.dtypes} | "
                f"{launch.elements:,} | {_mb(launch.nbytes)} | {launch.programs:,} | {waves:.2f} |")
        if timed:
            g = launch.gbps()
            line += (f" {launch.time_s * 1e6:,.1f} | {g:,.0f} | {g * 1e9 / peak:.0%} |" if g and peak
                     else f" {(launch.time_s or 0) * 1e6:,.1f} | | |")
        lines.append(line)
    return "\n".join(lines)


def report(name: str, desc: str, args, tr: Trace, launches: list[Launch], s: dict, peak: float | None,
           measured_peak: float | None, device_name: str) -> str:
    """The text report of one model: totals, the floor at the peaks, the launch table."""
    mr = s["must_read_bytes"]
    out = [f"{desc}: {tr.nparams / 1e6:,.1f} M parameters, batch {args.batch} x {args.seq}"
           f"{', bf16 autocast' if args.bf16 else ', float32'}; engine constants: "
           f"{'compiled (a GPU launch plan)' if not _interpreted() else 'Triton interpreter'}; device: {device_name}",
           f"must read (each watched tensor once): activations {_mb(mr['activations'])} MB in {len(tr.acts)} "
           f"tensors ({', '.join(f'{k} {_mb(v)} MB' for k, v in s['activation_bytes_by_dtype'].items())}), "
           f"weights {_mb(mr['weights'])} MB, gradients {_mb(mr['grads'])} MB: total {_mb(mr['total'])} MB",
           f"largest activation: {s['largest_activation']['name']} {_mb(s['largest_activation']['bytes'])} MB; "
           f"activations per token: {s['activation_bytes_per_token'] / 1e3:,.1f} kB",
           f"the launches move {_mb(s['engine_read_bytes'])} MB (" + ", ".join(
               f"{k} {_mb(v)}" for k, v in s["engine_bytes_by_kernel"].items()) + f"): {_mb(s['units_reread_bytes'])} "
           f"MB of it read twice (the dead-unit kernel's second read of the activation functions' outputs); "
           f"{s['launches_total']} launches {s['launches']}, {s['launches_under_one_wave']} statistics launches "
           f"under one wave ({SMS} SMs x {CTAS_PER_SM} CTAs)"]
    for label, bw in SCALING_AT:
        out.append(f"floor at {label}'s {bw / 1e12:.2f} TB/s: {mr['total'] / bw * 1e3:.2f} ms "
                   f"(3x: {3 * mr['total'] / bw * 1e3:.2f} ms); the launches' bytes: "
                   f"{s['engine_read_bytes'] / bw * 1e3:.2f} ms")
    if any(launch.time_s for launch in launches):
        total = sum(launch.time_s for launch in launches)
        out.append(f"measured: {total * 1e3:.2f} ms of kernel time for {_mb(s['engine_read_bytes'])} MB = "
                   f"{s['engine_read_bytes'] / total / 1e9:,.0f} GB/s; nominal peak "
                   f"{(peak or 0) / 1e9:,.0f} GB/s, streaming read (torch.sum) {(measured_peak or 0) / 1e9:,.0f} GB/s; "
                   f"floor (must-read at the streaming read): {mr['total'] / (measured_peak or peak) * 1e3:.2f} ms, "
                   f"engine {total / (mr['total'] / (measured_peak or peak)):.1f}x it")
        by = collections.defaultdict(float)
        for launch in launches:
            by[launch.kernel] += launch.time_s
        out.append("kernel time by kernel: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in by.items()))
    out.append("")
    out.append(launch_table(launches, measured_peak or peak))
    return "\n".join(out)


def _interpreted() -> bool:
    de = sys.modules.get("probes.engines.device")
    return bool(de is not None and de.INTERPRET)


def scaling_table(rows: list[tuple[str, Trace, dict]], args) -> str:
    """Predicted sampled-step cost against model size at an H100's and an H200's bandwidth."""
    head = ("| model | parameters | activations per token | must read | of it activations | launches | "
            + " | ".join(f"floor at {label} (ms) | 3x floor (ms)" for label, _ in SCALING_AT) + " |")
    rule = "|---|---:|---:|---:|---:|---:|" + "---:|---:|" * len(SCALING_AT)
    lines = [f"batch {args.batch} x {args.seq}{', bf16 autocast' if args.bf16 else ', float32'}; "
             f"cost of one sampled step = bytes / bandwidth (the floor) and the issue's 3x target", "", head, rule]
    for desc, tr, s in rows:
        mr = s["must_read_bytes"]
        cells = " | ".join(f"{mr['total'] / bw * 1e3:.2f} | {3 * mr['total'] / bw * 1e3:.2f}" for _, bw in SCALING_AT)
        lines.append(f"| {desc} | {tr.nparams / 1e6:,.0f} M | {s['activation_bytes_per_token'] / 1e3:,.1f} kB | "
                     f"{mr['total'] / 1e9:.2f} GB | {mr['activations'] / mr['total']:.0%} | {s['launches_total']} | "
                     f"{cells} |")
    lines.append("")
    lines.append("On another model: bytes = tokens x (activation bytes per token) + 8 x parameters (float32 weights "
                 "and gradients); cost ~ bytes / bandwidth, and the per-step overhead at every=N is that / N over "
                 "the step time.")
    return "\n".join(lines)


def static_sm90(de, variants: list[tuple[str, dict]]) -> list[dict]:
    """Each variant's statistics kernel (one contiguous tensor: the activation launch; float32 and
    bf16) compiled for sm_90 on this machine, as tests/compile_sm90.py compiles the engine's: its
    registers, spills and shared memory, the CTAs an H100/H200 SM keeps resident (registers,
    warps and shared memory limit it), and the bytes in flight per SM per loop iteration (each
    resident CTA loads one BLOCK). No GPU is needed; Triton's NVIDIA backend is."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from probes.engines import reduce as red

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    kinds = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.int64: "*i64", torch.int32: "*i32",
             torch.float64: "*fp64"}
    out = []
    for text, v in variants:
        for dtype in (torch.bfloat16, torch.float32):
            got: dict = {}

            def compile_launch(kernel, grid, *args, **consts):
                if kernel is not de._stats_kernel:
                    return
                sig = {}
                for name, a in zip(kernel.arg_names, args):
                    if isinstance(a, torch.Tensor):
                        sig[name] = kinds[a.dtype]
                    elif isinstance(a, bool):
                        sig[name] = "i1"
                    elif isinstance(a, int):
                        sig[name] = "i64" if name in kernel.do_not_specialize or abs(a) > 2**31 - 1 else "i32"
                    else:
                        sig[name] = "fp32"
                full = {n: ("constexpr" if n in consts else sig[n]) for n in kernel.arg_names}
                # pointers 16-byte aligned, as Triton's JIT specializes them at a launch on CUDA tensors
                attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                         if sig.get(n, "").startswith("*")}
                src = ASTSource(kernel, full, constexprs={(kernel.arg_names.index(k),): c for k, c in consts.items()},
                                attrs=attrs)
                compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": v.get("warps", 4)})
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(compiled.asm["cubin"])
                    f.flush()
                    usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                           text=True).stdout
                    sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
                got["registers"] = int(re.search(r"REG:(\d+)", usage).group(1))
                got["local"] = int(re.search(r"LOCAL:(\d+)", usage).group(1))
                got["shared"] = int(compiled.metadata.shared)
                got["loops"] = sass_loops(sass)

            real = de._launch
            de._launch = compile_launch
            try:
                with variant(de, v.get("block"), v.get("iters"), v.get("tail")):
                    x = torch.zeros(4 * de.CHUNK, dtype=dtype)
                    rows = de.Rows(torch.device("cpu"), 0.05)
                    rows.add([de.Item(x, red.sample_plan(x, 1000))])
                    rows.finalize()
                    block = de.BLOCK
            finally:
                de._launch = real
            warps = v.get("warps", 4)
            regs = -(-got["registers"] // 8) * 8  # allocated per thread in steps of 8
            ctas = min(65536 // (regs * 32 * warps), 64 // warps, 32, 233472 // (got["shared"] + 1024))
            per_thread = block // (32 * warps)  # elements each thread handles per loop iteration
            hot = [lp for lp in got.pop("loops") if lp["loads"]]  # the innermost loops that read x
            hot = min(hot, key=lambda lp: lp["instructions"]) if hot else None
            out.append({"variant": text, "dtype": _dt(dtype), **got, "warps": warps, "ctas_per_sm": ctas,
                        "bytes_in_flight_per_sm": ctas * block * dtype.itemsize,
                        "loop_instructions_per_element": hot and hot["instructions"] / per_thread,
                        "loop_loads": hot and hot["loads"]})
    return out


def sass_loops(sass: str) -> list[dict]:
    """The loops of a kernel's SASS (``cuobjdump -sass``): each backward branch's body, its
    instruction count and its global loads (``LDG.E.64``: 8 bytes a thread; ``LDG.E.U16``: 2)."""
    import re

    ins = []
    for line in sass.splitlines():
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(\S.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for at, text in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < at:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= at]
            loads = collections.Counter(re.search(r"(LDG\S*)", t).group(1) for t in body if "LDG" in t)
            loops.append({"instructions": len(body), "loads": dict(loads)})
    return loops


def sweep(tr: Trace, de, variants: list[tuple[str, dict]], args, s: dict, bw: float) -> list[dict]:
    """Each engine variant timed on the same tensors: kernel time, GB/s, and how far from the floor."""
    floor = s["must_read_bytes"]["total"] / bw
    out = []
    print(f"\nvariants (BLOCK x ITERS elements per program, num_warps of the statistics kernel), floor "
          f"{floor * 1e3:.2f} ms:\n")
    print("| variant | launches | programs | stats kernel (ms) | all kernels (ms) | GB/s | x floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for text, v in variants:
        with variant(de, v.get("block"), v.get("iters"), v.get("tail")):
            launches = measure(tr, de, args.repeat, args.hist_sample, warps=v.get("warps"))
        total = sum(x.time_s for x in launches)
        stats = sum(x.time_s for x in launches if x.kernel == "_stats_kernel")
        nbytes = sum(x.nbytes for x in launches)
        row = {"variant": text, "launches": len(launches), "programs": sum(x.programs for x in launches),
               "stats_s": stats, "total_s": total, "GBps": nbytes / total / 1e9, "x_floor": total / floor}
        out.append(row)
        print(f"| {text} | {row['launches']} | {row['programs']:,} | {stats * 1e3:.2f} | {total * 1e3:.2f} | "
              f"{row['GBps']:,.0f} | {row['x_floor']:.2f} |", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    models = None
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-small", help="gpt2-small, gpt2-medium or llama-1b")
    p.add_argument("--config", metavar="FILE",
                   help="a causal LM's config.json (or its folder) instead of --model: your own model's figures "
                        "(built from the config with AutoModelForCausalLM.from_config; nothing is downloaded)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 (no bf16 autocast)")
    p.add_argument("--hist-sample", type=int, default=65535, help="histogram sample per tensor (attach's hist_sample)")
    p.add_argument("--device", default="meta", help="meta (count only; the default) or cuda (run and time)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per launch on CUDA (after one warm-up)")
    p.add_argument("--variants", default="", metavar="LIST",
                   help="on CUDA, time these engine variants too, comma-separated: base, or block=N, iters=N, "
                        "warps=N, tail=0 (every block masked) joined by + (e.g. base,tail=0,iters=16,warps=8)")
    p.add_argument("--sm90", action="store_true",
                   help="compile the statistics kernel of each of --variants (default: base) for sm_90 here and "
                        "print its registers, spills, resident CTAs per SM and bytes in flight (no GPU needed)")
    p.add_argument("--scaling", action="store_true", help="the scaling table over every model (counts only)")
    p.add_argument("--json", action="store_true", help="JSON instead of text")
    p.add_argument("--json-out", metavar="FILE", help="also write the JSON to FILE (beside the text)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.seq < 1 or args.repeat < 1 or args.hist_sample < 1:
        p.error("--batch, --seq, --repeat and --hist-sample must be >= 1")
    if args.device not in ("meta", "cuda"):
        p.error(f"--device {args.device}: give meta or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (the default, meta, counts without one)")
    try:
        variants = [(v, parse_variant(v)) for v in args.variants.split(",") if v.strip()]
    except ValueError as exc:
        p.error(str(exc))
    if variants and args.device != "cuda" and not args.sm90:
        p.error("--variants: timed on CUDA only (give --device cuda), or compiled with --sm90")
    if args.sm90:
        de = load_engine(compiled=True)
        if de.INTERPRET:
            p.error("--sm90: the engine loaded in Triton's interpreter (unset TRITON_INTERPRET)")
        try:
            static = static_sm90(de, variants or [("base", {})])
        except Exception as exc:  # noqa: BLE001  (no NVIDIA backend, no cuobjdump: one line, exit 2)
            p.error(f"--sm90: could not compile for sm_90 here: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        if args.json:
            print(json.dumps(static, indent=1))
            return 0
        print("| variant | dtype | registers | spilled (bytes) | shared (bytes) | warps | CTAs per SM | "
              "bytes in flight per SM | hot loop: SASS instructions per element | its loads |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in static:
            per = r["loop_instructions_per_element"]
            loads = ", ".join(f"{k} x{n}" for k, n in (r["loop_loads"] or {}).items())
            print(f"| {r['variant']} | {r['dtype']} | {r['registers']} | {r['local']} | {r['shared']:,} | {r['warps']} "
                  f"| {r['ctas_per_sm']} | {r['bytes_in_flight_per_sm']:,} | {per:.1f} | {loads} |")
        return 0
    de = load_engine(compiled=True)  # before transformers, which may import triton
    try:
        models = _models()
    except ImportError as exc:
        p.error(f"transformers is needed to build the models: {exc}")
    if args.config:
        if args.scaling:
            p.error("--config: give it without --scaling")
        if not os.path.exists(args.config):
            p.error(f"--config {args.config}: no such file or folder")
        try:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(args.config, local_files_only=True)
            AutoModelForCausalLM._model_mapping[type(config)]  # noqa: B018  (a causal LM, or KeyError)
        except Exception as exc:  # noqa: BLE001  (a missing file, bad JSON, an unknown model type)
            p.error(f"--config {args.config}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        models = {"config": (f"{type(config).__name__} from {args.config}",
                             lambda: (config, AutoModelForCausalLM.from_config))}
        args.model = "config"
    names = list(models) if args.scaling else [args.model]
    unknown = [n for n in names if n not in models]
    if unknown:
        p.error(f"--model {unknown[0]}: one of {', '.join(models)}")
    device = torch.device(args.device)
    peak = measured = None
    device_name = "none (launches counted, not run)"
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        peak, measured = nominal_peak(device_name), stream_read(device)
    results, rows = {}, []
    for name in names:
        desc, make = models[name]
        config, cls = make()
        try:
            tr = trace(config, cls, args.batch, args.seq, args.bf16)
        except Exception as exc:  # noqa: BLE001  (a config that does not train at this batch x seq: one line)
            why = str(exc).splitlines()[0] if str(exc) else ""
            p.error(f"{name}: a training step at batch {args.batch} x {args.seq} failed: {type(exc).__name__}: {why}")
        try:
            if device.type == "cuda" and not args.scaling:
                launches = measure(tr, de, args.repeat, args.hist_sample)
            else:
                launches = replay(tr, de, torch.device("meta"), args.hist_sample)
        except RuntimeError as exc:  # the engine fell back: its launches cannot be counted or timed
            print(f"roofline: {name}: {exc}", file=sys.stderr)
            return 1
        s = summary(tr, launches)
        rows.append((desc, tr, s))
        results[name] = {"model": desc, "summary": s, "launches": [dataclasses.asdict(x) for x in launches]}
        if not args.json and not args.scaling:
            print(report(name, desc, args, tr, launches, s, peak, measured, device_name))
        if variants:
            results[name]["variants"] = sweep(tr, de, variants, args, s, measured or peak)
    doc = json.dumps({"batch": args.batch, "seq": args.seq, "bf16": args.bf16, "device": device_name,
                      "nominal_peak_Bps": peak, "stream_read_Bps": measured, "sms": SMS, "ctas_per_sm": CTAS_PER_SM,
                      "compiled_constants": not _interpreted(), "models": results}, indent=1)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(doc + "\n")
    if args.json:
        print(doc)
    elif args.scaling:
        print(scaling_table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
