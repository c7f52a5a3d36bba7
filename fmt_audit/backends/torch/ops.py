"""Which ONNX ops the PyTorch bridge (onnx2torch) can convert, without importing torch.

``inspect`` must start fast, and importing onnx2torch pulls in torch and
torchvision (seconds). The converter registry is therefore snapshotted in
``ops.json``; a test compares the snapshot with the installed onnx2torch
registry, so an upgrade that changes coverage fails loudly. Regenerate with
``python -m fmt_audit.backends.torch.ops``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import onnx

# onnx2torch registers converters up to this opset; newer graphs are down-converted first.
MAX_BRIDGE_OPSET = 17
# older graphs whose ops onnx2torch lacks at their own opset (opset 7-8 BatchNormalization,
# Gemm, Flatten) are converted up to the first of these at which it has them all
UPGRADE_OPSETS = (9, 11, 13, MAX_BRIDGE_OPSET)

_TABLE = Path(__file__).with_name("ops.json")


def live_registry() -> set[tuple[str, str, int]]:
    """(domain, op_type, since_version) of every converter onnx2torch registers (imports torch)."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    return {(d.domain, d.operation_type, int(d.version)) for d in _CONVERTER_REGISTRY}


@lru_cache(maxsize=1)
def snapshot() -> frozenset[tuple[str, str, int]]:
    entries = json.loads(_TABLE.read_text())["converters"]
    return frozenset((domain, op, int(version)) for domain, op, version in entries)


def _since_version(domain: str, op_type: str, opset: int) -> int | None:
    try:
        return onnx.defs.get_schema(op_type, max_inclusive_version=opset, domain=domain).since_version
    except Exception:  # unknown op or domain: no schema to resolve
        return None


def op_supported(domain: str, op_type: str, opset: int) -> bool:
    """Whether onnx2torch has a converter for ``op_type`` as defined at ``opset``."""
    domain = "" if domain == "ai.onnx" else domain
    since = _since_version(domain, op_type, opset)
    return (domain, op_type, since if since is not None else opset) in snapshot()


def _missing(model: onnx.ModelProto, at: int | None = None) -> list[str]:
    """Op types the bridge cannot convert with the default domain at opset ``at`` (None: the model's own)."""
    opsets = {("" if e.domain == "ai.onnx" else e.domain): e.version for e in model.opset_import}
    if at is not None:
        opsets[""] = at
    missing: list[str] = []
    for node in model.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        label = f"{domain}::{node.op_type}" if domain else node.op_type
        if label not in missing and not op_supported(domain, node.op_type, opsets.get(domain, 0)):
            missing.append(label)
    return missing


def unsupported_ops(model: onnx.ModelProto, convert: bool = True) -> list[str]:
    """Op types in the main graph that the bridge cannot convert, as ``Op`` or ``domain::Op``.

    With ``convert``, as the bridge converts (``fmt_audit.backends.torch.bridge.prepare_for_torch``): a graph
    newer than onnx2torch's range goes down to ``MAX_BRIDGE_OPSET``, every op at once; an older
    one up to the first of ``UPGRADE_OPSETS`` at which every op converts, if there is one. A
    graph the version converter cannot carry there may still fail when the bridge runs.
    """
    own = _missing(model)
    if not convert or not own:
        return own
    opset = next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), 0)
    if not opset:
        return own
    if opset > MAX_BRIDGE_OPSET:
        return _missing(model, MAX_BRIDGE_OPSET)
    if any(not _missing(model, target) for target in UPGRADE_OPSETS if target > opset):
        return []
    return own


def write_snapshot() -> None:
    from importlib.metadata import version

    rows = ",\n".join("  " + json.dumps(list(entry)) for entry in sorted(live_registry()))
    _TABLE.write_text(f'{{"onnx2torch": "{version("onnx2torch")}",\n "converters": [\n{rows}\n]}}\n')


if __name__ == "__main__":
    write_snapshot()
