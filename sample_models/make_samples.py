#!/usr/bin/env python
"""Generate the fmt-audit sample models and data sets.

Trains three tiny residual CNNs (clean, BadNets-poisoned, Blended-poisoned) on
scikit-learn's bundled ``digits`` data (no download), exports each to ONNX with
both the legacy TorchScript exporter (opset 13) and the dynamo exporter
(opset 18), verifies the exports, measures ACC/ASR through onnxruntime and
writes ``manifest.json``.  Everything is written next to this script.

Run from the repository root:

    .venv/bin/python sample_models/make_samples.py

The script is seeded and deterministic; it exits non-zero if any quality or
export check fails.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

SEED = 1234
OUT_DIR = Path(__file__).resolve().parent

IMG = 16
N_TEST = 500
N_DEFENDER = 200
EPOCHS = 30
BATCH = 64
LR = 3e-3
WEIGHT_DECAY = 1e-4

PRODUCER_NAME = "fmt-audit sample_models/make_samples.py"
PRODUCER_VERSION = "1.0"

# Attack configuration -------------------------------------------------------
BADNETS = {"target": 0, "poison_rate": 0.10, "size": 3}
BLENDED = {"target": 7, "poison_rate": 0.10, "alpha": 0.20}

MIN_CLEAN_ACC = 0.93
MIN_ASR = 0.90
MAX_ACC_DROP = 0.03
ATOL = 1e-4


class CheckError(RuntimeError):
    pass


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckError(msg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Data -----------------------------------------------------------------------
def load_data() -> tuple[np.ndarray, np.ndarray]:
    """digits 8x8 (0..16) -> uint8 16x16 (0..255), bilinear upsampling."""
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    x = F.interpolate(x, size=(IMG, IMG), mode="bilinear", align_corners=False)
    x = torch.clamp(torch.round(x), 0, 255).to(torch.uint8)[:, 0].numpy()
    y = d.target.astype(np.int64)
    return np.ascontiguousarray(x), y


def apply_badnets(x: np.ndarray) -> np.ndarray:
    """3x3 white square at the bottom-right corner (rows/cols 13..15)."""
    out = x.copy()
    s = BADNETS["size"]
    out[..., IMG - s:, IMG - s:] = 255
    return out


def make_blend_pattern(seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed + 7)
    return rng.randint(0, 256, size=(IMG, IMG)).astype(np.uint8)


def apply_blended(x: np.ndarray, pattern: np.ndarray, alpha: float) -> np.ndarray:
    out = (1.0 - alpha) * x.astype(np.float64) + alpha * pattern.astype(np.float64)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def random_shift(x: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Shift each image by dy, dx in {-1, 0, 1} with zero fill."""
    n = x.shape[0]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    dy = rng.randint(0, 3, size=n)
    dx = rng.randint(0, 3, size=n)
    out = np.empty_like(x)
    for oy in range(3):
        for ox in range(3):
            m = (dy == oy) & (dx == ox)
            if m.any():
                out[m] = padded[m, oy:oy + IMG, ox:ox + IMG]
    return out


def to_input(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) / 255.0)[:, None, :, :]


