"""The repair checks itself: the verdict, on the same clean data, of the model as given and of the repaired one.

A repair that fine-tuned without error has not necessarily removed anything. After it, the verdict method
(:mod:`fmt_audit.verdict`) runs again on the repaired graph, as ONNX Runtime and torch will run it, with the
images and seed it used on the model as given. Its word on the repaired model decides the status:

* ``removed``: the verdict found a backdoor in the model as given (or could not tell) and finds none in
  the repaired one;
* ``not found``: it finds none in either (the repair had nothing to show it removed);
* ``may persist``: it still finds one in the repaired model (the class it names is in the report); the
  pipeline then tries a stronger setting once (:data:`ESCALATION`), keeps its model only where the verdict
  then finds no backdoor, and reports both;
* ``unknown``: the verdict on the repaired model could not be computed (it says why).

The check is only as good as the verdict: README ("The verdict", "Limits") gives its measured rates; a
backdoor the verdict misses on the model as given is also missed after the repair.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import onnx

from fmt_audit.data import Dataset, Preprocessing
from fmt_audit.model.loading import LoadedModel
from fmt_audit.verdict import Verdict, VerdictConfig, VerdictInputs, gather
from fmt_audit.verdict.evidence.transfer import ReferenceCache

STATUSES = ("removed", "not found", "may persist", "unknown")
# what the pipeline tries once when the backdoor may persist (fmt_audit.repair.pipeline)
ESCALATION = "unlearning at twice the radius, for as many epochs again, from the repaired model"


@dataclass(frozen=True)
class SelfCheck:
    status: str                     # one of STATUSES
    before: dict | None             # the verdict on the model as given (Verdict.to_dict)
    after: dict                     # ... on the repaired model that was kept
    escalation: dict | None = None  # {"setting", "after" (its verdict), "kept" (whether its model was kept)}

    def to_dict(self) -> dict:
        return {"status": self.status, "before": self.before, "after": self.after, "escalation": self.escalation}


def status_of(after: dict, before: dict | None = None) -> str:
    """The self-check's word from the verdicts (as reports store them) on the repaired model and the given one."""
    if after["verdict"] == "suspicious":
        return "may persist"
    if after["verdict"] != "clean":
        return "unknown"
    return "not found" if before is not None and before["verdict"] == "clean" else "removed"


def verdict_on(loaded: LoadedModel, model: onnx.ModelProto, dataset: Dataset, preprocessing: Preprocessing,
               device: str, config: VerdictConfig, references: ReferenceCache | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> Verdict:
    """``config``'s verdict on ``model`` (``loaded``'s graph with other weights), from ``dataset``'s sample;
    ``references``: reference networks already trained on that sample (the check's verdicts share them);
    ``progress``: told of the verdict's stages (:class:`~fmt_audit.verdict.VerdictInputs`)."""
    if model is not loaded.proto:
        digest = hashlib.sha256(model.SerializeToString()).hexdigest()
        loaded = replace(loaded, proto=model, sha256=digest)
    sample = dataset.take(config.samples, seed=config.seed)
    return gather(VerdictInputs(loaded, sample, preprocessing, device, references=references, progress=progress),
                  config)
