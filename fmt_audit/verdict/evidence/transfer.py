"""Does a class's universal perturbation move clean networks too? The transfer of the universal ladder to
reference networks, evidence of the ``combined`` verdict.

The universal-perturbation ladder (:mod:`fmt_audit.verdict.evidence.universal`) finds the class that is
easiest to reach. In a backdoored model that is usually the target, but in a clean model it can be a natural
attractor class (MNIST's 8, CIFAR-10's 6). The two differ in where the shortcut lives. A natural universal
perturbation exploits features of the data, so it moves other networks trained on the same data too:
universal perturbations are known to transfer between models (Moosavi-Dezfooli et al., CVPR 2017). A
backdoor is a feature of the poisoned model; what reverse engineering recovers of a trigger moves the model,
not clean networks.

So the ladder's last-rung perturbations are applied to a few small networks trained from scratch on the
verdict's own labelled images (:mod:`fmt_audit.verdict.evidence.reference`), on the same held-out images.

Cost: training the references (``count x steps`` small CNN steps of ``batch`` images, on CPU) and two forward
passes per reference of every held-out image per class. The references depend only on the images and the
recipe, not on the audited model: a :class:`ReferenceCache` passed from one audit to the next (a fleet on one
data file) trains them once, and one with a folder (``--cache``) once across processes.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import logging
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmt_audit.data import Dataset
from fmt_audit.errors import OutputError
from fmt_audit.model.outputs import write_atomic
from fmt_audit.verdict.config import ReferenceConfig
from fmt_audit.verdict.evidence import reference as reference_module
from fmt_audit.verdict.evidence.reference import (
    ReferenceClassifier,
    reference_arrays,
    references_from_arrays,
    train_reference,
)
from fmt_audit.verdict.evidence.universal import UniversalLadder, held_out_effect

log = logging.getLogger(__name__)
STORED_FORMAT = 1   # of the files a ReferenceCache keeps: raise it when the references' recipe or layout changes


@dataclass(frozen=True)
class TransferResult:
    """Per reference network, every class's held-out success with the ladder's last perturbations and
    without them (:func:`fmt_audit.verdict.evidence.universal.held_out_effect`)."""

    reference_success: list[list[float]]    # [reference][class]
    reference_baseline: list[list[float]]   # [reference][class]


class ReferenceCache:
    """Trained reference sets by data and recipe: the last ``kept`` of them in memory (a few sets of three
    small CNNs: a few MiB) and, with ``folder``, every set on disk, so that another process auditing on the
    same images (``scan`` and then ``repair``, a CI gate on each new model, a fleet's workers) loads them
    instead of training them. Training is deterministic on CPU for a seed, so a set handed out again is the
    one a fresh training gives.

    A file holds arrays only (``np.savez``, read without pickle) and is named by a digest of everything the
    trained weights depend on: the images, the recipe, the seed, the reference module's source, the torch
    version, torch's CPU threads and instruction set (training on CPU is deterministic for those, not across
    them); one that cannot be read back as a whole set (cut short, another architecture) is trained again and
    replaced. A set that cannot be written (a full or read-only disk) is used all the same, with a warning:
    the cache saves time, it never changes a verdict."""

    def __init__(self, kept: int = 4, folder: str | os.PathLike | None = None):
        self.kept = kept
        self.folder = Path(folder).expanduser() if folder is not None else None
        self._sets: dict[tuple, list[ReferenceClassifier]] = {}

    def path_for(self, key: tuple) -> Path | None:
        """Where the set of ``key`` is kept on disk (None without a folder)."""
        if self.folder is None:
            return None
        from fmt_audit import __version__

        made_by = (STORED_FORMAT, __version__, _reference_source(), torch.__version__, torch.get_num_threads(),
                   torch.backends.cpu.get_cpu_capability())
        name = hashlib.sha256(repr((made_by, key)).encode()).hexdigest()
        return self.folder / f"references-{name[:40]}.npz"

    def get(self, key: tuple, train: Callable[[], list[ReferenceClassifier]],
            rebuild: Callable[[dict[str, np.ndarray]], list[ReferenceClassifier]]) -> list[ReferenceClassifier]:
        """The set of ``key``: from memory, from the folder (``rebuild`` from its arrays), or ``train``-ed."""
        if key not in self._sets:
            if len(self._sets) >= self.kept:
                del self._sets[next(iter(self._sets))]
            self._sets[key] = self._stored(key, rebuild) or self._trained(key, train)
        return self._sets[key]

    def _stored(self, key: tuple, rebuild) -> list[ReferenceClassifier] | None:
        path = self.path_for(key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                references = rebuild({name: stored[name] for name in stored.files})
            log.info("reference networks read from %s", path)
            return references
        except (OSError, EOFError, ValueError, TypeError, KeyError, RuntimeError, zipfile.BadZipFile) as error:
            log.warning("reference networks in %s unreadable (%s): training them again", path, error)
            return None

    def _trained(self, key: tuple, train) -> list[ReferenceClassifier]:
        references = train()
        path = self.path_for(key)
        if path is not None:
            stream = io.BytesIO()
            np.savez(stream, **reference_arrays(references))
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, stream.getvalue())
                log.info("reference networks kept in %s", path)
            except (OSError, OutputError) as error:
                log.warning("reference networks not kept in %s: %s", path.parent, error)
        return references


def _reference_source() -> str:
    """A digest of the module that builds and trains the references: a cache never hands out networks of
    another recipe, even from a development checkout whose version did not change."""
    try:
        return hashlib.sha256(inspect.getsource(reference_module).encode()).hexdigest()[:16]
    except (OSError, TypeError):    # no source shipped (a frozen install): the versions alone
        return "no source"


def trained_references(dataset: Dataset, classes: int, device: str = "cpu", config: ReferenceConfig | None = None,
                       seed: int = 0, cache: ReferenceCache | None = None) -> list[ReferenceClassifier]:
    """The ``config.count`` references trained on ``dataset`` from seeds ``seed, seed + 1, ...``
    (:func:`fmt_audit.verdict.evidence.reference.train_reference`), from ``cache`` when it holds them."""
    config = config or ReferenceConfig()

    def train() -> list[ReferenceClassifier]:
        return [train_reference(dataset, classes, device, config, seed + i) for i in range(config.count)]

    def rebuild(arrays: dict[str, np.ndarray]) -> list[ReferenceClassifier]:
        references = references_from_arrays(arrays, dataset.x.shape[1], classes, device)
        if len(references) != config.count:
            raise ValueError(f"{len(references)} reference networks stored, {config.count} wanted")
        return references

    if cache is None:
        return train()
    digest = hashlib.sha256()
    for part in (dataset.x, dataset.y):
        if part is not None:
            digest.update(f"{part.shape}{part.dtype}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
    return cache.get((digest.hexdigest(), classes, device, config, seed), train, rebuild)


def transfer_to_references(ladder: UniversalLadder, dataset: Dataset, classes: int, device: str = "cpu",
                           config: ReferenceConfig | None = None, seed: int = 0, batch: int = 512,
                           cache: ReferenceCache | None = None) -> TransferResult:
    """The ``config.count`` references of ``dataset`` (the ladder's images, float NCHW in [0, 1] with labels;
    :func:`trained_references`) and, per reference, each class's held-out success with the ladder's last
    perturbations and with none."""
    x = torch.from_numpy(np.ascontiguousarray(dataset.x, dtype=np.float32)).to(device)
    delta = torch.from_numpy(ladder.perturbations).to(device)
    success, baseline = [], []
    for reference in trained_references(dataset, classes, device, config, seed, cache):
        moved, _ = held_out_effect(reference, x, ladder.held, delta, batch)
        before, _ = held_out_effect(reference, x, ladder.held, torch.zeros_like(delta), batch)
        success.append([round(float(v), 6) for v in moved])
        baseline.append([round(float(v), 6) for v in before])
    return TransferResult(success, baseline)
