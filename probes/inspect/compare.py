"""`xray-tui inspect A B`: how the weights of one checkpoint differ from another's.

A and B are two transformers model directories (a base model and its fine-tune,
two points of one run), or B is a peft LoRA adapter directory
(``adapter_config.json``) for A, compared as A with the adapter merged (its
delta ``B·A·scaling`` added to each target weight). For every weight both hold
with the same shape, ``out`` gets:

- ``layer_comparison.json``: the relative change ``‖W_B − W_A‖_F / ‖W_A‖_F``
  (float64), ``‖W_B − W_A‖_F`` and ``max|W_B − W_A|``, the statistics of each
  side (exact quantiles), both linear histograms on common edges and, for
  matrices, the spectral metrics of each;
- ``weights/<name>.compare.svg`` (both histograms overlaid) and
  ``weights/<name>.diff.heatmap.svg`` (the heatmap of ``W_B − W_A``);
- ``comparison.xray``: a recording of two steps, A's weights at step 0 and
  B's at step 1 (the probe's update ratio between them), with each step's
  spectral metrics, which ``--tui`` or ``xray-tui replay`` opens.
"""

from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from probes.inspect import checkpoint as ins
from probes.inspect.loading import layer_patterns, load, one_line, selected
from probes.inspect.options import InspectError, Options, Report, check  # what was written: inspect's own report
from probes.inspect.pictures import HistogramFrame, downsample, fmt, svg_heatmap
from probes.spectral import analysis as spectral

from probes.spectral import matrices

COLOURS = {"a": "#89b4fa", "b": "#fab387"}


def is_adapter(path: str) -> bool:
    """A peft adapter directory (its own config, no model config)."""
    p = Path(path)
    return (p / "adapter_config.json").is_file() and not (p / "config.json").is_file()


def load_pair(a: str, b: str, device: str, notes: list[str]):
    """The models of A and B; B a LoRA adapter is merged into a fresh copy of A."""
    model_a, _ = load(a, device)
    if is_adapter(b):
        try:
            from peft import PeftModel
        except ImportError as exc:
            raise InspectError(f"{b} is a LoRA adapter: comparing it needs peft ({exc})") from None
        base, _ = load(a, device)
        try:
            model_b = PeftModel.from_pretrained(base, b, local_files_only=True).merge_and_unload()
        except Exception as exc:
            raise InspectError(f"{b}: cannot apply the adapter to {a}: {one_line(exc)}") from None
        notes.append(f"{b} is a LoRA adapter: B is {a} with the adapter merged (W + B·A·scaling)")
    else:
        if not Path(b).exists():
            raise InspectError(f"{b}: no such directory")
        model_b, _ = load(b, device)
    return model_a, model_b


def summary(x: torch.Tensor) -> dict:
    """Mean, std, min, max, rms and exact quantiles of the finite values, float64."""
    f = x.detach().double().reshape(-1)
    f = f[torch.isfinite(f)]
    if not f.numel():
        return {"count": 0}
    return {"count": int(f.numel()), "mean": float(f.mean()), "std": float(f.std(correction=0)),
            "min": float(f.min()), "max": float(f.max()), "rms": float(f.square().mean().sqrt()),
            **ins.exact_quantiles(x)}


