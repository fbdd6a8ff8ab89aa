"""The training-side probe: hooks, sampling, and hand-off to the publisher.

On a step that is not sampled every hook returns after one flag check. On a
sampled step the forward hooks reduce each watched module's output on its
device, the optimizer pre-step hook reduces every parameter and its gradient
(after AMP unscaling, since GradScaler unscales before calling
``optimizer.step``) and keeps a fixed subset of each weight's elements, and
the post-step hook reduces the update on that subset. The rows of the step
come to the host once, and the publisher thread does everything else.
"""

from __future__ import annotations

import atexit
import fnmatch
import logging
import math
import os
import sys
import time
from typing import Iterable

import msgspec
import numpy as np
import torch
from torch import nn

from probes.engines import cpu_kernel
from probes import engines
from probes.protocol import histogram, rundir, wire
from probes.publish import lifecycle
from probes.capture.scalars import ScalarLog, grad_norm
from probes.engines.reduce import COL, Batch, dead_units, upload
from probes.rules.engine import RuleEngine
from probes.publish.server import Publisher
from probes.distributed.job import DEFAULT_TIMEOUT, Job, table_keys

log = logging.getLogger("xray-tui")

#: Activation bytes held for a batched reduction before it runs early (in the hook): what the
#: probe may add to the step's peak memory (with its workspace, under 64 MiB + 1% of the parameters).
ACT_HOLD_BYTES = 32 << 20


def _is_activation(module: nn.Module) -> bool:
    """Activation functions: torch's own and those named like them."""
    if type(module).__module__ == "torch.nn.modules.activation":
        return True
    name = type(module).__name__
    return name.endswith("Activation") or name in {"GELU", "ReLU", "SiLU", "Tanh", "Sigmoid"}


def _is_block(name: str, module: nn.Module, parent_is_list: bool) -> bool:
    """Transformer blocks: the items of a ModuleList of composite modules."""
    return parent_is_list and any(True for _ in module.children())


