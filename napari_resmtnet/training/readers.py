"""Every LIDC reader's ratings per nodule cube, the labels derived from them, and how often the
readers agree with each other.

The cubes' max-vote malignancy is one number per nodule; ``reader_ratings.csv`` keeps each
reader's ratings (3-7 readers) of malignancy and of the other LIDC characteristics. From them
this module derives the training and scoring labels (readers' mean, max vote, texture class,
calcification, spiculation and margin by majority, soft rating distributions) and the
inter-reader agreement rates that a model's accuracy on those labels should be compared with.

LIDC scales used here (LIDC-IDRI reader instructions, Armato et al. 2011):

* malignancy 1 highly unlikely ... 5 highly suspicious;
* texture 1 non-solid / ground-glass, 2-4 part-solid (mixed), 5 solid;
* calcification 1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central, 6 absent;
* spiculation 1 none ... 5 marked; margin 1 poorly defined ... 5 sharp;
* subtlety, sphericity, lobulation 1-5; internal structure 1 soft tissue ... 4 air.

Conventions (each chosen to match the data's own columns or a clinical rule, and tested):

* readers' mean label: benign if mean < 3, malignant if > 3, indeterminate if = 3 (exactly,
  in integers), as the file's ``diagnosis_mean`` and most LIDC papers;
* max vote: the most frequent rating, ties to the lowest, which reproduces the cubes'
  ``nodules.csv`` ``malignancy_rating`` on every cube where both exist; label benign 1-2,
  indeterminate 3, malignant 4-5;
* majority of any characteristic: the most frequent value (or class), ties to the lowest
  LIDC code, the same rule as the max vote; texture classes are ordered by their code
  (ground-glass < part-solid < solid);
* calcification present needs a strict majority of readers (a tie is 'absent'), because a
  calcified nodule is Lung-RADS category 1 and a tie should not downgrade it; the benign
  patterns for Lung-RADS (complete/solid, central, popcorn, concentric = laminated) likewise
  need a strict majority; non-central (eccentric) calcification is not a benign pattern.

Inter-reader agreement: for each cube with at least two readers and each of its readers,
does the reader's value agree with the majority of the *other* readers (leave one out)?
When the others are tied between k values, the reader scores 1/k if it is among them (the
expected agreement under a random tie-break), so no tie rule favours low or high values.
Readers are matched within a characteristic only; nothing here pairs a reader's malignancy
with the same reader's texture.
"""

from __future__ import annotations

import csv
import sys
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple

# characteristic -> (CSV column, allowed LIDC codes)
CHARACTERISTICS: dict[str, tuple[str, range]] = {
    "malignancy": ("malignancy_ratings", range(1, 6)),
    "subtlety": ("subtlety", range(1, 6)),
    "internalStructure": ("internalStructure", range(1, 5)),
    "calcification": ("calcification", range(1, 7)),
    "sphericity": ("sphericity", range(1, 6)),
    "margin": ("margin", range(1, 6)),
    "lobulation": ("lobulation", range(1, 6)),
    "spiculation": ("spiculation", range(1, 6)),
    "texture": ("texture", range(1, 6)),
}
TEXTURE_CLASSES = ("ground-glass", "part-solid", "solid")  # LIDC texture 1, 2-4, 5
CALCIFICATION_ABSENT = 6
BENIGN_CALCIFICATION = frozenset({1, 2, 3, 5})  # popcorn, laminated, solid, central
MALIGNANCY_CLASSES = ("benign", "indeterminate", "malignant")  # ratings 1-2, 3, 4-5


@dataclass(frozen=True)
class CubeRatings:
    """One cube's ratings: per characteristic, one LIDC code per reader (in file order).
    A characteristic the file leaves empty has an empty tuple."""

    cube: str
    seriesuid: str
    ratings: Mapping[str, tuple[int, ...]]

    @property
    def n_readers(self) -> int:
        return len(self.ratings.get("malignancy", ()))

    def __getitem__(self, characteristic: str) -> tuple[int, ...]:
        return self.ratings.get(characteristic, ())


def texture_class(code: int) -> str:
    """LIDC texture code -> 'ground-glass' (1), 'part-solid' (2-4) or 'solid' (5)."""
    if code == 1:
        return "ground-glass"
    if 2 <= code <= 4:
        return "part-solid"
    if code == 5:
        return "solid"
    raise ValueError(f"LIDC texture must be 1-5, got {code!r}")


