"""``repair``: remove the flagged channels, fine-tune on clean data, write back, verify.

1. The channels to remove depend on the method (:mod:`fmt_audit.repair.methods`): ``fmt`` takes
   them from a scan run here on the training part of the data, from a scan
   report, or from the caller; ``ft`` and ``ibau`` remove none; ``fp``, ``clp`` and ``anp``
   choose them by their own criteria.
2. Removal makes each channel's output exactly zero: its Conv filter and bias,
   and the scale and shift of a BatchNormalization that directly follows.
3. Fine-tuning (:mod:`fmt_audit.repair.finetune`) through the PyTorch bridge, removed
   channels held at zero unless regrowth is allowed.
4. Write-back into the original graph (:func:`fmt_audit.backends.torch.bridge.write_back`):
   same nodes, names, opset and metadata, only initializer values change.
5. Verification before anything is returned: the ONNX checker passes, ONNX
   Runtime runs the repaired graph, its logits match the torch module's, and the
   removed channels' tensors are exactly zero in the graph.

A method that does not fine-tune (``clp``, ``anp``, ``ibau``) ends after its own step; ``clp`` is data-free:
given data, it only measures accuracy.

A part of the clean data (``holdout``) is kept out of scanning and training and
measures accuracy before removal, after removal and after fine-tuning.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from fmt_audit.backends.device import resolve_device
from fmt_audit.backends.torch.bridge import (
    BridgedClassifier,
    TorchBridge,
    channels_held_at_zero,
    check_free_batch,
    to_torch,
    write_back,
)
from fmt_audit.data import Dataset, load_data
from fmt_audit.errors import ConfigError, RepairError, UnsupportedModelError, first_line
from fmt_audit.fmt.gradient import FeatureMapPerturbation
from fmt_audit.fmt.scan import ScanConfig, calibrated_eps
from fmt_audit.fmt.selection import resolve_selection
from fmt_audit.model.graph import (
    ChannelSet,
    ImageInput,
    batchnorm_after,
    classifier_graph,
    constant_tensors,
    conv_layers,
    is_float16,
    nonfinite_weights,
    with_node_names,
)
from fmt_audit.model.loading import LoadedModel, load_model, run_checker
from fmt_audit.repair.config import RepairConfig
from fmt_audit.repair.finetune import STAMP_SHARE, EpochRecord, StampOrPerturbation, fine_tune, flip_decision
from fmt_audit.repair.methods.base import RepairInputs, RepairMethod
from fmt_audit.repair.methods.registry import METHODS, TAKE_CHANNELS
from fmt_audit.repair.patch_evidence import TRY_EPOCHS as PATCH_TRY_EPOCHS
from fmt_audit.repair.selfcheck import ESCALATION, PATCH_ESCALATION, SelfCheck, patch_on, status_of, verdict_on
from fmt_audit.report.json_report import RepairReport, ScanReport
from fmt_audit.verdict import VerdictConfig
from fmt_audit.verdict.evidence.transfer import ReferenceCache

# fewer optimizer steps than this and fine-tuning barely moves the weights (the
# published recipe takes about 100: 2,500 images, batch 256, 10 epochs)
MIN_STEPS = 30
# images for calibrating the unlearning eps when no gradient scan did: a median accuracy
# drop over 32 channels needs far fewer images than scoring every channel does
CALIBRATION_SAMPLES = 64
# images for checking ONNX Runtime against torch when a data-free repair has no data
VERIFY_IMAGES = 16
# ONNX Runtime against torch for a float16 graph: its weights are the trained float32 values rounded to
# 11 significant bits, which moves logits by about 1e-3 of their size
FLOAT16_TOLERANCE = 5e-3


@dataclass
class RepairResult:
    """The repaired graph, its report, and the scan that chose the channels (if one ran)."""

    model: onnx.ModelProto
    report: RepairReport
    scan: ScanReport | None = None


def check_channels(loaded: LoadedModel, channels: ChannelSet, where: str = "flagged channels") -> dict[str, list[int]]:
    """Validate a layer -> channel indices map against the model; sorted, deduplicated, empty layers dropped."""
    sizes = {layer.name: layer.out_channels for layer in loaded.layers}
    out = {}
    for name, indices in channels.items():
        if name not in sizes:
            raise ConfigError(f"{where}: {name!r} is not a Conv layer of this model "
                              f"(it has {len(sizes)}: {', '.join(list(sizes)[:5])}{', ...' if len(sizes) > 5 else ''})")
        values = sorted({int(c) for c in indices})
        bad = [c for c in values if not 0 <= c < sizes[name]]
        if bad:
            raise ConfigError(f"{where}: layer {name!r} has channels 0..{sizes[name] - 1}; got {bad[:5]}")
        if values:
            out[name] = values
    return out


def channel_tensors(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Per Conv layer, the stored tensors whose slice along axis 0 makes up a channel's output:
    the Conv weight and bias, and the scale and shift of a BatchNormalization that directly follows."""
    named = with_node_names(model)
    layers = conv_layers(named)
    norms = batchnorm_after(named.graph, layers)
    return {layer.name: [layer.weight] + ([layer.bias] if layer.bias else [])
            + (list(norms[layer.name].input[1:3]) if layer.name in norms else [])
            for layer in layers}


