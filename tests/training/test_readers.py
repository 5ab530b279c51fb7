"""Per-reader LIDC ratings: parsing, derived labels and leave-one-out inter-reader agreement."""

import csv
from collections import Counter

import pytest

from conftest import data_path
from napari_resmtnet.training.readers import (
    AGREEMENT_TASKS,
    CubeRatings,
    agreement_rates,
    derive_labels,
    format_agreement,
    labels_for,
    majority,
    mean_label,
    read_reader_ratings,
    texture_class,
)

HEADER = [
    "cube",
    "seriesuid",
    "match_mm",
    "malignancy_ratings",
    "n_readers",
    "mean_malignancy",
    "diagnosis_mean",
    "calcification",
    "margin",
    "spiculation",
    "texture",
    "note",
]


def write_csv(path, rows, header=HEADER):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([r.get(h, "") for h in header])
    return path


def row(cube, mal, calc=None, margin=None, spic=None, tex=None):
    n = len(mal)
    j = lambda v: ";".join(map(str, v)) if v else ""  # noqa: E731
    return {
        "cube": cube,
        "seriesuid": "1.2.3",
        "malignancy_ratings": j(mal),
        "n_readers": n if n else "",
        "calcification": j(calc or [6] * n),
        "margin": j(margin or [5] * n),
        "spiculation": j(spic or [1] * n),
        "texture": j(tex or [5] * n),
    }


def cube(**ratings):
    return CubeRatings("c.mha", "1.2.3", {k: tuple(v) for k, v in ratings.items()})


# --- reading -------------------------------------------------------------------------------


def test_read_small_file(tmp_path):
    p = write_csv(tmp_path / "r.csv", [row("a_dcm_0.mha", [4, 2, 4, 2], tex=[5, 5, 4, 1]), row("b_dcm_0.mha", [])])
    cubes = read_reader_ratings(p)
    assert list(cubes) == ["a_dcm_0.mha", "b_dcm_0.mha"]
    a = cubes["a_dcm_0.mha"]
    assert a.n_readers == 4 and a["malignancy"] == (4, 2, 4, 2) and a["texture"] == (5, 5, 4, 1)
    assert a["lobulation"] == ()  # a column the file lacks
    b = derive_labels(cubes["b_dcm_0.mha"])
    assert b.n_readers == 0 and b.label_mean == "unknown" and b.label_max_vote == "unknown"
    assert b.texture is None and b.calcified is None and b.mean_malignancy is None


@pytest.mark.parametrize(
    "change, match",
    [
        ({"malignancy_ratings": "4;x;2"}, "integers"),
        ({"malignancy_ratings": "4;6;2"}, "1-5"),
        ({"calcification": "6;7;6"}, "1-6"),
        ({"texture": "5;5"}, "2 texture ratings for 3 readers"),
        ({"n_readers": "4"}, "n_readers"),
        ({"cube": ""}, "empty cube"),
    ],
)
def test_bad_rows(tmp_path, change, match):
    r = row("a.mha", [3, 3, 3])
    r.update(change)
    with pytest.raises(ValueError, match=match) as exc:
        read_reader_ratings(write_csv(tmp_path / "r.csv", [r]))
    assert "line 2" in str(exc.value) and "\n" not in str(exc.value)


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="missing column"):
        read_reader_ratings(write_csv(tmp_path / "r.csv", [{"cube": "a"}], header=["cube", "texture"]))
    with pytest.raises(ValueError, match="twice"):
        read_reader_ratings(write_csv(tmp_path / "r.csv", [row("a", [1]), row("a", [2])]))


# --- derived labels ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratings, expected",
    [
        ([2, 3, 4], "indeterminate"),
        ([2, 3, 3], "benign"),
        ([3, 3, 4], "malignant"),
        ([1, 5], "indeterminate"),
        ([4, 2, 4, 2], "indeterminate"),
        ([5, 5, 3, 2], "malignant"),
        ([], "unknown"),
    ],
)
def test_mean_label(ratings, expected):
    assert mean_label(ratings) == expected


