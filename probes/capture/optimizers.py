"""Which optimizer the probe hooks: the torch optimizer inside a wrapper.

Accelerate's ``AcceleratedOptimizer`` (and DeepSpeed's, and many a user's
own) subclasses or imitates ``torch.optim.Optimizer`` without calling its
``__init__``, so it has no step-hook registry, and it holds the real
optimizer in ``.optimizer``. The probe hooks that inner optimizer: its
``step`` is the one that changes the weights, and it runs once per optimizer
step even when the wrapper's ``step`` is called on every micro-batch (under
``accelerator.accumulate`` the wrapper returns without stepping until the
gradients are synchronised), so the probe counts optimizer steps, not
micro-batches. Read once, at attach.
"""

from __future__ import annotations

import logging

log = logging.getLogger("xray-tui")

#: How deep a chain of ``.optimizer`` wrappers is followed (a cycle or a runaway chain stops here).
MAX_DEPTH = 8


def hookable(optimizer) -> bool:
    """Whether ``optimizer`` takes torch's step hooks (an initialised ``torch.optim.Optimizer``)."""
    return (isinstance(getattr(optimizer, "_optimizer_step_pre_hooks", None), dict)
            and callable(getattr(optimizer, "register_step_pre_hook", None))
            and callable(getattr(optimizer, "register_step_post_hook", None)))


def _chain(optimizer) -> list:
    """``optimizer`` and each optimizer it wraps in ``.optimizer``, outermost first."""
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen and len(chain) < MAX_DEPTH:
        chain.append(optimizer)
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def _scaler_of(wrappers: list):
    """An enabled GradScaler one of the wrappers holds (Accelerate's under fp16), else None."""
    for w in wrappers:
        s = getattr(w, "scaler", None)
        if s is not None and callable(getattr(s, "update", None)) and getattr(s, "is_enabled", lambda: False)():
            return s
    return None


def unwrap(optimizer, scaler=None, hook: bool = True):
    """The optimizer the probe reads and hooks, and the scaler that ends its steps.

    The innermost optimizer that takes torch's step hooks along the
    ``.optimizer`` chain; the wrappers' GradScaler when none was given (with it,
    a step the scaler skipped still counts, at ``scaler.update()``). An
    optimizer that neither takes hooks nor holds one that does is a TypeError
    when the probe must hook it (``hook``), and is kept as it is otherwise.
    """
    if optimizer is None:
        return None, scaler
    chain = _chain(optimizer)
    inner = next((o for o in reversed(chain) if hookable(o)), None)
    if inner is None:
        if hook:
            raise TypeError(
                f"xray-tui cannot hook {type(optimizer).__name__}.step: it is not a torch.optim.Optimizer and "
                f"holds none in .optimizer; attach without the optimizer and call xr.step() once per step")
        return optimizer, scaler
    if inner is optimizer:
        return optimizer, scaler
    wrappers = chain[:chain.index(inner)]
    if scaler is None and hook:
        scaler = _scaler_of(wrappers)
    log.info("xray-tui: hooking the %s inside %s (its steps are the optimizer steps)", type(inner).__name__,
             " > ".join(type(w).__name__ for w in wrappers))
    return inner, scaler
