"""Parameters grouped by module subtree, so a structural alert says its cause once.

``torch.no_grad()`` around one encoder layer leaves every parameter of that layer (and of
everything before it) without a gradient: one cause, which one alert per parameter (21 for a
2-layer BERT) buries. :func:`subtrees` finds the largest module subtrees all of whose
parameters are in a set, and :func:`describe` writes them as a list for a message.
"""

from __future__ import annotations


def _prefixes(param: str) -> list[str]:
    """The module paths above ``param``, outermost first (``a.b.c`` -> ``a``, ``a.b``)."""
    parts = param.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def subtrees(names, universe) -> list[tuple[str, list[str]]]:
    """``names`` (parameter names, a subset of ``universe``) as (module path, its parameters)
    pairs, one per largest module subtree whose parameters in ``universe`` are all in ``names``;
    a parameter whose module also holds others not in ``names`` stands alone (path = its own
    name). In the order of ``universe`` (model order)."""
    names = set(names)
    total: dict[str, int] = {}
    hit: dict[str, int] = {}
    for p in universe:
        for pre in _prefixes(p):
            total[pre] = total.get(pre, 0) + 1
            if p in names:
                hit[pre] = hit.get(pre, 0) + 1
    groups: dict[str, list[str]] = {}
    for p in universe:
        if p not in names:
            continue
        # the whole model is no subtree worth naming when every parameter is in it: its children are
        full = [pre for pre in _prefixes(p) if hit.get(pre) == total[pre] and hit[pre] < len(universe)]
        groups.setdefault(full[0] if full else p, []).append(p)
    return list(groups.items())


def describe(groups: list[tuple[str, list[str]]], most: int = 4) -> str:
    """``a.b (16 tensors), a.c.weight`` for a message; past ``most`` groups, "and N more"."""
    parts = [path if len(ps) == 1 and ps[0] == path else f"{path} ({len(ps)} tensors)"
             for path, ps in groups[:most]]
    if len(groups) > most:
        parts.append(f"and {len(groups) - most} more")
    return ", ".join(parts)


def leading(groups: list[tuple[str, list[str]]], universe) -> bool:
    """Whether the groups' parameters are exactly the first ones of ``universe`` in model order
    (everything up to some module: a gradient cut at that module's output)."""
    names = {p for _, ps in groups for p in ps}
    order = list(universe)
    return bool(names) and len(names) < len(order) and set(order[:len(names)]) == names
