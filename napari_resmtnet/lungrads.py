"""Lung-RADS v2022 baseline-screening category of one nodule, from its type and size.

**Decision support only.** The category is computed from what the plugin can measure (type,
mean diameter, solid-component mean diameter, calcification or fat); a reader must confirm
the type and the size and may override either, which recomputes the category. Findings the
rules below cannot see (growth against a prior CT, new nodules, juxtapleural/perifissural
morphology, airway nodules, atypical cysts, category 0, 4X and the S modifier) are left to
the reader.

Source: American College of Radiology, *Lung-RADS v2022 Assessment Categories* (released
November 2022; summarised in Christensen et al., CHEST 2024;165(3):738-753). Rows used,
baseline screening only (volumes are the table's equivalents, not used here):

==========  ====================================================================  ========
category    finding (baseline)                                                    rule
==========  ====================================================================  ========
1           nodule with benign calcification (complete, central, popcorn,        any size
            concentric rings) or fat-containing
2           solid: < 6 mm (< 113 mm³)                                              total
2           part-solid: < 6 mm total mean diameter (< 113 mm³)                     total
2           ground-glass (non-solid, GGN): < 30 mm (< 14 137 mm³)                  total
3           solid: ≥ 6 to < 8 mm (≥ 113 to < 268 mm³)                              total
3           part-solid: ≥ 6 mm total with solid component < 6 mm (< 113 mm³)       solid
3           ground-glass: ≥ 30 mm (≥ 14 137 mm³)                                   total
4A          solid: ≥ 8 to < 15 mm (≥ 268 to < 1 767 mm³)                           total
4A          part-solid: ≥ 6 mm total with solid component ≥ 6 to < 8 mm            solid
4B          solid: ≥ 15 mm (≥ 1 767 mm³)                                           total
4B          part-solid: solid component ≥ 8 mm (≥ 268 mm³)                          solid
==========  ====================================================================  ========

Size convention (v2022): measure the long axis and the perpendicular short axis to one
decimal place in mm and report the mean diameter, (long + short) / 2, to one decimal place;
the thresholds apply to that rounded mean, so 5.96 mm is reported as 6.0 mm and is category
3 when solid. Both diameters and the solid component are rounded here, half up, before the
table is applied. v2022 allows the two axes in any plane; the plugin's measurements use the
axial slice where the long axis is largest (see ``measurements.measure_nodule``).

The table is held as data (``BASELINE_RULES``) so that a reader can check it row by row
against the ACR document and each row has its own unit test.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal
from typing import NamedTuple

VERSION = "Lung-RADS v2022 baseline"
DECISION_SUPPORT = "decision support"

NODULE_TYPES = ("solid", "part-solid", "ground-glass")
_ALIASES = {
    "solid": "solid",
    "part-solid": "part-solid",
    "partsolid": "part-solid",
    "semi-solid": "part-solid",
    "subsolid": "part-solid",
    "mixed": "part-solid",
    "ground-glass": "ground-glass",
    "groundglass": "ground-glass",
    "ggn": "ground-glass",
    "ggo": "ground-glass",
    "non-solid": "ground-glass",
    "nonsolid": "ground-glass",
}

INF = math.inf


class Rule(NamedTuple):
    """One row of the baseline table: a nodule type, half-open ranges [low, high) of the
    total mean diameter and of the solid-component mean diameter (mm), and the category."""

    nodule_type: str
    total_mm: tuple[float, float]
    solid_mm: tuple[float, float] | None  # None: the solid component is not consulted
    category: str
    finding: str


BASELINE_RULES: tuple[Rule, ...] = (
    Rule("solid", (0.0, 6.0), None, "2", "solid nodule < 6 mm at baseline"),
    Rule("solid", (6.0, 8.0), None, "3", "solid nodule ≥ 6 to < 8 mm at baseline"),
    Rule("solid", (8.0, 15.0), None, "4A", "solid nodule ≥ 8 to < 15 mm at baseline"),
    Rule("solid", (15.0, INF), None, "4B", "solid nodule ≥ 15 mm at baseline"),
    Rule("part-solid", (0.0, 6.0), None, "2", "part-solid nodule < 6 mm total mean diameter at baseline"),
    Rule(
        "part-solid",
        (6.0, INF),
        (0.0, 6.0),
        "3",
        "part-solid nodule ≥ 6 mm total with solid component < 6 mm at baseline",
    ),
    Rule(
        "part-solid",
        (6.0, INF),
        (6.0, 8.0),
        "4A",
        "part-solid nodule ≥ 6 mm total with solid component ≥ 6 to < 8 mm at baseline",
    ),
    Rule("part-solid", (6.0, INF), (8.0, INF), "4B", "part-solid nodule with solid component ≥ 8 mm at baseline"),
    Rule("ground-glass", (0.0, 30.0), None, "2", "ground-glass (non-solid) nodule < 30 mm at baseline"),
    Rule("ground-glass", (30.0, INF), None, "3", "ground-glass (non-solid) nodule ≥ 30 mm at baseline"),
)

BENIGN_FEATURES_FINDING = "benign calcification (complete, central, popcorn, concentric rings) or fat"
CATEGORIES = ("1", "2", "3", "4A", "4B")


class LungRads(NamedTuple):
    """A Lung-RADS category with the table row that gave it; unpacks as (category, reason)."""

    category: str
    reason: str

    @property
    def label(self) -> str:
        """What a table cell or an export should show: the category marked as decision support."""
        return f"Lung-RADS {self.category} (decision support)"


def round_mm(value: float) -> float:
    """Round a length to one decimal place, half up, as Lung-RADS v2022 reports diameters
    (Python's round() is half-to-even and would report 5.25 mm as 5.2 mm)."""
    return float(Decimal(repr(float(value))).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def mean_diameter(long_axis_mm: float, short_axis_mm: float) -> float:
    """Lung-RADS mean diameter: each axis to one decimal, then their mean to one decimal."""
    long_axis_mm = _length(long_axis_mm, "long_axis_mm")
    short_axis_mm = _length(short_axis_mm, "short_axis_mm")
    if short_axis_mm > long_axis_mm:
        raise ValueError(f"short axis {short_axis_mm} mm is longer than the long axis {long_axis_mm} mm")
    return round_mm((round_mm(long_axis_mm) + round_mm(short_axis_mm)) / 2)


def normalise_type(nodule_type: str) -> str:
    """Canonical nodule type ('solid', 'part-solid', 'ground-glass') from common spellings,
    so that an override typed or exported as 'part solid' or 'GGN' means the same row."""
    if not isinstance(nodule_type, str):
        raise ValueError(f"nodule type must be one of {', '.join(NODULE_TYPES)}, got {nodule_type!r}")
    key = nodule_type.strip().lower().replace("_", "-").replace(" ", "-")
    if key not in _ALIASES:
        key = key.replace("-", "")
    if key not in _ALIASES:
        raise ValueError(f"nodule type must be one of {', '.join(NODULE_TYPES)}, got {nodule_type!r}")
    return _ALIASES[key]


def _length(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of mm, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number of mm, got {value!r}")
    return v


def _in(value: float, rng: tuple[float, float]) -> bool:
    return rng[0] <= value < rng[1]


def lung_rads(
    nodule_type: str,
    mean_diameter_mm: float,
    solid_mean_diameter_mm: float | None = None,
    calcified: bool = False,
    fat: bool = False,
) -> LungRads:
    """Lung-RADS v2022 baseline category of one nodule (decision support).

    ``nodule_type``: 'solid', 'part-solid' or 'ground-glass' (aliases such as 'GGN',
    'non-solid', 'part solid' are accepted). ``mean_diameter_mm``: the nodule's (total) mean
    diameter. ``solid_mean_diameter_mm``: the mean diameter of the solid component, needed
    only for a part-solid nodule of ≥ 6 mm, since only there does the table consult it.
    ``calcified``: a benign pattern of calcification (complete/solid, central, popcorn,
    concentric rings; not eccentric) and ``fat``: a fat-containing nodule; either gives
    category 1 whatever the size. Diameters are rounded to one decimal (half up) first.

    Returns ``LungRads(category, reason)`` with category one of '1', '2', '3', '4A', '4B'.
    """
    kind = normalise_type(nodule_type)
    total = round_mm(_length(mean_diameter_mm, "mean_diameter_mm"))
    solid = None
    if solid_mean_diameter_mm is not None:
        solid = round_mm(_length(solid_mean_diameter_mm, "solid_mean_diameter_mm"))
        if solid > total:
            raise ValueError(f"solid component {solid} mm is larger than the nodule's mean diameter {total} mm")
    if calcified or fat:
        return LungRads("1", f"{BENIGN_FEATURES_FINDING} [{VERSION}; {DECISION_SUPPORT}]")
    for rule in BASELINE_RULES:
        if rule.nodule_type != kind or not _in(total, rule.total_mm):
            continue
        if rule.solid_mm is not None:
            if solid is None:
                raise ValueError(f"a part-solid nodule of {total} mm needs the solid component's mean diameter")
            if not _in(solid, rule.solid_mm):
                continue
        size = f"{total:.1f} mm" + (f", solid component {solid:.1f} mm" if rule.solid_mm is not None else "")
        return LungRads(rule.category, f"{rule.finding}: {size} [{VERSION}; {DECISION_SUPPORT}]")
    raise AssertionError(f"no Lung-RADS rule for {kind} {total} mm, solid {solid}")  # the table covers every size
