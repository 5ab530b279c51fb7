"""Lung-RADS v2022 baseline table: one test per row and one at each side of every boundary."""

import math

import pytest

from napari_resmtnet.lungrads import (
    BASELINE_RULES,
    CATEGORIES,
    LungRads,
    lung_rads,
    mean_diameter,
    normalise_type,
    round_mm,
)


# --- one test per table row (a size well inside the row) -----------------------------------


@pytest.mark.parametrize(
    "kind, total, solid, expected",
    [
        ("solid", 4.0, None, "2"),
        ("solid", 7.0, None, "3"),
        ("solid", 11.0, None, "4A"),
        ("solid", 22.0, None, "4B"),
        ("part-solid", 4.0, 2.0, "2"),
        ("part-solid", 4.0, None, "2"),  # < 6 mm total: the solid component is not needed
        ("part-solid", 12.0, 3.0, "3"),
        ("part-solid", 12.0, 7.0, "4A"),
        ("part-solid", 20.0, 10.0, "4B"),
        ("ground-glass", 15.0, None, "2"),
        ("ground-glass", 40.0, None, "3"),
    ],
)
def test_table_rows(kind, total, solid, expected):
    cat, reason = lung_rads(kind, total, solid)
    assert cat == expected
    assert kind.split("-")[0] in reason and "decision support" in reason


def test_benign_features_give_category_1_at_any_size():
    for kind in ("solid", "part-solid", "ground-glass"):
        assert lung_rads(kind, 25.0, 20.0 if kind == "part-solid" else None, calcified=True).category == "1"
        assert lung_rads(kind, 3.0, fat=True).category == "1"
    assert "calcification" in lung_rads("solid", 30.0, calcified=True).reason


# --- every boundary, just below and at it (diameters already at one decimal) -----------------


@pytest.mark.parametrize(
    "total, expected",
    [
        (0.1, "2"),
        (5.9, "2"),
        (6.0, "3"),
        (7.9, "3"),
        (8.0, "4A"),
        (14.9, "4A"),
        (15.0, "4B"),
        (80.0, "4B"),
    ],
)
def test_solid_boundaries(total, expected):
    assert lung_rads("solid", total).category == expected


@pytest.mark.parametrize(
    "total, solid, expected",
    [
        (5.9, 5.9, "2"),  # below 6 mm total: 2 whatever the solid component
        (6.0, 0.1, "3"),
        (6.0, 5.9, "3"),
        (6.0, 6.0, "4A"),
        (9.0, 7.9, "4A"),
        (9.0, 8.0, "4B"),
        (30.0, 8.0, "4B"),
        (30.0, 5.9, "3"),
    ],
)
def test_part_solid_boundaries(total, solid, expected):
    assert lung_rads("part-solid", total, solid).category == expected


@pytest.mark.parametrize("total, expected", [(0.5, "2"), (29.9, "2"), (30.0, "3"), (60.0, "3")])
def test_ground_glass_boundaries(total, expected):
    assert lung_rads("ground-glass", total).category == expected


# --- the size convention: one decimal, half up, before the table -----------------------------


@pytest.mark.parametrize(
    "total, expected",
    [
        (5.94, "2"),
        (5.95, "3"),
        (7.949, "3"),
        (7.95, "4A"),
        (14.949, "4A"),
        (14.95, "4B"),
    ],
)
def test_solid_thresholds_apply_to_the_rounded_mean(total, expected):
    assert lung_rads("solid", total).category == expected


def test_ground_glass_and_solid_component_are_rounded_too():
    assert lung_rads("ground-glass", 29.95).category == "3"
    assert lung_rads("ground-glass", 29.94).category == "2"
    assert lung_rads("part-solid", 10.0, 5.95).category == "4A"
    assert lung_rads("part-solid", 10.0, 7.95).category == "4B"
    assert lung_rads("part-solid", 5.94, 5.94).category == "2"


def test_round_mm_is_half_up():
    assert round_mm(5.25) == 5.3 and round_mm(5.35) == 5.4 and round_mm(5.24) == 5.2
    assert round_mm(0.05) == 0.1 and round_mm(12) == 12.0


def test_mean_diameter_convention():
    # each axis to one decimal (7.25 -> 7.3), then the mean to one decimal ((7.3 + 5.0) / 2 = 6.15 -> 6.2)
    assert mean_diameter(7.25, 5.0) == 6.2
    assert mean_diameter(6.0, 6.0) == 6.0
    assert mean_diameter(8.04, 3.91) == 6.0  # 8.0 and 3.9 -> 5.95 -> 6.0: category 3 when solid
    with pytest.raises(ValueError, match="short axis"):
        mean_diameter(4.0, 5.0)


# --- the table as data ----------------------------------------------------------------------


def test_rules_tile_every_size_without_overlap():
    """For each type, the rows cover (0, inf) in the total (and, where consulted, the solid
    component) exactly once, so no size falls between two rows or into two."""
    for kind in ("solid", "part-solid", "ground-glass"):
        for total in [x / 10 for x in range(1, 800)]:
            solids = [s / 10 for s in range(1, int(total * 10) + 1, 7)] if kind == "part-solid" else [None]
            for solid in solids:
                hits = [
                    r
                    for r in BASELINE_RULES
                    if r.nodule_type == kind
                    and r.total_mm[0] <= total < r.total_mm[1]
                    and (r.solid_mm is None or r.solid_mm[0] <= solid < r.solid_mm[1])
                ]
                assert len(hits) == 1, (kind, total, solid, hits)


def test_every_rule_is_reachable_and_categories_are_known():
    for rule in BASELINE_RULES:
        lo, hi = rule.total_mm
        total = lo + 0.5 if math.isinf(hi) else (lo + hi) / 2
        solid = None
        if rule.solid_mm is not None:
            slo, shi = rule.solid_mm
            solid = slo + 0.5 if math.isinf(shi) else (slo + shi) / 2
            total = max(total, solid)
        assert lung_rads(rule.nodule_type, total, solid).category == rule.category
        assert rule.category in CATEGORIES


def test_result_unpacks_and_labels_itself_as_decision_support():
    res = lung_rads("solid", 9.0)
    cat, reason = res
    assert isinstance(res, LungRads) and cat == "4A" and "9.0 mm" in reason
    assert res.label == "Lung-RADS 4A (decision support)"


@pytest.mark.parametrize(
    "spelling, expected",
    [
        ("Solid", "solid"),
        ("part solid", "part-solid"),
        ("PART_SOLID", "part-solid"),
        ("partsolid", "part-solid"),
        ("subsolid", "part-solid"),
        ("GGN", "ground-glass"),
        ("ground glass", "ground-glass"),
        ("non-solid", "ground-glass"),
        ("nonsolid", "ground-glass"),
    ],
)
def test_type_spellings(spelling, expected):
    assert normalise_type(spelling) == expected


# --- bad input: one-line ValueError ---------------------------------------------------------


@pytest.mark.parametrize(
    "args, match",
    [
        (("cavity", 8.0), "nodule type"),
        ((None, 8.0), "nodule type"),
        (("solid", 0.0), "positive"),
        (("solid", -3.0), "positive"),
        (("solid", float("nan")), "positive"),
        (("solid", float("inf")), "positive"),
        (("solid", "big"), "number"),
        (("part-solid", 8.0), "solid component"),
        (("part-solid", 8.0, 9.0), "larger"),
        (("part-solid", 8.0, 0.0), "positive"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match) as exc:
        lung_rads(*args)
    assert "\n" not in str(exc.value)
