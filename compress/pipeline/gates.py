"""The recipe's gates, judged once the run is complete: a failed gate makes the run exit 3 (after
every artifact and the report are written).

Defaults (``compress.recipe.Gates``): ``max_accuracy_drop: 1.0`` and ``max_parity_error: 1e-4`` are
on unless the recipe sets them to ``null``; the parity gate is *not applicable* (reported, not
failed) in a recipe without an export stage unless the recipe set it explicitly (then the recipe
loader refuses the recipe). A gate whose value is NaN or infinite fails. The accuracy-drop gate
also fails when the final model scores at chance level (within ``CHANCE_MARGIN`` points of always
predicting the commonest test class): a model that learned nothing must not pass because its dense
reference is as bad. A search stage whose chosen model missed its measured budget fails the run.

The result says which gates were checked (value, limit, rule, passed), which were skipped and why,
and any warnings (``gates.warnings``)."""
from __future__ import annotations

import math
from typing import Any

from ..io import as_number

CHANCE_MARGIN = 2.0  # percentage points above chance that still count as "at chance"
PARITY_DEFAULT_NOTE = "not applicable: the recipe has no export stage (the default applies when it exports)"


def chance_level(labels, num_classes: int) -> float:
    """Accuracy (%) of always predicting the commonest label in ``labels`` (at least 100/num_classes)."""
    import torch

    y = torch.as_tensor(labels).flatten().long()
    if y.numel() == 0:
        return 100.0 / max(1, num_classes)
    common = int(torch.bincount(y).max()) / y.numel()
    return 100.0 * max(common, 1.0 / max(1, num_classes))


def at_chance(accuracy: float, chance: float) -> bool:
    return accuracy <= chance + CHANCE_MARGIN


def _finite(v: Any) -> bool:
    v = as_number(v)
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any, spec: str) -> str:
    v = as_number(v)
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


class _Judge:
    def __init__(self):
        self.failures: list[str] = []
        self.checked: dict[str, Any] = {}
        self.results: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}

    def check(self, gate: str, key: str, value: Any, limit: float, rule: str, message: str,
              note: str | None = None) -> None:
        """``rule`` is ``<=`` (value at most limit), ``>=`` or ``>``; non-finite values fail."""
        value = as_number(value)
        if not _finite(value):
            ok = False
            message = f"{message} (not a number: a NaN or infinite value fails every gate)"
        else:
            ok = value <= limit if rule == "<=" else value >= limit if rule == ">=" else value > limit
        self.checked[key] = value
        row = {"gate": gate, "value": value, "rule": rule, "limit": limit, "passed": ok}
        if note:
            row["note"] = note
        self.results.append(row)
        if not ok:
            self.failures.append(message)


