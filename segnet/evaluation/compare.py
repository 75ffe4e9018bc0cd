"""Two evaluations of the same cases, compared case by case.

Two models scored on the same held-out cases usually differ by much less than the cases differ
from one another, so their two means say little about which is better. The differences case by
case say more: for each class and metric this module gives the mean of ``candidate -
baseline`` over the cases, its standard error, how many cases got better and how many worse,
and the two-sided Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``), which assumes
nothing about the shape of the differences. It is how recipe changes, ensembles and inference
precisions are judged in the README.

Each side is an evaluation folder (``<run>/evaluation/<checkpoint>``, holding
``per_case.csv``) or the ``per_case.csv`` itself. Both must hold the same cases and classes:
a paired comparison of different cases would compare the cases, not the models. A (case,
class) pair that either side leaves out of its statistics (``both_empty``: the class is in
neither the prediction nor the reference) or scores as non-finite (a distance to an empty
mask) is left out of that metric, and the count of pairs used is printed.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segnet.errors import RunDirError, UserError, shortened

PER_CASE = "per_case.csv"
# Whether a larger value is the better one, for the metrics per_case.csv holds.
HIGHER_IS_BETTER = {
    "dice": True,
    "iou": True,
    "nsd": True,
    "hd95_mm": False,
    "assd_mm": False,
}
DEFAULT_METRICS = ("dice", "hd95_mm")

Scores = dict[tuple[str, int], dict[str, float]]  # (case, class) -> metric -> value


@dataclass(frozen=True)
class PairedDifference:
    """``candidate - baseline`` for one class and metric over the cases both score.

    Attributes:
        label: the class.
        metric: a column of per_case.csv, e.g. ``dice``.
        cases: the paired cases used.
        baseline: the baseline's mean over them.
        candidate: the candidate's mean over them.
        mean: the mean difference, candidate minus baseline.
        standard_error: the standard error of ``mean`` (sample std / sqrt(cases)); NaN for
            fewer than two cases.
        better: cases where the candidate is better (by the metric's direction).
        worse: cases where it is worse; the rest are ties.
        p_value: two-sided Wilcoxon signed-rank p-value; None where every difference is 0 or
            there are fewer than two cases.
    """

    label: int
    metric: str
    cases: int
    baseline: float
    candidate: float
    mean: float
    standard_error: float
    better: int
    worse: int
    p_value: float | None


def evaluation_csv(path: Path) -> Path:
    """The per_case.csv of an evaluation folder (or the file itself).

    Raises:
        RunDirError: there is none, with the evaluation folders found under a run directory.
    """
    if path.is_file():
        return path
    candidate = path / PER_CASE
    if candidate.is_file():
        return candidate
    inside = sorted(p.parent for p in path.glob(f"evaluation/*/{PER_CASE}"))
    if inside:
        names = shortened([str(p) for p in inside], 4)
        raise RunDirError(
            f"{path}: a run directory, not an evaluation; name one of its evaluations: {names}"
        )
    raise RunDirError(
        f"{path}: no {PER_CASE} here; pass an evaluation folder (<run>/evaluation/<name>, "
        "written by scripts/evaluate.py) or its per_case.csv"
    )


def read_scores(path: Path) -> Scores:
    """The per-case metrics of an evaluation; a pair left out of its statistics has none.

    Raises:
        RunDirError: the file is unreadable or not a per_case.csv segnet wrote.
    """
    csv_path = evaluation_csv(path)
    try:
        with csv_path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RunDirError(f"{csv_path}: cannot read it ({exc})") from None
    scores: Scores = {}
    try:
        for row in rows:
            key = (row["case"], int(row["class"]))
            if row.get("both_empty") == "True":
                scores[key] = {}  # in the evaluation, out of every statistic
                continue
            scores[key] = {
                m: float(row[m]) for m in HIGHER_IS_BETTER if row.get(m) not in (None, "")
            }
    except (KeyError, ValueError) as exc:
        raise RunDirError(
            f"{csv_path}: not a per_case.csv written by scripts/evaluate.py (bad {exc})"
        ) from None
    if not scores:
        raise RunDirError(f"{csv_path}: no scored cases in it")
    return scores


def read_class_names(path: Path) -> dict[int, str] | None:
    """The class names the evaluation's metrics.json recorded, if any."""
    import json

    metrics = evaluation_csv(path).with_name("metrics.json")
    try:
        names = json.loads(metrics.read_text()).get("class_names") or {}
        return {int(label): str(name) for label, name in names.items()} or None
    except (OSError, ValueError, AttributeError):
        return None  # names only decorate the table


def compare(
    baseline: Scores, candidate: Scores, metrics: Sequence[str] = DEFAULT_METRICS
) -> list[PairedDifference]:
    """Paired differences per class and metric, classes in order, metrics as given.

    Raises:
        UserError: the two evaluations do not hold the same cases and classes, or a metric
            is unknown.
    """
    unknown = [m for m in metrics if m not in HIGHER_IS_BETTER]
    if unknown:
        raise UserError(
            f"--metric {', '.join(unknown)}: not a per-case metric; choose from "
            f"{', '.join(HIGHER_IS_BETTER)}"
        )
    _check_same_cases(baseline, candidate)
    results = []
    for label in sorted({label for _, label in baseline}):
        keys = sorted(key for key in baseline if key[1] == label and key in candidate)
        for metric in metrics:
            pairs = [
                (baseline[key][metric], candidate[key][metric])
                for key in keys
                if metric in baseline[key] and metric in candidate[key]
            ]
            pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
            if pairs:
                results.append(_paired(label, metric, np.array(pairs)))
    return results


def _check_same_cases(baseline: Scores, candidate: Scores) -> None:
    cases = {case for case, _ in baseline}, {case for case, _ in candidate}
    only = [sorted(cases[0] - cases[1]), sorted(cases[1] - cases[0])]
    if only[0] or only[1]:
        parts = [
            f"{len(missing)} only in the {side} ({shortened(missing, 3)})"
            for side, missing in zip(("baseline", "candidate"), only)
            if missing
        ]
        raise UserError(
            f"the evaluations hold different cases: {'; '.join(parts)}; a paired comparison "
            "needs both scored on the same cases: evaluate both with the same --data"
        )


def _paired(label: int, metric: str, pairs: np.ndarray) -> PairedDifference:
    baseline, candidate = pairs[:, 0], pairs[:, 1]
    differences = candidate - baseline
    n = len(differences)
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    standard_error = float(np.std(differences, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return PairedDifference(
        label=label,
        metric=metric,
        cases=n,
        baseline=float(baseline.mean()),
        candidate=float(candidate.mean()),
        mean=float(differences.mean()),
        standard_error=standard_error,
        better=int(np.count_nonzero(sign * differences > 0)),
        worse=int(np.count_nonzero(sign * differences < 0)),
        p_value=_wilcoxon(differences),
    )


def _wilcoxon(differences: np.ndarray) -> float | None:
    from scipy import stats

    if len(differences) < 2 or not np.any(differences):
        return None
    return float(stats.wilcoxon(differences, zero_method="wilcox").pvalue)


def _figure(value: float, sign: str = "") -> str:
    """Four decimals; a difference too small for them in scientific notation, not as 0.0000."""
    if value != 0 and abs(value) < 5e-5:
        return f"{value:{sign}.1e}"
    return f"{value:{sign}.4f}"


def format_table(
    differences: Sequence[PairedDifference], class_names: dict[int, str] | None = None
) -> str:
    """The comparison as aligned text: one line per class and metric."""
    names = class_names or {}
    labels = {
        d.label: f"{d.label} ({names[d.label]})" if d.label in names else str(d.label)
        for d in differences
    }
    # The class column is as wide as its longest name ("1 (right ventricle)"), plus a space.
    width = max([len("class"), *map(len, labels.values())]) + 1
    header = (
        f"{'class':<{width}}{'metric':<9}{'cases':>6}{'baseline':>10}{'candidate':>11}"
        f"{'difference':>20}{'better':>8}{'worse':>7}{'p':>9}"
    )
    lines = [header]
    for d in differences:
        spread = f"{_figure(d.mean, '+')} ± {_figure(d.standard_error)}"
        p = "-" if d.p_value is None else f"{d.p_value:.3g}"
        lines.append(
            f"{labels[d.label]:<{width}}{d.metric:<9}{d.cases:>6}{d.baseline:>10.4f}"
            f"{d.candidate:>11.4f}{spread:>20}{d.better:>8}{d.worse:>7}{p:>9}"
        )
    lines.append(
        "difference: candidate - baseline, mean ± standard error over the paired cases; "
        "better/worse: cases that moved each way; p: two-sided Wilcoxon signed-rank"
    )
    return "\n".join(lines)
