"""Fleet audits: scan (and repair) many models, one task each, on Ray when it is installed, else one after
another.

A fleet's source is a folder of ``.onnx`` files or a manifest (JSON or CSV) naming
each model with its own data, normalisation, scan and repair options. Every
model's report (JSON and HTML) goes into the output folder together with a small
record of what produced it (model sha256 and configuration), so a rerun skips the
models already audited the same way; the fleet's summary table is written as
JSON and CSV. A model that fails (corrupt file, unsupported op, wrong data) is
a row with its error, not the end of the fleet.

With a repair, each model is scanned as without one; then, always or only when
the scan says it needs attention (:func:`fmt_audit.report.json_report.attention`), repaired
with the channels that scan flagged (``--method fmt``) or by another method, and
written as ``NAME.repaired.onnx`` beside ``NAME.repair.json`` and ``.html``.

Workers compute; the driver writes: tasks return their reports as text and the
repaired model as bytes, so a Ray cluster needs the models and data readable
from its workers but not the output folder.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import numbers
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from fmt_audit.errors import ConfigError, FmtAuditError, first_line
from fmt_audit.fleet.ray_engine import (
    INSTALL_HINT,
    check_resources,
    node_cpus,
    ray_available,
    ray_session,
    task_error,
    task_options,
)
from fmt_audit.fmt.scan import ScanConfig
from fmt_audit.model.loading import model_files
from fmt_audit.model.outputs import check_output_path, write_atomic
from fmt_audit.report.html_report import PAGE_OPENING, REPAIR_TITLE, SCAN_TITLE
from fmt_audit.verdict import VerdictConfig

if TYPE_CHECKING:
    from fmt_audit.repair.config import RepairConfig
    from fmt_audit.verdict.evidence.transfer import ReferenceCache

# the verdict's options by their CLI and manifest names (VerdictConfig.from_options)
VERDICT_OPTION_TYPES = {"verdict": "str", "verdict_samples": "int", "margin_restarts": "int", "margin_steps": "int"}
# scan and verdict options a manifest may set per model (ScanConfig fields; the device is the fleet's)
PER_MODEL_OPTIONS = (*(f.name for f in fields(ScanConfig) if f.name not in ("device", "predict_with")),
                     *VERDICT_OPTION_TYPES)
SUMMARY_COLUMNS = ("model", "verdict", "suspicion", "target_class", "flagged", "channels", "seconds", "error",
                   "skipped", "sha256", "removed", "accuracy_before", "accuracy_after", "repaired", "self_check")
RECORD_SUFFIX = ".fleet.json"
REPAIRED_SUFFIX = ".repaired.onnx"
# a model's outputs besides its record: scan report, its page, repair report, its page, repaired model
OUTPUT_SUFFIXES = (".json", ".html", ".repair.json", ".repair.html", REPAIRED_SUFFIX)
SUMMARY_FILES = ("fleet.json", "fleet.csv")
REPAIR_WHEN = ("always", "suspicious")      # repair every model, or those whose scan needs attention


@dataclass(frozen=True)
class FleetModel:
    """One model of a fleet: where it is, its data, and the scan options it sets itself."""

    name: str                       # label, unique in the fleet (path relative to the source, no suffix)
    path: Path
    data: Path | None = None        # None: the fleet's data
    options: dict = field(default_factory=dict)


@dataclass
class FleetRow:
    """One model's line of the fleet summary."""

    model: str
    sha256: str | None = None
    verdict: str | None = None
    suspicion: float | None = None
    target_class: int | None = None     # the class the verdict points to
    flagged: int | None = None
    channels: int | None = None
    seconds: float | None = None
    error: str | None = None
    skipped: bool = False           # an earlier run's report of the same model and configuration was kept
    removed: int | None = None      # a repair's removed channels
    accuracy_before: float | None = None    # a repair's held-out clean accuracy, before and after
    accuracy_after: float | None = None
    repaired: str | None = None     # the repaired model's file name in the output folder
    self_check: str | None = None   # the repair's self-check: removed / not found / may persist / unknown

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FleetResult:
    rows: list[FleetRow]
    engine: str                     # "ray (N CPUs)" or "sequential (...)"
    seconds: float

    @property
    def failed(self) -> list[FleetRow]:
        return [row for row in self.rows if row.error]

    def to_dict(self) -> dict:
        return {"engine": self.engine, "seconds": round(self.seconds, 3), "models": len(self.rows),
                "failed": len(self.failed), "rows": [row.to_dict() for row in self.rows]}

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: "" if v is None else v for k, v in row.to_dict().items()})
        return out.getvalue()

    def format_text(self) -> str:
        repairs = any(row.repaired for row in self.rows)
        lines = [f"{'model':32s} {'verdict':17s} {'suspicion':>9s} {'flagged':>8s} "
                 + (f"{'removed':>7s} {'accuracy':>15s} " if repairs else "") + f"{'time s':>7s}  error"]
        for row in self.rows:
            suspicion = f"{row.suspicion:.3f}" if row.suspicion is not None else "–"
            flagged = f"{row.flagged}/{row.channels}" if row.flagged is not None else "–"
            seconds = f"{row.seconds:.1f}" if row.seconds is not None else "–"
            verdict = (row.verdict or "–") + (" (kept)" if row.skipped else "")
            repair = ""
            if repairs:
                accuracy = (f"{row.accuracy_before:.3f} -> {row.accuracy_after:.3f}"
                            if row.accuracy_before is not None and row.accuracy_after is not None else "–")
                repair = f"{'–' if row.removed is None else row.removed:>7} {accuracy:>15s} "
            lines.append(f"{row.model:32s} {verdict:17s} {suspicion:>9s} {flagged:>8s} {repair}{seconds:>7s}  "
                         f"{row.error or ''}".rstrip())
        lines.append(f"{len(self.rows)} models, {len(self.failed)} failed, "
                     f"{sum(r.skipped for r in self.rows)} kept from an earlier run; {self.engine}, "
                     f"{self.seconds:.1f} s")
        return "\n".join(lines)