def check_gates(recipe, dense: dict, final: dict, summary: dict, chance: float | None = None) -> dict:
    """Judge ``recipe.gates`` on the dense and final metrics and the summary blocks of the stages.
    ``chance`` (accuracy % of a constant predictor on the test split) enables the at-chance check."""
    g = recipe.gates
    explicit = g.model_fields_set
    j = _Judge()
    warnings: list[str] = []

    d_acc, f_acc = dense.get("accuracy"), final.get("accuracy")
    task = getattr(recipe, "task", None)
    primary = task.primary if task is not None else "accuracy"
    # max_metric_drop judges the task's primary metric; max_accuracy_drop is its alias (and default)
    gate = "max_metric_drop" if g.max_metric_drop is not None else "max_accuracy_drop"
    limit = g.max_metric_drop if g.max_metric_drop is not None else g.max_accuracy_drop
    d_m, f_m = dense.get(primary), final.get(primary)
    if limit is None:
        j.skipped[gate] = "off (null in the recipe)"
    elif d_m is None or f_m is None:
        j.skipped[gate] = f"no {primary} measured"
    else:
        drop = as_number(d_m) - as_number(f_m)
        j.check(gate, f"{primary}_drop", drop, limit, "<=",
                f"{primary} drop {_fmt(drop, '.2f')} points > {gate} {limit}",
                note=f"dense - final {primary}, points")
        if chance is not None and primary == "accuracy":
            floor = round(chance + CHANCE_MARGIN, 4)
            j.check(gate, "final_above_chance", f_acc, floor, ">",
                    f"final accuracy {_fmt(f_acc, '.2f')}% is at chance level ({chance:.2f}% for a constant "
                    f"prediction; needs > {floor:.2f}%): {gate} needs a model that learned something "
                    "(set gates.max_accuracy_drop: null to judge no accuracy)",
                    note="final accuracy must be above chance + 2 pp")
    if chance is not None and d_acc is not None and at_chance(as_number(d_acc), chance):
        warnings.append(f"the dense model scores {_fmt(d_acc, '.2f')}%, at chance level ({chance:.2f}% for a "
                        "constant prediction): accuracy-drop gates compare against a model that learned nothing; "
                        "set gates.min_accuracy for an absolute floor")

    if g.min_accuracy is None:
        j.skipped["min_accuracy"] = "off (not set)"
    elif f_acc is None:
        j.failures.append("min_accuracy set but no accuracy was measured")
    else:
        j.check("min_accuracy", "final_accuracy", f_acc, g.min_accuracy, ">=",
                f"final accuracy {_fmt(f_acc, '.2f')}% < min_accuracy {g.min_accuracy}%")

    if g.min_speedup is None:
        j.skipped["min_speedup"] = "off (not set)"
    else:
        rows = [r for r in summary.get("benchmark", []) if "speedup" in r]
        if not rows:
            j.failures.append("min_speedup set but no benchmark stage measured a speedup")
        else:
            sp = rows[0]["speedup"]
            j.check("min_speedup", "speedup", sp, g.min_speedup, ">=",
                    f"speedup {_fmt(sp, '.3f')} < min_speedup {g.min_speedup} "
                    f"({rows[0]['backend']}, batch {rows[0]['batch_size']})")

    exp = summary.get("export") or {}
    # relative to the largest logit where measured (equal to the absolute error while |logits| <= 1)
    key = "parity_max_rel_error" if "parity_max_rel_error" in exp else "parity_max_abs_error"
    err = exp.get(key)
    if g.max_parity_error is None:
        j.skipped["max_parity_error"] = ("off (null in the recipe)" if "max_parity_error" in explicit
                                         else PARITY_DEFAULT_NOTE)
    elif err is None:
        if "max_parity_error" in explicit:
            j.failures.append("max_parity_error set but no export stage measured parity")
        else:
            j.skipped["max_parity_error"] = "not applicable: no export stage measured parity"
    else:
        j.check("max_parity_error", key, err, g.max_parity_error, "<=",
                f"parity error {_fmt(err, '.3g')} > max_parity_error {g.max_parity_error}",
                note="max |ONNX Runtime - torch| / max(1, max |torch logit|)" if key == "parity_max_rel_error"
                else "max |ONNX Runtime - torch|")

    if g.max_int8_accuracy_drop is None:
        j.skipped["max_int8_accuracy_drop"] = "off (not set)"
    else:
        acc8 = (summary.get("export") or {}).get("int8_accuracy")
        if acc8 is None:
            j.failures.append("max_int8_accuracy_drop set but no export stage wrote an int8 model (onnx.int8)")
        elif f_acc is None:
            j.failures.append("max_int8_accuracy_drop set but no accuracy was measured")
        else:
            drop = as_number(f_acc) - as_number(acc8)
            j.check("max_int8_accuracy_drop", "int8_accuracy_drop", drop, g.max_int8_accuracy_drop, "<=",
                    f"int8 accuracy drop {_fmt(drop, '.2f')} pp > max_int8_accuracy_drop {g.max_int8_accuracy_drop}")

    search = summary.get("search") or {}
    if "within_budget" in search:  # always on: a search must not pass with a model over its budget
        value, limit = as_number(search.get("measured_ratio")), search.get("budget_limit_ratio")
        ok = bool(search["within_budget"]) and _finite(value)  # the stage's comparison in its own units
        j.checked["search_measured_ratio"] = value
        j.results.append({"gate": "search_budget", "value": value, "rule": "<=", "limit": limit, "passed": ok,
                          "note": f"chosen model / dense, measured ({search.get('budget_metric')})"})
        if not ok:
            j.failures.append(
                f"search: the chosen model ({search.get('chosen')}) measured {_fmt(value, '.3f')} x dense "
                f"{search.get('budget_metric')}, over its budget {search.get('budget_ratio')} x dense "
                f"(+{search.get('tolerance', 0):.0%} tolerance = {_fmt(limit, '.3f')} x)")

    return {"passed": not j.failures, "failures": j.failures, "checked": j.checked, "results": j.results,
            "skipped": j.skipped, "warnings": warnings}