# Model ----------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.block1 = BasicBlock(16, 16, 1)
        self.block2 = BasicBlock(16, 32, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block1(x)
        x = self.block2(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def train_model(
    x: np.ndarray,
    y: np.ndarray,
    poison_fn,
    poison_mask: np.ndarray,
    seed: int,
) -> nn.Module:
    """Train on base images ``x``; rows in ``poison_mask`` get the trigger
    applied *after* augmentation so the trigger stays in a fixed place."""
    seed_everything(seed)
    rng = np.random.RandomState(seed)
    model = TinyResNet()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = (len(x) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, epochs=EPOCHS, steps_per_epoch=steps_per_epoch
    )
    yt = torch.from_numpy(y)
    for _epoch in range(EPOCHS):
        model.train()
        xa = random_shift(x, rng)
        if poison_fn is not None and poison_mask.any():
            xa[poison_mask] = poison_fn(xa[poison_mask])
        xt = torch.from_numpy(to_input(xa))
        perm = torch.from_numpy(rng.permutation(len(x)))
        for i in range(steps_per_epoch):
            idx = perm[i * BATCH:(i + 1) * BATCH]
            logits = model(xt[idx])
            loss = F.cross_entropy(logits, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def build_poisoned_set(x, y, target, rate, rng):
    """Append poisoned copies (10% of the training set size) of non-target
    images, relabelled to ``target``."""
    n_poison = round(rate * len(x))
    candidates = np.flatnonzero(y != target)
    chosen = np.sort(rng.choice(candidates, size=n_poison, replace=False))
    xp = np.concatenate([x, x[chosen]])
    yp = np.concatenate([y, np.full(n_poison, target, dtype=np.int64)])
    mask = np.zeros(len(xp), dtype=bool)
    mask[len(x):] = True
    return xp, yp, mask, n_poison


# Export ---------------------------------------------------------------------
def clean_model_proto(m: onnx.ModelProto) -> None:
    """Strip doc strings / node metadata, set producer info (in place)."""
    m.producer_name = PRODUCER_NAME
    m.producer_version = PRODUCER_VERSION
    m.doc_string = ""
    del m.metadata_props[:]

    def scrub_graph(g: onnx.GraphProto) -> None:
        g.doc_string = ""
        del g.metadata_props[:]
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            vi.doc_string = ""
            del vi.metadata_props[:]
        for init in g.initializer:
            init.doc_string = ""
            del init.metadata_props[:]
        for node in g.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for attr in node.attribute:
                attr.doc_string = ""
                if attr.HasField("g"):
                    scrub_graph(attr.g)
                for sg in attr.graphs:
                    scrub_graph(sg)

    scrub_graph(m.graph)
    for fn in m.functions:
        fn.doc_string = ""
        del fn.metadata_props[:]
        for node in fn.node:
            node.doc_string = ""
            del node.metadata_props[:]


def postprocess(path: Path) -> None:
    # Keep whatever external-data layout the exporter chose: load without
    # resolving external tensors, edit metadata, write the graph file back.
    m = onnx.load(str(path), load_external_data=False)
    clean_model_proto(m)
    onnx.save_model(m, str(path))


def export_legacy(model: nn.Module, path: Path) -> None:
    dummy = torch.zeros(1, 1, IMG, IMG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            dummy,
            str(path),
            dynamo=False,
            opset_version=13,
            do_constant_folding=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    postprocess(path)


def export_dynamo(model: nn.Module, path: Path) -> None:
    dummy = torch.zeros(2, 1, IMG, IMG)
    for stale in (path, path.with_name(path.name + ".data")):
        if stale.exists():
            stale.unlink()
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (dummy,),
            str(path),
            dynamo=True,
            opset_version=18,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: batch}},
            verbose=False,
        )
    postprocess(path)


def external_data_files(path: Path) -> list[str]:
    m = onnx.load(str(path), load_external_data=False)
    locs = set()
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for kv in t.external_data:
                if kv.key == "location":
                    locs.add(kv.value)
    for loc in locs:
        require(not os.path.isabs(loc) and "/" not in loc and "\\" not in loc,
                f"{path.name}: external data location {loc!r} is not a plain relative name")
        require((path.parent / loc).exists(), f"{path.name}: missing external data file {loc}")
    return sorted(locs)


def inspect_export(path: Path) -> dict:
    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    op_types = sorted({n.op_type for n in g.node})
    allowzero_reshapes = [
        n.name for n in g.node
        if n.op_type == "Reshape"
        and any(a.name == "allowzero" and a.i == 1 for a in n.attribute)
    ]
    constant_nodes = []
    for n in g.node:
        if n.op_type != "Constant":
            continue
        for a in n.attribute:
            if a.name == "value" and a.HasField("t"):
                dims = list(a.t.dims)
                constant_nodes.append({"name": n.name, "dims": dims,
                                       "numel": int(np.prod(dims)) if dims else 1})
            else:
                constant_nodes.append({"name": n.name, "attr": a.name})
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "opset": int(opset),
        "op_types": op_types,
        "n_nodes": len(g.node),
        "n_initializers": len(g.initializer),
        "batchnorm": "kept" if "BatchNormalization" in op_types else "folded",
        "allowzero_reshapes": allowzero_reshapes,
        "constant_nodes": constant_nodes,
        "external_data": external_data_files(path),
        "ir_version": int(m.ir_version),
        "functions": len(m.functions),
    }


def ort_session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def ort_predict(sess: ort.InferenceSession, x_uint8: np.ndarray, bs: int = 250) -> np.ndarray:
    outs = []
    for i in range(0, len(x_uint8), bs):
        outs.append(sess.run(["logits"], {"input": to_input(x_uint8[i:i + bs])})[0])
    return np.concatenate(outs)


