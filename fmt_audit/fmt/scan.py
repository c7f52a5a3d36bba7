"""``scan``: load a model and clean data, test every Conv channel, select the suspicious ones."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fmt_audit.backends.device import DEVICES, Placement, resolve_device
from fmt_audit.data import Dataset, Preprocessing, check_seed, load_data
from fmt_audit.errors import ConfigError, FmtAuditError
from fmt_audit.fmt.memory import MemoryPlan, available_memory, graph_cost, peak_memory_mib, plan_memory
from fmt_audit.fmt.scores import ChannelScores
from fmt_audit.fmt.selection import AUTO_SELECTION, SELECTIONS, resolve_selection, select
from fmt_audit.model.graph import ConvLayer, image_input, nonfinite_weights, opset_version
from fmt_audit.model.loading import LoadedModel, load_model
from fmt_audit.report.json_report import LayerResult, ScanReport
from fmt_audit.verdict import VerdictConfig, VerdictInputs
from fmt_audit.verdict import gather as gather_verdict

if TYPE_CHECKING:
    from fmt_audit.verdict.evidence.transfer import ReferenceCache

log = logging.getLogger(__name__)
MODES = ("gradient", "mask")
PREDICTORS = ("onnxruntime", "torch")
SCORES = ("accuracy", "shift")
AUTO = "auto"
# mask mode: the share of the memory plan (its kept-forward-pass share, unused there) for the cut graph's
# cached feature maps of one layer (fmt_audit.backends.onnxrt.suffix)
CUT_SHARE = 0.4
# eps values tried by calibration, in [0,1] pixel space (the published 0.06 among them)
EPS_GRID = (0.02, 0.03, 0.045, 0.06, 0.09, 0.13, 0.2, 0.3)


@dataclass(frozen=True)
class ScanConfig:
    """Every parameter of a scan. The defaults are the ``default`` preset; ``paper`` is the published method."""

    mode: str = "mask"
    samples: int = 256
    eps: float | str = AUTO
    alpha: float | None = None          # None: eps / 3, the published ratio (0.02 at eps 0.06)
    steps: int = 5
    gain: float = 10.0
    score: str = "shift"
    selection: str = AUTO_SELECTION     # trace where the combined verdict runs, else outlier (resolve_selection)
    outlier_threshold: float = 3.5
    calibration_drop: float = 0.25
    skip_layers: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_range: str = "0-1"
    device: str = "auto"
    seed: int = 0
    max_memory: float | None = None     # MiB for the scan's working memory; None: half of what is free
    preset: str = "default"
    predict_with: str = "onnxruntime"   # gradient mode: what runs the candidate batches

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1; got {self.samples}")
        check_seed(self.seed)
        if self.eps != AUTO and not (isinstance(self.eps, (int, float)) and 0 < self.eps <= 1):
            raise ConfigError(f"--eps must be 'auto' or in (0, 1] (pixel space); got {self.eps}")
        if self.alpha is not None and not 0 < self.alpha <= (self.eps if self.eps != AUTO else 1):
            raise ConfigError(f"--alpha must be in (0, eps={self.eps}]; got {self.alpha}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1; got {self.steps}")
        if not np.isfinite(self.gain) or self.gain in (0.0, 1.0):
            raise ConfigError(f"--gain must be finite and not 0 or 1 (those remove or keep a channel); got {self.gain}")
        if self.score not in SCORES:
            raise ConfigError(f"--score must be one of {', '.join(SCORES)}; got {self.score!r}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"--selection must be one of {', '.join(SELECTIONS)}; got {self.selection!r}")
        if self.outlier_threshold <= 0:
            raise ConfigError(f"the outlier threshold must be positive; got {self.outlier_threshold}")
        if not 0 < self.calibration_drop < 1:
            raise ConfigError(f"calibration_drop must be in (0, 1); got {self.calibration_drop}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.predict_with not in PREDICTORS:
            raise ConfigError(f"predict_with must be one of {', '.join(PREDICTORS)}; got {self.predict_with!r}")
        if self.max_memory is not None and not (np.isfinite(self.max_memory) and self.max_memory > 0):
            raise ConfigError(f"--max-memory must be a positive size such as 512M or 4G; got {self.max_memory} MiB")
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}; got {self.preset!r}")
        _ = self.preprocessing      # validated with the scan's options
        if self.skip_layers is not None:
            try:
                re.compile(self.skip_layers)
            except re.error as error:
                raise ConfigError(f"--skip-layers is not a valid regular expression: {error}") from None

    @classmethod
    def from_preset(cls, preset: str = "default", **overrides) -> ScanConfig:
        """The preset's settings, with ``overrides`` (``None`` values are ignored) on top."""
        if preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}; got {preset!r}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**PRESETS[preset], **given, "preset": preset})

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.mean, self.std, self.input_range)

    def step_size(self, eps: float) -> float:
        return self.alpha if self.alpha is not None else eps / 3



