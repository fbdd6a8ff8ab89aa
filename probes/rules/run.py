"""What the rules know about the run beyond the stream: its model, precision and optimizer.

The engine learns it from the Hello (:meth:`RunFacts.set_hello`), Notes and each
step's Scalars; the rules read it to judge like with like (a parameter's kind)
and to write hints that fit the situation (the precision, a LoRA pair, a param
group's learning rate).
"""

from __future__ import annotations

from probes.protocol.wire import Step


class RunFacts:
    """The run as the rules know it; :class:`probes.rules.engine.RuleEngine` is one."""

    def __init__(self) -> None:
        self.activations: set[str] = set()  # modules that are activation functions
        self.trainable: set[str] | None = None  # parameter names with requires_grad, once known
        #: parameter name -> (its LayerInfo, its short name), from the Hello
        self.params: dict[str, tuple] = {}
        self.modules: dict[str, object] = {}  # module name -> LayerInfo
        #: training precision as the probe knows it: Hello.precision ("fp32", "bf16", "fp16",
        #: "fp16+scaler"; "" unknown), replaced by a ``precision`` Note (e.g. "bf16-autocast")
        self.precision = ""
        self.param_groups: dict[str, int] = {}  # parameter name -> optimizer param group
        #: parameter -> its first sampled weight was all zero (e.g. a LoRA B: its ratio starts at 1/n)
        self.zero_init: dict[str, bool] = {}
        self.eps = 0.05  # the probe's near-zero threshold (its Hello says), which dead units are counted against
        #: the latest value of each run-level scalar (``loss``, ``lr``, ``lr/N``, ``scale``...), per
        #: ``evaluate_scalars``; rules read the learning rate from here for their messages
        self.scalars: dict[str, float] = {}
        #: the latest training Step of each rank (loss-spike names the layers that moved in it)
        self.last_step: dict[int, Step] = {}
        self.hosts: list[str] = []  # every rank's host (Hello.hosts), for the straggler's message
        #: the tensors of the every-step tier's arrays, in their order (Hello.signal_tensors)
        self.signal_tensors: list[str] = []
        #: the gradient clipping's max_norm as a ``clip`` Note said (the HF Trainer's
        #: args.max_grad_norm at train begin); the every-step ``clip`` scalar wins (see :meth:`clip`)
        self.clip_note: float | None = None

    def set_layers(self, layers) -> None:
        """Tell the engine the model's layers (a Hello's ``layers``): the
        near-zero and dead-unit tests apply to activation functions only,
        since other modules' outputs are legitimately small at init; and
        ``no-grad`` watches only parameters that require a gradient."""
        layers = list(layers)
        self.activations = {li.name for li in layers if li.role == "activation"}
        self.modules = {li.name: li for li in layers}
        self.params = {(f"{li.name}.{p}" if li.name else p): (li, p) for li in layers for p in li.params}
        self.trainable = {f"{li.name}.{p}" if li.name else p
                           for li in layers for p in li.params
                           if p not in li.frozen and f"{p}.grad" not in li.skipped}  # e.g. sparse gradients

    def set_hello(self, hello) -> None:
        """Tell the engine about the run (a :class:`~probes.protocol.wire.Hello`): its layers
        (:meth:`set_layers`), precision, parameter groups and unoptimized parameters,
        which the hints and the learning rate in the messages read."""
        self.set_layers(hello.layers)
        self.precision = getattr(hello, "precision", "") or ""
        self.param_groups = dict(getattr(hello, "param_groups", {}) or {})
        self.eps = getattr(hello, "eps", self.eps)
        self.hosts = list(getattr(hello, "hosts", []) or [])
        self.signal_tensors = list(getattr(hello, "signal_tensors", []) or [])

    def note(self, msg) -> None:
        """Take a run :class:`~probes.protocol.wire.Note`; a ``precision`` note (autocast seen in
        forward, e.g. ``{"precision": "bf16-autocast"}``) replaces the precision; a ``clip`` note
        (``{"max_norm": 1.0}``: the HF Trainer's ``max_grad_norm``) says clipping is on. Any other
        message is ignored, so the publisher can hand it everything it publishes."""
        event = getattr(msg, "event", None)
        if event == "precision" and msg.data.get("precision"):
            self.precision = str(msg.data["precision"])
        elif event == "clip":
            norm = msg.data.get("max_norm")
            self.clip_note = float(norm) if isinstance(norm, (int, float)) and norm > 0 else None

    # -- what the rules ask ------------------------------------------------

    def lr(self, param: str) -> tuple[float | None, int]:
        """(the learning rate of ``param``'s param group as last reported, or None; the group)."""
        group = self.param_groups.get(param, 0)
        return self.scalars.get("lr" if group == 0 else f"lr/{group}"), group

    def clip(self) -> float | None:
        """The gradient clipping's max_norm, or None when the probe knows of none: the latest
        ``clip`` scalar (sent on steps where the loop called clip_grad_norm_), else a ``clip`` Note."""
        norm = self.scalars.get("clip")
        if norm is not None and norm > 0:
            return float(norm)
        return self.clip_note

    def lr_text(self, param: str) -> str:
        """``param``'s learning rate for a message ("lr 0.001 (param group 1)"), "" if unknown."""
        lr, group = self.lr(param)
        if lr is None:
            return ""
        return f"lr {lr:.3g}" + (f" (param group {group})" if self.param_groups else "")

    def param_kind(self, param: str) -> str:
        """What a parameter is, for comparing like with like: "matrix", "bias", "norm",
        "embedding" (from the module's type when the Hello said it, else from the name)."""
        info = self.params.get(param)
        short = info[1] if info else param.rpartition(".")[2]
        mtype = (info[0].type if info else "").lower()
        if short == "bias" or short.endswith("_bias"):
            return "bias"
        if "norm" in mtype:
            return "norm"
        if "embedding" in mtype:
            return "embedding"
        return "matrix"

    def lora(self, param: str):
        """(A or B, the other matrix's state: "frozen" / "unoptimized" / "") of a LoRA
        parameter, or None for any other parameter."""
        info = self.params.get(param)
        if info is None or info[0].role != "lora":
            return None
        name = info[0].name
        which = "A" if "lora_A" in name else ("B" if "lora_B" in name else "")
        if not which:
            return None
        other = self.modules.get(name.replace("lora_A", "lora_B") if which == "A" else name.replace("lora_B", "lora_A"))
        state = ""
        if other is not None:
            if info[1] in other.frozen:
                state = "frozen"
            elif info[1] in other.unoptimized:
                state = "unoptimized"
        return which, state

    def unoptimized(self, param: str) -> bool:
        """Whether ``param`` requires a gradient but is in none of the optimizer's param groups."""
        info = self.params.get(param)
        return info is not None and info[1] in info[0].unoptimized

    def precision_kind(self) -> str:
        """The run's precision as one of "fp16+scaler", "fp16", "bf16", "fp32", or "" (unknown)."""
        p = self.precision.lower()
        if "fp16" in p or "float16" in p and "bfloat16" not in p:
            return "fp16+scaler" if "scaler" in p else "fp16"
        if "bf16" in p or "bfloat16" in p:
            return "bf16"
        if "fp32" in p or "float32" in p:
            return "fp32"
        return ""