def nonzero_removed(model: onnx.ModelProto, removed: ChannelSet) -> list[str]:
    """The removed channels whose tensors in ``model`` are not exactly zero, as ``layer[c]: tensor`` strings."""
    stored = constant_tensors(model.graph)
    tensors = channel_tensors(model)
    problems = []
    for layer, channels in removed.items():
        for name in tensors[layer]:
            if name not in stored:
                problems.append(f"{layer}: tensor {name!r} is computed, not stored")
                continue
            value = numpy_helper.to_array(stored[name])
            for c in channels:
                if np.any(value[c] != 0):
                    problems.append(f"{layer}[{c}]: {name}")
    return problems


def remove_channels(bridge: TorchBridge, removed: ChannelSet) -> None:
    """Zero the removed channels' parameters in the bridged module (filter, bias, following BN scale/shift)."""
    with torch.no_grad():
        for layer, channels in removed.items():
            index = list(channels)
            conv = bridge.conv_weights(layer)
            conv.weight[index] = 0
            if conv.bias is not None:
                conv.bias[index] = 0
            norm = bridge.channel_modules[layer]
            if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
                norm.weight[index] = 0
                norm.bias[index] = 0


def verify(repaired: onnx.ModelProto, classifier: BridgedClassifier, x: np.ndarray,
           removed: ChannelSet, device: str, tolerance: float, expect_zero: bool, scores: str | None = None) -> dict:
    """Check the repaired graph (its class scores: the output ``scores``, else its only one); :class:`RepairError`
    with the reason if it fails."""
    from fmt_audit.backends.onnxrt.session import OrtClassifier

    try:
        run_checker(repaired)
    except Exception as error:
        raise RepairError(f"the repaired model fails the ONNX checker: {first_line(error)}") from error
    in_ort = OrtClassifier(classifier_graph(repaired, scores) if scores else repaired, device, classifier.preprocessing)
    ort_device = in_ort.session.device
    ort_logits = in_ort.logits(x)
    torch_logits = classifier.logits(x)
    difference = float(np.abs(ort_logits - torch_logits).max())
    allowed = tolerance * max(1.0, float(np.abs(torch_logits).max()))
    if not difference <= allowed:
        raise RepairError(f"the repaired ONNX model disagrees with the fine-tuned PyTorch module: "
                          f"max |logit difference| {difference:.3g} > {allowed:.3g}")
    problems = nonzero_removed(repaired, removed) if expect_zero else []
    if problems:
        raise RepairError(f"removed channels are not zero in the repaired model: {', '.join(problems[:5])}")
    return {"checker": "passed", "ort_provider": in_ort.provider, "ort_device": ort_device, "images": len(x),
            "max_abs_logit_difference": difference, "allowed": allowed,
            "removed_exactly_zero": expect_zero}


