"""The repair checks itself: the verdict, on the same clean data, of the model as given and of the repaired one.

A repair that fine-tuned without error has not necessarily removed anything. After it, the verdict method
(:mod:`fmt_audit.verdict`) runs again on the repaired graph, as ONNX Runtime and torch will run it, with the
images and seed it used on the model as given. Its word on the repaired model decides the status:

* ``removed``: the verdict found a backdoor in the model as given (or could not tell) and finds none in
  the repaired one;
* ``not found``: it finds none in either (the repair had nothing to show it removed);
* ``may persist``: it still finds one in the repaired model (the class it names is in the report), or a small
  patch still leads the images into the class it named on the model as given
  (:mod:`fmt_audit.repair.patch_evidence`); the pipeline then tries a stronger setting once
  (:data:`PATCH_ESCALATION` where the patch leads, else :data:`ESCALATION`), keeps its model only where the
  check then passes, and reports both;
* ``unknown``: the verdict on the repaired model could not be computed (it says why).

The patch evidence is searched where the verdict on the model as given named a class. The check is only as
good as the verdict and the patch: README ("The verdict", "Limits") gives its measured rates; a
backdoor the verdict misses on the model as given is also missed after the repair.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import onnx

from fmt_audit.data import Dataset, Preprocessing
from fmt_audit.errors import FmtAuditError
from fmt_audit.model.loading import LoadedModel
from fmt_audit.verdict import Verdict, VerdictConfig, VerdictInputs, gather
from fmt_audit.verdict.evidence.transfer import ReferenceCache

if TYPE_CHECKING:
    from fmt_audit.repair.patch_evidence import PatchEvidence

STATUSES = ("removed", "not found", "may persist", "unknown")
# what the pipeline tries once when the backdoor may persist (fmt_audit.repair.pipeline)
ESCALATION = "unlearning at twice the radius, for as many epochs again, from the repaired model"
PATCH_ESCALATION = ("the repair's fine-tuning again from the repaired model, half of the copies stamped with the "
                    "patch that leads (true labels), the other half clean (no feature-map perturbation)")


@dataclass(frozen=True)
class SelfCheck:
    status: str                     # one of STATUSES
    before: dict | None             # the verdict on the model as given (Verdict.to_dict)
    after: dict                     # ... on the repaired model that was kept
    # the stronger try: {"setting", "eps" (None for the patch's), "stamps", "after" (its verdict), "patch" (the patch
    # evidence on its model), "kept" (whether its model was kept), "accuracy"}
    escalation: dict | None = None
    patch: dict | None = None       # the patch evidence on the repaired model kept (PatchEvidence.to_dict)

    def to_dict(self) -> dict:
        return {"status": self.status, "before": self.before, "after": self.after, "escalation": self.escalation,
                "patch": self.patch}


def status_of(after: dict, before: dict | None = None, patch: dict | None = None) -> str:
    """The self-check's word from the verdicts (as reports store them) on the repaired model and the given one,
    and the patch evidence on the repaired model (``None``: not searched)."""
    if after["verdict"] == "suspicious" or (patch is not None and patch["leads"]):
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


def patch_on(loaded: LoadedModel, model: onnx.ModelProto, dataset: Dataset, preprocessing: Preprocessing,
             device: str, config: VerdictConfig, target: int, before: PatchEvidence | None = None,
             ) -> tuple[PatchEvidence | None, str | None]:
    """The anchored patch evidence (:func:`fmt_audit.repair.patch_evidence.patch_evidence`) on ``model``
    (``loaded``'s graph with other weights) into ``target``, the anchor found on ``loaded`` as given, from the
    verdict's sample of ``dataset`` (``config``'s size and seed); ``before``: the evidence on an earlier repaired
    model (its anchor and other classes' figures kept). Where it cannot be searched, ``(None, why)``: a sample
    too small to measure a patch (:func:`~fmt_audit.repair.patch_evidence.measurable`), or a model the search
    cannot run (as a verdict that cannot be computed, this does not stop the repair)."""
    from fmt_audit.backends.torch.logits import logit_classifier
    from fmt_audit.repair.patch_evidence import FIT_IMAGES, measurable, patch_evidence

    sample = dataset.take(config.samples, seed=config.seed)
    try:
        # the class scores as every stage reads them: the class output alone, float32, at the data's image size
        repaired, classes, _ = logit_classifier(replace(loaded, proto=model).classifier, loaded.image_input,
                                                preprocessing, device, None, "patch search")
        if not measurable(sample, target, classes, config.seed):
            return None, (f"the check's {len(sample)} images hold fewer than {2 * FIT_IMAGES} of other classes "
                          f"than class {target} or a class it is compared with")
        given = None if before is not None else logit_classifier(
            loaded.classifier, loaded.image_input, preprocessing, device, None, "patch search")[0]
        return patch_evidence(given, repaired, sample, target, classes, config.seed, before), None
    except FmtAuditError as error:
        return None, str(error)