DEFAULT_VERDICT = VerdictConfig()
# The published method with the public reference code's defaults, and ours (see README, "Presets").
PRESETS: dict[str, dict] = {
    "paper": {"mode": "gradient", "eps": 0.06, "alpha": 0.02, "steps": 1, "score": "accuracy",
              "selection": "kmeans"},
    "default": {},
    # iterated FMT: the gradient method with a calibrated eps, 5 steps and class-shift scores (a per-channel
    # test: its repair removes what the test flags, not the trace)
    "gradient": {"mode": "gradient", "selection": "outlier"},
}


def scanned_layers(loaded: LoadedModel, config: ScanConfig) -> list[ConvLayer]:
    """The model's Conv layers that ``config`` tests (all but those ``--skip-layers`` matches)."""
    skip = re.compile(config.skip_layers) if config.skip_layers else None
    layers = [layer for layer in loaded.layers if not (skip and skip.search(layer.name))]
    if not layers:
        raise ConfigError(f"--skip-layers {config.skip_layers!r} skips every Conv layer")
    return layers


def _converted(loaded: LoadedModel):
    """The model's PyTorch bridge, or None where it cannot be converted (the verdict then tries and says why)."""
    from fmt_audit.backends.torch.bridge import to_torch

    try:
        return to_torch(loaded.classifier)
    except FmtAuditError:
        return None


def _suspicion(scores: ChannelScores, score: str) -> np.ndarray:
    """The ``[C, 2]`` matrix selection works on, higher = more suspicious."""
    return 1.0 - scores.accuracy if score == "accuracy" else scores.shift


class _Scanner:
    """Builds the tester for a mode and scores layers with it."""

    def __init__(self, loaded: LoadedModel, dataset: Dataset, config: ScanConfig, layers: list[ConvLayer],
                 plan: MemoryPlan | None = None, memory_share: int = 1, placement: Placement | None = None):
        self.config = config
        self.placement = placement or resolve_device(config.device, torch_needed=config.mode == "gradient")
        self.num_classes = loaded.num_classes or int(dataset.y.max()) + 1
        preprocessing = config.preprocessing
        self.plan = plan or memory_plan(loaded, dataset, config, layers, memory_share, self.placement)
        self.dataset = dataset
        # ONNX Runtime runs mask mode, and gradient mode's candidate batches unless torch is asked for
        self.masked = self.onnx = None
        if config.mode == "mask":
            from fmt_audit.backends.onnxrt.masked import MaskedModel

            # mask mode keeps no forward pass for backward ones: that share of the plan holds the cut's feature maps
            self.masked = MaskedModel(loaded.classifier, config.device, preprocessing, self.plan.predict_batch,
                                      cut_memory=CUT_SHARE * self.plan.budget_mib * 2**20)
            self.provider, self.device = self.masked.provider, self.masked.session.device
            self.placement = replace(self.placement, onnxruntime=self.device)    # as the session really runs
            self.bridge = None
            return
        from fmt_audit.backends.torch.bridge import to_torch

        if config.predict_with == "onnxruntime":
            from fmt_audit.backends.onnxrt.session import OrtClassifier

            self.onnx = OrtClassifier(loaded.classifier, config.device, preprocessing, self.plan.predict_batch)
        self.provider = self.onnx.provider if self.onnx else None
        if self.onnx:
            self.placement = replace(self.placement, onnxruntime=self.onnx.session.device)
        self.placement = self.placement.with_torch()
        self.device = self.placement.torch
        self.bridge = to_torch(loaded.classifier)
        if config.predict_with == "torch":
            from fmt_audit.backends.torch.bridge import check_free_batch

            check_free_batch(self.bridge, loaded.image_input, "predicting candidates with torch")

    def tester(self, eps: float | None = None):
        """The mode's tester; gradient mode needs ``eps`` except to measure clean accuracy."""
        config, plan = self.config, self.plan
        eps = 0.06 if eps is None else eps
        if config.mode == "gradient":
            from fmt_audit.fmt.gradient import FeatureMapTester, GradientTestConfig

            settings = GradientTestConfig(eps, config.step_size(eps), config.steps, config.seed,
                                          plan.candidate_batch, plan.gradient_batch, plan.predict_batch)
            return FeatureMapTester(self.bridge, self.dataset.x, self.dataset.y, self.num_classes,
                                    config.preprocessing, settings, self.device,
                                    predictor=self.onnx.predict if self.onnx else None)
        from fmt_audit.fmt.mask import MaskTestConfig, MaskTester

        return MaskTester(self.masked, self.dataset.x, self.dataset.y, self.num_classes,
                          MaskTestConfig(config.gain, plan.candidate_batch))


