"""``evaluate``: clean accuracy, attack success rate and robust accuracy of a model, run as deployed (ONNX Runtime).

* ACC: share of clean images predicted as their label.
* ASR: among triggered images whose true label is not the target, the share predicted as the target.
* RA: among the same images, the share predicted as their true label.
* DER (defense effectiveness rating, against a baseline model):
  ``[max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import onnx

from fmt_audit.data import Dataset, Preprocessing, load_data
from fmt_audit.errors import ConfigError, DataError
from fmt_audit.model.loading import LoadedModel, load_model
from fmt_audit.report.schema import SCHEMA_VERSION


@dataclass(frozen=True)
class Metrics:
    acc: float
    asr: float | None
    ra: float | None
    clean_images: int
    attack_images: int              # triggered images whose true label is not the target

    def to_dict(self) -> dict:
        def r(value):
            return None if value is None else round(value, 6)

        return {"acc": r(self.acc), "asr": r(self.asr), "ra": r(self.ra), "clean_images": self.clean_images,
                "attack_images": self.attack_images}


def attack_metrics(predicted: np.ndarray, labels: np.ndarray, target: int) -> tuple[float, float, int]:
    """(ASR, RA, images counted) for predictions on triggered images with their true ``labels``."""
    counted = labels != target
    n = int(counted.sum())
    if n == 0:
        raise DataError(f"every triggered image is labelled with the target class {target}; "
                        "ASR needs triggered images from other classes (with their true labels)")
    return float((predicted[counted] == target).mean()), float((predicted[counted] == labels[counted]).mean()), n


def defense_effectiveness(before: Metrics, after: Metrics) -> float:
    """DER of going from ``before`` to ``after`` (0.5 = no change; 1 = ASR gone at no accuracy cost)."""
    if before.asr is None or after.asr is None:
        raise ConfigError("DER needs the attack success rate: give --poisoned and --target")
    return (max(0.0, before.asr - after.asr) - max(0.0, before.acc - after.acc) + 1) / 2


@dataclass
class Evaluation:
    model: dict
    metrics: Metrics
    baseline: dict | None = None        # the baseline's model info and metrics
    der: float | None = None
    config: dict | None = None

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": "evaluation",
                "model": self.model, "metrics": self.metrics.to_dict(), "baseline": self.baseline,
                "der": None if self.der is None else round(self.der, 6), "config": self.config}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def format_text(self) -> str:
        def pct(value):
            return "-" if value is None else f"{100 * value:6.2f}%"

        rows = [("model", self.metrics)]
        if self.baseline:
            base = self.baseline["metrics"]
            rows.insert(0, ("baseline", Metrics(base["acc"], base["asr"], base["ra"], base["clean_images"],
                                                base["attack_images"])))
        lines = [f"{'':10s} {'ACC':>8s} {'ASR':>8s} {'RA':>8s}"]
        lines += [f"{name:10s} {pct(m.acc):>8s} {pct(m.asr):>8s} {pct(m.ra):>8s}" for name, m in rows]
        m = self.metrics
        lines.append(f"{m.clean_images} clean images" + (f", {m.attack_images} triggered images not of target "
                                                         f"{self.config['target']}" if m.asr is not None else ""))
        if self.der is not None:
            lines.append(f"DER {self.der:.4f}  (0.5 = no change, 1 = attack removed at no accuracy cost)")
        return "\n".join(lines)


def model_metrics(model: onnx.ModelProto, clean: Dataset, poisoned: Dataset | None, target: int | None,
                  preprocessing: Preprocessing, device: str = "auto") -> tuple[Metrics, str]:
    """``model``'s metrics run in ONNX Runtime, and the execution provider that ran it."""
    from fmt_audit.backends.onnxrt.session import OrtClassifier

    classifier = OrtClassifier(model, device, preprocessing)
    acc = float((classifier.predict(clean.x) == clean.y).mean())
    if poisoned is None:
        return Metrics(acc, None, None, len(clean), 0), classifier.provider
    triggered = classifier.predict(poisoned.x)
    asr, ra, n = attack_metrics(triggered, poisoned.y, target)
    return Metrics(acc, asr, ra, len(clean), n), classifier.provider


def evaluate(model: str | os.PathLike | LoadedModel, data: str | os.PathLike | Dataset,
             poisoned: str | os.PathLike | Dataset | None = None, target: int | None = None,
             baseline: str | os.PathLike | LoadedModel | None = None,
             preprocessing: Preprocessing | None = None, device: str = "auto") -> Evaluation:
    """ACC on ``data``; with ``poisoned`` (triggered images, true labels) and ``target``, ASR and RA;
    with ``baseline`` (the model before a defense), its metrics on the same data and the DER."""
    preprocessing = preprocessing or Preprocessing()
    if (poisoned is None) != (target is None):
        raise ConfigError("--poisoned and --target go together: give both or neither")
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    preprocessing.check_channels(loaded.image_input.channels)
    num_classes = loaded.num_classes
    if target is not None and (target < 0 or (num_classes is not None and target >= num_classes)):
        raise ConfigError(f"--target must be a class of the model (0..{(num_classes or 1) - 1}); got {target}")

    def load(source):
        return source if isinstance(source, Dataset) else load_data(source, loaded.image_input, num_classes)

    clean = load(data)
    triggered = load(poisoned) if poisoned is not None else None
    metrics, provider = model_metrics(loaded.classifier, clean, triggered, target, preprocessing, device)
    config = {"target": target, "device": device, "ort_provider": provider, **preprocessing.to_dict(),
              "data": clean.source, "poisoned": triggered.source if triggered else None}
    info = {"path": str(loaded.path), "sha256": loaded.sha256}
    if baseline is None:
        return Evaluation(info, metrics, config=config)
    base = baseline if isinstance(baseline, LoadedModel) else load_model(baseline)
    sizes = [(m.image_input.channels, m.image_input.height, m.image_input.width) for m in (base, loaded)]
    if sizes[0] != sizes[1] or base.num_classes != num_classes:
        raise ConfigError("the baseline takes different inputs or has different classes than the model")
    base_metrics, _ = model_metrics(base.classifier, clean, triggered, target, preprocessing, device)
    der = defense_effectiveness(base_metrics, metrics) if triggered is not None else None
    return Evaluation(info, metrics, {"path": str(base.path), "sha256": base.sha256,
                                      "metrics": base_metrics.to_dict()}, der, config)