def test_max_vote_ties_go_to_the_lowest_rating():
    lab = derive_labels(cube(malignancy=[4, 2, 4, 2]))
    assert lab.max_vote_rating == 2 and lab.label_max_vote == "benign" and lab.label_mean == "indeterminate"
    assert "malignancy" in lab.ties
    lab = derive_labels(cube(malignancy=[5, 4, 4, 1]))
    assert lab.max_vote_rating == 4 and lab.label_max_vote == "malignant" and "malignancy" not in lab.ties
    assert lab.mean_malignancy == pytest.approx(3.5)
    assert lab.malignancy_distribution == (0.25, 0.0, 0.0, 0.5, 0.25)
    assert lab.agreement["malignancy"] == 0.5
    assert derive_labels(cube(malignancy=[3])).label_max_vote == "indeterminate"


@pytest.mark.parametrize(
    "code, expected", [(1, "ground-glass"), (2, "part-solid"), (3, "part-solid"), (4, "part-solid"), (5, "solid")]
)
def test_texture_classes(code, expected):
    assert texture_class(code) == expected


@pytest.mark.parametrize(
    "texture, expected",
    [
        ([5, 5, 4], "solid"),
        ([2, 3, 5], "part-solid"),
        ([1, 1, 5, 5], "ground-glass"),  # tie -> lower class
        ([4, 4, 5, 5], "part-solid"),
        ([1, 2, 3], "part-solid"),
        ([5], "solid"),
    ],
)
def test_texture_majority(texture, expected):
    assert derive_labels(cube(malignancy=[3] * len(texture), texture=texture)).texture == expected


@pytest.mark.parametrize(
    "calc, calcified, benign",
    [
        ([6, 6, 6], False, False),
        ([3, 3, 6], True, True),
        ([3, 6], False, False),  # a tie is not calcified
        ([4, 4, 6], True, False),  # non-central: not a benign pattern
        ([1, 2, 5, 6], True, True),
        ([4, 3, 6], True, False),
    ],
)
def test_calcification(calc, calcified, benign):
    lab = derive_labels(cube(malignancy=[3] * len(calc), calcification=calc))
    assert (lab.calcified, lab.benign_calcification) == (calcified, benign)


def test_spiculation_and_margin_are_ordinal_majorities():
    lab = derive_labels(cube(malignancy=[3, 3, 3, 3], spiculation=[1, 3, 3, 5], margin=[2, 4, 2, 4]))
    assert lab.spiculation == 3 and lab.spiculation_mean == 3.0
    assert lab.margin == 2 and lab.margin_mean == 3.0 and "margin" in lab.ties


def test_majority_helper():
    assert majority([]) is None
    assert majority([3, 1, 3, 1]) == 1
    assert majority(["solid", "part-solid"], order=["ground-glass", "part-solid", "solid"].index) == "part-solid"


def test_labels_for_accepts_mapping_or_iterable():
    c = cube(malignancy=[1, 2])
    assert list(labels_for({"c.mha": c})) == list(labels_for([c])) == ["c.mha"]


# --- agreement -----------------------------------------------------------------------------


def test_texture_agreement_leave_one_out():
    cubes = [
        cube(malignancy=[3] * 4, texture=[5, 5, 5, 1]),  # 3 of 4 agree with the others' majority
        cube(malignancy=[3] * 3, texture=[5, 1, 5]),  # others tied for readers 1 and 3: 1/2 each; reader 2: 0
        cube(malignancy=[3] * 2, texture=[5, 4]),  # two readers who disagree: 0
        cube(malignancy=[3], texture=[5]),  # one reader: skipped
    ]
    tasks = [t for t in AGREEMENT_TASKS if t.name == "texture"]
    a = agreement_rates(cubes, tasks)["texture"]
    assert a.n_pairs == 9 and a.n_cubes == 3
    assert a.rate == pytest.approx((3 + 1 + 0) / 9)
    assert a.rate_per_cube == pytest.approx((0.75 + 1 / 3 + 0) / 3)
    assert a.within_one is None


