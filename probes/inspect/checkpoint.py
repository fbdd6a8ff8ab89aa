"""`xray-tui inspect`: offline statistics and pictures of a local causal-LM directory.

Loads a transformers model directory (GPT-2, LLaMA or anything
``AutoModelForCausalLM`` loads) from local files only, runs one forward and
backward pass on a text with the probe attached (so the statistics are the
live stream's, from :mod:`probes.engines.reduce`), computes the spectral metrics of
every weight matrix (:mod:`probes.spectral.analysis`), and writes into ``out``:

- ``layer_statistics.json``: one entry per (layer, kind), the export
  contract's statistics (README, ``xray-tui export``) plus a linear
  ``histogram`` with ``bins`` bins and, for weights, ``spectral``;
- ``weights/``, ``activations/``, ``gradients/``: an SVG histogram per tensor
  and, for matrices, an SVG heatmap (hand-written SVG, no matplotlib);
- ``inspection.xray``: the same as a recording (Hello, one Step, the
  Spectral messages, End), which ``xray-tui replay`` or ``--tui`` opens.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from probes.inspect.loading import layer_patterns, load, one_line, selected, token_ids
from probes.inspect.options import InspectError, Options, Report, check
from probes.inspect.pictures import downsample, svg_heatmap, svg_histogram
from probes.spectral import matrices
from probes.protocol import stats, wire
from probes.spectral import analysis as spectral


KIND_DIRS = {"weight": "weights", "act": "activations", "grad": "gradients"}
#: Elements read for a picture's linear histogram (a strided sample above it).
PICTURE_SAMPLE = 1 << 20


# -- loading --------------------------------------------------------------------------


# -- selection ------------------------------------------------------------------------------


# -- pictures (hand-written SVG) -----------------------------------------------------------------


def file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "tensor"


def as_matrix(x: torch.Tensor) -> torch.Tensor | None:
    """A 2-D view for the heatmap: matrices as they are, activations as (tokens, units),
    conv weights as (out, in x kernel)."""
    if x.dim() < 2:
        return None
    if x.dim() > 2 and x.shape[-1] < 16:  # a conv kernel: keep output channels as rows
        return x.reshape(x.shape[0], -1)
    return x.reshape(-1, x.shape[-1])


def linear_histogram(x: torch.Tensor, bins: int, vmin: float | None = None,
                     vmax: float | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """A linear histogram of the finite values of ``x`` on ``[vmin, vmax]`` (the whole
    tensor's min and max when given, so a value outside a sample still sets the range),
    counting every ``every``-th element above 1M elements: (edges, counts, every)."""
    f = x.detach().float().reshape(-1)
    every = 1
    if f.numel() > PICTURE_SAMPLE:
        every = math.ceil(f.numel() / PICTURE_SAMPLE) | 1
        f = f[::every]
    a = f.cpu().numpy()
    a = a[np.isfinite(a)]
    if not a.size:
        return np.array([0.0, 1.0]), np.zeros(1, dtype=np.int64), every
    lo = vmin if vmin is not None and math.isfinite(vmin) else float(a.min())
    hi = vmax if vmax is not None and math.isfinite(vmax) else float(a.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(a, bins=bins, range=(lo, hi))
    return edges, counts, every


def exact_quantiles(x: torch.Tensor, qs=stats.QUANTILES) -> dict[str, float]:
    """p05/p25/median/p75/p95 of the finite values of the whole tensor, exactly:
    numpy's default (linear) method, the order statistics found by partition on the
    float32 values and interpolated in float64. NaN for a tensor without finite values."""
    a = x.detach().float().reshape(-1).cpu().numpy()
    a = a[np.isfinite(a)]
    names = ("p05", "p25", "median", "p75", "p95")
    if not a.size:
        return dict.fromkeys(names, math.nan)
    pos = np.asarray(qs, dtype=np.float64) * (a.size - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, a.size - 1)
    part = np.partition(a, np.unique(np.concatenate([lo, hi])))
    below, above = part[lo].astype(np.float64), part[hi].astype(np.float64)
    return dict(zip(names, (float(v) for v in below + (above - below) * (pos - lo))))


# -- the inspection ---------------------------------------------------------------------------


def progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=True)


def inspect(path: str, out: str, opts: Options | None = None) -> Report:
    """Inspect the model directory ``path``; write statistics and pictures into ``out``."""
    from probes.capture.probe import attach

    opts = opts or Options()
    check(opts)
    notes: list[str] = []
    model, tokenizer = load(path, opts.device, notes)
    patterns = layer_patterns(model, opts.layers)
    outdir = Path(out)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        for kind, sub in KIND_DIRS.items():
            if opts.plots and getattr(opts, {"weight": "weights", "act": "activations", "grad": "gradients"}[kind]):
                (outdir / sub).mkdir(exist_ok=True)
    except OSError as exc:
        raise InspectError(f"{out}: {exc.strerror or exc}") from None
    recording = outdir / "inspection.xray"
    if recording.exists():
        recording.unlink()  # an inspection's own output is replaced, not numbered

    cfg = model.config
    max_len = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    eos = getattr(cfg, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    ids = token_ids(opts.text, tokenizer, cfg.vocab_size, max_len, eos if isinstance(eos, int) else None,
                    notes).to(opts.device)
    for n in notes:  # said now, not only in the report: the pass below can take a while
        print(f"xray-tui: note: {n}", file=sys.stderr)
    acts: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, inputs, output):
            x = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(x, torch.Tensor) and x.is_floating_point() and name not in acts:
                acts[name] = x.detach()
        return hook

    model.train(False)  # no dropout: the statistics of the model as it is
    xr = attach(model, every=1, serve=False, log=str(recording), include=patterns,
                name=f"inspect {Path(path).name}", spectral_every=None, eps=opts.eps)
    handles = []
    try:
        if opts.activations:
            from probes.capture.selection import select_modules

            for name, module in select_modules(model, patterns):
                handles.append(module.register_forward_hook(keep(name)))
            handles += _hook_extra(model, patterns, xr, acts)
        try:
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids).loss
                if opts.gradients:
                    loss.backward()
        except Exception as exc:  # a model this code cannot run: one line, not a traceback
            raise InspectError(f"{path}: the forward/backward pass failed: {one_line(exc)}") from None
        params = [(n, p) for n, p in model.named_parameters() if selected(n.rpartition(".")[0], patterns)]
        xr.step()  # one sampled step (step 0): weights, gradients and activations, reduced as live
        spec = _spectral(model, params, opts, xr) if opts.weights else {}
    finally:
        for h in handles:
            h.remove()
        xr.close()
    msgs, _ = wire.read_file(str(recording))
    step = next(m for m in msgs if isinstance(m, wire.Step))
    want = {"weight": opts.weights, "grad": opts.gradients, "act": opts.activations}
    tensors: dict[tuple[str, str], torch.Tensor] = {}
    for n, p in params:
        tensors[(n, "weight")] = p
        if p.grad is not None:
            tensors[(n, "grad")] = p.grad
    for n, x in acts.items():
        tensors[(n, "act")] = x
    entries, pictures = [], []
    samples = [s for s in step.samples if want.get(s.kind) and (s.layer, s.kind) in tensors]
    with progress(opts.progress) as bar:
        task = bar.add_task("pictures", total=len(samples))
        for s in samples:
            entry = stats.export_dict(s, step.step, step.rank)
            x = tensors[(s.layer, s.kind)]
            entry.update(exact_quantiles(x))  # the whole tensor is here: exact, not from the histogram
            entry["quantiles"] = "exact"
            edges, counts, every = linear_histogram(x, opts.bins, entry["min"], entry["max"])
            entry["histogram"] = {"edges": edges.tolist(), "counts": counts.tolist(), "every": every}
            entry["shape"] = list(x.shape)
            if s.kind == "weight" and s.layer in spec:
                entry["spectral"] = spec[s.layer]
            entry["pictures"] = []
            entries.append(entry)  # cleaned of NaN/inf when written
            bar.advance(task)
            if not opts.plots:
                continue
            sub = outdir / KIND_DIRS[s.kind]
            stem = file_stem(s.layer)
            hist_path = sub / f"{stem}.hist.svg"
            summary = {k: entry[k] for k in ("mean", "std", "min", "max")}
            hist_path.write_text(svg_histogram(edges, counts, f"{s.kind} {s.layer}", summary, opts.hist_scale,
                                               every=every))
            entry["pictures"].append(str(hist_path.relative_to(outdir)))
            pictures.append(hist_path)
            mat = as_matrix(x) if opts.heatmaps else None
            if mat is not None:
                heat_path = sub / f"{stem}.heatmap.svg"
                heat_path.write_text(svg_heatmap(downsample(mat, opts.heatmap_max_dim, opts.heatmap_pool),
                                                 f"{s.kind} {s.layer}", tuple(x.shape), entry["min"], entry["max"],
                                                 opts.heatmap_pool,
                                                 ("token", "unit") if s.kind == "act" else ("row", "column")))
                entry["pictures"].append(str(heat_path.relative_to(outdir)))
                pictures.append(heat_path)
    doc = {
        "model": str(Path(path).resolve()),
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "text": opts.text,
        "tokens": int(ids.shape[1]),
        "token_ids": ids[0].tolist(),
        "notes": notes,
        "loss": float(loss.detach()),
        "layers": opts.layers,
        "spectral_skipped": [{"layer": n, "reason": r} for n, r in matrices.targets(model)[1]
                             if selected(n.rpartition(".")[0], patterns)] if opts.weights else [],
        "entries": [json_ready(e) for e in entries],
    }
    json_path = outdir / "layer_statistics.json"
    json_path.write_text(json.dumps(doc, indent=1))
    return Report(outdir, json_path, recording, len(entries), pictures, float(loss.detach()), notes)


#: Modules whose *input* is read as an activation of its own, ``<module path>.input``: the
#: attention context before the output projection (GPT-2 ``attn.c_proj``, LLaMA ``self_attn.o_proj``)
#: and the SwiGLU product act(gate) * up before ``mlp.down_proj``; no module outputs them.
INPUT_OF = ("attn.c_proj", "self_attn.o_proj", "mlp.down_proj")
#: Fused query/key/value projections split into ``<module path>.q`` / ``.k`` / ``.v`` (GPT-2's ``c_attn``).
FUSED_QKV = ("attn.c_attn",)


def _ends(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _hook_extra(model: nn.Module, patterns, xr, acts: dict) -> list:
    """Hooks that hand the probe module inputs and split q/k/v, under their own names."""
    def take(name: str, x) -> None:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and name not in acts:
            acts[name] = x.detach()
            xr.hold_activation(name, x)  # reduced with the step's other activations, and recorded

    def pre(name):
        return lambda module, inputs: take(f"{name}.input", inputs[0] if inputs else None)

    def qkv(name):
        def hook(module, inputs, output):
            x = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(x, torch.Tensor) and x.shape[-1] % 3 == 0:
                for part, t in zip("qkv", x.detach().chunk(3, dim=-1)):
                    take(f"{name}.{part}", t.contiguous())
        return hook

    handles = []
    for name, module in model.named_modules():
        if not selected(name, patterns):
            continue
        if _ends(name, INPUT_OF):
            handles.append(module.register_forward_pre_hook(pre(name)))
        if _ends(name, FUSED_QKV):
            handles.append(module.register_forward_hook(qkv(name)))
    return handles


def _spectral(model, params, opts: Options, xr) -> dict[str, dict]:
    """Spectral metrics of the selected weight matrices, also sent to the recording."""
    chosen = {id(p) for _, p in params}
    tg = [t for t in matrices.targets(model)[0] if id(t.param) in chosen]
    out = {}
    with progress(opts.progress) as bar:
        task = bar.add_task("spectral", total=len(tg))
        for t in tg:
            m = spectral.analyze_matrix(t.tensor(), t.name, max_dim=opts.max_dim)
            out[t.name] = m.as_dict()
            msg = m.to_wire(0, xr.rank)
            xr.publisher.submit(lambda msg=msg: msg)
            bar.advance(task)
    return out


def json_ready(d):
    """JSON without NaN/inf (null instead), as the export contract writes them."""
    if isinstance(d, dict):
        return {k: json_ready(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [json_ready(v) for v in d]
    if isinstance(d, float) and not math.isfinite(d):
        return None
    if isinstance(d, np.generic):
        return json_ready(d.item())
    return d