def malignancy_class(rating: int) -> str:
    """One reader's malignancy rating -> 'benign' (1-2), 'indeterminate' (3), 'malignant' (4-5)."""
    if rating in (1, 2):
        return "benign"
    if rating == 3:
        return "indeterminate"
    if rating in (4, 5):
        return "malignant"
    raise ValueError(f"LIDC malignancy must be 1-5, got {rating!r}")


def mean_label(ratings: Iterable[int]) -> str:
    """Readers'-mean label: benign if the mean rating < 3, malignant if > 3, indeterminate
    if exactly 3 (compared in integers, so 3 readers of 2, 3, 4 are indeterminate), and
    'unknown' without ratings."""
    r = list(ratings)
    if not r:
        return "unknown"
    s, n = sum(r), 3 * len(r)
    return "benign" if s < n else "malignant" if s > n else "indeterminate"


def majority(values: Iterable, order: Callable | None = None):
    """The most frequent value, ties to the lowest (by ``order``); None for no values."""
    c = Counter(values)
    if not c:
        return None
    top = max(c.values())
    return min((v for v, k in c.items() if k == top), key=order)


def _modes(values) -> list:
    c = Counter(values)
    top = max(c.values())
    return [v for v, k in c.items() if k == top]


def _strict_majority(flags: list[bool]) -> bool | None:
    return None if not flags else sum(flags) * 2 > len(flags)


def _mean(values) -> float | None:
    return float(Fraction(sum(values), len(values))) if values else None


@dataclass(frozen=True)
class CubeLabels:
    """Labels of one cube derived from all its readers (None where the file has no ratings).

    ``malignancy_distribution``: the fraction of readers per rating 1-5, a soft target.
    ``majority``: the majority LIDC code of every characteristic. ``agreement``: per
    characteristic (and 'texture' as classes), the fraction of readers whose value equals the
    majority, usable as a per-cube training weight. ``ties``: characteristics whose majority
    was a tie broken by rule.
    """

    cube: str
    n_readers: int
    mean_malignancy: float | None
    label_mean: str
    max_vote_rating: int | None
    label_max_vote: str
    malignancy_distribution: tuple[float, ...] | None
    texture: str | None
    calcified: bool | None
    benign_calcification: bool | None
    spiculation: int | None
    margin: int | None
    spiculation_mean: float | None
    margin_mean: float | None
    majority: Mapping[str, int | None] = field(default_factory=dict)
    agreement: Mapping[str, float | None] = field(default_factory=dict)
    ties: frozenset = frozenset()


def derive_labels(cube: CubeRatings) -> CubeLabels:
    """All per-cube labels of the module's conventions from one cube's ratings."""
    mal = cube["malignancy"]
    maj, agree, ties = {}, {}, set()
    for name in CHARACTERISTICS:
        vals = cube[name]
        maj[name] = majority(vals)
        agree[name] = (vals.count(maj[name]) / len(vals)) if vals else None
        if vals and len(_modes(vals)) > 1:
            ties.add(name)
    tex = [texture_class(v) for v in cube["texture"]]
    tex_major = majority(tex, order=TEXTURE_CLASSES.index)
    agree["texture_class"] = tex.count(tex_major) / len(tex) if tex else None
    if tex and len(_modes(tex)) > 1:
        ties.add("texture_class")
    calc = cube["calcification"]
    max_vote = maj["malignancy"]
    return CubeLabels(
        cube=cube.cube,
        n_readers=len(mal),
        mean_malignancy=_mean(mal),
        label_mean=mean_label(mal),
        max_vote_rating=max_vote,
        label_max_vote="unknown" if max_vote is None else malignancy_class(max_vote),
        malignancy_distribution=tuple(mal.count(k) / len(mal) for k in range(1, 6)) if mal else None,
        texture=tex_major,
        calcified=_strict_majority([v != CALCIFICATION_ABSENT for v in calc]),
        benign_calcification=_strict_majority([v in BENIGN_CALCIFICATION for v in calc]),
        spiculation=maj["spiculation"],
        margin=maj["margin"],
        spiculation_mean=_mean(cube["spiculation"]),
        margin_mean=_mean(cube["margin"]),
        majority=maj,
        agreement=agree,
        ties=frozenset(ties),
    )


