"""Writing results safely: atomically, never over an input, never half a file."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import onnx

from fmt_audit.errors import OutputError
from fmt_audit.model.graph import fits_in_protobuf
from fmt_audit.model.loading import check_external_data, save_with_external_data, sha256_of


def check_output_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output that would overwrite an input or land in a missing folder."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}")
    if path.is_dir():
        raise OutputError(f"output path is a folder: {path}")
    for source in inputs:
        if Path(source).exists() and path.exists() and path.resolve() == Path(source).resolve():
            raise OutputError(f"refusing to overwrite the input file {source}")
    return path


def check_output_paths(outputs: Mapping[str, str | os.PathLike | None],
                       inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse, before any work, the outputs of one task (``{what it is: path}``, None where not written) that
    :func:`check_output_path` refuses, and two that name one file (one would replace the other)."""
    seen: dict[Path, str] = {}
    for what, path in outputs.items():
        if path is None:
            continue
        check_output_path(path, inputs)
        resolved = Path(path).resolve()
        if resolved in seen:
            raise OutputError(f"{seen[resolved]} and {what} name the same file {path}: give them different paths")
        seen[resolved] = what


def _published_mode() -> int:
    """0666 less the process umask: the mode a plain ``open(path, "w")`` would give. Read where the system
    shows it (Linux); elsewhere set and restored, at write time, not at import."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see a partial file."""
    path = Path(path)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as error:
        raise OutputError(f"cannot write in {path.parent or '.'}: {error.strerror or error}") from error
    try:
        os.chmod(temporary, _published_mode())     # mkstemp's 0600 would make the result private
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:     # Ctrl-C and SIGTERM included: no temporary file is left
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OutputError(f"cannot write {path}: {error.strerror or error}") from error
        raise


def _names_its_data(path: Path, data: Path) -> bool:
    """Whether the model now at ``path`` keeps external data in ``data`` (read without loading that data)."""
    if not (path.is_file() and data.is_file()):
        return False
    try:
        locations = check_external_data(onnx.load(str(path), load_external_data=False), path.parent)
    except Exception:   # not a model we can read: leave whatever is beside it alone
        return False
    return data.name in locations


def write_model(path: str | os.PathLike, model: onnx.ModelProto) -> str:
    """Write ``model`` atomically; returns the model file's sha256.

    A model under protobuf's 2 GiB limit is one file. A larger one is the model
    file plus ``<name>.data`` (ONNX external data) beside it: both are written in
    a temporary folder next to ``path`` and renamed into place, the data first,
    so the model file never names data that is not there. A small model written
    over a large one removes the ``<name>.data`` the old model kept its weights in.
    """
    path = Path(path)
    data = path.with_name(f"{path.name}.data")
    if fits_in_protobuf(model):
        payload = model.SerializeToString()
        stale = _names_its_data(path, data)
        write_atomic(path, payload)
        if stale:   # the model written over kept its weights there; nothing names them now
            data.unlink(missing_ok=True)
        return hashlib.sha256(payload).hexdigest()
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent or "."))
    except OSError as error:
        raise OutputError(f"cannot write in {path.parent or '.'}: {error.strerror or error}") from error
    try:
        save_with_external_data(model, staging / path.name)
        mode = _published_mode()
        for name in (data.name, path.name):
            os.chmod(staging / name, mode)
        os.replace(staging / data.name, data)
        os.replace(staging / path.name, path)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sha256_of(path)
