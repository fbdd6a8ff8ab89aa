"""A synthetic message stream, numpy only: for tests, benchmarks and demos
of the viewer without a training run."""

from __future__ import annotations

import numpy as np

from probes.protocol import histogram, wire


def sample_of(layer: str, kind: str, x: np.ndarray, eps: float = 0.05, *,
              dead_units: float | None = None, ratio: float | None = None) -> wire.Sample:
    """The exact :class:`wire.Sample` of a numpy array (the numpy reference)."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    x64 = x.astype(np.float64)
    lo, run = histogram.trim(histogram.histogram(x))
    with np.errstate(invalid="ignore", over="ignore"):
        return wire.Sample(
            layer=layer,
            kind=kind,
            count=int(x.size),
            sum=float(x64.sum()),
            sumsq=float((x64 * x64).sum()),
            abssum=float(np.abs(x64).sum()),
            min=float(x.min()) if x.size else float("nan"),
            max=float(x.max()) if x.size else float("nan"),
            near_zero=int((np.abs(x) < eps).sum()),
            zeros=int((x == 0).sum()),
            nan=int(np.isnan(x).sum()),
            posinf=int((x == np.inf).sum()),
            neginf=int((x == -np.inf).sum()),
            hist_lo=lo,
            hist_counts=wire.encode_counts(run, int(x.size)),
            hist_n=int(x.size),
            dead_units=dead_units,
            ratio=ratio,
            sum3=float((x64**3).sum()),
            sum4=float((x64**4).sum()),
        )


def hello(n_layers: int, run: str = "synthetic", rank: int = 0, world_size: int = 1) -> wire.Hello:
    """A Hello for ``n_layers`` Linear layers named ``model.layers.N.fc``."""
    layers = [wire.LayerInfo(f"model.layers.{i}.fc", "Linear", ["weight", "bias"], True) for i in range(n_layers)]
    return wire.Hello(version=wire.PROTOCOL_VERSION, run=run, rank=rank, world_size=world_size,
                      pid=1, started=1_700_000_000.0, every=1, layers=layers)


def steps(n_layers: int, n_steps: int, *, elements: int = 512, seed: int = 0, rank: int = 0,
          dead_layer: int | None = None, t0: float = 1_700_000_000.0) -> list[wire.Step]:
    """Healthy-looking steps; ``dead_layer`` outputs zeros (a dead layer)."""
    rng = np.random.default_rng(seed)
    out = []
    for step in range(n_steps):
        samples = []
        for i in range(n_layers):
            name = f"model.layers.{i}.fc"
            w = rng.normal(0, 0.02 * (1 + i % 3), elements)
            g = rng.normal(0, 1e-3, elements)
            a = np.zeros(elements) if i == dead_layer else np.maximum(rng.normal(0, 1, elements), 0)
            samples.append(sample_of(name + ".weight", "weight", w))
            samples.append(sample_of(name + ".weight", "grad", g))
            samples.append(sample_of(name, "act", a, dead_units=1.0 if i == dead_layer else 0.0))
            samples.append(sample_of(name + ".weight", "update", g * 1e-3, ratio=1e-3))
        out.append(wire.Step(step=step, rank=rank, time=t0 + step * 0.5, samples=samples))
    return out


def alert(step: int, layer: str, rule: str = "dead", severity: str = "warning", kind: str = "act") -> wire.Alert:
    """An alert as the probe would send it."""
    return wire.Alert(step=step, rank=0, severity=severity, rule=rule, layer=layer, kind=kind,
                      value=1.0, threshold=0.99, message=f"{rule} on {layer}: synthetic alert")