def memory_plan(loaded: LoadedModel, dataset: Dataset, config: ScanConfig, layers: list[ConvLayer],
                share: int = 1, placement: Placement | None = None) -> MemoryPlan:
    """Batch sizes for this scan under ``config.max_memory`` (when not given: half the free memory, divided
    among ``share`` scans running side by side, as Ray tasks on one machine do), on the device where the
    scan's heavy arrays live (``placement``: decided from ``config.device`` when not given)."""
    placement = placement or resolve_device(config.device, torch_needed=config.mode == "gradient")
    device = placement.memory_device(config.mode)
    budget = (config.max_memory * 2**20 if config.max_memory is not None
              else available_memory(device) / 2 / max(1, share))
    height, width = dataset.x.shape[2:]
    cost = graph_cost(loaded.proto, height, width)
    return plan_memory(cost, [layer.name for layer in layers], len(dataset), dataset.x[0].nbytes, budget, device)


def calibrate_eps(scanner: _Scanner, layers: list[ConvLayer], clean_accuracy: float) -> tuple[float, list[dict]]:
    """The smallest eps of :data:`EPS_GRID` at which testing moves predictions.

    Scores a seeded sample of channels at each eps in turn and stops at the first
    where the sample's median accuracy drop (2*alpha candidate) reaches
    ``calibration_drop`` of the clean accuracy: below that, most perturbations
    change nothing and every channel looks alike; far above it, every channel
    collapses the model and again they look alike.
    """
    config = scanner.config
    by_layer = _sampled_channels(layers, 32, config.seed)
    trace = []
    for eps in EPS_GRID:
        tester = scanner.tester(eps)
        accuracy = np.concatenate([tester.score_layer(layer, channels).accuracy[:, 1]
                                   for layer, channels in by_layer.values()])
        drop = float(np.median(clean_accuracy - accuracy)) / max(clean_accuracy, 1e-12)
        trace.append({"eps": eps, "median_relative_drop": round(drop, 4)})
        if drop >= config.calibration_drop:
            return eps, trace
    return EPS_GRID[-1], trace


def _sampled_channels(layers: list[ConvLayer], count: int, seed: int) -> dict[str, tuple[ConvLayer, list[int]]]:
    """A seeded sample of ``count`` channels over all layers, grouped by layer in layer order."""
    rng = np.random.default_rng(seed)
    pairs = [(layer, c) for layer in layers for c in range(layer.out_channels)]
    chosen: dict[str, tuple[ConvLayer, list[int]]] = {}
    for i in sorted(rng.choice(len(pairs), size=min(count, len(pairs)), replace=False)):
        layer, channel = pairs[i]
        chosen.setdefault(layer.name, (layer, []))[1].append(channel)
    return chosen


def calibrated_eps(loaded: LoadedModel, dataset: Dataset, config: ScanConfig) -> tuple[float, list[dict]]:
    """The gradient-mode eps :func:`calibrate_eps` picks for this model and data, whatever ``config.mode``."""
    gradient = replace(config, mode="gradient", eps=AUTO)
    layers = list(loaded.layers)
    scanner = _Scanner(loaded, dataset.take(gradient.samples, seed=gradient.seed), gradient, layers)
    return calibrate_eps(scanner, layers, scanner.tester().clean_accuracy())


@dataclass(frozen=True)
class LayerWork:
    """What testing any subset of a scan's layers needs, so that other processes (Ray workers) can test
    some of them and return exactly what this process would have: the same model (checked by sha256),
    images, options, eps and batch sizes."""

    model_path: str
    sha256: str
    dataset: Dataset
    config: ScanConfig
    eps: float | None
    plan: MemoryPlan
    scores: str | None = None       # the class-score output (None: the model's rule)


# (work, layers, progress) -> one LayerResult per layer, in order; see fmt_audit.fleet.ray_engine
LayerRunner = Callable[[LayerWork, list[ConvLayer], Callable[[str, int, int], None] | None], list[LayerResult]]


