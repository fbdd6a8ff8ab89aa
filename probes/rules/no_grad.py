"""``no-grad``: a parameter that requires a gradient but gets none.

At a step where other parameters have a gradient, a trainable parameter
(from the Hello: not frozen, its gradient not skipped) without one is on a
detached branch or unused in forward. The parameters it finds are left out of
the update rules' judgement (:attr:`probes.rules.base.StepContext.missing`).

Each parameter keeps its own hysteresis, but the parameters that fire (or
recover) at the same step are one cause, said in one alert grouped by module
subtree (:mod:`probes.rules.subtree`): ``torch.no_grad()`` around an encoder
layer is one alert naming that layer and everything before it, not one per
parameter. The alert's layer is the group's first parameter in model order.
"""

from __future__ import annotations

from probes.protocol.wire import Alert
from probes.rules.base import FIRE, RECOVER, Finding, StepContext, StepRule, StreamState, Where, alert, track
from probes.rules.subtree import describe, leading, subtrees


class NoGrad(StepRule):
    """``no-grad``, judged on each trainable parameter's gradient stream (alerts of kind grad)."""

    id = "no-grad"

    def __init__(self, engine) -> None:
        super().__init__(engine)
        #: (rank, parameter) -> the parameter its alert is on (its group's first), while it fires
        self._leader: dict[tuple[int, str], str] = {}
        #: (rank, leader) -> (the group's description, its parameters still without a gradient)
        self._open: dict[tuple[int, str], tuple[str, set]] = {}

    def evaluate(self, ctx: StepContext, out: list[Alert]) -> None:
        step, engine = ctx.step, self.engine
        grads = {s.layer for s in step.samples if s.kind == "grad"}
        trainable = engine.trainable
        if trainable is None or not grads:
            return  # without the model's layers, frozen parameters are not known
        fired, recovered, runs, k = [], [], {}, 3
        for s in step.samples:
            if s.kind != "weight" or s.layer not in trainable:
                continue
            c = engine.cfg(s.layer)
            if not c.on("no-grad"):
                continue
            st = engine.streams.setdefault((s.layer, "grad", step.rank), StreamState())
            bad = s.layer not in grads
            if bad:
                ctx.missing.add(s.layer)
            change = track(st, "no-grad", bad, c.nograd_k, c.recover_k)
            runs[s.layer], k = st.bad.get("no-grad", 0), c.nograd_k
            if change == FIRE:
                fired.append(s)
            elif change == RECOVER:
                recovered.append(s)
        order = [p for p in engine.params if p in trainable]  # model order
        if fired:
            out.extend(self._fired(ctx, fired, order, runs, k))
        for s in recovered:
            # said once per alert, on its layer (so a viewer clears it), when all it covered recovered
            leader = self._leader.pop((step.rank, s.layer), s.layer)
            what, members = self._open.get((step.rank, leader), (leader, set()))
            members.discard(s.layer)
            if not members:
                self._open.pop((step.rank, leader), None)
                out.append(alert(step, Where(leader, "grad"), self.id, Finding(
                    "info", 0.0, 0.0, f"no-grad on {what} recovered: gradients arrive again"), kind="grad"))

    def _fired(self, ctx, fired, order, runs, k) -> list[Alert]:
        """The alerts for the parameters that fired at this step: one per module subtree, or one
        for all when they are everything up to some module (a gradient cut at its output)."""
        by_name = {s.layer: s for s in fired}
        groups = subtrees(list(by_name), order)
        if leading(groups, order) and len(by_name) > 1:
            last = groups[-1][0]
            hint = (f"the gradient stops at {last}'s output, so everything before it gets none: is "
                    f"{last} run under torch.no_grad(), or its output .detach()ed (a detached branch)?")
            causes = [(groups, hint)]
        else:
            hint = "is it on a detached branch (.detach(), torch.no_grad()), or unused in forward?"
            causes = [([g], hint) for g in groups]
        out = []
        for gs, hint in causes:
            names = [p for _, ps in gs for p in ps]
            n = runs[names[0]]
            what = (f"{names[0]} requires a gradient but got none" if len(names) == 1 else
                    f"{len(names)} parameter tensors that require a gradient got none ({describe(gs)})")
            out.append(alert(ctx.step, by_name[names[0]], self.id,
                             Finding("warning", n, k, f"{what} in {n} sampled steps: {hint}"), kind="grad"))
            rank = ctx.step.rank
            self._open[(rank, names[0])] = (describe(gs), set(names))
            self._leader.update({(rank, p): names[0] for p in names})
        return out
