"""The messages of the xray-tui protocol: msgspec Structs, schema-checked when decoded.

A probe sends a :class:`Hello` first, then :class:`Step` (one sampled step's
per-layer :class:`Sample` rows), :class:`Scalars` (every step's loss, lr,
grad norm), :class:`Alert`, :class:`Note`, :class:`Spectral` and a last
:class:`End`; a viewer sends only :class:`Request`. Field constraints
(``Meta``) are the validation: a decoded message is within them.
:mod:`probes.protocol.wire` frames them.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import numpy as np
from msgspec import Meta, Struct

from probes.protocol import histogram

#: Largest weight heatmap grid a Spectral message carries (cells; a terminal shows fewer).
HEAT_MAX_ROWS, HEAT_MAX_COLS = 64, 128

Count = Annotated[int, Meta(ge=0)]
#: A rank, or -1: the whole job (rank 0 merges every rank's statistics; probes/distributed/job.py)
Rank = Annotated[int, Meta(ge=-1)]
#: The rank of the whole job's merged samples and of alerts drawn from them.
JOB_RANK = -1
Kind = Literal["weight", "grad", "act", "update"]
#: What an alert is about: a sample's kind, or ``scalar`` (the loss, the loss scale: layer ``(loss)``)
AlertKind = Literal["weight", "grad", "act", "update", "scalar"]
Severity = Literal["info", "warning", "critical"]
BinIndex = Annotated[int, Meta(ge=0, lt=histogram.NUM_BINS)]


class LayerInfo(Struct, frozen=True):
    """One watched module, in model (forward-definition) order."""

    name: str
    type: str = ""
    params: list[str] = []  # short names, e.g. ["weight", "bias"]
    act: bool = False  # whether its output is hooked
    role: str = ""  # "activation" (an activation function), "block" (a transformer block), "lora" or ""
    frozen: list[str] = []  # params (short names) with requires_grad=False
    # tensors of this module the probe does not read, and why: "weight" (a meta or sparse
    # parameter, absent from ``params``), "weight.grad" (gradients that come sparse), ...
    skipped: dict[str, str] = {}
    # a LoRA adapter's A or B module (role "lora"): the path of the base module it changes;
    # adapters follow their base module in ``Hello.layers``
    adapter_of: str = ""
    # params (short names) that require a gradient but sit in none of the optimizer's param
    # groups: they can never move (a LoRA adapter left out of the optimizer)
    unoptimized: list[str] = []


class Hello(Struct, tag="hello", frozen=True):
    """First message of every stream: who is talking and what to expect."""

    version: int
    run: str
    rank: Count = 0
    world_size: Annotated[int, Meta(ge=1)] = 1
    pid: Count = 0
    started: float = 0.0
    argv: list[str] = []
    every: Annotated[int, Meta(ge=1)] = 1
    eps: float = 0.05
    hist: str = histogram.SPEC
    layers: list[LayerInfo] = []
    #: the :class:`Request` kinds this probe honours (e.g. ["spectral"]); [] from older probes
    accepts: list[str] = []
    #: the numeric precision of training as the probe knows it at attach: "fp32", "bf16", "fp16"
    #: (the parameters' dtype), "+scaler" when a GradScaler is given ("fp16+scaler"); "" unknown.
    #: Autocast, seen only in forward, is sent later as a ``precision`` :class:`Note`.
    precision: str = ""
    #: parameter name -> index of its optimizer param group (whose lr is scalar ``lr`` or ``lr/N``)
    param_groups: dict[str, int] = {}
    #: the step the run resumed at (0 for a fresh run): step indices continue from it
    start_step: Count = 0
    #: with torch.distributed: the host name of every rank (index = rank), from rank 0's
    #: job setup (probes/distributed/job.py); [] when the probe does not merge the job
    hosts: list[str] = []
    #: the tensors of the every-step tier's arrays (:attr:`Scalars.adam_rms`,
    #: :attr:`Scalars.update_ratio`), in their order: the trainable weights the probe watches
    signal_tensors: list[str] = []


class Sample(Struct, frozen=True, array_like=True):
    """Sufficient statistics of one tensor at one step (mergeable).

    ``count`` is the number of elements read; the sums are over all of them
    (so a single NaN makes ``sum`` NaN, as the tensor's true sum is).
    The histogram covers the finite elements of a sample of ``hist_n``
    elements: ``hist`` holds the counts of bins ``hist_lo ..`` in the fixed
    edge set of :mod:`probes.protocol.histogram`. On the wire the counts are one
    little-endian array (uint16 when ``hist_n`` < 2**16, else uint32), so a
    viewer decodes a sample without making an object per bin.
    """

    layer: str
    kind: Kind
    count: Count
    sum: float
    sumsq: float
    abssum: float
    min: float
    max: float
    near_zero: Count
    zeros: Count
    nan: Count
    posinf: Count
    neginf: Count
    hist_lo: BinIndex
    hist_counts: bytes
    hist_n: Count
    dead_units: float | None = None  # act: fraction of last-dim units never above eps
    ratio: float | None = None  # update: ||dW|| / ||W|| on the element subset
    sum3: float = float("nan")  # third and fourth power sums, for skewness and kurtosis
    sum4: float = float("nan")
    # update: ||W_t - W_0|| / ||W_0|| on the element subset (W_0: the weight at attach); None when
    # unknown (older probes, a weight that was all zeros at attach). Defaulted fields go last, so
    # frames without them (older recordings) still decode.
    init_dist: float | None = None
    # weight of a LoRA B: the adapter's relative shift ||B A scale||_F / ||W_base||_F (exact, on
    # the whole matrices); 0 while B is zero
    lora_shift: float | None = None

    @property
    def hist(self) -> np.ndarray:
        """The histogram counts (a read-only array over the frame's bytes)."""
        return np.frombuffer(self.hist_counts, dtype=counts_dtype(self.hist_n))


def counts_dtype(hist_n: int) -> str:
    """The wire dtype of a histogram's counts: none can exceed ``hist_n``."""
    return "<u2" if hist_n < 1 << 16 else "<u4"


def encode_counts(counts, hist_n: int) -> bytes:
    """Histogram counts as :attr:`Sample.hist_counts` bytes."""
    return np.asarray(counts).astype(counts_dtype(hist_n)).tobytes()


class RankStats(Struct, frozen=True):
    """One number per rank of the job at one sampled step (all-gathered; index = rank).

    ``grad_norm``: the L2 norm of the rank's replicated gradients (FSDP's
    sharded ones are left out: their pieces differ by rank); ``nonfinite``:
    NaN/Inf elements over all the rank's samples; ``step_time``: wall seconds
    per step since the rank's previous sampled step; ``fwd_time``: seconds from
    the previous step's end to this step's forward end (data loading and
    forward, which a DDP all-reduce in backward does not even out); ``loss``.
    NaN where unknown.
    """

    grad_norm: list[float] = []
    nonfinite: list[float] = []
    step_time: list[float] = []
    fwd_time: list[float] = []
    loss: list[float] = []


class Step(Struct, tag="step", frozen=True):
    """All samples one rank took at one training step (``rank`` -1: the whole job's)."""

    step: Count
    rank: Rank
    time: float
    samples: list[Sample]
    drops: Count = 0  # samples the probe dropped so far because it fell behind
    # with several ranks: every rank's total gradient L2 norm at this step (all-gathered)
    rank_grad_norms: list[float] | None = None
    # "train": the training step's samples; "eval": the activations (kind "act" only) of one
    # evaluation forward (under no_grad or inference_mode) taken while ``step`` steps
    # were done. Eval steps feed no training stream and no rule.
    phase: Literal["train", "eval"] = "train"
    # a GradScaler found non-finite gradients and skipped ``optimizer.step`` at this step: the
    # weights and gradients are as they were read, and there is no update
    skipped: bool = False
    # the whole job's step (rank -1): every rank's numbers, all-gathered
    ranks: RankStats | None = None


class Scalars(Struct, tag="scalars", frozen=True):
    """Run-level numbers of one training step: every step, sampled or not.

    The probe keeps them (device scalars on the device) and ships them every
    step, or every few steps when steps are faster than
    :data:`probes.capture.scalars.SHIP_INTERVAL`, with one non-blocking copy
    to the host; a sampled step's own Scalars follow its :class:`Step` (so a
    rule that sees a loss spike has the step's per-layer statistics already).
    Messages come in step order. Names the probe fills in itself:
    ``loss`` (the model output's ``.loss``, or ``xr.log(loss=...)``), ``lr``
    (param group 0) and ``lr/N`` (group N), ``grad_norm`` (the global L2
    norm of the gradients, sampled steps only), ``scale`` (a GradScaler's
    scale), ``steps_per_s``, and ``tokens_per_s`` / ``samples_per_s`` when
    known; the every-step tier's ``grad_norm_est`` (the global gradient
    norm, estimated from each weight's fixed subset, every step), and, on a
    step where the loop called ``torch.nn.utils.clip_grad_norm_``,
    ``grad_norm_preclip`` (what it returned: the norm before clipping) and
    ``clip`` (its ``max_norm``); any other name comes from
    ``xr.log(name=value)``.
    """

    step: Count
    rank: Count
    time: float
    values: dict[str, float]
    #: a GradScaler found inf/NaN gradients and skipped this step's ``optimizer.step``
    skipped: bool = False
    #: The every-step early-warning tier (probes/capture/signals.py): one little-endian float32 per
    #: tensor of :attr:`Hello.signal_tensors`, read on each tensor's fixed element subset; b"" when
    #: the tier did not run this step. ``adam_rms``: sqrt(mean(g^2 / v_hat)) with Adam's second
    #: moment after this step's update (StableAdamW's RMS_t; NaN without Adam-family state);
    #: ``update_ratio``: ||W_after - W_before|| / ||W_before|| (NaN where no step was taken).
    adam_rms: bytes = b""
    update_ratio: bytes = b""

    def signals(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The tier's arrays (``adam_rms``, ``update_ratio``) as float64, or None when absent."""
        if not self.adam_rms:
            return None
        return (np.frombuffer(self.adam_rms, dtype="<f4").astype(np.float64),
                np.frombuffer(self.update_ratio, dtype="<f4").astype(np.float64))


class Alert(Struct, tag="alert", frozen=True):
    """A rule fired (or, with severity ``info``, recovered)."""

    step: Count
    rank: Rank
    severity: Severity
    rule: str
    layer: str
    kind: AlertKind
    value: float
    threshold: float
    message: str


class Note(Struct, tag="note", frozen=True):
    """A free-form event of the run, e.g. an injected fault in the demo."""

    step: Count
    rank: Rank
    event: str
    data: dict[str, str | int | float | bool | None] = {}


#: How a run ended, as :attr:`End.reason` says; ``error`` comes from older probes (= crashed).
END_REASONS = ("finished", "stopped", "crashed", "killed", "interrupted", "error")
#: Reasons that mean the run did not end as planned (headless exits 1 for them).
END_FAILED = frozenset({"crashed", "killed", "interrupted", "error"})


class End(Struct, tag="end", frozen=True):
    """The run stopped.

    ``reason``: ``finished`` (closed normally), ``stopped`` (``on_alert="stop"``
    asked the loop to stop), ``crashed`` (an exception left the training
    loop; ``error`` says ``Type: message``), ``killed`` (a signal such as
    SIGTERM) or ``interrupted`` (Ctrl-C). Older probes said ``error``.
    """

    step: Count
    rank: Count
    reason: str = "finished"
    error: str = ""


class Spectral(Struct, tag="spectral", frozen=True):
    """Spectral health of one weight matrix (WeightWatcher's metrics; probes/spectral/analysis.py).

    ``layer`` is the parameter name; eigenvalues are those of W^T W. ``alpha``
    (power-law exponent, None when the fit failed), ``xmin`` and ``ks`` (the
    KS distance at xmin) come from the continuous MLE with xmin at the least
    KS distance. ``esd`` counts eigenvalues in log10-spaced bins from
    ``esd_lo`` to ``esd_hi`` (log10 units). ``method`` says how the
    eigenvalues were obtained ("exact", "conv-slices" or "lowrank").
    ``untrusted`` says why the ``spectral`` alert ignored this fit (too few
    tail eigenvalues, or a band crossing within alpha's standard error).
    """

    step: Count
    rank: Count
    layer: str
    alpha: float | None
    alpha_weighted: float | None
    log_norm: float
    log_spectral_norm: float
    stable_rank: float
    n_evals: Count
    xmin: float | None = None
    ks: float | None = None
    shape: list[int] = []
    esd_lo: float = 0.0
    esd_hi: float = 0.0
    esd: list[Count] = []
    method: str = "exact"
    # the fit's tail: eigenvalues >= xmin (WeightWatcher's num_pl_spikes), and alpha's
    # standard error (alpha - 1) / sqrt(n_tail) (its sigma); 0 / None from older probes
    n_tail: Count = 0
    sigma: float | None = None
    # why the probe does not trust this fit enough to alert on it ("" = trusted, or an older probe)
    untrusted: str = ""
    # the matrix's magnitude for the viewer's heatmap: heat_shape = [rows, cols] cells (each the RMS
    # of its block of W), heat = rows*cols float16 little-endian; empty from older probes
    heat_shape: Annotated[list[Annotated[int, Meta(ge=1, le=HEAT_MAX_COLS)]], Meta(max_length=2)] = []
    heat: bytes = b""

    def heat_matrix(self) -> "np.ndarray | None":
        """The heatmap grid as a float array, or None when this message has none (or a bad one)."""
        if len(self.heat_shape) != 2 or len(self.heat) != 2 * self.heat_shape[0] * self.heat_shape[1]:
            return None
        return np.frombuffer(self.heat, dtype="<f2").astype(np.float32).reshape(self.heat_shape)


Message = Union[Hello, Step, Scalars, Alert, Note, End, Spectral]


class Request(Struct, tag="request", frozen=True):
    """A viewer asks the probe for something: the only message a probe reads.

    ``what`` names one of the kinds in the probe's :attr:`Hello.accepts`;
    today only ``"spectral"`` (run a spectral pass now). The probe answers
    the asking viewer alone with a ``request`` :class:`Note`
    (``{"what", "accepted", "reason"}``). Not part of :data:`Message`: a
    probe never sends one, and a viewer never decodes one.
    """

    what: Annotated[str, Meta(min_length=1, max_length=32)]
