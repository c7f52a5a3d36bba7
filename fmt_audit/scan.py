"""``scan``: load a model and clean data, test every Conv channel, select the suspicious ones."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .data import Preprocessing, load_data
from .errors import ConfigError
from .graph import opset_version
from .loading import LoadedModel, load_model
from .report import LayerResult, ScanReport
from .runtime import DEVICES
from .selection import SELECTIONS, select


@dataclass(frozen=True)
class ScanConfig:
    """Every parameter of a scan; defaults are the published method's."""

    samples: int = 256
    eps: float = 0.06
    alpha: float = 0.02
    selection: str = "outlier"
    outlier_threshold: float = 3.5
    skip_layers: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    device: str = "auto"
    seed: int = 0
    max_batch: int = 2048

    def __post_init__(self):
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1; got {self.samples}")
        if not 0 < self.eps <= 1:
            raise ConfigError(f"--eps must be in (0, 1] (pixel space); got {self.eps}")
        if not 0 < self.alpha <= self.eps:
            raise ConfigError(f"--alpha must be in (0, eps={self.eps}]; got {self.alpha}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"--selection must be one of {', '.join(SELECTIONS)}; got {self.selection!r}")
        if self.outlier_threshold <= 0:
            raise ConfigError(f"the outlier threshold must be positive; got {self.outlier_threshold}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1; got {self.max_batch}")
        if self.skip_layers is not None:
            try:
                re.compile(self.skip_layers)
            except re.error as error:
                raise ConfigError(f"--skip-layers is not a valid regular expression: {error}") from None

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.mean, self.std)


def scan(model: str | os.PathLike | LoadedModel, data: str | os.PathLike, config: ScanConfig | None = None,
         progress: Callable[[str, int, int], None] | None = None) -> ScanReport:
    """Feature map testing of ``model`` on the clean labelled images in ``data``.

    ``progress(layer, done, total)`` is called as channels are tested.
    """
    from .bridge import to_torch, torch_device
    from .testing import FeatureMapTester, GradientTestConfig

    config = config or ScanConfig()
    started = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    preprocessing = config.preprocessing
    preprocessing.check_channels(loaded.image_input.channels)
    dataset = load_data(data, loaded.image_input, loaded.num_classes).take(config.samples, seed=config.seed)
    skip = re.compile(config.skip_layers) if config.skip_layers else None
    skipped = [layer.name for layer in loaded.layers if skip and skip.search(layer.name)]
    layers = [layer for layer in loaded.layers if layer.name not in skipped]
    if not layers:
        raise ConfigError(f"--skip-layers {config.skip_layers!r} skips every Conv layer")
    device = torch_device(config.device)
    bridge = to_torch(loaded.proto)
    tester = FeatureMapTester(bridge, dataset.x, dataset.y, preprocessing,
                              GradientTestConfig(config.eps, config.alpha, config.seed, config.max_batch), device)
    prepared = time.perf_counter()
    results = []
    total = sum(layer.out_channels for layer in layers)
    done = 0
    for layer in layers:
        def advance(k: int, name: str = layer.name) -> None:
            nonlocal done
            done += k
            if progress:
                progress(name, done, total)

        scores = tester.score_layer(layer, progress=advance)
        chosen = select(scores, config.selection, seed=config.seed, threshold=config.outlier_threshold,
                        samples=len(dataset))
        results.append(LayerResult(layer.name, layer.out_channels, layer.depthwise,
                                   [[round(float(v), 6) for v in row] for row in scores],
                                   chosen.flagged, chosen.to_dict()))
    finished = time.perf_counter()
    shape = loaded.image_input.shape
    return ScanReport(
        model={"path": str(loaded.path), "sha256": loaded.sha256, "opset": opset_version(loaded.proto),
               "input": {"name": loaded.image_input.name, "shape": list(shape) if shape else None}},
        config={"mode": "gradient", **asdict(config), "samples": len(dataset), **preprocessing.to_dict(),
                "torch_device": device, "bridge_steps": bridge.steps},
        layers=results, clean_accuracy=tester.clean_accuracy(), skipped_layers=skipped,
        timing={"prepare_s": round(prepared - started, 3), "testing_s": round(finished - prepared, 3),
                "total_s": round(time.perf_counter() - started, 3)},
    )