def svg_overlay(edges: np.ndarray, counts_a, counts_b, title: str, labels: tuple[str, str],
                sums: tuple[dict, dict], scale: str = "linear", width: int = 600, height: int = 320) -> str:
    """Two histograms on common edges, overlaid: A filled, B as a translucent fill with an
    outline, with x and y axes, a legend and each side's mean/std/min/max."""
    ca, cb = np.asarray(counts_a, dtype=np.float64), np.asarray(counts_b, dtype=np.float64)
    cmax = float(max(ca.max(initial=0), cb.max(initial=0)))
    frame = HistogramFrame(edges, cmax, title, scale, width, height)
    parts = frame.head()
    for series, counts, style in (("a", ca, 'fill-opacity="0.85"'),
                                  ("b", cb, f'fill-opacity="0.45" stroke="{COLOURS["b"]}" stroke-width="1"')):
        for i, c in enumerate(counts):
            tip = f"{series.upper()} [{fmt(edges[i])}, {fmt(edges[i + 1])}): {int(c)}"
            parts.append(frame.bar(i, c, f'fill="{COLOURS[series]}" {style}', tip, series=series))
    parts += frame.axes()
    left, top, w, fg, dim = frame.left, frame.top, frame.w, frame.fg, frame.dim
    bx, by = left + w - 210, top + 6
    parts.append(f'<rect class="summary" x="{bx}" y="{by}" width="204" height="{14 * 5 + 8}" fill="#181825" '
                 'stroke="#585b70" opacity="0.9"/>')
    for j, (series, label) in enumerate(zip("ab", labels)):
        x = bx + 44 + 80 * j
        parts.append(f'<rect x="{x}" y="{by + 6}" width="8" height="8" fill="{COLOURS[series]}"/>')
        parts.append(f'<text class="legend" data-series="{series}" x="{x + 11}" y="{by + 14}" '
                     f'fill="{fg}">{html.escape(label)}</text>')
        for k, name in enumerate(("mean", "std", "min", "max")):
            v = sums[j].get(name)
            if v is None:
                continue
            if j == 0:
                parts.append(f'<text x="{bx + 6}" y="{by + 28 + 14 * k}" fill="{dim}">{name}</text>')
            parts.append(f'<text class="stat" data-series="{series}" data-name="{name}" data-value="{v!r}" '
                         f'x="{x}" y="{by + 28 + 14 * k}" fill="{fg}">{v: .3g}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def compare(path_a: str, path_b: str, out: str, opts: Options | None = None) -> Report:
    """Compare the weights of ``path_a`` and ``path_b``; write statistics and pictures into ``out``."""
    opts = opts or Options()
    check(opts)
    if not opts.weights:
        raise InspectError("--no-weights: a comparison compares weights")
    notes: list[str] = []
    model_a, model_b = load_pair(path_a, path_b, opts.device, notes)
    patterns = layer_patterns(model_a, opts.layers)
    outdir = Path(out)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        if opts.plots:
            (outdir / "weights").mkdir(exist_ok=True)
    except OSError as exc:
        raise InspectError(f"{out}: {exc.strerror or exc}") from None
    params_b = dict(model_b.named_parameters())
    pairs, unmatched = [], []
    for n, p in model_a.named_parameters():
        if not selected(n.rpartition(".")[0], patterns):
            continue
        q = params_b.get(n)
        if q is None or q.shape != p.shape:
            unmatched.append({"layer": n, "reason": "not in B" if q is None else
                              f"shape {list(p.shape)} in A, {list(q.shape)} in B"})
        else:
            pairs.append((n, p, q))
    if unmatched:
        notes.append(f"{len(unmatched)} weights of A have no counterpart of the same shape in B (see 'unmatched')")
    for n in notes:
        print(f"xray-tui: note: {n}", file=sys.stderr)
    la, lb = Path(path_a).name or "A", Path(path_b).name or "B"
    specs_a = _spectral(model_a, {id(p) for _, p, _ in pairs}, opts)
    specs_b = _spectral(model_b, {id(q) for _, _, q in pairs}, opts)
    entries, pictures = [], []
    with ins.progress(opts.progress) as bar:
        task = bar.add_task("compare", total=len(pairs))
        for n, p, q in pairs:
            wa, wb = p.detach(), q.detach()
            d = wb.double() - wa.double()
            na, nd = float(wa.double().norm()), float(d.norm())
            rel = nd / na if na > 0 else (0.0 if nd == 0 else math.inf)
            sa, sb = summary(wa), summary(wb)
            lo = min(sa.get("min", 0.0), sb.get("min", 0.0))
            hi = max(sa.get("max", 0.0), sb.get("max", 0.0))
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            edges = np.histogram_bin_edges([], bins=opts.bins, range=(lo, hi))
            ha = _counts(wa, edges)
            hb = _counts(wb, edges)
            entry = {"layer": n, "shape": list(wa.shape), "rel_change": rel, "delta_l2": nd,
                     "delta_absmax": float(d.abs().max()) if d.numel() else 0.0, "a": sa, "b": sb,
                     "histogram": {"edges": edges.tolist(), "a": ha.tolist(), "b": hb.tolist()}, "pictures": []}
            if n in specs_a:
                entry["spectral_a"] = specs_a[n].as_dict()
            if n in specs_b:
                entry["spectral_b"] = specs_b[n].as_dict()
            if opts.plots:
                stem = ins.file_stem(n)
                hp = outdir / "weights" / f"{stem}.compare.svg"
                title = f"weight {n}: {la} vs {lb}, ‖ΔW‖/‖W‖ = {fmt(rel)}"
                hp.write_text(svg_overlay(edges, ha, hb, title, (la, lb), (sa, sb), opts.hist_scale))
                entry["pictures"].append(str(hp.relative_to(outdir)))
                pictures.append(hp)
                mat = ins.as_matrix(d) if opts.heatmaps else None
                if mat is not None:
                    dp = outdir / "weights" / f"{stem}.diff.heatmap.svg"
                    dmin, dmax = (float(d.min()), float(d.max())) if d.numel() else (0.0, 0.0)
                    dp.write_text(svg_heatmap(downsample(mat, opts.heatmap_max_dim, opts.heatmap_pool),
                                                  f"W_B - W_A {n} ({lb} - {la})", tuple(wa.shape), dmin, dmax,
                                                  opts.heatmap_pool))
                    entry["pictures"].append(str(dp.relative_to(outdir)))
                    pictures.append(dp)
            entries.append(entry)
            bar.advance(task)
    recording = outdir / "comparison.xray"
    if recording.exists():
        recording.unlink()
    _record(model_a, pairs, patterns, recording, specs_a, specs_b, f"compare {la} {lb}", opts)
    doc = {"a": str(Path(path_a).resolve()), "b": str(Path(path_b).resolve()),
           "b_kind": "lora-adapter" if is_adapter(path_b) else "model",
           "model_type": model_a.config.model_type, "layers": opts.layers, "notes": notes,
           "unmatched": unmatched, "entries": [ins.json_ready(e) for e in entries]}
    json_path = outdir / "layer_comparison.json"
    json_path.write_text(json.dumps(doc, indent=1))
    return Report(outdir, json_path, recording, len(entries), pictures, notes=notes)


def _counts(x: torch.Tensor, edges: np.ndarray) -> np.ndarray:
    a = x.detach().float().reshape(-1).cpu().numpy()
    return np.histogram(a[np.isfinite(a)], bins=edges)[0]


def _spectral(model, chosen: set[int], opts: Options) -> dict:
    """Spectral metrics (objects) of the chosen weight matrices, by name."""
    out = {}
    for t in matrices.targets(model)[0]:
        if id(t.param) in chosen:
            out[t.name] = spectral.analyze_matrix(t.tensor(), t.name, max_dim=opts.max_dim)
    return out


def _record(model_a, pairs, patterns, recording: Path, specs_a, specs_b, name: str, opts: Options) -> None:
    """A's weights at step 0 and B's at step 1 (copied into A's parameters, which are
    restored afterwards), each with its spectral metrics."""
    from probes.capture.probe import attach

    xr = attach(model_a, every=1, serve=False, log=str(recording), include=patterns, name=name,
                spectral_every=None, eps=opts.eps)
    saved = []
    try:
        xr.step()
        for m in specs_a.values():
            msg = m.to_wire(0, xr.rank)
            xr.publisher.submit(lambda msg=msg: msg)
        with torch.no_grad():
            for _, p, q in pairs:
                saved.append((p, p.detach().clone()))
                p.copy_(q)
        xr.step()
        for m in specs_b.values():
            msg = m.to_wire(1, xr.rank)
            xr.publisher.submit(lambda msg=msg: msg)
    finally:
        xr.close()
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)