def score_layers(work: LayerWork, names: list[str], loaded: LoadedModel | None = None,
                 progress: Callable[[str, int], None] | None = None, scanner: _Scanner | None = None
                 ) -> list[LayerResult]:
    """Test the layers ``names`` as the scan described by ``work`` does (in a worker: the model is loaded
    from ``work.model_path`` and must have the scan's sha256; the scan itself passes its ``scanner``)."""
    if loaded is None:
        loaded = load_model(work.model_path, work.scores).at_image_size(*work.dataset.x.shape[2:])
        if loaded.sha256 != work.sha256:
            raise ConfigError(f"{work.model_path} changed during the scan (sha256 {loaded.sha256[:12]}, "
                              f"expected {work.sha256[:12]})")
    by_name = {layer.name: layer for layer in loaded.layers}
    layers = [by_name[name] for name in names]
    scanner = scanner or _Scanner(loaded, work.dataset, work.config, layers, plan=work.plan)
    tester = scanner.tester(work.eps)
    results = []
    for layer in layers:
        scores = tester.score_layer(layer, progress=(lambda k, name=layer.name: progress(name, k))
                                    if progress else None)
        chosen = select(_suspicion(scores, work.config.score), work.config.selection, seed=work.config.seed,
                        threshold=work.config.outlier_threshold, samples=len(work.dataset))
        results.append(LayerResult(layer.name, layer.out_channels, layer.depthwise,
                                   _rounded(scores.accuracy), _rounded(scores.shift), chosen.flagged,
                                   chosen.to_dict(), scores.sink.tolist(),
                                   list(layer.feature_map) if layer.feature_map else None))
    return results