# ---------------------------------------------------------------- reading a source


def _inside(folder: Path, relative: str, what: str) -> Path:
    """``folder / relative``, refused when absolute or resolving outside ``folder`` (manifests are data)."""
    if not relative or Path(relative).is_absolute():
        raise ConfigError(f"{what} {relative!r}: expected a path relative to the manifest's folder {folder}")
    path = (folder / relative)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ConfigError(f"{what} {relative!r} leads outside the manifest's folder {folder}")
    return path


@functools.cache
def repair_option_types() -> dict[str, str]:
    """The repair options a manifest may set per model, with their types (``repair_config``'s parameters)."""
    import inspect

    from fmt_audit.repair.config import repair_config

    return {name: str(parameter.annotation) for name, parameter in inspect.signature(repair_config).parameters.items()
            if name != "seed"}


def _entry_options(entry: dict, where: str) -> dict:
    if None in entry:   # a CSV row with more cells than the header has names
        raise ConfigError(f"{where}: more cells than the header has columns")
    allowed = ("model", "data", "class_output", *PER_MODEL_OPTIONS, *repair_option_types())
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; a model may set "
                          f"{', '.join(allowed)}")
    return {k: v for k, v in entry.items() if k not in ("model", "data") and v not in (None, "")}


def read_manifest(path: Path) -> list[FleetModel]:
    """The models a JSON (``{"models": [{"model": ..., ...}]}`` or a bare list) or CSV manifest names."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the manifest {path}: {first_line(error)}") from error
    if path.suffix.lower() == ".json":
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON: {error}") from None
        entries = parsed.get("models") if isinstance(parsed, dict) else parsed
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ConfigError(f"{path}: expected a list of models, or {{\"models\": [...]}}, each an object with "
                              "at least \"model\"")
    elif path.suffix.lower() == ".csv":
        entries = list(csv.DictReader(io.StringIO(text)))
        if entries and "model" not in entries[0]:
            raise ConfigError(f"{path}: the CSV header needs a 'model' column; got {', '.join(entries[0])}")
    else:
        raise ConfigError(f"{path}: a fleet source is a folder of .onnx files or a .json or .csv manifest")
    folder = path.parent
    models = []
    for number, entry in enumerate(entries, start=1):
        where = f"{path}, model {number}"
        if not isinstance(entry.get("model"), str):
            raise ConfigError(f"{where}: expected \"model\": a path to an .onnx file")
        if entry.get("data") is not None and not isinstance(entry["data"], str):
            raise ConfigError(f"{where}: \"data\" must be a path; got {entry['data']!r}")
        if entry.get("class_output") is not None and not isinstance(entry["class_output"], str):
            raise ConfigError(f"{where}: \"class_output\" must be an output's name; got {entry['class_output']!r}")
        for key in ("mean", "std"):
            value = entry.get(key)
            if value is not None and not (isinstance(value, str) or (isinstance(value, list) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))):
                raise ConfigError(f"{where}: {key} must be a list of numbers or comma-separated text; got {value!r}")
        model = _inside(folder, entry["model"], "model")
        data = _inside(folder, entry["data"], "data") if entry.get("data") else None
        models.append(FleetModel(Path(entry["model"]).with_suffix("").as_posix(), model, data,
                                 _entry_options(entry, where)))
    return _unique(models, str(path))


def read_source(source: str | os.PathLike, out: str | os.PathLike | None = None) -> list[FleetModel]:
    """The models of a fleet: every ``.onnx`` under a folder (sorted), or those a manifest names. Repaired
    models a fleet wrote into ``out`` (``NAME.repaired.onnx``) are not models of the fleet, wherever ``out`` is."""
    source = Path(source)
    if source.is_dir():
        root = source.resolve()
        written = Path(out).resolve() if out is not None else None

        def ours(path: Path) -> bool:
            return written is not None and path.name.endswith(REPAIRED_SUFFIX) and path.resolve().parent == written

        found = sorted(p for p in source.rglob("*.onnx")
                       if p.is_file() and p.resolve().is_relative_to(root) and not ours(p))
        if not found:
            raise ConfigError(f"no .onnx files in {source}")
        return _unique([FleetModel(p.relative_to(source).with_suffix("").as_posix(), p) for p in found], str(source))
    if source.is_file():
        return read_manifest(source)
    raise ConfigError(f"fleet source not found: {source}")


def _unique(models: list[FleetModel], where: str) -> list[FleetModel]:
    bad = [m.name for m in models if not m.name.strip(".") or m.name.startswith(".")]
    if bad:
        raise ConfigError(f"{where}: model name {bad[0]!r} cannot name a report file")
    names = [report_name(m.name) + suffix for m in models for suffix in (*OUTPUT_SUFFIXES, RECORD_SUFFIX)]
    names += SUMMARY_FILES
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{where}: models whose output files would share a name: {', '.join(repeated)}")
    if not models:
        raise ConfigError(f"{where}: no models")
    return models


# ---------------------------------------------------------------- one model


def model_config(base: dict, model: FleetModel) -> tuple[ScanConfig, VerdictConfig | None]:
    """The model's ScanConfig (the preset, the fleet's options, then the model's own) and its verdict's
    settings (None: no verdict)."""
    from fmt_audit.data import parse_channel_values

    own = {key: value for key, value in model.options.items() if key in _OPTION_TYPES}
    options = {key: _typed(key, value, model.name, _OPTION_TYPES) for key, value in {**base, **own}.items()}
    for key in ("mean", "std"):
        options[key] = parse_channel_values(options.get(key), f"{model.name}: {key}")
    preset = options.pop("preset", None) or "default"
    verdict = {key: options.pop(key) for key in VERDICT_OPTION_TYPES if key in options}
    try:
        config = ScanConfig.from_preset(preset, **options)
        return config, VerdictConfig.from_options(**verdict, seed=config.seed)
    except TypeError as error:      # a wrong value type from a manifest
        raise ConfigError(f"{model.name}: {error}") from None
    except FmtAuditError as error:  # a value out of range: say whose
        raise ConfigError(f"{model.name}: {first_line(error)}") from None


def model_repair(base: dict, model: FleetModel, seed: int) -> RepairConfig:
    """The model's RepairConfig: the fleet's repair options, then the model's own (the scan's seed)."""
    from fmt_audit.repair.config import repair_config

    types = repair_option_types()
    own = {key: value for key, value in model.options.items() if key in types}
    options = {key: _typed(key, value, model.name, types) for key, value in {**base, **own}.items()}
    try:
        return repair_config(seed, **options)
    except (TypeError, ValueError) as error:      # a wrong value type from a manifest
        raise ConfigError(f"{model.name}: {first_line(error)}") from None
    except FmtAuditError as error:  # a value out of range: say whose, and that it is a repair option
        raise ConfigError(f"{model.name}: {first_line(error)} (a repair option)") from None


_OPTION_TYPES = {**{f.name: str(f.type) for f in fields(ScanConfig)}, **VERDICT_OPTION_TYPES}  # "int", "float | None"
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _typed(key: str, value, where: str, types: dict[str, str]):
    """A manifest value as its option's type: CSV cells are text (``"64"``, ``"auto"``, ``"0.5,0.5,0.5"``,
    ``"true"``)."""
    kind = types.get(key, "str")
    whole = kind.startswith("int")
    what = ("a whole number" if whole else "a number") + (" or 'auto'" if "str" in kind else "")
    if not isinstance(value, str):
        if value is None:       # the preset's (or the option's) default: the configs decide
            return None
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)    # JSON's true is no count
        if whole:
            if not ((isinstance(value, numbers.Integral) and number)
                    or (isinstance(value, float) and value.is_integer())):   # JSON 5.0 is 5; 1.5 is no count
                raise ConfigError(f"{where}: {key} must be {what}; got {json.dumps(value, default=str)}")
            return int(value)
        if kind.startswith("float") and not number:
            raise ConfigError(f"{where}: {key} must be {what}; got {json.dumps(value, default=str)}")
        if kind.startswith("bool") and not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false; got {json.dumps(value, default=str)}")
        return value
    if not kind.startswith(("int", "float", "bool")) or (value == "auto" and "str" in kind):
        return value    # text options, and "auto" where an option takes it (eps)
    if kind.startswith("bool"):
        if value.lower() in ("", "auto", "none") and "None" in kind:
            return None
        if value.lower() not in _TRUE + _FALSE:
            raise ConfigError(f"{where}: {key} must be true or false; got {value!r}")
        return value.lower() in _TRUE
    try:
        return int(value) if whole else float(value)
    except ValueError:
        raise ConfigError(f"{where}: {key} must be {what}; got {value!r}") from None


def config_key(config: ScanConfig, verdict: VerdictConfig | None, data: Path, repair: RepairConfig | None = None,
               repair_when: str = "always", class_output: str | None = None) -> str:
    """What decides a report besides the model: this version of the tool, every scan and repair option, and
    the data: a file's sha256, an image folder's file names, sizes and modification times."""
    from fmt_audit import __version__
    from fmt_audit.model.loading import sha256_of

    repairing = {"config": asdict(repair), "when": repair_when} if repair is not None else None
    digest = hashlib.sha256(json.dumps({"tool": __version__, "config": asdict(config),
                                        "verdict": asdict(verdict) if verdict else None, "data": str(data),
                                        "repair": repairing, "class_output": class_output}, sort_keys=True,
                                       default=str).encode())
    if data.is_file():
        digest.update(sha256_of(data).encode())
    elif data.is_dir():
        for path in sorted(p for p in data.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(data).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def model_sha256(path: Path) -> str | None:
    """The model file's sha256, joined by its external data files' (their weights decide the report too)."""
    from fmt_audit.model.loading import sha256_of

    if not path.is_file():
        return None
    files = model_files(path)
    if len(files) == 1:
        return sha256_of(path)
    return hashlib.sha256("".join(sha256_of(f) if f.is_file() else "-" for f in files).encode()).hexdigest()


def report_name(name: str) -> str:
    """A model's name as its report files are named: subfolders joined by ``__``."""
    return name.replace("/", "__").replace("\\", "__")


