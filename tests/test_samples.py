"""The bundled samples are what the manifest says: measured, not asserted."""

import numpy as np
import pytest
from conftest import MANIFEST, SAMPLES

from fmt_audit.backends.onnxrt.session import create_session, run_batched
from fmt_audit.data import load_data
from fmt_audit.model.loading import load_model


def _predict(model, data):
    session = create_session(model.proto, "cpu")
    (logits,) = run_batched(session, model.image_input.name, data.x)
    return logits.argmax(1)


@pytest.mark.parametrize("entry", MANIFEST["models"], ids=lambda e: e["file"])
def test_manifest_figures_hold(entry):
    model = load_model(SAMPLES / entry["file"])
    test = load_data(SAMPLES / "test.npz", model.image_input, model.num_classes)
    acc = float((_predict(model, test) == test.y).mean())
    assert acc == pytest.approx(entry["acc"], abs=1e-4)
    clean_acc = next(m["acc"] for m in MANIFEST["models"] if m["attack"] == "none" and m["opset"] == entry["opset"])
    if entry["attack"] == "none":
        assert entry["target"] is None
        return
    triggered = load_data(SAMPLES / entry["triggered_test"], model.image_input, model.num_classes)
    keep = triggered.y != entry["target"]
    asr = float((_predict(model, triggered)[keep] == entry["target"]).mean())
    assert asr == pytest.approx(entry["asr"], abs=1e-4)
    assert asr >= 0.90
    assert acc >= clean_acc - 0.03


def test_samples_stay_small():
    total = sum(path.stat().st_size for path in SAMPLES.iterdir() if path.is_file())
    assert total < 2 * 1024 * 1024


def test_exporters_differ_as_documented():
    by_opset = {entry["opset"]: entry for entry in MANIFEST["models"]}
    assert set(by_opset) == {13, 18}
    assert by_opset[13]["exporter"] == "legacy" and by_opset[18]["exporter"] == "dynamo"
    for entry in MANIFEST["models"]:
        proto = load_model(SAMPLES / entry["file"]).proto
        assert proto.opset_import[0].version == entry["opset"]
    assert np.isfinite([m["acc"] for m in MANIFEST["models"]]).all()
