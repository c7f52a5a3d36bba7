"""A model with channel masks, run in ONNX Runtime: one session, any mask setting.

:class:`MaskedModel` wraps an instrumented copy of the model (see
:mod:`fmt_audit.backends.onnxrt.instrument`). Every call feeds a mask per Conv layer — ones,
except where the caller says otherwise — so the same session gives the original
model, the model with channels removed (mask 0, what a repair does), or one mask
setting per image (a mask of batch size, how mask-mode testing runs many
settings at once). It needs no PyTorch: it covers every graph ORT runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx

from fmt_audit.backends.onnxrt.instrument import feature_output_name, instrument, mask_input_name
from fmt_audit.backends.onnxrt.session import Session, create_session, with_free_batch
from fmt_audit.data import Preprocessing
from fmt_audit.errors import first_line
from fmt_audit.model.graph import (
    ChannelSet,
    ConvLayer,
    ImageInput,
    class_scores,
    conv_layers,
    image_input,
    with_node_names,
)

log = logging.getLogger(__name__)
# a layer's cut graph must give the whole graph's class scores within this, relative to max(1, |largest|)
# (the audit runs float16 graphs widened to float32: fmt_audit.model.graph.float32_view)
CUT_TOLERANCE = 1e-4


class MaskedModel:
    """``model`` instrumented with a mask after every Conv, in one ORT session."""

    def __init__(self, model: onnx.ModelProto, device: str = "auto", preprocessing: Preprocessing | None = None,
                 batch_size: int = 256, threads: int | None = None, cut_memory: float | None = None):
        named = with_free_batch(with_node_names(model))
        self.layers: list[ConvLayer] = conv_layers(named)
        self.image: ImageInput = image_input(named)
        self.preprocessing = preprocessing or Preprocessing()
        self.instrumented = instrument(named)
        self.session: Session = create_session(self.instrumented, device, threads=threads)
        self.device = self.session.device     # the cut graphs run where the whole one does
        self.threads = threads
        self._cut = self._graph = None
        self.cut_memory = cut_memory        # bytes the cut may keep of one layer's feature maps; None: no limit
        self.cuts: dict[str, bool] = {}     # per layer tested: whether its cut graph ran (else the whole)
        self.logits_name = named.graph.output[0].name
        self.batch_size = batch_size if self.image.batch is None else self.image.batch
        self._ones = {layer.name: np.ones((1, layer.out_channels, 1, 1), np.float32) for layer in self.layers}

    @property
    def provider(self) -> str:
        return self.session.provider

    def masks(self, removed: ChannelSet | None = None) -> dict[str, np.ndarray]:
        """Mask arrays for every layer: ones, with the ``removed`` channels at 0."""
        out = {}
        for layer in self.layers:
            channels = (removed or {}).get(layer.name, ())
            if not channels:
                out[layer.name] = self._ones[layer.name]
                continue
            mask = np.ones((1, layer.out_channels, 1, 1), np.float32)
            mask[:, list(channels)] = 0.0
            out[layer.name] = mask
        return out

    def run(self, x: np.ndarray, masks: Mapping[str, np.ndarray] | None = None,
            features: Sequence[str] = ()) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits and the requested layers' (unmasked) feature maps for one batch of [0,1] images.

        ``masks`` maps layer names to ``[1 or len(x), C, 1, 1]`` arrays; missing layers get ones.
        """
        feeds = self._feeds(x, masks)
        names = [self.logits_name, *(feature_output_name(name) for name in features)]
        padded = self.image.batch is not None and len(x) < self.image.batch
        if padded:  # a model with a static batch size: pad the images and any per-image masks
            feeds = {k: _pad(v, self.image.batch) for k, v in feeds.items()}
        outputs = self.session.run(feeds, names)
        if padded:
            outputs = [o[:len(x)] for o in outputs]
        return class_scores(outputs[0]), dict(zip(features, outputs[1:]))

    def _feeds(self, x: np.ndarray, masks: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        images = self.preprocessing.apply(x).astype(np.float32, copy=False)
        feeds = {self.image.name: self.image.to_model_layout(images)}
        for layer in self.layers:
            feeds[mask_input_name(layer.name)] = (masks or {}).get(layer.name, self._ones[layer.name])
        return feeds

    def replicated_predictions(self, layer: str, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Top-1 predictions of ``len(mask) // len(x)`` copies of ``x``, copy r with rows ``r * n:(r + 1) * n``
        of ``mask`` as layer ``layer``'s mask (every other mask at one).

        Only the part of the graph the mask can change runs per copy (:mod:`fmt_audit.backends.onnxrt.suffix`):
        the rest runs once per layer and images. Where the graph cannot be cut there, the cut does not give
        the whole graph's class scores on two copies of the first batch of ``x``, or running it fails, the
        whole graph runs on the copies (``cuts`` says which layers ran cut).
        """
        replicas = len(mask) // len(x)
        cut = self._cut_at(layer, x)
        if cut is not None:
            try:
                return self._cut_scores(cut, np.arange(len(mask)) % len(x), mask).argmax(1)
            except Exception as error:      # any failure of the cut: the whole graph, as before the cut
                log.info("layer %s: the cut graph failed (%s); the whole graph runs", layer, first_line(error))
                self._cut, self.cuts[layer] = (self._cut[0], None), False
        return self.predict(np.concatenate([x] * replicas), masks={layer: mask})

    def _cut_at(self, layer: str, x: np.ndarray):
        """``(suffix, boundary of x, other feeds)`` for ``layer``, kept for the last layer and images asked
        (the very array: the cache holds it); None where the whole graph has to run."""
        if self._cut is not None and self._cut[0][0] == layer and self._cut[0][1] is x:
            return self._cut[1]
        self._cut = None
        found = self._cut_for(layer, x) if self.image.batch is None else None
        self._cut = ((layer, x), found)
        self.cuts[layer] = found is not None
        return found

    def _cut_for(self, layer: str, x: np.ndarray):
        from fmt_audit.backends.onnxrt.suffix import LayerSuffix

        try:
            if self._graph is None:
                self._graph = LayerSuffix.typed_graph(self.instrumented)
            suffix = LayerSuffix(self._graph, self.instrumented, layer, self.image.name, self.logits_name,
                                 self.device, self.threads)
            parts: dict[str, list[np.ndarray]] = {}
            for part in self.batches(x):
                values = suffix.boundary_values(self._feeds(x[part]))
                need = sum(value.nbytes for value in values.values()) / (part.stop - part.start) * len(x) * 2
                if self.cut_memory is not None and need > self.cut_memory:      # kept, and concatenated once
                    log.info("layer %s: its feature maps for %d images (%.0f MiB) exceed the memory for the cut; "
                             "the whole graph runs", layer, len(x), need / 2**20)
                    return None
                for name, value in values.items():
                    parts.setdefault(name, []).append(value)
            boundary = {name: np.concatenate(values) for name, values in parts.items()}
            feeds = {name: value for name, value in self._feeds(x[:1]).items() if name != self.image.name}
            cut = (suffix, boundary, feeds)
            # the check: two copies of the first batch, cut as the scoring cuts them, against the whole graph
            first = x[:self.batch_size]
            ones = np.ones((2 * len(first), *self._ones[layer].shape[1:]), np.float32)
            expected = np.concatenate([class_scores(self.session.run(self._feeds(first), [self.logits_name])[0])] * 2)
            got = self._cut_scores(cut, np.concatenate([np.arange(len(first))] * 2), ones)
        except Exception as error:      # any failure to cut: the whole graph, as before the cut
            log.info("layer %s: the graph cannot be cut there (%s); the whole graph runs", layer, first_line(error))
            return None
        scale = max(1.0, float(np.abs(expected).max()))
        if got.shape != expected.shape or float(np.abs(got - expected).max()) > CUT_TOLERANCE * scale:
            log.info("layer %s: the cut graph does not give the whole graph's scores; the whole graph runs", layer)
            return None
        return cut

    def _cut_scores(self, cut, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Class scores through ``cut`` of the images ``rows`` (indices into the cut's images; replica-major
        copies repeat them), row k with row k of ``mask``."""
        suffix, boundary, feeds = cut
        out = []
        for start in range(0, len(rows), self.batch_size):
            part = rows[start:start + self.batch_size]
            out.append(suffix.scores({name: value[part] for name, value in boundary.items()}, feeds,
                                     mask[start:start + self.batch_size]))
        return np.concatenate(out)

    def batches(self, x: np.ndarray) -> Iterator[slice]:
        for start in range(0, len(x), self.batch_size):
            yield slice(start, min(start + self.batch_size, len(x)))

    def predict(self, x: np.ndarray, removed: ChannelSet | None = None,
                masks: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Top-1 predictions for ``x``, with the ``removed`` channels silenced or under explicit ``masks``.

        Masks of ``len(x)`` rows (one setting per image) are cut into batches along with ``x``.
        """
        masks = self.masks(removed) if masks is None else masks
        out = []
        for part in self.batches(x):
            batch_masks = {name: m if len(m) == 1 else m[part] for name, m in masks.items()}
            out.append(self.run(x[part], batch_masks)[0].argmax(1))
        return np.concatenate(out)

    def peaks(self, x: np.ndarray, layers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Per image and channel, the spatial maximum of each layer's feature map: ``{layer: [N, C]}``."""
        names = [layer.name for layer in self.layers] if layers is None else list(layers)
        out: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for part in self.batches(x):
            _, features = self.run(x[part], features=names)
            for name, value in features.items():
                out[name].append(value.reshape(*value.shape[:2], -1).max(axis=2))
        return {name: np.concatenate(values) for name, values in out.items()}


def _pad(value: np.ndarray, size: int) -> np.ndarray:
    if len(value) in (1, size):
        return value
    return np.concatenate([value, np.repeat(value[-1:], size - len(value), axis=0)])
