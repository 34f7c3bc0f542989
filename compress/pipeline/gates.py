"""The recipe's gates, judged once the run is complete: a failed gate makes the run exit 3 (after
every artifact and the report are written)."""
from __future__ import annotations

from typing import Any

from ..recipe import Recipe


def check_gates(recipe: Recipe, dense: dict, final: dict, summary: dict) -> dict:
    g = recipe.gates
    failures: list[str] = []
    checked: dict[str, Any] = {}
    if g.max_accuracy_drop is not None:
        drop = dense["accuracy"] - final["accuracy"]
        checked["accuracy_drop"] = drop
        if drop > g.max_accuracy_drop:
            failures.append(f"accuracy drop {drop:.2f} pp > max_accuracy_drop {g.max_accuracy_drop}")
    if g.min_speedup is not None:
        rows = [r for r in summary.get("benchmark", []) if "speedup" in r]
        if not rows:
            failures.append("min_speedup set but no benchmark stage measured a speedup")
        else:
            sp = rows[0]["speedup"]
            checked["speedup"] = sp
            if sp < g.min_speedup:
                failures.append(f"speedup {sp:.3f} < min_speedup {g.min_speedup} "
                                f"({rows[0]['backend']}, batch {rows[0]['batch_size']})")
    if g.max_parity_error is not None:
        err = summary.get("export", {}).get("parity_max_abs_error")
        if err is None:
            failures.append("max_parity_error set but no export stage measured parity")
        else:
            checked["parity_max_abs_error"] = err
            if err > g.max_parity_error:
                failures.append(f"parity error {err:.3g} > max_parity_error {g.max_parity_error}")
    if g.max_int8_accuracy_drop is not None:
        acc8 = summary.get("export", {}).get("int8_accuracy")
        if acc8 is None:
            failures.append("max_int8_accuracy_drop set but no export stage wrote an int8 model (onnx.int8)")
        else:
            drop = final["accuracy"] - acc8
            checked["int8_accuracy_drop"] = drop
            if drop > g.max_int8_accuracy_drop:
                failures.append(f"int8 accuracy drop {drop:.2f} pp > max_int8_accuracy_drop {g.max_int8_accuracy_drop}")
    return {"passed": not failures, "failures": failures, "checked": checked}
