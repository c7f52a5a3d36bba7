"""The JSON reports' schema, declared once (docs/report-schema.md explains each field).

A spec is a type, a tuple of types (any of them), a ``dict`` of key to spec (these keys required, others
allowed: a report may carry more), or a one-element ``list`` (every item matches the spec). :func:`problems`
checks a report against its kind's spec; the test suite checks every report it writes.
"""

from __future__ import annotations

SCHEMA_VERSION = 2      # 1: the reports before schema_version was written (read as such)

NUMBER = (int, float)
OPTIONAL_NUMBER = (int, float, type(None))
VERDICT = {"method": str, "suspicion": OPTIONAL_NUMBER, "verdict": str, "target_class": (int, type(None)),
           "threshold": NUMBER, "basis": str}
SCAN = {
    "schema_version": int, "kind": str,
    "model": {"path": str, "sha256": str, "opset": int, "input": dict},
    "config": {"mode": str, "samples": int, "score": str, "selection": str, "preset": str, "seed": int,
               "device_used": str, "verdict": (dict, type(None))},
    "layers": [{"name": str, "channels": int, "depthwise": bool, "scores": [[NUMBER]], "shift": [[NUMBER]],
                "flagged": [int], "selection": dict}],
    "summary": {"layers_tested": int, "channels_tested": int, "flagged": int, "flagged_fraction": NUMBER,
                "degenerate_layers": [str], "skipped_layers": [str], "clean_accuracy": NUMBER,
                "suspicion": OPTIONAL_NUMBER, "verdict": (str, type(None))},
    "verdict": (dict, type(None)),
    "trace": (dict, type(None)),
    "timing": {"total_s": NUMBER},
    "resources": dict,
}
REPAIR = {
    "schema_version": int, "kind": str,
    "model": {"path": str, "sha256": str},
    "output": (dict, type(None)),
    "method": str,
    "config": {"method": str, "epochs": int, "seed": int, "device_used": str},
    "flagged": {"source": str, "count": int, "channels_total": int, "layers": dict},
    "data": {"images": int, "train": int, "holdout": int},
    "accuracy": {"before": OPTIONAL_NUMBER, "after_removal": OPTIONAL_NUMBER, "after": OPTIONAL_NUMBER},
    "epochs": [dict],
    "verification": {"checker": str, "ort_provider": str, "max_abs_logit_difference": NUMBER,
                     "removed_exactly_zero": bool},
    "self_check": (dict, type(None)),
    "warnings": [str],
    "timing": {"total_s": NUMBER},
}
SELF_CHECK = {"status": str, "before": (dict, type(None)), "after": VERDICT, "escalation": (dict, type(None)),
              "patch": (dict, type(None))}
METRICS = {"acc": NUMBER, "asr": OPTIONAL_NUMBER, "ra": OPTIONAL_NUMBER, "clean_images": int, "attack_images": int}
EVALUATION = {
    "schema_version": int, "kind": str,
    "model": {"path": str, "sha256": str},
    "metrics": METRICS,
    "baseline": (dict, type(None)),
    "der": OPTIONAL_NUMBER,
    "config": dict,
}
COMPARISON = {
    "schema_version": int, "kind": str,
    "model": {"path": str, "sha256": str},
    "baseline": METRICS,
    "config": dict,
    "methods": [{"method": str, "metrics": (dict, type(None)), "der": OPTIONAL_NUMBER, "removed": (int, type(None)),
                 "seconds": NUMBER, "error": (str, type(None)), "repair": (dict, type(None))}],
}
KINDS = {"scan": SCAN, "repair": REPAIR, "evaluation": EVALUATION, "comparison": COMPARISON}


def _check(value, spec, where: str, found: list[str]) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            found.append(f"{where}: expected an object, got {type(value).__name__}")
            return
        for key, inner in spec.items():
            if key not in value:
                found.append(f"{where}.{key}: missing")
            else:
                _check(value[key], inner, f"{where}.{key}", found)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            found.append(f"{where}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]", found)
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        # JSON has no bool/int distinction worth trusting the other way: a bool is not a number here
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            found.append(f"{where}: expected {names}, got {type(value).__name__}")


def problems(report: dict) -> list[str]:
    """What in ``report`` (a scan, repair, evaluation or comparison report as JSON gives it) does not match its
    schema; empty when it matches."""
    if not isinstance(report, dict):
        return ["the report is not a JSON object"]
    kind = report.get("kind")
    if kind not in KINDS:
        return [f"kind: expected one of {', '.join(KINDS)}, got {kind!r}"]
    found: list[str] = []
    _check(report, KINDS[kind], "report", found)
    if report.get("schema_version") != SCHEMA_VERSION:
        found.append(f"schema_version: expected {SCHEMA_VERSION}, got {report.get('schema_version')!r}")
    if kind == "scan" and isinstance(report.get("verdict"), dict):
        _check(report["verdict"], VERDICT, "report.verdict", found)
    if kind == "repair" and isinstance(report.get("self_check"), dict):
        _check(report["self_check"], SELF_CHECK, "report.self_check", found)
    if kind == "evaluation" and isinstance(report.get("baseline"), dict):
        _check(report["baseline"], {"path": str, "sha256": str, "metrics": METRICS}, "report.baseline", found)
    methods = report.get("methods") if kind == "comparison" else None
    for i, method in enumerate(methods if isinstance(methods, list) else []):
        if isinstance(method, dict) and isinstance(method.get("metrics"), dict):
            _check(method["metrics"], METRICS, f"report.methods[{i}].metrics", found)
        if isinstance(method, dict) and isinstance(method.get("repair"), dict):
            _check(method["repair"], REPAIR, f"report.methods[{i}].repair", found)
    return found
