"""A model with channel masks, run in ONNX Runtime: one session, any mask setting.

:class:`MaskedModel` wraps an instrumented copy of the model (see
:mod:`fmt_audit.backends.onnxrt.instrument`). Every call feeds a mask per Conv layer — ones,
except where the caller says otherwise — so the same session gives the original
model, the model with channels removed (mask 0, what a repair does), or one mask
setting per image (a mask of batch size, how mask-mode testing runs many
settings at once). It needs no PyTorch: it covers every graph ORT runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx

from fmt_audit.backends.onnxrt.instrument import feature_output_name, instrument, mask_input_name
from fmt_audit.backends.onnxrt.session import Session, create_session, with_free_batch
from fmt_audit.data import Preprocessing
from fmt_audit.model.graph import ConvLayer, ImageInput, class_scores, conv_layers, image_input, with_node_names

ChannelSet = Mapping[str, Sequence[int]]


class MaskedModel:
    """``model`` instrumented with a mask after every Conv, in one ORT session."""

    def __init__(self, model: onnx.ModelProto, device: str = "auto", preprocessing: Preprocessing | None = None,
                 batch_size: int = 256, threads: int | None = None):
        named = with_free_batch(with_node_names(model))
        self.layers: list[ConvLayer] = conv_layers(named)
        self.image: ImageInput = image_input(named)
        self.preprocessing = preprocessing or Preprocessing()
        self.session: Session = create_session(instrument(named), device, threads=threads)
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
        images = self.preprocessing.apply(x).astype(np.float32, copy=False)
        feeds = {self.image.name: self.image.to_model_layout(images)}
        for layer in self.layers:
            feeds[mask_input_name(layer.name)] = (masks or {}).get(layer.name, self._ones[layer.name])
        names = [self.logits_name, *(feature_output_name(name) for name in features)]
        padded = self.image.batch is not None and len(x) < self.image.batch
        if padded:  # a model with a static batch size: pad the images and any per-image masks
            feeds = {k: _pad(v, self.image.batch) for k, v in feeds.items()}
        outputs = self.session.run(feeds, names)
        if padded:
            outputs = [o[:len(x)] for o in outputs]
        return class_scores(outputs[0]), dict(zip(features, outputs[1:]))

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
