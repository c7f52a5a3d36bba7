"""Fleet audits: scan many models, one task each, on Ray when it is installed, else one after another.

A fleet's source is a folder of ``.onnx`` files or a manifest (JSON or CSV) naming
each model with its own data, normalisation and scan options. Every model's
report (JSON and HTML) goes into the output folder together with a small record
of what produced it (model sha256 and configuration), so a rerun skips the
models already audited the same way; the fleet's summary table is written as
JSON and CSV. A model that fails (corrupt file, unsupported op, wrong data) is
a row with its error, not the end of the fleet.

Workers compute; the driver writes: tasks return their reports as text, so a Ray
cluster needs the models and data readable from its workers but not the output
folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import ConfigError, FmtAuditError, first_line
from .html_report import PAGE_OPENING, SCAN_TITLE
from .loading import model_files
from .outputs import check_output_path, write_atomic
from .ray_engine import INSTALL_HINT, check_gpus, one_thread, ray_available, ray_session, task_error
from .scan import ScanConfig

# options a manifest may set per model (ScanConfig fields; the device is the fleet's)
PER_MODEL_OPTIONS = tuple(f.name for f in fields(ScanConfig) if f.name not in ("device", "predict_with"))
SUMMARY_COLUMNS = ("model", "verdict", "suspicion", "sink_class", "flagged", "channels", "seconds", "error",
                   "skipped", "sha256")
RECORD_SUFFIX = ".fleet.json"


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
    sink_class: int | None = None
    flagged: int | None = None
    channels: int | None = None
    seconds: float | None = None
    error: str | None = None
    skipped: bool = False           # an earlier run's report of the same model and configuration was kept

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
        lines = [f"{'model':32s} {'verdict':13s} {'suspicion':>9s} {'flagged':>8s} {'time s':>7s}  error"]
        for row in self.rows:
            suspicion = f"{row.suspicion:.3f}" if row.suspicion is not None else "–"
            flagged = f"{row.flagged}/{row.channels}" if row.flagged is not None else "–"
            seconds = f"{row.seconds:.1f}" if row.seconds is not None else "–"
            verdict = (row.verdict or "–") + (" (kept)" if row.skipped else "")
            lines.append(f"{row.model:32s} {verdict:13s} {suspicion:>9s} {flagged:>8s} {seconds:>7s}  "
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


def _entry_options(entry: dict, where: str) -> dict:
    if None in entry:   # a CSV row with more cells than the header has names
        raise ConfigError(f"{where}: more cells than the header has columns")
    unknown = sorted(set(entry) - {"model", "data", *PER_MODEL_OPTIONS})
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; a model may set model, data, "
                          f"{', '.join(PER_MODEL_OPTIONS)}")
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


def read_source(source: str | os.PathLike) -> list[FleetModel]:
    """The models of a fleet: every ``.onnx`` under a folder (sorted), or those a manifest names."""
    source = Path(source)
    if source.is_dir():
        root = source.resolve()
        found = sorted(p for p in source.rglob("*.onnx") if p.is_file() and p.resolve().is_relative_to(root))
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
    names = [report_name(m.name) for m in models]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{where}: models whose reports would share a name: {', '.join(repeated)}")
    if not models:
        raise ConfigError(f"{where}: no models")
    return models


# ---------------------------------------------------------------- one model


def model_config(base: dict, model: FleetModel) -> ScanConfig:
    """The model's ScanConfig: the preset, the fleet's options, then the model's own."""
    from .data import parse_channel_values

    options = {key: _typed(key, value, model.name) for key, value in {**base, **model.options}.items()}
    for key in ("mean", "std"):
        options[key] = parse_channel_values(options.get(key), f"{model.name}: {key}")
    preset = options.pop("preset", None) or "default"
    try:
        return ScanConfig.from_preset(preset, **options)
    except TypeError as error:      # a wrong value type from a manifest
        raise ConfigError(f"{model.name}: {error}") from None


_OPTION_TYPES = {f.name: str(f.type) for f in fields(ScanConfig)}    # "int", "float | None", ...