def test_ordinal_agreement_within_one():
    c = cube(malignancy=[1, 2, 2, 4], spiculation=[1, 1, 1, 1])
    r = agreement_rates([c])
    # reader 1 (1): others 2,2,4 -> 2: miss, within one; readers 2, 3 (2): others {1,2,4} tied -> 1/3 each,
    # within one 2/3 each; reader 4 (4): others 1,2,2 -> 2: miss, not within one
    assert r["malignancy"].rate == pytest.approx((0 + 1 / 3 + 1 / 3 + 0) / 4)
    assert r["malignancy"].within_one == pytest.approx((1 + 2 / 3 + 2 / 3 + 0) / 4)
    assert r["spiculation"].rate == 1.0 and r["spiculation"].within_one == 1.0
    assert r["malignancy_class"].rate == pytest.approx((1 + 1 + 1 + 0) / 4)


def test_malignancy_mean_agreement():
    c = cube(malignancy=[2, 2, 4, 3])
    r = agreement_rates([c])
    # reader 1: others 2,4,3 mean 3 -> skipped (likewise reader 2); reader 3 (malignant): others 2,2,3 -> benign: miss;
    # reader 4 (3): others 2,2,4 -> benign: a 3 is no benign call: miss, and left out of 'decided'
    assert (r["malignancy_mean"].rate, r["malignancy_mean"].n_pairs) == (0.0, 2)
    assert (r["malignancy_mean_decided"].rate, r["malignancy_mean_decided"].n_pairs) == (0.0, 1)
    r = agreement_rates([cube(malignancy=[1, 2, 1, 5])])
    assert r["malignancy_mean"].rate == pytest.approx(3 / 4)


def test_agreement_needs_two_readers():
    with pytest.raises(ValueError, match="two or more readers"):
        agreement_rates([cube(malignancy=[3], texture=[5])])
    assert set(agreement_rates([cube(malignancy=[2, 4])])) == {
        "malignancy_mean",
        "malignancy_mean_decided",
        "malignancy_class",
        "malignancy",
    }  # no other ratings


def test_format_agreement():
    text = format_agreement(
        agreement_rates(
            [
                cube(
                    malignancy=[1, 2, 5],
                    texture=[5, 5, 1],
                    spiculation=[1, 2, 1],
                    margin=[5, 5, 4],
                    calcification=[6, 6, 6],
                )
            ]
        )
    )
    assert (
        text.splitlines()[0].startswith("task")
        and "texture" in text
        and len(text.splitlines()) == 1 + len(AGREEMENT_TASKS)
    )


# --- the real file -------------------------------------------------------------------------


@pytest.mark.data
def test_real_reader_ratings():
    p = data_path("ct_nodule_cubes", "reader_ratings.csv")
    cubes = read_reader_ratings(p)
    labels = labels_for(cubes)
    assert len(cubes) == 985 and sum(c.n_readers > 0 for c in cubes.values()) == 979
    # the data README's counts, and the file's own derived columns, cube by cube
    assert Counter(v.label_mean for v in labels.values()) == {
        "benign": 456,
        "malignant": 380,
        "indeterminate": 143,
        "unknown": 6,
    }
    with open(p, newline="") as f:
        for r in csv.DictReader(f):
            lab = labels[r["cube"]]
            assert lab.label_mean == r["diagnosis_mean"], r["cube"]
            if r["mean_malignancy"]:
                assert lab.mean_malignancy == pytest.approx(float(r["mean_malignancy"]), abs=5e-4)
    # the max vote reproduces nodules.csv's malignancy_rating wherever it is given
    with open(data_path("ct_nodule_cubes", "nodules.csv"), newline="") as f:
        given = {r["cube"]: int(r["malignancy_rating"]) for r in csv.DictReader(f) if r["malignancy_rating"]}
    both = [c for c in given if c in labels and labels[c].max_vote_rating is not None]
    assert len(both) > 800 and all(labels[c].max_vote_rating == given[c] for c in both)
    rates = agreement_rates(cubes)
    print("\n" + format_agreement(rates))
    for a in rates.values():
        assert 0.2 < a.rate < 1.0 and a.n_cubes > 700
    assert 0.6 < rates["texture"].rate < 0.9
