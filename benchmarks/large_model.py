"""A model past protobuf's 2 GiB limit, end to end: inspect, scan in both modes, repair.

Builds (once, cached) an image classifier of about 2.2 GB — a small Conv stack
and a 16,384 x 34,000 dense layer (two halves) of random weights — stored as ONNX with
external data, and runs the CLI commands on it, timing each and recording the
peak RSS of each command's process. Needs ~10 GB of free memory and ~5 GB of disk.

    python benchmarks/large_model.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import numpy as np
from cases import CACHE, SAMPLES

FOLDER = CACHE / "large_model"
HIDDEN = 34_000


def build():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model_path = FOLDER / "model.onnx"
    if model_path.exists():
        return model_path, FOLDER / "images.npz"
    FOLDER.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def tensor(name, *shape, scale):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [tensor("w1", 16, 1, 3, 3, scale=0.3), tensor("b1", 16, scale=0.1),
             tensor("w2", 64, 16, 3, 3, scale=0.1), tensor("b2", 64, scale=0.1),
             # two halves: no single tensor may reach 2 GiB either (it must be one protobuf message once)
             tensor("fc1a", HIDDEN // 2, 64 * 16 * 16, scale=0.01), tensor("fb1a", HIDDEN // 2, scale=0.01),
             tensor("fc1b", HIDDEN // 2, 64 * 16 * 16, scale=0.01), tensor("fb1b", HIDDEN // 2, scale=0.01),
             tensor("fc2", 10, HIDDEN, scale=0.01), tensor("fb2", 10, scale=0.01)]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc1a", "fb1a"], ["ha"], name="fc1a", transB=1),
             helper.make_node("Gemm", ["f", "fc1b", "fb1b"], ["hb"], name="fc1b", transB=1),
             helper.make_node("Concat", ["ha", "hb"], ["h"], name="concat", axis=1),
             helper.make_node("Relu", ["h"], ["rh"], name="relu3"),
             helper.make_node("Gemm", ["rh", "fc2", "fb2"], ["logits"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                              ["n", 1, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save_model(model, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data")
    with np.load(SAMPLES / "defender.npz") as data:
        np.savez(FOLDER / "images.npz", x=data["x"][:64], y=data["y"][:64])
    return model_path, FOLDER / "images.npz"


def run(*args) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from fmt_audit_cli.main import main; main()", *map(str, args)],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"command": " ".join(map(str, args[:1])), "exit": done.returncode, "seconds": round(seconds, 1),
            "peak_rss_mib_so_far": round(peak), "last_line": (done.stdout + done.stderr).strip().splitlines()[-1]}


if __name__ == "__main__":
    model, images = build()
    size = (model.parent / "model.onnx.data").stat().st_size
    print(f"model: {model} with {size / 1e9:.2f} GB of external data", flush=True)
    out = FOLDER / "repaired.onnx"
    for step in (["inspect", model],
                 ["scan", model, "--data", images, "--samples", "16"],
                 ["scan", model, "--data", images, "--samples", "16", "--mode", "gradient", "--eps", "0.1",
                  "--steps", "1"],
                 ["repair", model, "--data", images, "--samples", "16", "--epochs", "0", "-o", out]):
        print(json.dumps(run(*step)), flush=True)
    if out.exists():
        print(f"repaired: {out.stat().st_size} B model + {(FOLDER / 'repaired.onnx.data').stat().st_size / 1e9:.2f}"
              " GB of external data", flush=True)