def output_stem(out: Path, model: FleetModel) -> Path:
    """``out/NAME``; a model's files are this plus ``.json``, ``.html`` and :data:`RECORD_SUFFIX`
    (appended: a name may hold dots)."""
    return out / report_name(model.name)


def output_file(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


def audit_model(path: str, data: str, config: ScanConfig, verdict: VerdictConfig | None, memory_share: int = 1,
                repair: RepairConfig | None = None, repair_when: str = "always", repaired_path: str = "",
                references: ReferenceCache | None = None, class_output: str | None = None) -> dict:
    """Scan one model, and repair it when asked; the reports as text, the repaired model as bytes, and its
    summary row, or its error. Never raises for the model's own faults: those are the row's ``error`` (a
    failed repair keeps the scan's results). Runs in a Ray worker or in-process; ``references``: reference
    networks trained for earlier models, to reuse."""
    started = time.perf_counter()

    def failed(error: Exception, step: str = "") -> dict:
        named = "" if isinstance(error, FmtAuditError) else f"{type(error).__name__}: "
        return {"error": f"{step}{named}{first_line(error)}", "seconds": round(time.perf_counter() - started, 1)}

    try:
        from fmt_audit.fmt.scan import scan
        from fmt_audit.model.loading import load_model
        from fmt_audit.report.html_report import scan_html

        model = load_model(path, class_output) if class_output is not None else path
        report = scan(model, data, config, memory_share=memory_share, verdict=verdict, references=references)
    except Exception as error:  # one model's failure must not end the fleet: recorded with its type
        return failed(error)
    verdict_config, verdict = verdict, report.verdict or {}
    result = {"json": report.to_json(), "html": scan_html(report), "sha256": report.model["sha256"],
              "verdict": verdict.get("verdict"), "suspicion": verdict.get("suspicion"),
              "target_class": verdict.get("target_class"), "flagged": report.flagged_count,
              "channels": sum(layer.channels for layer in report.layers)}
    if repair is not None and (repair_when == "always" or report.attention()):
        try:
            result |= _repaired(model, data, config, repair, report, repaired_path, verdict_config, references)
        except Exception as error:  # as above; the scan's results stand
            result["error"] = failed(error, "repair: ")["error"]
    return result | {"seconds": round(time.perf_counter() - started, 1)}


def _repaired(model, data: str, config: ScanConfig, settings: RepairConfig, report, output: str,
              check: VerdictConfig | None, references: ReferenceCache | None = None) -> dict:
    """Repair the scanned model (method fmt: the channels its scan flagged) and check it with the scan's verdict
    (method fmt: the scan's reused as the "before"; other methods compute it again); the report and the
    model's bytes."""
    from fmt_audit.model.graph import fits_in_protobuf
    from fmt_audit.repair.methods.registry import METHODS
    from fmt_audit.repair.pipeline import repair
    from fmt_audit.report.html_report import repair_html

    result = repair(model, data, settings, config, flagged=report if METHODS[settings.method].takes_channels else None,
                    check=check, references=references)
    if not fits_in_protobuf(result.model):
        raise ConfigError("the repaired model is past protobuf's 2 GiB limit: repair it with fmt-audit repair, "
                          "which writes its weights as external data")
    payload = result.model.SerializeToString()
    result.report.record_output(output, hashlib.sha256(payload).hexdigest())
    accuracy = result.report.accuracy
    return {"repair_json": result.report.to_json(), "repair_html": repair_html(result.report, report),
            "model_bytes": payload, "removed": result.report.flagged_count,
            "accuracy_before": accuracy.get("before"), "accuracy_after": accuracy.get("after"),
            "repaired": Path(output).name,
            "self_check": (result.report.self_check or {}).get("status")}


# ---------------------------------------------------------------- the fleet


@dataclass
class _Job:
    model: FleetModel
    config: ScanConfig
    verdict: VerdictConfig | None
    data: Path
    key: str
    sha256: str | None
    repair: RepairConfig | None = None
    repair_when: str = "always"

    @property
    def class_output(self) -> str | None:
        return self.model.options.get("class_output")


def _read_record(stem: Path) -> dict | None:
    try:
        record = json.loads(output_file(stem, RECORD_SUFFIX).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _kept_row(job: _Job, stem: Path) -> FleetRow | None:
    """The earlier run's row when its record matches this model (sha256) and configuration, and the files it
    names are there."""
    record = _read_record(stem)
    if job.sha256 is None or record is None or record.get("pending") or not isinstance(record.get("row"), dict):
        return None
    if record.get("sha256") != job.sha256 or record.get("config_key") != job.key or record["row"].get("error"):
        return None     # another model or configuration, or a failed repair (retried like a failed scan)
    files = _record_files(record, stem)
    if output_file(stem, ".json").name not in files or not all((stem.parent / name).is_file() for name in files):
        return None
    row = FleetRow(**{k: v for k, v in record["row"].items() if k in SUMMARY_COLUMNS})
    row.skipped = True
    return row


def _record_files(record: dict, stem: Path) -> list[str]:
    """The files a model's record names: only names this model's outputs can have (a record is a file in
    the output folder, and the fleet deletes what an earlier record named and this run did not write)."""
    files = record.get("files")
    ours = {output_file(stem, suffix).name for suffix in OUTPUT_SUFFIXES}
    return [name for name in files if isinstance(name, str) and name in ours] if isinstance(files, list) else []


def _store(out: Path, job: _Job, result: dict) -> FleetRow:
    """Write the model's reports, repaired model and record, and make its row. A record naming the files
    goes first, marked pending, and the final one last: a run cut off in between leaves files the next run
    knows as its own (and redoes), never a report that passes for another configuration's."""
    stem = output_stem(out, job.model)
    row = FleetRow(job.model.name, job.sha256, result.get("verdict"),
                   result.get("suspicion"), result.get("target_class"), result.get("flagged"), result.get("channels"),
                   result.get("seconds"), result.get("error"), removed=result.get("removed"),
                   accuracy_before=result.get("accuracy_before"), accuracy_after=result.get("accuracy_after"),
                   repaired=result.get("repaired"), self_check=result.get("self_check"))
    outputs = [(suffix, result[key]) for suffix, key in zip(OUTPUT_SUFFIXES, ("json", "html", "repair_json",
                                                                            "repair_html", "model_bytes"))
               if key in result]
    if outputs:
        files = [output_file(stem, suffix).name for suffix, _ in outputs]
        record_path = output_file(stem, RECORD_SUFFIX)
        # files an earlier run wrote for this model stay known as the fleet's until replaced
        earlier = _record_files(_read_record(stem) or {}, stem)
        pending = {"sha256": row.sha256, "pending": True, "files": sorted(set(files) | set(earlier))}
        write_atomic(record_path, (json.dumps(pending, indent=1) + "\n").encode())
        for suffix, payload in outputs:
            write_atomic(output_file(stem, suffix), payload if isinstance(payload, bytes) else payload.encode())
        for name in set(earlier) - set(files):     # an earlier run's repair this run did not redo
            (out / name).unlink(missing_ok=True)
        record = {"sha256": row.sha256, "config_key": job.key, "files": files, "row": row.to_dict()}
        write_atomic(record_path, (json.dumps(record, indent=1) + "\n").encode())
    return row


def _check_ours(path: Path, protected: list, openings: tuple[str, ...] | None, claimed: Iterable[str] = ()) -> None:
    """Refuse to write ``path`` over an input, or over a file an earlier fleet run did not write: those begin
    with one of ``openings``, or (binary files, ``openings`` None) are named in the model's record
    (``claimed``)."""
    check_output_path(path, inputs=protected)
    if not path.is_file():
        return
    if openings is None:
        ours = path.name in claimed
    else:
        with path.open("rb") as stream:
            start = stream.read(max(len(o.encode()) for o in openings)).decode(errors="replace")
        ours = any(start.startswith(opening) for opening in openings)
    if not ours:
        raise ConfigError(f"refusing to overwrite {path}: no earlier fleet run wrote it (choose another --out)")


def run_fleet(models: Sequence[FleetModel], data: str | os.PathLike | None, out: str | os.PathLike,
              options: dict | None = None, *, repair: dict | None = None, repair_when: str = "always",
              address: str | None = None, workers: int | None = None, gpus_per_task: float = 0.0,
              force: bool = False, use_ray: bool | None = None, on_row: Callable[[FleetRow], None] | None = None,
              inputs: Iterable[str | os.PathLike] = (), reference_cache: str | os.PathLike | None = None,
              ) -> FleetResult:
    """Audit ``models`` into the folder ``out``; ``options`` are scan options for every model (a model's own
    options win). ``repair``: repair options (``fmt_audit.repair.pipeline.repair_config``'s; ``{}`` for the defaults)
    to repair each model after its scan, ``always`` or, by ``repair_when``, only when the scan says it needs
    attention; None: scan only. ``use_ray``: None takes Ray when installed; with Ray and no ``address`` it
    starts on this machine with ``workers`` CPUs (default: all). ``force`` reruns models already audited the
    same way. Nothing is written over ``inputs`` (the manifest, say), the models, the data, or a file of
    ``out`` that an earlier fleet run did not write. ``reference_cache``: a folder where the verdicts' reference
    networks are kept and reused (:class:`~fmt_audit.verdict.evidence.transfer.ReferenceCache`; each Ray worker
    reads and writes it too); without it, models audited in this process on one data file share them."""

    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"the output folder is a file: {out}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1; got {workers}")
    if address and workers is not None:
        raise ConfigError("--workers sizes Ray on this machine; a cluster (--address) has its own CPUs")
    if gpus_per_task < 0:
        raise ConfigError(f"--gpus-per-task must be 0 or more; got {gpus_per_task}")
    if repair_when not in REPAIR_WHEN:
        raise ConfigError(f"--repair-when must be one of {', '.join(REPAIR_WHEN)}; got {repair_when!r}")
    ray_ok = ray_available()
    if use_ray and not ray_ok:
        raise ConfigError(f"Ray is not installed: {INSTALL_HINT}")
    if address and not ray_ok:
        raise ConfigError(f"--address needs Ray: {INSTALL_HINT}")
    use_ray = ray_ok if use_ray is None else use_ray
    for given, known, what in ((options or {}, _OPTION_TYPES, "scan"),
                               (repair or {}, repair_option_types() if repair else {}, "repair")):
        if unknown := sorted(set(given) - set(known)):
            raise ConfigError(f"unknown {what} option(s) {', '.join(unknown)}; expected some of {', '.join(known)}")
    jobs = []
    for model in models:
        source = model.data or (Path(data) if data is not None else None)
        if source is None:
            raise ConfigError(f"{model.name}: no data (give --data, or 'data' in the manifest)")
        config, verdict = model_config(options or {}, model)
        settings = model_repair(repair, model, config.seed) if repair is not None else None
        if repair is None:      # a manifest shared with repairing runs: its repair values are checked all the same
            model_repair({}, model, config.seed)
        jobs.append(_Job(model, config, verdict, Path(source),
                         config_key(config, verdict, Path(source), settings, repair_when,
                                    model.options.get("class_output")),
                         model_sha256(model.path), settings, repair_when))
    out.mkdir(parents=True, exist_ok=True)
    _check_outputs(out, models, repair is not None, [*inputs, *(f for m in models for f in model_files(m.path)),
                                 *(m.data for m in models if m.data)] + ([data] if data else []))
    rows, waiting = {}, []
    for job in jobs:
        kept = None if force else _kept_row(job, output_stem(out, job.model))
        if kept is not None:
            rows[job.model.name] = kept
            if on_row:
                on_row(kept)
        else:
            waiting.append(job)
    if use_ray:
        engine = _run_on_ray(waiting, out, rows, address, workers, gpus_per_task, on_row, reference_cache)
    else:
        engine = "sequential, in this process" + ("" if ray_ok else " (Ray is not installed)")
        from fmt_audit.verdict.evidence.transfer import ReferenceCache

        # models audited on one data file share their reference networks
        references = ReferenceCache(folder=reference_cache)
        for job in waiting:
            result = audit_model(str(job.model.path), str(job.data), job.config, job.verdict, 1, job.repair,
                                 job.repair_when, str(output_file(output_stem(out, job.model), REPAIRED_SUFFIX)),
                                 references, job.class_output)
            rows[job.model.name] = _store(out, job, result)
            if on_row:
                on_row(rows[job.model.name])
    result = FleetResult([rows[m.name] for m in models], engine, time.perf_counter() - started)
    write_atomic(out / SUMMARY_FILES[0], (json.dumps(result.to_dict(), indent=1) + "\n").encode())
    write_atomic(out / SUMMARY_FILES[1], result.to_csv().encode())
    return result


def _check_outputs(out: Path, models: Sequence[FleetModel], repairing: bool, protected: list) -> None:
    """Every file the fleet may write: none over an input, none over a file no earlier fleet run wrote."""
    for summary, ours in zip(SUMMARY_FILES, ('{\n "engine"', ",".join(SUMMARY_COLUMNS[:3]))):
        _check_ours(out / summary, protected, (ours,))
    # reports of this version begin with their schema version; those of 0.2 with the model
    report = ('{\n "schema_version"', '{\n "model": {')
    openings = [(RECORD_SUFFIX, ('{\n "sha256"',)), (".json", report), (".html", (PAGE_OPENING + SCAN_TITLE,))]
    if repairing:
        openings += [(".repair.json", report), (".repair.html", (PAGE_OPENING + REPAIR_TITLE,)),
                     (REPAIRED_SUFFIX, None)]
    for model in models:
        stem = output_stem(out, model)
        claimed = _record_files(_read_record(stem) or {}, stem)
        for suffix, opening in openings:
            _check_ours(output_file(stem, suffix), protected, opening, claimed)


def _run_on_ray(jobs: Sequence[_Job], out: Path, rows: dict, address: str | None, workers: int | None,
                gpus_per_task: float, on_row, reference_cache: str | os.PathLike | None = None) -> str:
    import ray

    with ray_session(address, workers) as where:
        budgets = [job.config.max_memory for job in jobs if job.config.max_memory is not None]
        check_resources(gpus_per_task, max(budgets, default=None))
        task = ray.remote(_audit_in_worker)
        pending = {task.options(**task_options(gpus_per_task, job.config.max_memory)).remote(
            str(job.model.path.resolve()), str(job.data.resolve()), job.config, job.verdict, job.repair,
            job.repair_when, str(output_file(output_stem(out, job.model), REPAIRED_SUFFIX)),
            job.class_output, None if reference_cache is None else str(Path(reference_cache).expanduser().resolve())):
            job for job in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as error:  # the worker itself died (out of memory, killed): the model's row says so
                result = {"error": first_line(task_error(error))}
            rows[job.model.name] = _store(out, job, result)
            if on_row:
                on_row(rows[job.model.name])
    return where


def _audit_in_worker(path: str, data: str, config: ScanConfig, verdict: VerdictConfig | None,
                     repair: RepairConfig | None, repair_when: str, repaired_path: str,
                     class_output: str | None = None, reference_cache: str | None = None) -> dict:
    # without --max-memory, a model's scan takes its share of this node's free memory: as many one-CPU
    # tasks as the node has CPUs may run beside it (with it, Ray reserved the budget: task_options)
    references = None
    if reference_cache is not None:
        from fmt_audit.verdict.evidence.transfer import ReferenceCache

        references = ReferenceCache(folder=reference_cache)
    return audit_model(path, data, config, verdict, node_cpus(), repair, repair_when, repaired_path, references,
                       class_output)