def select_modules(model: nn.Module, include: Iterable[str] | None = None,
                   exclude: Iterable[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Modules whose outputs are hooked by default: leaf modules with
    parameters, activation functions and transformer blocks; narrowed by
    glob patterns on the module path."""
    list_children = {id(c) for m in model.modules() if isinstance(m, nn.ModuleList) for c in m}
    chosen = []
    for name, module in model.named_modules():
        if not name:
            continue
        leaf = not any(True for _ in module.children())
        has_params = any(True for _ in module.parameters(recurse=False))
        if not ((leaf and has_params) or _is_activation(module) or _is_block(name, module, id(module) in list_children)):
            continue
        if include and not any(fnmatch.fnmatch(name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatch(name, p) for p in exclude):
            continue
        chosen.append((name, module))
    return chosen


def block_list(model: nn.Module) -> tuple[str, int] | None:
    """The model's list of transformer blocks: its (unwrapped) path, e.g.
    ``transformer.h``, and length. It is the longest ``ModuleList`` of
    composite modules (the first of equals, in model order); None if the
    model has none."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and any(True for _ in m[0].children()):
            if best is None or len(m) > best[1]:
                best = (_unwrap_name(name), len(m))
    return best


def block_filter(model: nn.Module, layers: Iterable[int]):
    """A predicate over (unwrapped) module or parameter paths: inside one of
    the transformer blocks ``layers`` (indices into :func:`block_list`).
    Raises ValueError for a model without blocks or an index it lacks."""
    layers = list(layers)
    if not layers:
        raise ValueError("layers=[]: give at least one block index, or None for every layer")
    found = block_list(model)
    if found is None:
        raise ValueError(f"layers={layers}: this model has no list of transformer blocks "
                         "(a ModuleList of composite modules); use include/exclude patterns")
    prefix, n = found
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ValueError(f"layers={layers}: no block {', '.join(map(repr, bad))}; "
                         f"{prefix} has blocks 0..{n - 1}")
    heads = tuple(f"{prefix}.{i}" for i in sorted(set(layers)))
    starts = tuple(h + "." for h in heads)
    return lambda path: path in heads or path.startswith(starts)


def _eager(fn):
    """Never compiled, nor anything it calls: a hook that runs eagerly inside a
    torch.compile'd call (a frame dynamo skipped or fell back on) would
    otherwise have each function it calls compiled on its own."""
    return torch.compiler.disable(fn, recursive=True)


def lora_adapters(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module, nn.Module, float]]:
    """peft-style LoRA adapters: (wrapper path, base_layer, A module, B module, scale).

    A LoRA layer (peft's ``LoraLayer``, or a hand-written one with the same
    attributes) has a ``base_layer`` and ``lora_A``/``lora_B``, each a module
    or a ``ModuleDict`` of one module per adapter name; ``scaling`` is a dict
    (adapter name -> float) or a float (``scale`` is read too), default 1.
    The change it makes to the base weight is ``B @ A * scale`` (A and B
    flattened to matrices: conv adapters too).
    """
    out = []
    for mname, m in model.named_modules():
        base, la, lb = (getattr(m, a, None) for a in ("base_layer", "lora_A", "lora_B"))
        if not all(isinstance(x, nn.Module) for x in (base, la, lb)):
            continue
        if isinstance(la, nn.ModuleDict) != isinstance(lb, nn.ModuleDict):
            continue
        pairs = [(k, la[k], lb[k]) for k in la.keys() if k in lb] if isinstance(la, nn.ModuleDict) else [("", la, lb)]
        scaling = getattr(m, "scaling", getattr(m, "scale", 1.0))
        for key, a, b in pairs:
            scale = scaling.get(key, 1.0) if isinstance(scaling, dict) else scaling
            try:
                scale = float(scale)
            except (TypeError, ValueError):
                continue
            out.append((_unwrap_name(mname), base, a, b, scale))
    return out


def _unreadable(t: torch.Tensor) -> str:
    """Why the probe cannot read ``t`` ("" if it can): no values, or not a dense tensor."""
    if t.is_meta:
        return "on the meta device: it has no values"
    if t.layout != torch.strided:
        return f"{str(t.layout).replace('torch.', '')} layout: only dense (strided) tensors are read"
    return ""


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _unique_run_name(name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... if a live run already has it,
    so that `xray-tui attach NAME` always means one run."""
    try:
        taken = {r.name for r in rundir.live_runs()}
    except rundir.RunDirError:
        return name  # the publisher reports the run directory problem
    n = 2
    candidate = name
    while candidate in taken:
        candidate = f"{name}-{n}"
        n += 1
    return candidate


#: Prefixes that wrappers put in front of every name: DDP's ``module.``, torch.compile's
#: ``_orig_mod.``, and PEFT's ``base_model.model.`` (PeftModel -> LoraModel -> the model)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
#: Path components that FSDP1 (``FullyShardedDataParallel``) and activation checkpointing's
#: ``CheckpointWrapper`` insert anywhere in a name, not only in front (``_fsdp_wrapped_module.0._fsdp_wrapped_module.weight``)
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _unwrap_name(name: str) -> str:
    """Parameter and module names without DDP/compile/PEFT/FSDP1/checkpoint wrappers' parts."""
    stripped = True
    while stripped:  # in any nesting: DDP(compile(model)), a compiled PEFT model, ...
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix) or name == prefix[:-1]:
                name = name[len(prefix):]
                stripped = True
    if "_wrapped_module" in name:
        name = ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)
    return name


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch built without distributed
    _DTensor = ()


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's own shard (FSDP2's parameters and gradients), else ``t``.

    Each rank measures its shard: the statistics are mergeable, so the ranks'
    samples merge into those of the whole tensor, and nothing is gathered
    (DTensor ops on the whole tensor would run collectives inside the probe).
    """
    return t.to_local() if isinstance(t, _DTensor) else t


def _is_sharded(raw_name: str, p: torch.Tensor) -> bool:
    """Each rank holds a different piece of ``p``: an FSDP2 DTensor sharded on
    some mesh dimension, or a parameter under an FSDP1 wrapper (its name says so)."""
    if isinstance(p, _DTensor):
        return any(pl.is_shard() for pl in p.placements)
    return "_fsdp_wrapped_module" in raw_name.split(".")


def _log_path(log: str | None, run: str, rank: int, world: int) -> str | None:
    """``log=`` with ``{name}``, ``{rank}`` and ``{time}`` filled in. With several ranks and
    no ``{rank}``, the ranks after the first to open the file get ``STEM-N.EXT`` (a file is
    never shared or overwritten), and each says so: :func:`_say_where` asks for ``{rank}``."""
    if not log:
        return log
    values = {"name": rundir.safe_name(run), "rank": rank, "time": time.strftime("%Y%m%d-%H%M%S")}
    try:
        path = str(log).format(**values)
    except KeyError as exc:
        raise ValueError(f"log={log!r}: {{{exc.args[0]}}} is not a placeholder; "
                         "use {name}, {rank} or {time}") from None
    except (IndexError, ValueError):
        raise ValueError(f"log={log!r}: braces must hold {{name}}, {{rank}} or {{time}} "
                         "(write {{ and }} for literal ones)") from None
    return path


def _say_where(run: str, rank: int, publisher: Publisher, asked: str | None = None, world: int = 1) -> None:
    """One line at attach: the run's name, its socket and its recording (stderr, so that a
    person finds the recording later; ``XRAY_TUI_QUIET=1`` silences it)."""
    if os.environ.get("XRAY_TUI_QUIET"):
        return
    parts = [f"run {run!r}" + (f" rank {rank}" if rank else "")]
    if publisher.socket_path is not None:
        parts.append(f"socket {publisher.socket_path}")
    if publisher.recorder is not None:
        parts.append(f"recording {os.path.abspath(publisher.recorder.path)}")
        if asked is not None and os.path.abspath(asked) != os.path.abspath(publisher.recorder.path):
            parts.append(f"as {asked} was taken" + (" (put {rank} in log= to name each rank's file)"
                                                    if world > 1 else ""))
    print("xray-tui: " + ", ".join(parts), file=sys.stderr, flush=True)


def _optimizer_step(optimizer) -> int:
    """The steps an optimizer has taken (a resumed run's): Adam-family ``state["step"]``, else 0.

    Read once, at attach; the count is a CPU tensor or a float in torch's
    optimizers (a capturable optimizer's device count costs one host read here)."""
    if optimizer is None:
        return 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step") if hasattr(optimizer, "state") else None
            if step is not None:
                try:
                    return max(0, int(float(step)))
                except (TypeError, ValueError):
                    return 0
    return 0


def _precision(params, scaler) -> str:
    """The training precision the parameters show: fp32, bf16 or fp16, with "+scaler"."""
    dtypes = {p.dtype for _, p in params}
    name = "fp16" if torch.float16 in dtypes else "bf16" if torch.bfloat16 in dtypes else "fp32"
    return name + "+scaler" if scaler is not None else name


class AlertRaised(RuntimeError):
    """Raised in the training loop by ``on_alert="raise"``; ``.alert`` says why."""

    def __init__(self, alert: wire.Alert) -> None:
        super().__init__(f"xray-tui: {alert.severity} {alert.rule} alert on {alert.layer} ({alert.kind}) "
                         f"at step {alert.step}: {alert.message}")
        self.alert = alert


_LEVELS = {"info": 0, "warning": 1, "critical": 2}


class XRay:
    """A probe attached to a model; see :func:`attach`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        every: int = 10,
        name: str | None = None,
        log: str | None = None,
        eps: float = 0.05,
        serve: bool = True,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        hist_sample: int = 65535,  # counts then fit 16 bits on the wire
        update_sample: int = 4096,
        rules: RuleEngine | None = None,
        on_alert=None,
        alert_level: str = "critical",
        seed: int = 0,
        tcp: str | int | bool | None = None,
        spectral_every: int | None = 500,
        layers: Iterable[int] | None = None,
        scaler=None,
        start_step: int | None = None,
        hook_optimizer: bool = True,
        job: bool = True,
        job_timeout: float = DEFAULT_TIMEOUT,
        serve_local: bool = True,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if not 1 <= hist_sample < 2**32:  # the kernel's and the wire's counts are 32-bit
            raise ValueError(f"hist_sample must be between 1 and 2**32 - 1, got {hist_sample}")
        if update_sample < 1:
            raise ValueError(f"update_sample must be >= 1, got {update_sample}")
        if not (on_alert is None or callable(on_alert) or on_alert in ("raise", "stop")):
            raise ValueError(f"on_alert must be a callable, 'raise' or 'stop', got {on_alert!r}")
        if start_step is not None and (isinstance(start_step, bool) or not isinstance(start_step, int)
                                       or start_step < 0):
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        if scaler is not None and not callable(getattr(scaler, "update", None)):
            raise ValueError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if alert_level not in ("warning", "critical"):
            raise ValueError(f"alert_level must be 'warning' or 'critical', got {alert_level!r}")
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.eps = eps
        self.hist_k = hist_sample
        self.update_k = update_sample
        self.scaler = scaler
        # the step a resumed run is at: given, or the optimizer's own count (Adam-family state["step"])
        self.step_index = start_step if start_step is not None else _optimizer_step(optimizer)
        self._sampling = self.step_index % every == 0
        #: the activation hooks' one flag: this forward pass is sampled (set per forward by the root pre-hook)
        self._active = self._sampling
        self._phase: str | None = None  # "train" or "eval" inside a forward of the model, else None
        self._eval_armed = True  # the next evaluation forward is sampled (re-armed by each sampled step)
        self._seen: set[str] = set()
        self._eval_seen: set[str] = set()
        self._gen = torch.Generator().manual_seed(seed)
        self._plan_rng = np.random.default_rng(seed)  # histogram sample offsets: no torch op, no host read
        self._batch = self._new_batch()
        self._eval_batch = self._new_batch()
        self._subsets: dict[str, torch.Tensor | None] = {}
        self._snapshot: torch.Tensor | None = None  # update subsets of every trainable weight, concatenated
        self._handles: list = []
        self._closed = False
        self._failed: set[str] = set()
        self._warned_step = False
        self._on_alert = on_alert
        self._alert_level = _LEVELS[alert_level]
        self._pending_alert: wire.Alert | None = None
        #: Set when an alert at ``alert_level`` fired and ``on_alert="stop"``: the loop should stop.
        self.should_stop = False

        inside = block_filter(model, layers) if layers is not None else None  # ValueError before any hook
        self._skipped: set[tuple[str, str]] = set()  # (tensor name, kind) already noted as unreadable
        self._skip_notes: list[tuple[str, str, str]] = []  # noted before the publisher existed
        #: module -> {"weight": why, "weight.grad": why, ...}: tensors the probe does not read
        self._unread: dict[str, dict[str, str]] = {}
        self.params = []
        self._sharded: set[int] = set()  # ids of parameters each rank holds a different piece of (FSDP)
        for raw, p in model.named_parameters():
            n = _unwrap_name(raw)
            if not p.is_floating_point() or (inside is not None and not inside(n)):
                continue
            why = _unreadable(p)
            if why:
                mod, _, short = n.rpartition(".")
                self._unread.setdefault(mod, {})[short] = why
                self._skip(n, "weight", why)
                continue
            self.params.append((n, p))
            if _is_sharded(raw, p):
                self._sharded.add(id(p))
        if any(p.device.type == "cpu" for _, p in self.params):
            cpu_kernel.ready()  # start building the CPU kernel now, off the training thread
        watched = {id(p) for _, p in self.params}
        for mname, m in model.named_modules():  # gradients known to come sparse
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and id(m.weight) in watched:
                self._unread.setdefault(_unwrap_name(mname), {})["weight.grad"] = "sparse gradient (sparse=True)"
        modules = [(_unwrap_name(n), m) for n, m in select_modules(model, include, exclude)]
        if inside is not None:
            modules = [(n, m) for n, m in modules if inside(n)]
        self._find_lora()
        hooked = {n: m for n, m in modules}
        self._activations = {n for n, m in modules if _is_activation(m)}
        self.trainable = [(n, p) for n, p in self.params if p.requires_grad]
        rank, world = _rank_and_world()
        self.rank = rank
        self.world = world
        #: every step's loss, learning rates, scale and rates (the cheap tier), shipped with sampled steps
        self._scalars = ScalarLog(rank, optimizer, scaler)
        self._precision_seen = ""  # autocast's dtype once a training forward ran under it
        self._stepped = False  # optimizer.step ran in this iteration (a GradScaler may skip it)
        self._rank_norms: torch.Tensor | None = None
        self.run = name or os.path.splitext(os.path.basename(sys.argv[0] or "run"))[0] or "run"
        if serve and world == 1:
            self.run = _unique_run_name(self.run)
        # wall clock of step ends (one perf_counter a step), for the job's step-time and straggler figures
        self._t_end = self._t_sampled = time.perf_counter()
        self._t_fwd = math.nan  # the sampled step's forward end
        self._since_sampled = 0
        #: the whole job's view (probes/job.py): None with one rank, job=False, or a failed setup
        self._job: Job | None = None
        if job and world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            try:
                self._job = Job(table_keys(self.params, self.trainable, [n for n, _ in modules]),
                                lambda build: self.publisher.submit(build), self.run, timeout=job_timeout,
                                replicated={n for n, p in self.params if id(p) not in self._sharded},
                                lora_bases=self._lora_bases, every=every)
            except Exception:
                log.exception("xray-tui: the whole-job view could not be set up; each rank serves its own")
                self._job = None
        if not serve_local and rank != 0:
            serve = False  # a very large job: rank 0 serves the whole job, the others only compute
        hello = wire.Hello(
            version=wire.PROTOCOL_VERSION,
            run=self.run,
            rank=rank,
            world_size=world,
            pid=os.getpid(),
            started=time.time(),
            argv=list(sys.argv),
            every=every,
            eps=eps,
            hist=histogram.SPEC,
            layers=self._layer_infos(hooked),
            accepts=["spectral"] if spectral_every else [],  # so the recorded Hello equals the served one
            precision=_precision(self.params, scaler),
            param_groups=self._param_groups,
            start_step=self.step_index,
            hosts=self._job.hosts if self._job is not None else [],
        )
        log = _log_path(log, self.run, rank, world)
        self.publisher = Publisher(hello, serve=serve, log_path=log, rules=rules, tcp=tcp if serve else None)
        _say_where(self.run, rank, self.publisher, log, world)
        if on_alert is not None:
            self.publisher.subscribe(self._alert_listener)
        # the device engine's fallback reaches the viewers (the header shows it, headless prints it)
        self._unsubscribe_engine = engines.on_fallback(
            lambda device, why: self.note("engine-fallback", device=device, why=why))
        if self._job is not None and not self._job.on and rank == 0:
            self.note("job-off", why=self._job.why_off)  # e.g. the ranks watch different layers
        for n, kind, why in self._skip_notes:
            self.note("skipped", layer=n, kind=kind, why=why)
        self._skip_notes.clear()
        # distance from initialisation: the update subsets as they are at attach, kept for the run
        self._init: torch.Tensor | None = None
        self._init_sumsq: torch.Tensor | None = None
        try:
            self._init = self._take_subsets()
            if self._init is not None:
                self._init_sumsq = self._segment_sumsq(self._init)
        except Exception:
            self._init = None
            self._fail("init")
        for mname, module in modules:
            self._handles.append(module.register_forward_hook(self._make_hook(mname)))
        # which pass this is (training or evaluation), and whether it is sampled
        self._handles.append(model.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
        # the forward is over: reduce the held activations together, then let them go
        self._handles.append(model.register_forward_hook(self._end_forward))
        self._hooked = optimizer is not None and hook_optimizer
        if self._hooked:
            self._handles.append(optimizer.register_step_pre_hook(lambda *_: self.before_update()))
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.after_update()))
            if scaler is not None:
                # with a GradScaler the step ends at scaler.update(): it runs every iteration, while
                # optimizer.step (and its hooks) does not when the gradients overflowed
                self._scaler_update = scaler.update
                scaler.update = self._on_scaler_update
        #: spectral health (WeightWatcher's metrics) in a background thread every N steps; None: off
        self.spectral = None
        if spectral_every:
            from probes.spectral.monitor import SpectralMonitor

            self.spectral = SpectralMonitor(self, every=spectral_every)
        atexit.register(self.close)  # socket, manifest and recording are cleaned up at exit
        lifecycle.register(self)  # so End says whether the run crashed or was killed (probes/lifecycle.py)

    def _layer_infos(self, hooked: dict[str, nn.Module]) -> list[wire.LayerInfo]:
        by_module: dict[str, list[str]] = {}
        frozen: dict[str, list[str]] = {}
        unoptimized: dict[str, list[str]] = {}
        groups = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]} \
            if self.optimizer is not None else {}
        #: parameter name -> its optimizer param group (Hello.param_groups)
        self._param_groups = {}
        for pname, p in self.params:
            mod, _, short = pname.rpartition(".")
            by_module.setdefault(mod, []).append(short)
            if not p.requires_grad:
                frozen.setdefault(mod, []).append(short)
            elif id(p) in groups:
                self._param_groups[pname] = groups[id(p)]
            elif self.optimizer is not None:
                unoptimized.setdefault(mod, []).append(short)
        infos = []
        # a wrapper (FSDP1, CheckpointWrapper) has the unwrapped name of the module it wraps; that
        # module comes after it in named_modules, so it is the one kept, in the wrapper's place
        named = {}
        for mname, module in self.model.named_modules():
            named[_unwrap_name(mname)] = module
        for mname, module in named.items():
            if mname in by_module or mname in hooked or mname in self._unread:
                role = "activation" if _is_activation(module) else ("block" if mname in hooked and
                                                                     mname not in by_module and
                                                                     any(True for _ in module.children()) else "")
                base = self._adapter_of.get(mname, "")
                infos.append(wire.LayerInfo(mname, type(module).__name__, by_module.pop(mname, []),
                                            mname in hooked, "lora" if base else role, frozen.get(mname, []),
                                            skipped=dict(self._unread.get(mname, {})), adapter_of=base,
                                            unoptimized=unoptimized.get(mname, [])))
        # each base module's adapters follow it, whatever order the modules were registered in
        adapters = [li for li in infos if li.adapter_of]
        infos = [li for li in infos if not li.adapter_of]
        for li in adapters:
            at = next((i for i, x in enumerate(infos) if x.name == li.adapter_of), None)
            if at is None:
                infos.append(li)
                continue
            while at + 1 < len(infos) and infos[at + 1].adapter_of == li.adapter_of:
                at += 1
            infos.insert(at + 1, li)
        return infos

    def _find_lora(self) -> None:
        """The LoRA adapters whose base weight and B are watched: their shift is
        computed on sampled steps, and the Hello groups them with their base."""
        #: (B weight name, A weight, B weight, scale) per adapter
        self._lora: list[tuple[str, torch.Tensor, torch.Tensor, float]] = []
        self._lora_bases: dict[str, str] = {}  # B weight name -> base weight name
        self._adapter_of: dict[str, str] = {}  # adapter module path -> base module path
        names = {id(p): n for n, p in self.params}
        paths = {id(m): _unwrap_name(n) for n, m in self.model.named_modules()}
        for _, base, a, b, scale in lora_adapters(self.model):
            w, wa, wb = (getattr(x, "weight", None) for x in (base, a, b))
            if not all(isinstance(t, torch.Tensor) and id(t) in names for t in (w, wa, wb)):
                continue  # a quantised base weight, or outside ``layers``
            if wa.dim() < 2 or wb.dim() < 2 or wb.reshape(wb.shape[0], -1).shape[1] != wa.shape[0]:
                continue  # not the B @ A shape
            self._lora.append((names[id(wb)], wa, wb, scale))
            self._lora_bases[names[id(wb)]] = names[id(w)]
            for x in (a, b):
                self._adapter_of[paths[id(x)]] = paths[id(base)]

    def _lora_sumsq(self) -> dict[str, tuple[torch.Tensor, int]]:
        """||B A scale||_F^2 of every adapter, on the device and without forming B A:
        trace((B^T B)(A A^T)) with r x r matrices; adapters of the same shapes in one batched
        product (a few ops per shape, not per adapter). Each B weight's value is ``(vector, index)``."""
        out: dict[str, tuple[torch.Tensor, int]] = {}
        if not self._lora or "lora" in self._failed:
            return out
        groups: dict[tuple, list] = {}
        for bname, wa, wb, scale in self._lora:
            groups.setdefault((wa.shape, wb.shape, wa.dtype, wb.dtype, wa.device), []).append((bname, wa, wb, scale))
        try:
            with torch.no_grad():
                for items in groups.values():
                    a = torch.stack([wa if wa.dim() == 2 else wa.reshape(wa.shape[0], -1) for _, wa, _, _ in items])
                    b = torch.stack([wb if wb.dim() == 2 else wb.reshape(wb.shape[0], -1) for _, _, wb, _ in items])
                    a, b = a.float(), b.float()
                    scales = upload([s * s for _, _, _, s in items], a.device, torch.float32)
                    vals = ((b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))).sum((1, 2)).clamp_min(0) * scales
                    for i, (bname, _, _, _) in enumerate(items):
                        out[bname] = (vals, i)
        except Exception:
            self._fail("lora")
            return {}
        return out

    def _skip(self, name: str, kind: str, why: str) -> None:
        """Leave a tensor out, saying why once per (name, kind): an info log and a ``skipped`` Note."""
        if (name, kind) in self._skipped:
            return
        self._skipped.add((name, kind))
        log.info("xray-tui: %s (%s) is not read: %s", name, kind, why)
        if hasattr(self, "publisher"):
            self.note("skipped", layer=name, kind=kind, why=why)
        else:
            self._skip_notes.append((name, kind, why))

    # -- hooks ----------------------------------------------------------

    def _begin_forward(self, module, args, kwargs) -> None:
        """Root pre-hook: a training pass (gradients enabled) is sampled with
        its step; an evaluation pass (``torch.no_grad()`` or
        ``inference_mode``) when armed: the first one after each sampled
        training step. ``model.eval()`` alone does not make a pass an
        evaluation: a pass that can be backpropagated is training (dropout-free
        fine-tuning and ``xray-tui inspect`` run ``model.eval()`` with a
        backward). A training pass reads only
        ``_sampling`` and an eval pass only ``_eval_armed``, so torch.compile
        keeps two variants of each kind of pass, not one per combination."""
        if torch.is_grad_enabled():
            self._phase, self._active = "train", self._sampling
            if not torch.compiler.is_compiling():
                self._note_inputs(args, kwargs)
        else:
            self._phase, self._active = "eval", self._eval_armed and "eval" not in self._failed

    def _end_forward(self, module, args, output) -> None:
        """Root hook: the forward is over; reduce what it held (and ship an eval pass).

        When torch.compile traces this hook, nothing is reduced here (that
        would break the graph): the held activations are reduced with the
        parameters at the optimizer step, and an eval pass is shipped then.
        """
        phase, self._phase = self._phase, None
        if phase == "train" and not torch.compiler.is_compiling():
            self._note_loss(output)
        if phase == "eval":
            if self._active:
                self._eval_armed = False
                if not torch.compiler.is_compiling():
                    self._flush_eval()
            self._active = False  # the next forward's pre-hook sets it (not _sampling: one guard less)
        elif self._sampling and not torch.compiler.is_compiling():
            self._t_fwd = time.perf_counter()  # data loading + forward of this step end here
            self._reduce_held()

    @_eager
    def _note_inputs(self, args, kwargs) -> None:
        """A training forward's size (tokens/s, samples/s) and precision (autocast), read from
        the inputs' shapes and the autocast state: no tensor is read."""
        x = kwargs.get("input_ids")
        if not isinstance(x, torch.Tensor):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is not None and x.dim():
            if not x.is_floating_point():
                self._scalars.add_inputs(x.numel(), x.shape[0])  # token ids: (batch, sequence)
            else:
                self._scalars.add_inputs(0, x.shape[0])
        if not self._precision_seen and self.params:
            device = self.params[0][1].device.type
            if torch.is_autocast_enabled(device):
                dtype = torch.get_autocast_dtype(device)
                name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).replace("torch.", ""))
                self._precision_seen = f"{name}-autocast" + ("+scaler" if self.scaler is not None else "")
                self.note("precision", precision=self._precision_seen)

    @_eager
    def _note_loss(self, output) -> None:
        """The loss of a training forward, when the model returns one (Hugging Face models
        given labels return ``.loss``; nanoGPT-style models a ``(logits, loss)`` tuple, whose
        first 0-d floating tensor that autograd tracks is taken); kept on its device."""
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is None and isinstance(output, tuple) and not hasattr(output, "_fields"):
            loss = next((t for t in output if isinstance(t, torch.Tensor) and t.dim() == 0
                         and t.is_floating_point() and t.grad_fn is not None), None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point():
            self._scalars.add_loss(loss)

    def log(self, **values) -> None:
        """Record run-level scalars of the current step: ``xr.log(loss=loss, acc=0.9)``.

        Tensors stay on their device (no host read) and travel with the next
        sampled step; a ``loss`` given here replaces the one read from the
        model's output. Call it before the step ends (before ``optimizer.step()``,
        or ``scaler.update()`` with a GradScaler).
        """
        self._scalars.log(values)

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not self._active:
                return
            self._take_act(name, output)

        return hook

    def _take_act(self, name: str, output) -> None:
        """Hold one module's output (sampled passes only)."""
        if self._phase == "eval":
            part, batch, seen = "eval", self._eval_batch, self._eval_seen
        elif self._phase is None and not torch.is_grad_enabled():
            return  # called outside a forward of the model, under no_grad: not a training activation
        else:
            part, batch, seen = "act", self._batch, self._seen
        if torch.compiler.is_compiling():
            # traced by torch.compile: tensor ops and list appends only, so the hook adds graph
            # outputs instead of breaking the graph (no logging, no early reduction, and no
            # read of the `seen` set, whose contents dynamo would guard on)
            x = _first_tensor(output)
            if x is not None and x.is_floating_point() and x.layout == torch.strided and part not in self._failed:
                batch.hold(name, "act", x, dead=dead_units(x, self.eps) if name in self._activations else None,
                           detach=False)
            return
        self._take_act_eager(name, output, part, batch, seen)

    @_eager
    def _take_act_eager(self, name: str, output, part: str, batch: Batch, seen: set) -> None:
        if name in seen or part in self._failed:
            return
        try:
            x = _first_tensor(output)
            if x is None or not x.is_floating_point():
                return
            if x.layout != torch.strided or x.is_meta:
                self._skip(name, "act", _unreadable(x))
                return
            seen.add(name)  # gradient checkpointing runs forward twice
            batch.hold(name, "act", x, units=name in self._activations)
            if batch.held_bytes > ACT_HOLD_BYTES:
                batch.reduce()  # bound the memory that held activations keep alive
        except Exception:
            self._fail(part)

    def _new_batch(self) -> Batch:
        return Batch(self.eps, self.hist_k, self._plan_rng)

    @_eager
    def _reduce_held(self) -> None:
        if "act" not in self._failed:
            try:
                self._batch.reduce()
            except Exception:
                self._fail("act")

    @_eager
    def _flush_eval(self) -> None:
        """Ship the evaluation pass's activations as their own Step (``phase="eval"``)."""
        if not len(self._eval_batch):
            return
        batch, self._eval_batch = self._eval_batch, self._new_batch()
        self._eval_seen.clear()
        if not len(batch) or self._closed or "eval" in self._failed:
            return
        try:
            copy = batch.start_copy()  # one device-to-host copy for the pass, waited for by the publisher
        except Exception:
            self._fail("eval")
            return
        step, rank, t = self.step_index, self.rank, time.time()
        self.publisher.submit(
            lambda: build_step(step, rank, t, batch.meta, *copy.wait(), batch.hist_n, phase="eval"))

    def _alert_listener(self, msg: wire.Message) -> None:
        """Runs on the publisher thread: act on alerts as ``on_alert`` says."""
        if not isinstance(msg, wire.Alert) or msg.severity == "info":
            return
        if callable(self._on_alert):
            self._on_alert(msg)
        elif _LEVELS[msg.severity] >= self._alert_level:
            if self._on_alert == "stop":
                self.should_stop = True
            elif self._pending_alert is None:
                self._pending_alert = msg  # raised by the training thread at the next step boundary

    def _fail(self, part: str) -> None:
        """Switch off a failing part of the probe with one warning."""
        self._failed.add(part)
        log.exception("xray-tui: the probe's %s statistics failed and are switched off", part)

    def _subset(self, name: str, p: torch.Tensor) -> torch.Tensor | None:
        if name not in self._subsets:
            n = _local(p).numel()  # a subset of this rank's shard
            self._subsets[name] = (
                None if n <= self.update_k
                else torch.randperm(n, generator=self._gen)[: self.update_k].sort().values.to(p.device)
            )
        return self._subsets[name]

    def _take_subsets(self) -> torch.Tensor | None:
        """The update subsets of all trainable weights, in one new float32 buffer."""
        if not self.trainable:
            return None
        device = self.trainable[0][1].device
        indices = [self._subset(name, p) for name, p in self.trainable]
        engine = engines.for_device(device)
        if engine == "device":
            try:
                from probes.engines import device as device_engine

                # one launch instead of an index op per parameter, on the weights as they are
                out = device_engine.gather([_local(p) for _, p in self.trainable], indices)
                if out is not None:
                    return out
            except Exception as e:
                engines.failed(device, e)
        flats = [_local(p).detach().reshape(-1) for _, p in self.trainable]
        if (engine == "cpu-kernel"
                and all(f.dtype == torch.float32 and f.device.type == "cpu" and f.is_contiguous() for f in flats)):
            return cpu_kernel.gather(flats, indices)  # one call instead of an index op per parameter
        pieces = [(f if i is None else f[i]).to(device=device, dtype=torch.float32) for f, i in zip(flats, indices)]
        return torch.cat(pieces)  # a copy: the optimizer's in-place update cannot reach it

    @_eager
    def before_update(self) -> None:
        """Read weights and gradients, and keep the update subset (sampled steps)."""
        if len(self._eval_batch):
            self._flush_eval()  # an eval pass that torch.compile traced
        self._stepped = True
        if self.scaler is not None:
            self._scalars.keep_scale()
        if not self._sampling or "params" in self._failed:
            return
        try:
            self._read_params()
            self._snapshot = self._take_subsets()
        except Exception:
            self._fail("params")
        if self.world > 1 and self._job is None:
            self._gather_grad_norms()  # with the job, the norms travel in its all-gather, off this thread

    @_eager
    def after_update(self, skipped: bool = False) -> None:
        """Reduce the updates, ship the step, and move to the next one.

        ``skipped``: the optimizer did not step (an integration's GradScaler
        found inf/NaN gradients); the step still counts, without an update.
        With a GradScaler given to :func:`attach` the step ends at
        ``scaler.update()`` instead.
        """
        if self._sampling and not skipped:
            try:
                self._read_updates()
            except Exception:
                self._fail("params")
        if skipped:
            self._snapshot = None  # nothing moved: no update to measure
        if self._hooked and self.scaler is not None:
            return  # the step ends in scaler.update()
        self._end_step(skipped)

    @_eager
    def _on_scaler_update(self, *args, **kwargs):
        """``scaler.update`` while attached: the iteration's end, whether or not
        ``optimizer.step`` ran (it did not when the scaler found inf/NaN gradients)."""
        skipped, self._stepped = not self._stepped, False
        try:
            if skipped and self._sampling and "params" not in self._failed:
                try:
                    self._read_params()  # the gradients that overflowed (unscaled by scaler.step)
                except Exception:
                    self._fail("params")
            if skipped:
                self._scalars.keep_scale()  # the scale this step used, before update() changes it
        finally:
            result = self._scaler_update(*args, **kwargs)
        self._end_step(skipped)
        return result

    def _end_step(self, skipped: bool = False) -> None:
        """Close the step: its scalars; on a sampled step ship everything; then advance."""
        self._scalars.end_step(self.step_index, skipped)
        now = time.perf_counter()
        self._since_sampled += 1
        if self._sampling:
            # seconds per step since the last sampled step, and this step's data + forward time
            self._timing = ((now - self._t_sampled) / self._since_sampled, self._t_fwd - self._t_end)
            self._t_sampled, self._since_sampled, self._t_fwd = now, 0, math.nan
            self._flush(skipped)
        elif self._scalars.full():
            self._ship(self._scalars.take())
        self._t_end = now
        self._advance()

    def _ship(self, build) -> None:
        """Hand a builder to the publisher, behind the job's rounds when there are any (step order)."""
        if self._job is not None:
            self._job.forward(build)
        else:
            self.publisher.submit(build)

    @_eager
    def step(self) -> None:
        """Mark a step boundary in loops that did not pass an optimizer.

        Call it once per optimizer step, after ``backward()`` and before
        ``zero_grad()``. The update is measured between two calls.
        """
        if self.optimizer is not None:
            if not self._warned_step:
                log.warning("xray-tui: step() ignored: the optimizer's own hooks count steps")
                self._warned_step = True
            return
        if len(self._eval_batch):
            self._flush_eval()  # an eval pass that torch.compile traced
        if self._sampling:
            try:
                self._read_params()
                self._read_updates()
            except Exception:
                self._fail("params")
        self._end_step()
        if self._sampling:
            self._snapshot = self._take_subsets()

    def _read_params(self) -> None:
        b = self._batch
        lora = self._lora_sumsq()
        for name, p in self.params:
            w = _local(p)
            b.hold(name, "weight", w, lora_sumsq=lora.get(name))
            g = p.grad
            if g is None and w.numel() == 0 and p.requires_grad:
                g = w  # FSDP1 leaves an empty shard's gradient None: read it as the empty gradient it is
            if g is not None:
                g = _local(g)
                if g.layout != torch.strided or g.is_meta:
                    self._skip(name, "grad", _unreadable(g))
                else:
                    b.hold(name, "grad", g)
        b.reduce()  # now, before the optimizer changes them

    def _subset_lengths(self) -> list[int]:
        return [_local(p).numel() if self._subsets[n] is None else self.update_k for n, p in self.trainable]

    def _segment_sumsq(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum of squares (float64) of each trainable weight's piece of a subsets buffer."""
        lengths = upload(self._subset_lengths(), flat.device)
        return torch.segment_reduce(flat.double().square(), "sum", lengths=lengths, unsafe=True)

    def _read_updates(self) -> None:
        before, self._snapshot = self._snapshot, None
        if before is None:
            return
        after = self._take_subsets()
        delta = after - before
        refs = self._segment_sumsq(before)
        dists = [None] * len(self.trainable)
        if self._init is not None and "init" not in self._failed:
            try:  # ||W_t - W_0|| / ||W_0|| on the same subset
                dists = (self._segment_sumsq(after - self._init) / self._init_sumsq).sqrt()
            except Exception:
                self._fail("init")
        self._batch.hold_split([name for name, _ in self.trainable], "update", delta, self._subset_lengths(),
                               ref_sumsq=refs, init_dist=dists if isinstance(dists, torch.Tensor) else None)

    def _gather_grad_norms(self) -> None:
        """Every rank's total gradient norm, with torch.distributed itself.

        A collective, so every rank must sample the same steps (same
        ``every``); it moves one number per rank.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or "ranks" in self._failed:
            return
        # Only replicated parameters' gradients count: under FSDP each rank holds a different piece
        # of a sharded gradient, whose norms differ from rank to rank in a healthy run. A model
        # with nothing replicated sends no norms (the same on every rank: no collective).
        if self._sharded and len(self._sharded) == len(self.params):
            return
        try:
            grads = [_local(p.grad).detach() for _, p in self.params
                     if p.grad is not None and p.grad.layout == torch.strided and id(p) not in self._sharded]
            if grads:
                local = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
            else:
                local = torch.zeros((), device=self.params[0][1].device if self.params else "cpu")
            gathered = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(gathered, local)
            self._rank_norms = torch.stack(gathered)
        except Exception:
            self._fail("ranks")

    def _flush(self, skipped: bool = False) -> None:
        batch, self._batch = self._batch, self._new_batch()
        norms, self._rank_norms = self._rank_norms, None
        self._seen.clear()
        self._eval_armed = True  # the next evaluation pass is sampled
        scalars = self._scalars.take()
        if self._closed:
            return
        copy = None
        if len(batch):
            try:
                copy = batch.start_copy()  # the one device-to-host copy of the step, waited for by the publisher
            except Exception:
                self._fail("transfer")
        if self._job is not None:
            self._job.submit(self.step_index, self._job_work(batch, copy, scalars, skipped))
            return  # every rank takes part in every round, even with nothing to add (the ranks stay in step)
        if copy is None:
            self.publisher.submit(scalars)
            return
        step, rank, t, bases = self.step_index, self.rank, time.time(), self._lora_bases

        def build() -> list[wire.Message]:
            # every rank's gradient norm comes to the host here, on the publisher thread
            rank_norms = norms.cpu().tolist() if norms is not None else None
            msg = build_step(step, rank, t, batch.meta, *copy.wait(), batch.hist_n, rank_norms,
                             lora_bases=bases, skipped=skipped)
            out = scalars()
            if out and out[-1].step == step:  # the global gradient norm, from the rows just built
                out[-1].values["grad_norm"] = grad_norm(msg)
            return [msg, *out]

        self.publisher.submit(build)

    def _job_work(self, batch: Batch, copy, scalars, skipped: bool):
        """The sampled step's work on the job thread (probes/job.py): build this rank's messages
        and its per-rank vector; ``finish`` (publisher thread) adds the gathered norms and, on
        rank 0, the whole job's Step (``rank=-1``)."""
        step, rank, t, bases, job = self.step_index, self.rank, time.time(), self._lora_bases, self._job
        step_time, fwd_time = self._timing

        def work():
            if copy is not None:
                rows, hists = copy.wait()
                meta, hist_n = batch.meta, batch.hist_n
            else:
                rows, hists, meta, hist_n = np.zeros((0, len(COL))), np.zeros((0, histogram.NUM_BINS)), [], []
            msg = build_step(step, rank, t, meta, rows, hists, hist_n, lora_bases=bases, skipped=skipped)
            out = scalars()
            loss = math.nan
            if out and out[-1].step == step:
                out[-1].values["grad_norm"] = grad_norm(msg)
                loss = float(out[-1].values.get("loss", math.nan))
            c = COL
            nonfinite = float(rows[:, [c["nan"], c["posinf"], c["neginf"]]].sum()) if len(rows) else 0.0
            sq = [s.sumsq for s in msg.samples if s.kind == "grad" and s.layer in job.replicated]
            gn = math.sqrt(sum(sq)) if sq else math.nan
            vector = [step, gn, nonfinite, step_time, fwd_time, loss]
            return [msg, *out], meta, rows, hists, hist_n, vector, finish

        def finish(own, gathered, merged) -> list[wire.Message]:
            if own and isinstance(own[0], wire.Step) and job.replicated:
                # the same all-gathered vector on every rank (rank 0's judges rank-divergence)
                own = [msgspec.structs.replace(own[0], rank_grad_norms=gathered[:, 1].tolist()), *own[1:]]
            if merged is None:
                return own
            meta, rows, hists, hist_n = job.merged_rows(merged)
            whole = build_step(step, wire.JOB_RANK, t, meta, rows, hists, hist_n, lora_bases=bases, skipped=skipped)
            return [*own, msgspec.structs.replace(whole, ranks=job.rank_stats(gathered))]

        return work

    def _advance(self) -> None:
        self.step_index += 1
        self._sampling = self._active = self.step_index % self.every == 0
        alert, self._pending_alert = self._pending_alert, None
        if alert is not None and not self._closed:
            raise AlertRaised(alert)

    # -- lifecycle --------------------------------------------------------

    def memory(self) -> dict[str, int]:
        """Bytes the probe itself holds now: ``buffers`` on the model's device (the
        update subsets' indices, W_0 and the snapshot between a sampled step's two
        hooks) and the publisher's ``backlog`` of Step frames for late viewers."""
        tensors = [self._init, self._init_sumsq, self._snapshot, *self._subsets.values()]
        held = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return {"buffers": held, "backlog": self.publisher.backlog_size}

    def note(self, event: str, **data) -> None:
        """Send an event (e.g. an injected fault) along with the statistics."""
        step, rank = self.step_index, self.rank
        self.publisher.submit(lambda: wire.Note(step, rank, event, data))

    def close(self, reason: str | None = None, error: str = "") -> None:
        """Remove the hooks, send what is queued, close socket and recording.

        ``reason`` is :attr:`wire.End.reason`; by default it is worked out:
        ``crashed`` or ``interrupted`` when an uncaught exception is ending the
        process (the ``atexit`` close), ``stopped`` when ``on_alert="stop"``
        set :attr:`should_stop`, else ``finished``. ``error`` is the exception
        as ``Type: message``.
        """
        if self._closed:
            return
        if reason is None:
            reason, error = lifecycle.exit_reason()
            if reason == "finished" and self.should_stop:
                reason = "stopped"
        if len(self._eval_batch):
            self._flush_eval()  # an eval pass that torch.compile traced
        if self._job is not None:
            self._job.close()  # its last rounds reach the publisher before End
        self.publisher.submit(self._scalars.take())  # the steps since the last sampled one
        self._closed = True
        atexit.unregister(self.close)
        self._unsubscribe_engine()
        lifecycle.unregister(self)
        for h in self._handles:
            h.remove()
        if self.spectral is not None:
            # its optimizer hooks removed here, in the training thread, and its thread joined: left to
            # the thread, they went up to a poll later, and a removal racing opt.step could break it
            self.spectral.close()
        if self._hooked and self.scaler is not None:
            self.scaler.__dict__.pop("update", None)  # the class's own update again
        step, rank = self.step_index, self.rank
        self.publisher.submit(lambda: wire.End(step, rank, reason, error))
        self.publisher.close()

    def __enter__(self) -> "XRay":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close with how the block ended: ``crashed`` (the exception, which still
        propagates), ``interrupted`` (Ctrl-C), ``stopped`` or ``finished``."""
        if exc_type is None:
            self.close()
            return
        reason, error = lifecycle.reason_of(exc if exc is not None else exc_type())
        if reason == "finished" and self.should_stop:
            reason = "stopped"
        self.close(reason, error)


def build_step(step: int, rank: int, t: float, meta, rows: np.ndarray, hists: np.ndarray, hist_n,
               rank_grad_norms: list[float] | None = None, phase: str = "train",
               lora_bases: dict[str, str] | None = None, skipped: bool = False) -> wire.Step:
    """Turn the host copy of a step's rows into a :class:`wire.Step` (publisher thread).

    ``lora_bases`` maps each LoRA B weight to its base weight, whose row gives
    the ||W|| of the adapter's relative shift."""
    # Python floats and one vectorised trim: per-element numpy scalars made this ~11 us a sample,
    # publisher time that holds the GIL the training thread needs
    table = rows.tolist()
    occupied = hists != 0
    first = occupied.argmax(1)
    last = hists.shape[1] - occupied[:, ::-1].argmax(1)
    empty = ~occupied.any(1)
    first[empty] = last[empty] = 0
    c = COL
    weight_sumsq = {layer: r[c["sumsq"]] for (layer, kind), r in zip(meta, table) if kind == "weight"} \
        if lora_bases else {}
    samples = []
    for i, ((layer, kind), r, n) in enumerate(zip(meta, table, hist_n)):
        lo, hi, n = int(first[i]), int(last[i]), int(n)
        dead, ref = r[c["dead_units"]], r[c["ref_sumsq"]]
        ratio = init_dist = shift = None
        if kind == "update":
            if ref > 0:
                ratio = math.sqrt(r[c["sumsq"]] / ref)
            if math.isfinite(r[c["init_dist"]]):
                init_dist = r[c["init_dist"]]  # NaN/inf: a weight that was all zeros at attach
        elif kind == "weight" and lora_bases and layer in lora_bases and math.isfinite(r[c["lora_sumsq"]]):
            base = weight_sumsq.get(lora_bases[layer], math.nan)
            if base > 0:
                shift = math.sqrt(r[c["lora_sumsq"]] / base)
        samples.append(
            wire.Sample(
                layer=layer,
                kind=kind,
                count=int(r[c["count"]]),
                sum=r[c["sum"]],
                sumsq=r[c["sumsq"]],
                abssum=r[c["abssum"]],
                min=r[c["min"]],
                max=r[c["max"]],
                near_zero=int(r[c["near_zero"]]),
                zeros=int(r[c["zeros"]]),
                nan=int(r[c["nan"]]),
                posinf=int(r[c["posinf"]]),
                neginf=int(r[c["neginf"]]),
                hist_lo=lo,
                hist_counts=wire.encode_counts(hists[i, lo:hi], n),
                hist_n=n,
                dead_units=None if math.isnan(dead) else dead,
                ratio=ratio,
                sum3=r[c["sum3"]],
                sum4=r[c["sum4"]],
                init_dist=init_dist,
                lora_shift=shift,
            )
        )
    return wire.Step(step=step, rank=rank, time=t, samples=samples, rank_grad_norms=rank_grad_norms, phase=phase,
                     skipped=skipped)


def attach(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **kwargs) -> XRay:
    """Attach a probe to ``model`` (and ``optimizer``, to count steps).

    Keyword arguments: ``every`` (sample one step in N, default 10), ``name``
    (the run's name in ``xray-tui ls``), ``log`` (record the stream to this
    file), ``eps`` (near-zero threshold, 0.05), ``serve`` (listen for
    viewers, default True), ``include``/``exclude`` (glob patterns of module
    paths whose outputs are hooked), ``hist_sample`` (elements histogrammed
    per tensor), ``update_sample`` (elements per weight used for updates),
    ``rules`` (a :class:`~probes.rules.RuleEngine`), ``on_alert`` (a callable
    given each warning/critical :class:`~probes.protocol.wire.Alert` on the publisher
    thread; ``"raise"``: raise :class:`AlertRaised` in the training loop at the
    next step boundary; ``"stop"``: set ``xr.should_stop``), ``alert_level``
    (the least severity that raises or stops: ``"critical"``), ``tcp``
    (also listen on TCP: ``True`` for a free port on 127.0.0.1, ``PORT`` or
    ``"HOST:PORT"``; viewers need the random token the probe writes, readable
    by you only, next to its socket; see docs/reliability.md), ``layers``
    (transformer-block indices, e.g. ``[0, 1, 2]``: only modules and
    parameters inside those items of the model's block ``ModuleList``, e.g.
    ``transformer.h.0``, are watched; ValueError for an index the model does
    not have), ``job`` (with torch.distributed: rank 0 merges every rank's
    statistics into the whole job's, ``rank=-1``, through collectives on a
    gloo group of the probe's own, off the training thread; see
    :mod:`probes.distributed.job`; default True), ``job_timeout`` (seconds a round of
    those collectives may take before the view is switched off and the
    missing ranks named, 60), ``serve_local`` (False: ranks other than 0
    open no socket).
    Usable as a context manager; without an optimizer call ``xr.step()``.
    """
    return XRay(model, optimizer, **kwargs)