def regrowth(bridge: TorchBridge, removed: ChannelSet) -> dict[str, list[float]]:
    """L2 norm of each removed channel's filter after fine-tuning (non-zero only when regrowth is allowed)."""
    return {layer: [round(float(bridge.conv_weights(layer).weight[c].norm()), 6) for c in channels]
            for layer, channels in removed.items()}


def unlearning_eps(config: RepairConfig, scanned, loaded: LoadedModel, train: Dataset,
                 scan_config: ScanConfig) -> tuple[float, list[dict], str]:
    """The unlearning eps, its calibration trace, and where it came from."""
    if config.unlearn_eps != "auto":
        return float(config.unlearn_eps), [], "given"
    if isinstance(scanned, ScanReport) and scanned.config.get("mode") == "gradient":
        return float(scanned.config["eps"]), list(scanned.config.get("calibration") or []), "scan"
    eps, trace = calibrated_eps(loaded, train, replace(scan_config, samples=min(scan_config.samples,
                                                                              CALIBRATION_SAMPLES)))
    return eps, trace, "calibrated"


def verification_images(image: ImageInput, seed: int) -> np.ndarray:
    """Seeded uniform [0, 1] images of the model's input size, for checking a repair made without data."""
    if image.height is None or image.width is None:
        raise ConfigError("a repair without data needs a model with a fixed input height and width "
                          "(to make images that check ONNX Runtime against torch); give --data")
    shape = (VERIFY_IMAGES, image.channels or 3, image.height, image.width)
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def repair(model: str | os.PathLike | LoadedModel, data: str | os.PathLike | Dataset | None,
           config: RepairConfig | None = None, scan_config: ScanConfig | None = None,
           flagged: ScanReport | ChannelSet | None = None,
           progress: Callable[[str, int, int], None] | None = None,
           on_epoch: Callable[[EpochRecord], None] | None = None,
           check: VerdictConfig | None = None, references: ReferenceCache | None = None) -> RepairResult:
    """Repair ``model`` with the clean labelled images in ``data`` by ``config.method``.

    ``flagged`` (method ``fmt`` only): the channels to remove — a scan report of
    this model, or a ``{layer: [channels]}`` map; ``None`` runs a scan with
    ``scan_config`` on the training part of the data first (with ``selection="trace"``:
    the ``combined`` verdict and its trace only, and the unlearning radius calibrated here,
    as for given channels; the default ``auto`` is ``trace`` where ``check`` is the ``combined`` verdict, the
    per-channel ``outlier`` test otherwise: :func:`fmt_audit.fmt.selection.resolve_selection`). ``data`` may
    be ``None`` for the data-free ``clp``. ``progress`` is passed to the removal (a scan's channels, the
    trace's stages, ANP's masks, i-BAU's rounds) and told of the self-check and its verdicts' stages;
    ``on_epoch`` gets each epoch's record. ``check``: the verdict that checks the repair
    (:mod:`fmt_audit.repair.selfcheck`) on the model as given and the repaired one, on the same images (the
    training split's sample where the removal ran that verdict itself, ``selection="trace"``; else all the data);
    ``None``: no self-check (it needs data). ``references``: where the verdicts' reference networks are kept
    and reused (a :class:`~fmt_audit.verdict.evidence.transfer.ReferenceCache`, with a folder to reuse them
    across processes); ``None``: trained once for this repair.
    """
    config = config or RepairConfig()
    method = METHODS[config.method]
    # selection "auto": the trace where this repair chooses its channels and checks itself with combined
    traceable = method.takes_channels and flagged is None and check is not None and check.method == "combined"
    scan_config = scan_config or ScanConfig()
    scan_config = replace(scan_config, selection=resolve_selection(scan_config.selection, traceable))
    started = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    broken = nonfinite_weights(loaded.proto.graph)
    if broken:
        raise UnsupportedModelError(f"NaN or Inf in {len(broken)} weight tensor(s) ({', '.join(broken[:3])}); "
                                    "repair refused: fine-tuning cannot be trusted to fix a broken model")
    if flagged is not None and not method.takes_channels:
        raise ConfigError(f"given channels to remove (a scan report) go with --method {', '.join(TAKE_CHANNELS)}, "
                          f"not {method.name}")
    if data is None and method.needs_data:
        free = ", ".join(name for name, m in METHODS.items() if not m.needs_data)
        raise ConfigError(f"--method {method.name} needs clean labelled data (--data); only {free} is data-free")
    preprocessing = scan_config.preprocessing
    preprocessing.check_channels(loaded.image_input.channels)
    dataset = None
    if data is not None:
        dataset = data if isinstance(data, Dataset) else load_data(data, loaded.image_input, loaded.num_classes)
        loaded = loaded.at_image_size(*dataset.x.shape[2:])
        if len(dataset) < 2:
            raise ConfigError(f"repair needs at least 2 clean images; got {len(dataset)}")
    empty = Dataset(np.zeros((0, 1, 1, 1), np.float32), np.zeros(0, np.int64))
    train, holdout = dataset.split(config.holdout, seed=scan_config.seed) if dataset is not None else (empty, empty)
    bridge = to_torch(loaded.classifier)     # before the scan: a model that cannot be fine-tuned fails fast
    check_free_batch(bridge, loaded.image_input, "fine-tuning")
    placement = resolve_device(scan_config.device, torch_needed=True)    # one decision for every stage
    device = placement.torch
    classifier = BridgedClassifier(bridge, preprocessing, device)
    placement = replace(placement, torch_memory_format=bridge.memory_format_name(device))
    # trained reference networks, kept for every verdict of this repair on the same images (the removal's, the
    # self-check's)
    references = references if references is not None else ReferenceCache()
    inputs = RepairInputs(config, scan_config, loaded, train, classifier, flagged, progress, check, references)
    removal = method.removal(inputs)
    source, scan_report, evidence = removal.source, removal.scan, removal.evidence
    removed = check_channels(loaded, removal.channels)
    scanned = time.perf_counter()

    measure = (lambda: classifier.accuracy(holdout)) if len(holdout) else (lambda: None)
    accuracy = {"before": measure()}
    tuning = config.fine_tune if method.fine_tunes else replace(config.fine_tune, epochs=0)
    # nothing is fine-tuned after a method that does not (anp decided flips for its own search: its evidence says)
    flip, flip_info = (flip_decision(classifier, train, tuning.flip) if method.fine_tunes
                       else (False, {"setting": tuning.flip, "flip": False}))
    remove_channels(bridge, removed)
    accuracy["after_removal"] = measure()
    own_started = time.perf_counter()
    own_evidence = method.after_removal(inputs)
    own_step = type(method).after_removal is not RepairMethod.after_removal
    own_s = time.perf_counter() - own_started if own_step else None
    evidence = own_evidence if own_evidence is not None else evidence
    unlearn = method.unlearns(config, scan_config)
    perturb, unlearning = None, {"enabled": unlearn}
    if unlearn and tuning.epochs:
        eps, trace, origin = unlearning_eps(config, scan_report or flagged, loaded, train, scan_config)
        perturb = FeatureMapPerturbation(classifier, loaded.layers, eps, eps / 3, config.unlearn_steps,
                                         seed=tuning.seed)
        unlearning.update({"eps": eps, "alpha": eps / 3, "steps": config.unlearn_steps, "eps_from": origin,
                           "calibration": trace})
        # the trace's reversed triggers (--selection trace, where repair traced): how many the copies carry
        stamps = len(removal.stamps) if config.unlearn_stamps else 0
        unlearning["stamps"] = stamps
        if stamps:
            perturb = StampOrPerturbation(perturb, removal.stamps, STAMP_SHARE, seed=tuning.seed)
            unlearning["stamp_share"] = STAMP_SHARE
    hold = (contextlib.nullcontext() if config.allow_regrowth
            else channels_held_at_zero(bridge.channel_modules, removed))
    tolerance = max(config.tolerance, FLOAT16_TOLERANCE) if is_float16(loaded.proto) else config.tolerance
    check_images = next((d.x[:64] for d in (holdout, train) if len(d)), None)
    if check_images is None:
        check_images = verification_images(loaded.image_input, scan_config.seed)

    def written_and_verified() -> tuple[onnx.ModelProto, dict]:
        model = write_back(loaded.proto, bridge)
        return model, verify(model, classifier, check_images, removed, scan_config.device, tolerance,
                             expect_zero=not config.allow_regrowth, scores=loaded.scores)

    self_check = None
    notes: list[str] = []       # what the self-check could not do, for the report's warnings
    patch_seconds = 0.0
    with hold:
        history = fine_tune(classifier, train, tuning, flip, holdout if len(holdout) else None,
                            progress=on_epoch, perturb=perturb) if tuning.epochs else []
        accuracy["after"] = measure()
        trained = time.perf_counter()
        repaired, verification = written_and_verified()
        checked_from = time.perf_counter()
        if check is not None and dataset is not None:
            if progress:
                progress("self-check", 0, 0)
            def told(which: str):       # each of the check's verdicts tells its stages, under its name
                return (lambda stage, done, total: progress(f"self-check ({which}): {stage}", done, total)
                        ) if progress else None
            # the verdict the removal computed here on the training split (trace's evidence), where it is the
            # check's: the repaired model is checked on the same images (its references already trained); else
            # a scan report's verdict, or the check's own on all the data
            own = (removal.evidence or {}).get("verdict") if removal.scan is None else removal.scan.verdict
            given = flagged.verdict if isinstance(flagged, ScanReport) else None
            checked_on = train if own and own.get("method") == check.method else dataset
            before = next((v for v in (own, given) if v and v.get("method") == check.method), None) or \
                verdict_on(loaded, loaded.proto, dataset, preprocessing, device, check, references,
                           told("model as given")).to_dict()
            after = verdict_on(loaded, repaired, checked_on, preprocessing, device, check, references,
                               told("repaired")).to_dict()
            # where the verdict named a class on the model as given: does a small patch still lead into it?
            named = before.get("target_class") if before.get("verdict") == "suspicious" else None
            patch = None
            if named is not None and config.patch_check:
                if progress:
                    progress("self-check: patch search", 0, 0)
                patch, skipped = patch_on(loaded, repaired, checked_on, preprocessing, device, check, named)
                if skipped:
                    notes.append(f"self-check: no patch search ({skipped})")
                patch_seconds += patch.seconds if patch else 0.0
            escalation = None
            if status_of(after, before, patch and patch.to_dict()) == "may persist" and method.escalates \
                    and tuning.epochs:
                state = {key: value.clone() for key, value in bridge.module.state_dict().items()}
                patch_try = patch is not None and patch.leads
                if patch_try:
                    # once, stronger: the patch that leads stamped into half of the copies, true labels, for
                    # PATCH_TRY_EPOCHS of the repair's recipe (the removed channels still held at zero)
                    stamp = patch.target.stamp(train.x.shape[1:])
                    stronger = StampOrPerturbation(lambda batch: batch, [stamp], STAMP_SHARE, seed=tuning.seed)
                    tuning_try = replace(tuning, epochs=PATCH_TRY_EPOCHS)
                    flip_try, _ = flip_decision(classifier, train, tuning_try.flip)     # of the repaired model
                    try_flip = {"flip": flip_try}
                    setting, eps = f"{PATCH_ESCALATION}, {PATCH_TRY_EPOCHS} epochs", None
                else:
                    # once, stronger: unlearning at twice the radius (at the calibrated one where it was off)
                    eps = 2 * unlearning["eps"] if unlearning.get("eps") else \
                        unlearning_eps(config, scan_report or flagged, loaded, train, scan_config)[0]
                    stronger = FeatureMapPerturbation(classifier, loaded.layers, eps, eps / 3, config.unlearn_steps,
                                                      seed=tuning.seed + 1)
                    tuning_try, flip_try, setting = tuning, flip, f"{ESCALATION} (eps {eps:.4g})"
                    try_flip = {}
                more = fine_tune(classifier, train, tuning_try, flip_try, holdout if len(holdout) else None,
                                 progress=on_epoch, perturb=stronger)
                candidate, candidate_verification = written_and_verified()
                tried = verdict_on(loaded, candidate, checked_on, preprocessing, device, check, references,
                                   told("stronger try")).to_dict()
                # the target fitted again at the anchor, against the other classes' success before the try
                patch_tried, skipped = (None, None) if patch is None else patch_on(
                    loaded, candidate, checked_on, preprocessing, device, check, named, patch)
                if skipped:
                    notes.append(f"self-check: no patch search on the stronger try's model ({skipped})")
                patch_seconds += patch_tried.seconds if patch_tried else 0.0
                # kept only where both checks pass (a patch that could not be fitted again passes nothing)
                kept = tried["verdict"] == "clean" and (patch is None or (patch_tried is not None
                                                                          and not patch_tried.leads))
                escalation = {"setting": setting, "eps": eps, "stamps": 1 if patch_try else 0, **try_flip,
                              "after": tried, "patch": patch_tried.to_dict() if patch_tried else None,
                              "kept": kept, "accuracy": measure()}
                if kept:
                    repaired, verification, after, patch = candidate, candidate_verification, tried, patch_tried
                    history += more
                    accuracy["after"] = escalation["accuracy"]
                else:
                    bridge.module.load_state_dict(state)
            patch_figures = patch.to_dict() if patch else None
            self_check = SelfCheck(status_of(after, before, patch_figures), before, after, escalation, patch_figures)
    steps = tuning.epochs * tuning.steps_per_epoch(len(train))
    batch_size = tuning.batch_for(len(train))
    warnings = []
    if 0 < steps < MIN_STEPS:
        warnings.append(f"fine-tuning took only {steps} optimizer steps ({len(train)} training images, batch "
                        f"{batch_size}, {tuning.epochs} epochs); a smaller --batch-size "
                        "or more --epochs gives it more")
    if evidence and evidence.get("warning"):
        warnings.append(f"{method.name}: {evidence['warning']}")
    warnings += notes
    report = RepairReport(
        model={"path": str(loaded.path), "sha256": loaded.sha256, "class_output": loaded.scores},
        config={"method": method.name, **asdict(tuning), "allow_regrowth": config.allow_regrowth,
                "holdout": config.holdout, "tolerance": config.tolerance, "device_used": device,
                "placement": {**placement.to_dict(), "onnxruntime": verification["ort_device"]},
                **preprocessing.to_dict(), "flip_decision": flip_info, "unlearning": unlearning,
                "patch_check": config.patch_check, "steps": steps, "batch_size_used": batch_size,
                "scan": scan_report.config if scan_report else None,
                **method.settings(config)},
        flagged=removed, source=source, channels_total=sum(layer.out_channels for layer in loaded.layers),
        data={"images": len(dataset) if dataset is not None else 0, "train": len(train), "holdout": len(holdout),
              "source": dataset.source if dataset is not None else None},
        accuracy=accuracy, epochs=[record.to_dict() for record in history], verification=verification,
        regrowth=regrowth(bridge, removed) if config.allow_regrowth else None, warnings=warnings,
        timing={"scan_s": round(scanned - started, 3), "fine_tune_s": round(trained - scanned - (own_s or 0.0), 3),
                **({f"{method.name}_s": round(own_s, 3)} if own_s is not None else {}),
                "self_check_s": round(time.perf_counter() - checked_from, 3) if self_check else None,
                "patch_check_s": round(patch_seconds, 3) if patch_seconds else None,
                "total_s": round(time.perf_counter() - started, 3)},
        method=method.name, evidence=evidence, self_check=self_check.to_dict() if self_check else None,
    )
    return RepairResult(repaired, report, scan_report)
