"""What removing channels does, for the research scripts of issue 31: ACC and ASR of a model with channels
removed (masks at 0, ONNX Runtime), and as many random channels per layer."""

from __future__ import annotations

import numpy as np


def acc_asr(masked, case, removed) -> tuple[float, float | None]:
    acc = float((masked.predict(case.test.x, removed) == case.test.y).mean())
    if case.triggered is None:
        return round(acc, 4), None
    victims = case.test.y != case.target
    asr = float((masked.predict(case.triggered[victims], removed) == case.target).mean())
    return round(acc, 4), round(asr, 4)


def random_like(chosen: dict[str, list[int]], sizes: dict[str, int], seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    return {name: sorted(rng.choice(sizes[name], len(c), replace=False).tolist()) for name, c in chosen.items()}


def opened(case):
    """(loaded model, its ORT masked model, its torch classifier, the defender data) of a benchmark case."""
    from fmt_audit.backends.onnxrt.masked import MaskedModel
    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.data import Preprocessing, load_npz
    from fmt_audit.model.loading import load_model

    loaded = load_model(case.model)
    preprocessing = Preprocessing(case.mean, case.std)
    return (loaded, MaskedModel(loaded.proto, "cpu", preprocessing),
            BridgedClassifier(to_torch(loaded.proto), preprocessing, "cpu"), load_npz(case.defender))
