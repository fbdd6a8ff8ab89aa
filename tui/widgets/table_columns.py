"""Which of the layer table's columns fit in a width, and how wide each one is.

Pure arithmetic (no Textual): :func:`plan_columns` drops the least useful
columns first as the terminal narrows and gives spare cells to the
pictures, so a wide terminal shows wider sparklines, not blank space.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The sparkline columns, in their fixed order (the user toggles each with 1 2 3).
SPARK_KINDS = ("weight", "grad", "act")
SPARK_MIN, SPARK_MAX = 6, 32
#: A trend column (gradient norm, update ratio over the last sampled steps): each cell one step.
TREND_MIN, TREND_MAX = 6, 64
NAME_MIN, NAME_PREF = 16, 36
#: The module type column is at most this wide (longer types are cut).
TYPE_MAX = 12
BADGE_W, NUM_W, GAUGE_W = 6, 7, 9


@dataclass(frozen=True)
class Columns:
    """Which columns fit in a given width, and how wide each is.

    ``name`` includes the type sub-column (``type`` cells plus two spaces)
    when ``type`` > 0; ``trend`` is the width of each of the two trend
    columns beside ``‖grad‖`` and ``upd/w`` (0: not shown).
    """

    width: int
    name: int
    kinds: tuple[str, ...]
    spark: int
    gauge: bool
    norm: bool
    ratio: bool
    trend: int = 0
    type: int = 0


def plan_columns(width: int, shown: tuple[str, ...] = SPARK_KINDS, *, name_need: int = NAME_PREF,
                 type_w: int = 0) -> Columns:
    """Choose the columns for ``width`` cells, dropping the least useful first.

    Order of sacrifice as the terminal narrows: the weight sparkline, the
    trend columns, the gradient sparkline, the update ratio, the activation
    sparkline, the gauge and the grad norm. The name keeps at least
    ``NAME_MIN`` cells when it can and at most what its longest entry needs
    (``name_need``, type included); every cell beyond goes to the
    sparklines and trends (up to their caps), so a wide terminal shows
    wider pictures, not blank space. ``type_w`` is the longest module type:
    the type shows on every row or on none. ``shown`` are the sparkline
    kinds the user has toggled on.
    """
    configs = [
        (SPARK_KINDS, True, True, True, True),
        (("grad", "act"), True, True, True, True),
        (("grad", "act"), True, True, True, False),
        (("act",), True, True, True, False),
        (("act",), True, True, False, False),
        ((), True, True, False, False),
        ((), False, True, False, False),
        ((), False, False, False, False),
    ]
    for kinds, gauge, norm, ratio, trend in configs:
        kinds = tuple(k for k in kinds if k in shown)
        trends = (norm + ratio) if trend else 0
        fixed = BADGE_W + (GAUGE_W + 1) * gauge + (NUM_W + 1) * norm + (NUM_W + 1) * ratio + 1 + trends
        flex = width - fixed - len(kinds) - (SPARK_MIN * len(kinds)) - TREND_MIN * trends
        if flex < NAME_MIN and (kinds or gauge or norm or ratio):
            continue
        # The name takes what it needs (within the room), the pictures the rest up to their caps.
        name = max(min(max(name_need, NAME_MIN), flex), min(flex, NAME_MIN), 1)
        name = min(name, max(NAME_PREF, int(flex * 0.5)))  # a very long path is cut, not the pictures
        spare = flex - name
        spark, tr = (SPARK_MIN if kinds else 0), (TREND_MIN if trends else 0)
        n_flex = len(kinds) + trends
        if n_flex:
            share = spare // n_flex
            spark = min(SPARK_MAX, spark + share) if kinds else 0
            tr = min(TREND_MAX, tr + share) if trends else 0
            spare -= len(kinds) * (spark - SPARK_MIN if kinds else 0) + trends * (tr - TREND_MIN if trends else 0)
        name += spare
        typ = type_w if type_w and name >= NAME_MIN + 2 + type_w else 0
        return Columns(width, max(name, 1), kinds, spark, gauge, norm, ratio, tr, typ)
    raise AssertionError("unreachable: the last config always fits")
