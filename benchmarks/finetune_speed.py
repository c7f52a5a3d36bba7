"""Fine-tuning through the bridge against the same architecture written in torch.

For each architecture: the torch module (``native``) is exported to ONNX as the
benchmark models are (legacy exporter, opset 13, eval mode), and the ONNX graph
converted back with ``fmt_audit.backends.torch.bridge.to_torch`` (``bridge``). Both then run the
same training step (SGD with momentum, cross-entropy, train mode, batch 128 of
CIFAR-10 images), alternating in rounds so that both see the same machine state;
images/s is the median over rounds. ``fmt-audit fine_tune`` is the library's
whole loop on the bridged module (crop augmentation, gradient clipping, batch
and schedule bookkeeping), for reference.

The exporter folds a BatchNormalization that directly follows a Conv into the
Conv's weights, so the bridged module has fewer BatchNorm layers than the native
one where the architecture has that pattern (all of MobileNetV2, one per block
of the PreAct-ResNet): it is the same function, not the same op list.

    python benchmarks/finetune_speed.py cifar_quarter resnet18 mobilenetv2
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
from cases import publish

HEADER = ["model", "module", "batch", "images/s", "vs native", "BatchNorm layers"]
ROUNDS = 5


def native_module(name: str):
    import torch

    torch.manual_seed(0)
    if name == "cifar_quarter":
        from matrix import DATASETS, Normalize, PreActResNet18

        spec = DATASETS["cifar10"]
        return torch.nn.Sequential(Normalize(spec.mean, spec.std), PreActResNet18(16, 3, 10))
    import architectures

    return architectures._module(name)


def bridged(module):
    import onnx
    import torch

    from fmt_audit.backends.torch.bridge import to_torch

    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), torch.zeros(1, 3, 32, 32), buffer, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
                      opset_version=13, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    return proto, to_torch(proto)


def step_rate(module, x, y, steps: int) -> float:
    """Images/s of ``steps`` SGD steps of ``module`` on the batch ``x``."""
    import torch

    module.train()
    parameters = [p for p in module.parameters() if p.requires_grad_(True) is not None]
    optimizer = torch.optim.SGD(parameters, lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(module(x), y).backward()
        optimizer.step()
    return steps * len(x) / (time.perf_counter() - started)


def batchnorms(module) -> int:
    import torch

    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["cifar_quarter"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    args = parser.parse_args()
    import torch
    from matrix import load_shared

    from fmt_audit.backends.torch.bridge import BridgedClassifier
    from fmt_audit.data import Dataset, Preprocessing
    from fmt_audit.repair.finetune import FineTuneConfig, fine_tune

    cifar = load_shared("cifar10")
    x_np = cifar["x_train"][:args.batch].astype(np.float32) / 255
    x, y = torch.from_numpy(x_np), torch.from_numpy(cifar["y_train"][:args.batch])
    rows = []
    for name in args.models:
        native = native_module(name)
        _proto, bridge = bridged(native)
        rates: dict[str, list[float]] = {"native": [], "bridge": []}
        for module in (native, bridge.module):   # warm-up
            step_rate(module, x, y, 2)
        for _ in range(ROUNDS):
            rates["native"].append(step_rate(native, x, y, args.steps))
            rates["bridge"].append(step_rate(bridge.module, x, y, args.steps))
        native_rate = float(np.median(rates["native"]))
        for label, module in (("native", native), ("bridge", bridge.module)):
            rate = float(np.median(rates[label]))
            rows.append({"model": name, "module": label, "batch": args.batch, "images/s": round(rate, 1),
                         "vs native": round(rate / native_rate, 2), "BatchNorm layers": batchnorms(module)})
            print(rows[-1], flush=True)
        classifier = BridgedClassifier(bridge, Preprocessing(), "cpu")
        data = Dataset(np.ascontiguousarray(x_np[:args.batch]), cifar["y_train"][:args.batch])
        config = FineTuneConfig(epochs=args.steps, batch_size=args.batch)
        started = time.perf_counter()
        fine_tune(classifier, data, config, flip=False)
        rate = args.steps * args.batch / (time.perf_counter() - started)
        rows.append({"model": name, "module": "bridge, fmt-audit fine_tune", "batch": args.batch,
                     "images/s": round(rate, 1), "vs native": round(rate / native_rate, 2),
                     "BatchNorm layers": batchnorms(bridge.module)})
        print(rows[-1], flush=True)
    publish(rows, HEADER, f"finetune_speed_{'_'.join(args.models)}_threads{os.cpu_count()}")


if __name__ == "__main__":
    main()