def verify_export(path: Path, model: nn.Module, x_check: np.ndarray) -> ort.InferenceSession:
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort_session(path)
    require([i.name for i in sess.get_inputs()] == ["input"], f"{path.name}: bad input names")
    require([o.name for o in sess.get_outputs()] == ["logits"], f"{path.name}: bad output names")
    xin = to_input(x_check)
    with torch.no_grad():
        ref = model(torch.from_numpy(xin)).numpy()
    got = sess.run(["logits"], {"input": xin})[0]
    err = float(np.max(np.abs(ref - got)))
    require(got.shape == ref.shape and err <= ATOL,
            f"{path.name}: onnxruntime vs torch max abs diff {err:.3g} > {ATOL}")
    for bs in (1, 7):
        out = sess.run(["logits"], {"input": xin[:bs]})[0]
        require(out.shape == (bs, 10), f"{path.name}: batch {bs} gave shape {out.shape}")
        e = float(np.max(np.abs(out - ref[:bs])))
        require(e <= ATOL, f"{path.name}: batch {bs} max abs diff {e:.3g} > {ATOL}")
    print(f"  {path.name}: checker ok, max|ort-torch|={err:.2e}, batch 1/7 ok")
    return sess


# Main -----------------------------------------------------------------------
def main() -> int:
    t_start = time.time()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    seed_everything(SEED)

    x_all, y_all = load_data()
    perm = np.random.RandomState(SEED).permutation(len(x_all))
    test_idx = np.sort(perm[:N_TEST])
    def_idx = np.sort(perm[N_TEST:N_TEST + N_DEFENDER])
    train_idx = np.sort(perm[N_TEST + N_DEFENDER:])
    x_test, y_test = x_all[test_idx], y_all[test_idx]
    x_def, y_def = x_all[def_idx], y_all[def_idx]
    x_train, y_train = x_all[train_idx], y_all[train_idx]
    require(not (set(test_idx) & set(def_idx) or set(test_idx) & set(train_idx)
                 or set(def_idx) & set(train_idx)), "data splits are not disjoint")
    print(f"data: train={len(x_train)} defender={len(x_def)} test={len(x_test)}")

    pattern = make_blend_pattern(SEED)
    alpha = BLENDED["alpha"]
    blend_fn = lambda a: apply_blended(a, pattern, alpha)  # noqa: E731

    x_test_badnets = apply_badnets(x_test)
    x_test_blended = blend_fn(x_test)

    save = lambda name, x, y: np.savez_compressed(OUT_DIR / name, x=x, y=y)  # noqa: E731
    save("defender.npz", x_def, y_def)
    save("test.npz", x_test, y_test)
    save("badnets_test.npz", x_test_badnets, y_test)
    save("blended_test.npz", x_test_blended, y_test)

    # Train ---------------------------------------------------------------
    rng = np.random.RandomState(SEED + 1)
    configs = {}
    configs["clean"] = dict(x=x_train, y=y_train, fn=None,
                            mask=np.zeros(len(x_train), bool), n_poison=0)
    for name, cfg, fn in (("badnets", BADNETS, apply_badnets), ("blended", BLENDED, blend_fn)):
        xp, yp, mask, n_p = build_poisoned_set(x_train, y_train, cfg["target"], cfg["poison_rate"], rng)
        configs[name] = dict(x=xp, y=yp, fn=fn, mask=mask, n_poison=n_p)

    models = {}
    train_times = {}
    for i, (name, c) in enumerate(configs.items()):
        t0 = time.time()
        models[name] = train_model(c["x"], c["y"], c["fn"], c["mask"], SEED + 100 + i)
        train_times[name] = time.time() - t0
        with torch.no_grad():
            acc = (models[name](torch.from_numpy(to_input(x_test))).argmax(1).numpy() == y_test).mean()
        print(f"trained {name:8s} ({c['n_poison']} poisoned) in {train_times[name]:.1f}s, torch acc={acc:.4f}")

    # Export + verify ------------------------------------------------------
    triggered = {"badnets": x_test_badnets, "blended": x_test_blended}
    attack_cfg = {"none": None, "badnets": BADNETS, "blended": BLENDED}
    trigger_desc = {
        "none": None,
        "badnets": "3x3 white square (value 255) at bottom-right corner, rows 13..15, cols 13..15 (16x16 image)",
        "blended": f"full-image blend x'=(1-a)*x+a*P, a={alpha}, P fixed seeded uniform-random 16x16 uint8 pattern",
    }
    x_check = x_test[:64]
    entries = []
    inspections = {}
    results = {}
    for exporter, opset in (("legacy", 13), ("dynamo", 18)):
        for name in ("clean", "badnets", "blended"):
            attack = "none" if name == "clean" else name
            path = OUT_DIR / f"{name}_op{opset}.onnx"
            if exporter == "legacy":
                export_legacy(models[name], path)
            else:
                export_dynamo(models[name], path)
            sess = verify_export(path, models[name], x_check)
            info = inspect_export(path)
            require(info["opset"] == opset, f"{path.name}: opset {info['opset']} != {opset}")
            inspections[path.name] = info

            acc = float((ort_predict(sess, x_test).argmax(1) == y_test).mean())
            asr = None
            if attack != "none":
                tgt = attack_cfg[attack]["target"]
                keep = y_test != tgt
                pred = ort_predict(sess, triggered[attack][keep]).argmax(1)
                asr = float((pred == tgt).mean())
            results[path.name] = (acc, asr)
            cfg = attack_cfg[attack]
            ext = info["external_data"]
            entries.append({
                "file": path.name,
                "exporter": exporter,
                "opset": opset,
                "attack": attack,
                "target": None if cfg is None else cfg["target"],
                "poison_rate": 0.0 if cfg is None else cfg["poison_rate"],
                "trigger": trigger_desc[attack],
                "batchnorm": info["batchnorm"],
                "external_data": ext[0] if len(ext) == 1 else (ext or None),
                "acc": round(acc, 4),
                "asr": None if asr is None else round(asr, 4),
                "triggered_test": None if attack == "none" else f"{attack}_test.npz",
            })

    # Quality requirements (measured through onnxruntime) -------------------
    for opset in (13, 18):
        clean_acc = results[f"clean_op{opset}.onnx"][0]
        require(clean_acc >= MIN_CLEAN_ACC,
                f"clean_op{opset}.onnx: clean acc {clean_acc:.4f} < {MIN_CLEAN_ACC}")
        for name in ("badnets", "blended"):
            acc, asr = results[f"{name}_op{opset}.onnx"]
            require(asr >= MIN_ASR, f"{name}_op{opset}.onnx: ASR {asr:.4f} < {MIN_ASR}")
            require(acc >= clean_acc - MAX_ACC_DROP,
                    f"{name}_op{opset}.onnx: acc {acc:.4f} more than {MAX_ACC_DROP} below clean {clean_acc:.4f}")

    manifest = {
        "seed": SEED,
        "data": {
            "source": (
                "sklearn.datasets.load_digits (8x8, 0..16) scaled to 0..255, bilinear-upsampled "
                "to 16x16 (align_corners=False), rounded, clipped"),
            "format": "NHW uint8, grayscale, model input = x/255 as [N,1,16,16] float32",
            "image_shape": [IMG, IMG],
            "value_range": [0, 255],
            "arrays": {"x": "uint8 (N, 16, 16)", "y": "int64 (N,) true labels 0..9"},
            "files": {
                "defender.npz": f"clean defender subset with true labels ({len(x_def)} images)",
                "test.npz": f"clean test set ({len(x_test)} images)",
                "badnets_test.npz": "test set with BadNets trigger applied to every image, original true labels",
                "blended_test.npz": "test set with Blended trigger applied to every image, original true labels",
            },
            "splits": {"attacker_train": len(x_train), "defender": len(x_def), "test": len(x_test),
                       "disjoint": True},
        },
        "model_io": {"input": "input float32 [batch,1,16,16] in [0,1]", "output": "logits float32 [batch,10]"},
        "architecture": (
            "stem Conv1->16+BN+ReLU; residual block 16->16 (identity); residual block "
            "16->32 stride 2 (1x1 projection); global avg pool; Linear 32->10"),
        "metrics": (
            "acc = clean test accuracy; asr = share of triggered test images with true "
            "label != target predicted as target; both measured with onnxruntime CPU"),
        "models": entries,
    }
    (OUT_DIR / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    print("\nresults (onnxruntime):")
    for e in entries:
        asr = "  -   " if e["asr"] is None else f"{e['asr']:.4f}"
        print(f"  {e['file']:20s} acc={e['acc']:.4f} asr={asr} bn={e['batchnorm']} ext={e['external_data']}")
    print("\nexport inspection:")
    for fname, info in inspections.items():
        print(f"  {fname}: ops={info['op_types']} nodes={info['n_nodes']} inits={info['n_initializers']} "
              f"allowzero_reshape={len(info['allowzero_reshapes'])} constants={info['constant_nodes']} "
              f"ext={info['external_data']} ir={info['ir_version']} functions={info['functions']}")
    print("\ntraining time: " + ", ".join(f"{k}={v:.1f}s" for k, v in train_times.items())
          + f" (total {sum(train_times.values()):.1f}s)")
    print(f"total wall time: {time.time() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckError as exc:
        print(f"CHECK FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