def _typed(key: str, value, where: str):
    """A manifest value as its option's type: CSV cells are text (``"64"``, ``"auto"``, ``"0.5,0.5,0.5"``)."""
    kind = _OPTION_TYPES.get(key, "str")
    if not isinstance(value, str) or value == "auto" or not kind.startswith(("int", "float")):
        return value
    try:
        return int(value) if kind == "int" else float(value)
    except ValueError:
        raise ConfigError(f"{where}: {key} must be a number; got {value!r}") from None


def config_key(config: ScanConfig, data: Path) -> str:
    """What decides a report besides the model: this version of the tool, every scan option, and the data:
    a file's sha256, an image folder's file names, sizes and modification times."""
    from . import __version__
    from .loading import sha256_of

    digest = hashlib.sha256(json.dumps({"tool": __version__, "config": asdict(config), "data": str(data)},
                                       sort_keys=True, default=str).encode())
    if data.is_file():
        digest.update(sha256_of(data).encode())
    elif data.is_dir():
        for path in sorted(p for p in data.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(data).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def model_sha256(path: Path) -> str | None:
    """The model file's sha256, joined by its external data files' (their weights decide the report too)."""
    from .loading import sha256_of

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


def audit_model(path: str, data: str, config: ScanConfig, memory_share: int = 1) -> dict:
    """Scan one model; the JSON and HTML reports as text and its summary row, or its error. Never raises
    for the model's own faults: those are the row's ``error``. Runs in a Ray worker or in-process."""
    started = time.perf_counter()
    try:
        from .html_report import scan_html
        from .scan import scan

        report = scan(path, data, config, memory_share=memory_share)
    except FmtAuditError as error:
        return {"error": first_line(error), "seconds": round(time.perf_counter() - started, 1)}
    except Exception as error:  # one model's unexpected failure must not end the fleet: recorded with its type
        return {"error": f"{type(error).__name__}: {first_line(error)}",
                "seconds": round(time.perf_counter() - started, 1)}
    verdict = report.verdict or {}
    return {"json": report.to_json(), "html": scan_html(report), "sha256": report.model["sha256"],
            "verdict": verdict.get("verdict"), "suspicion": verdict.get("suspicion"),
            "sink_class": verdict.get("sink_class"), "flagged": report.flagged_count,
            "channels": sum(layer.channels for layer in report.layers),
            "seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------- the fleet


@dataclass
class _Job:
    model: FleetModel
    config: ScanConfig
    data: Path
    key: str
    sha256: str | None


def _kept_row(job: _Job, stem: Path) -> FleetRow | None:
    """The earlier run's row when its record matches this model (sha256) and configuration."""
    record_path = output_file(stem, RECORD_SUFFIX)
    if job.sha256 is None or not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("row"), dict):
        return None
    if record.get("sha256") != job.sha256 or record.get("config_key") != job.key:
        return None
    if not output_file(stem, ".json").is_file():
        return None
    row = FleetRow(**{k: v for k, v in record.get("row", {}).items() if k in SUMMARY_COLUMNS})
    row.skipped = True
    return row


def _store(out: Path, job: _Job, result: dict) -> FleetRow:
    """Write the model's reports and record (record last: a report without one is redone) and make its row."""
    stem = output_stem(out, job.model)
    row = FleetRow(job.model.name, job.sha256, result.get("verdict"),
                   result.get("suspicion"), result.get("sink_class"), result.get("flagged"), result.get("channels"),
                   result.get("seconds"), result.get("error"))
    if "json" in result:
        # the old record goes first: a report replaced without its new record must not pass for the old one
        output_file(stem, RECORD_SUFFIX).unlink(missing_ok=True)
        write_atomic(output_file(stem, ".json"), result["json"].encode())
        write_atomic(output_file(stem, ".html"), result["html"].encode())
        record = {"sha256": row.sha256, "config_key": job.key, "row": row.to_dict()}
        write_atomic(output_file(stem, RECORD_SUFFIX), (json.dumps(record, indent=1) + "\n").encode())
    return row


def _check_ours(path: Path, protected: list, opening: str) -> None:
    """Refuse to write ``path`` over an input, or over a file an earlier fleet run did not write (those
    begin with ``opening``)."""
    check_output_path(path, inputs=protected)
    if path.is_file():
        with path.open("rb") as stream:
            if not stream.read(len(opening.encode())).decode(errors="replace") == opening:
                raise ConfigError(f"refusing to overwrite {path}: no earlier fleet run wrote it (choose another "
                                  "--out)")


def run_fleet(models: Sequence[FleetModel], data: str | os.PathLike | None, out: str | os.PathLike,
              options: dict | None = None, *, address: str | None = None, workers: int | None = None,
              gpus_per_task: float = 0.0, force: bool = False, use_ray: bool | None = None,
              on_row: Callable[[FleetRow], None] | None = None,
              inputs: Iterable[str | os.PathLike] = ()) -> FleetResult:
    """Audit ``models`` into the folder ``out``; ``options`` are scan options for every model (a model's own
    options win). ``use_ray``: None takes Ray when installed; with Ray and no ``address`` it starts on this
    machine with ``workers`` CPUs (default: all). ``force`` reruns models already audited the same way.
    Nothing is written over ``inputs`` (the manifest, say), the models, the data, or a file of ``out`` that
    an earlier fleet run did not write."""

    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"the output folder is a file: {out}")
    out.mkdir(parents=True, exist_ok=True)
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1; got {workers}")
    if address and workers is not None:
        raise ConfigError("--workers sizes Ray on this machine; a cluster (--address) has its own CPUs")
    if gpus_per_task < 0:
        raise ConfigError(f"--gpus-per-task must be 0 or more; got {gpus_per_task}")
    ray_ok = ray_available()
    if use_ray and not ray_ok:
        raise ConfigError(f"Ray is not installed: {INSTALL_HINT}")
    if address and not ray_ok:
        raise ConfigError(f"--address needs Ray: {INSTALL_HINT}")
    use_ray = ray_ok if use_ray is None else use_ray
    protected = [*inputs, *(f for m in models for f in model_files(m.path)),
                 *(m.data for m in models if m.data)] + ([data] if data else [])
    for summary, ours in (("fleet.json", '{\n "engine"'), ("fleet.csv", ",".join(SUMMARY_COLUMNS))):
        _check_ours(out / summary, protected, ours)
    for model in models:
        stem = output_stem(out, model)
        for suffix, opening in ((RECORD_SUFFIX, '{\n "sha256"'), (".json", '{\n "model": {'),
                                (".html", PAGE_OPENING + SCAN_TITLE)):
            _check_ours(output_file(stem, suffix), protected, opening)
    jobs, rows = [], {}
    for model in models:
        source = model.data or (Path(data) if data is not None else None)
        if source is None:
            raise ConfigError(f"{model.name}: no data (give --data, or 'data' in the manifest)")
        config = model_config(options or {}, model)
        job = _Job(model, config, Path(source), config_key(config, Path(source)), model_sha256(model.path))
        kept = None if force else _kept_row(job, output_stem(out, model))
        if kept is not None:
            rows[model.name] = kept
            if on_row:
                on_row(kept)
        else:
            jobs.append(job)
    if use_ray:
        engine = _run_on_ray(jobs, out, rows, address, workers, gpus_per_task, on_row)
    else:
        engine = "sequential, in this process" + ("" if ray_ok else " (Ray is not installed)")
        for job in jobs:
            rows[job.model.name] = _store(out, job, audit_model(str(job.model.path), str(job.data), job.config))
            if on_row:
                on_row(rows[job.model.name])
    result = FleetResult([rows[m.name] for m in models], engine, time.perf_counter() - started)
    write_atomic(out / "fleet.json", (json.dumps(result.to_dict(), indent=1) + "\n").encode())
    write_atomic(out / "fleet.csv", result.to_csv().encode())
    return result


def _run_on_ray(jobs: Iterable[_Job], out: Path, rows: dict, address: str | None, workers: int | None,
                gpus_per_task: float, on_row) -> str:
    import ray

    with ray_session(address, workers) as where:
        check_gpus(gpus_per_task)
        # tasks side by side on one machine share its memory; a cluster's nodes: --max-memory
        share = 1 if address else int(ray.cluster_resources().get("CPU", 1))
        task = ray.remote(num_cpus=1, num_gpus=gpus_per_task, max_retries=0)(_audit_in_worker)
        pending = {task.remote(str(job.model.path.resolve()), str(job.data.resolve()), job.config, gpus_per_task,
                               share): job for job in jobs}
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


def _audit_in_worker(path: str, data: str, config: ScanConfig, gpus: float, memory_share: int) -> dict:
    one_thread(gpus)
    return audit_model(path, data, config, memory_share)