# --- reading -------------------------------------------------------------------------------


def _codes(text: str | None, name: str, allowed: range, where: str) -> tuple[int, ...]:
    text = (text or "").strip()
    if not text:
        return ()
    try:
        codes = tuple(int(t) for t in text.split(";"))
    except ValueError:
        raise ValueError(f"{where}: {name} must be ';'-separated integers, got {text!r}") from None
    bad = [c for c in codes if c not in allowed]
    if bad:
        raise ValueError(f"{where}: {name} must be in {allowed.start}-{allowed.stop - 1}, got {bad[0]}")
    return codes


def read_reader_ratings(path) -> dict[str, CubeRatings]:
    """Read ``reader_ratings.csv`` into {cube file name (as in ``nodules.csv``): CubeRatings}.

    Only ``cube`` and ``malignancy_ratings`` are required; any characteristic column that is
    present is read and checked (codes in the LIDC range, one per reader, ``n_readers``
    consistent). Raises ValueError with the offending line for malformed content.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        missing = {"cube", "malignancy_ratings"} - cols
        if missing:
            raise ValueError(f"{path.name}: missing column(s) {', '.join(sorted(missing))}")
        out: dict[str, CubeRatings] = {}
        for line, row in enumerate(reader, start=2):
            cube = (row.get("cube") or "").strip()
            where = f"{path.name} line {line}"
            if not cube:
                raise ValueError(f"{where}: empty cube name")
            if cube in out:
                raise ValueError(f"{where}: cube {cube} listed twice")
            ratings = {}
            for name, (col, allowed) in CHARACTERISTICS.items():
                if col in cols:
                    ratings[name] = _codes(row.get(col), name, allowed, where)
            n = len(ratings["malignancy"])
            for name, vals in ratings.items():
                if vals and n and len(vals) != n:
                    raise ValueError(f"{where}: {len(vals)} {name} ratings for {n} readers")
            declared = (row.get("n_readers") or "").strip()
            if declared and declared != str(n):
                raise ValueError(f"{where}: n_readers is {declared} but {n} malignancy ratings are given")
            out[cube] = CubeRatings(cube=cube, seriesuid=(row.get("seriesuid") or "").strip(), ratings=ratings)
    return out


def labels_for(cubes: Mapping[str, CubeRatings] | Iterable[CubeRatings]) -> dict[str, CubeLabels]:
    """{cube: CubeLabels} for a mapping from ``read_reader_ratings`` or any iterable of cubes."""
    items = cubes.values() if isinstance(cubes, Mapping) else cubes
    return {c.cube: derive_labels(c) for c in items}


# --- inter-reader agreement ----------------------------------------------------------------


class Task(NamedTuple):
    """What to compare: a characteristic, how one reader's code becomes a class, whether the
    classes are ordinal (then 'within one' is reported too), and how the other readers are
    pooled ('majority', or 'mean' / 'mean_decided' for the readers'-mean malignancy label)."""

    name: str
    characteristic: str
    to_class: Callable[[int], object]
    ordinal: bool = False
    pool: str = "majority"


def _identity(v):
    return v


AGREEMENT_TASKS: tuple[Task, ...] = (
    Task("malignancy_mean", "malignancy", malignancy_class, pool="mean"),
    Task("malignancy_mean_decided", "malignancy", malignancy_class, pool="mean_decided"),
    Task("malignancy_class", "malignancy", malignancy_class),
    Task("malignancy", "malignancy", _identity, ordinal=True),
    Task("texture", "texture", texture_class),
    Task("calcification", "calcification", lambda v: v != CALCIFICATION_ABSENT),
    Task("benign_calcification", "calcification", lambda v: v in BENIGN_CALCIFICATION),
    Task("spiculation", "spiculation", _identity, ordinal=True),
    Task("margin", "margin", _identity, ordinal=True),
)


@dataclass(frozen=True)
class Agreement:
    """Leave-one-out agreement for one task.

    ``rate``: mean over (cube, reader) pairs of the reader's agreement with the others.
    ``rate_per_cube``: each cube's mean over its readers, averaged over cubes (every nodule
    weighs the same, as in a model's accuracy). ``within_one``: the same as ``rate`` but
    counting a difference of one code as agreement (ordinal tasks only).
    """

    task: str
    rate: float
    rate_per_cube: float
    within_one: float | None
    n_pairs: int
    n_cubes: int


def _credit(mine, others_modes, within_one=False) -> float:
    if within_one:
        return sum(abs(mine - m) <= 1 for m in others_modes) / len(others_modes)
    return (mine in others_modes) / len(others_modes)


def agreement_rates(
    cubes: Mapping[str, CubeRatings] | Iterable[CubeRatings], tasks: Iterable[Task] = AGREEMENT_TASKS
) -> dict[str, Agreement]:
    """Inter-reader agreement of each task over a set of cubes (see the module docstring).

    For 'mean' tasks the reader's own class (rating < 3 benign, > 3 malignant, 3
    indeterminate) is compared with the readers'-mean label of the others, over the cubes
    where that label is benign or malignant (a reader's 3 then counts as disagreement);
    'mean_decided' does the same over the readings that are not 3, the analogue of a
    benign-vs-malignant classifier, which always decides.
    Cubes with fewer than two readers of a characteristic are skipped, and a task with no
    such cube is left out of the result.
    """
    items = list(cubes.values() if isinstance(cubes, Mapping) else cubes)
    out = {}
    for task in tasks:
        credits, near, per_cube = [], [], []
        for cube in items:
            vals = cube[task.characteristic]
            if len(vals) < 2:
                continue
            cube_credits = []
            for i, v in enumerate(vals):
                others = vals[:i] + vals[i + 1 :]
                if task.pool in ("mean", "mean_decided"):
                    target = mean_label(others)
                    if target not in ("benign", "malignant"):
                        continue
                    if task.pool == "mean_decided" and task.to_class(v) not in ("benign", "malignant"):
                        continue
                    c = float(task.to_class(v) == target)
                else:
                    modes = _modes([task.to_class(o) for o in others])
                    c = _credit(task.to_class(v), modes)
                    if task.ordinal:
                        near.append(_credit(task.to_class(v), modes, within_one=True))
                cube_credits.append(c)
            if cube_credits:
                credits.extend(cube_credits)
                per_cube.append(sum(cube_credits) / len(cube_credits))
        if not credits:
            continue
        out[task.name] = Agreement(
            task=task.name,
            rate=sum(credits) / len(credits),
            rate_per_cube=sum(per_cube) / len(per_cube),
            within_one=(sum(near) / len(near)) if task.ordinal else None,
            n_pairs=len(credits),
            n_cubes=len(per_cube),
        )
    if not out:
        raise ValueError("no cube with two or more readers of any characteristic: no agreement to measure")
    return out


def format_agreement(rates: Mapping[str, Agreement]) -> str:
    """A plain-text table of agreement rates, for logs, the evaluation printout or a report."""
    lines = [f"{'task':<25}{'per reading':>12}{'per cube':>10}{'within 1':>10}{'readings':>10}{'cubes':>7}"]
    for a in rates.values():
        w = "" if a.within_one is None else f"{a.within_one:.3f}"
        lines.append(f"{a.task:<25}{a.rate:>12.3f}{a.rate_per_cube:>10.3f}{w:>10}{a.n_pairs:>10}{a.n_cubes:>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m napari_resmtnet.training.readers [reader_ratings.csv]``: print label counts and the
    inter-reader agreement over every cube of the file."""
    argv = sys.argv[1:] if argv is None else argv
    path = (
        Path(argv[0])
        if argv
        else Path(__file__).resolve().parents[2] / "shared" / "data" / "ct_nodule_cubes" / "reader_ratings.csv"
    )
    cubes = read_reader_ratings(path)
    labels = labels_for(cubes)
    print(f"{path}: {len(cubes)} cubes, {sum(c.n_readers > 0 for c in cubes.values())} with reader ratings")
    for attr in ("label_mean", "label_max_vote", "texture", "calcified"):
        print(f"  {attr}: {dict(sorted(Counter(str(getattr(v, attr)) for v in labels.values()).items()))}")
    print(format_agreement(agreement_rates(cubes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