def scan(model: str | os.PathLike | LoadedModel, data: str | os.PathLike | Dataset,
         config: ScanConfig | None = None,
         progress: Callable[[str, int, int], None] | None = None,
         runner: LayerRunner | None = None, memory_share: int = 1, *,
         verdict: VerdictConfig | None = DEFAULT_VERDICT, references: ReferenceCache | None = None) -> ScanReport:
    """Feature map testing of ``model`` on the clean labelled images in ``data``.

    ``progress(layer, done, total)`` is called as channels are tested (``total`` 0: a stage begins, the
    verdict or the trace). ``runner``
    tests the layers elsewhere (``fmt_audit.fleet.ray_engine.ray_runner``: Ray workers,
    by chunks of layers); calibration and the verdict stay in this process, and
    the report is the one a local scan gives. ``memory_share``: scans running side
    by side on this machine, which share its memory (a runner may say how many it runs).
    ``verdict``: the model-level verdict's settings (None: no verdict), on its own sample
    of ``data``; ``references``: trained reference networks to reuse (a fleet on one data file).
    """
    config = config or ScanConfig()
    # auto traces where the combined verdict runs (docs/research/scan-trace-h2h.md)
    traceable = verdict is not None and verdict.method == "combined"
    config = replace(config, selection=resolve_selection(config.selection, traceable))
    if config.selection == "trace":
        from fmt_audit.fmt.trace import require_combined

        require_combined(verdict)
    started = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    config.preprocessing.check_channels(loaded.image_input.channels)
    everything = data if isinstance(data, Dataset) else load_data(data, loaded.image_input, loaded.num_classes)
    loaded = loaded.at_image_size(*everything.x.shape[2:])
    dataset = everything.take(config.samples, seed=config.seed)
    layers = scanned_layers(loaded, config)
    tested_names = {layer.name for layer in layers}
    skipped = [layer.name for layer in loaded.layers if layer.name not in tested_names]
    scanner = _Scanner(loaded, dataset, config, layers,
                       memory_share=max(memory_share, getattr(runner, "memory_share", 1)))
    log.info("scanning %d channels in %d layers on %d images, %s mode on %s; batches %s", sum(
        layer.out_channels for layer in layers), len(layers), len(dataset), config.mode, scanner.device,
        scanner.plan.to_dict())
    if scanner.bridge is not None and scanner.bridge.steps:
        log.info("PyTorch bridge: %s", "; ".join(scanner.bridge.steps))
    clean_accuracy = scanner.tester().clean_accuracy()
    calibration: list[dict] = []
    eps = config.eps
    if config.mode == "gradient" and eps == AUTO:
        eps, calibration = calibrate_eps(scanner, layers, clean_accuracy)
        log.info("calibrated eps %s (%s)", eps, ", ".join(f"{t['eps']}: drop {t['median_relative_drop']}"
                                                          for t in calibration))
    prepared = time.perf_counter()
    work = LayerWork(str(Path(loaded.path).resolve()), loaded.sha256, dataset, config,
                     None if eps == AUTO else eps, scanner.plan, loaded.scores)
    if runner is not None:
        results = runner(work, layers, progress)
    else:
        total = sum(layer.out_channels for layer in layers)
        done = 0
        if progress:    # the count begins (its clock too) before the first channel
            progress(layers[0].name, 0, total)

        def advance(name: str, k: int) -> None:
            nonlocal done
            done += k
            if progress:
                progress(name, done, total)

        results = score_layers(work, [layer.name for layer in layers], loaded, advance, scanner)
    tested = time.perf_counter()
    found = None
    if verdict is not None:
        if progress:
            progress(f"{verdict.method} verdict", 0, 0)
        scanner.placement = scanner.placement.with_torch()     # the verdict runs in torch, where the scan's did
        scanner.bridge = scanner.bridge or _converted(loaded)  # once, for the verdict and a trace after it
        found = gather_verdict(VerdictInputs(loaded, everything.take(verdict.samples, seed=verdict.seed),
                                             config.preprocessing, scanner.placement.torch, scanner.bridge,
                                             references, progress), verdict)
    finished = time.perf_counter()
    traced = None
    if config.selection == "trace":
        if progress:
            progress("trace", 0, 0)
        traced = _trace(loaded, layers, everything, config, found, scanner)
        results = [replace(r, flagged=traced.get("layers", {}).get(r.name, [])) for r in results]
    shape = image_input(loaded.proto).shape     # as the graph declares it (run_at: the size it ran at)
    resolved = replace(config, eps=eps) if config.mode == "gradient" else config
    used = asdict(resolved)
    if config.mode == "gradient":
        used["alpha"] = config.step_size(eps)
    return ScanReport(
        model={"path": str(loaded.path), "sha256": loaded.sha256, "opset": opset_version(loaded.proto),
               "input": {"name": loaded.image_input.name, "shape": list(shape) if shape else None,
                         "layout": loaded.image_input.layout,
                         **({"run_at": list(loaded.run_at)} if loaded.run_at else {})},
               "class_output": loaded.scores,
               "nonfinite_weights": nonfinite_weights(loaded.proto.graph)},
        config={**used, "eps_requested": config.eps, "samples": len(dataset), **config.preprocessing.to_dict(),
                "device_used": scanner.device, "ort_provider": scanner.provider,
                "placement": replace(scanner.placement, torch_memory_format=scanner.bridge.memory_format_name(
                    scanner.placement.torch) if scanner.bridge is not None else None).to_dict(),
                **({"layers_device_used": getattr(runner, "device_used", None)} if runner is not None else {}),
                "bridge_steps": scanner.bridge.steps if scanner.bridge else None,
                # mask mode in this process: the layers whose settings ran through the whole graph, not cut
                "whole_graph_layers": ([name for name, cut in scanner.masked.cuts.items() if not cut]
                                       if scanner.masked is not None and runner is None else None),
                "calibration": calibration, "verdict": asdict(verdict) if verdict is not None else None},
        layers=results, clean_accuracy=clean_accuracy, skipped_layers=skipped,
        timing={"prepare_s": round(prepared - started, 3), "testing_s": round(tested - prepared, 3),
                "verdict_s": round(finished - tested, 3),
                **({"trace_s": round(time.perf_counter() - finished, 3)} if config.selection == "trace" else {}),
                "total_s": round(time.perf_counter() - started, 3)},
        resources={"memory_plan": scanner.plan.to_dict(), **peak_memory_mib()},
        verdict=found.to_dict() if found is not None else None,
        trace={k: v for k, v in traced.items() if k != "layers"} if traced is not None else None,
    )


def _trace(loaded: LoadedModel, layers: list[ConvLayer], data: Dataset, config: ScanConfig, found,
           scanner: _Scanner) -> dict:
    """What the report keeps of the trace (:func:`fmt_audit.fmt.trace.trace_verdict`) of the suspicious
    verdict's reversed trigger, with the flagged channels under ``layers``; ``{"skipped": why}`` (nothing
    flagged) when the verdict names no class to trace."""
    from fmt_audit.fmt.trace import trace_verdict, untraceable

    why = untraceable(found)
    if why is not None:     # before converting anything
        return {"skipped": why}
    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch

    classifier = BridgedClassifier(scanner.bridge or to_torch(loaded.classifier), config.preprocessing,
                                   scanner.placement.torch)
    return trace_verdict(classifier, layers, data, found, config.seed)


def _rounded(values: np.ndarray) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in values]
