"""The development matrix's replicas (benchmarks/matrix.py, cases.py): a method developed after the first models
were seen is measured on new models of the same cells, which must differ from the first ones and never be
picked up by a run that names the first ones."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import cases
import matrix


def test_a_replica_is_the_same_cell_from_other_seeds():
    (first,) = matrix.select("mnist-lenet-badnets-p10")
    (again,) = matrix.select("mnist-lenet-badnets-p10-r1")
    assert again.name == "mnist-lenet-badnets-p10-r1" and again.replica == 1
    assert (again.dataset, again.net, again.attack, again.rate) == (first.dataset, first.net, first.attack, first.rate)
    assert (again.norm, again.exporter, again.bn) == (first.norm, first.exporter, first.bn)
    assert again.seed != first.seed
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (200, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, 200)
    _, y_first, _ = matrix.poison(first, x, y)
    _, y_again, _ = matrix.poison(again, x, y)
    changed_first, changed_again = np.flatnonzero(y_first != y), np.flatnonzero(y_again != y)
    assert len(changed_first) == len(changed_again) > 0 and set(changed_first) != set(changed_again)


def test_a_part_without_a_replica_names_only_the_first_models():
    assert all(c.replica == 0 for c in matrix.select("plaincnn"))
    replicas = matrix.select("plaincnn-r2")
    assert replicas and all(c.replica == 2 and c.name.endswith("-r2") and "plaincnn" in c.name for c in replicas)
    assert {c.name for c in matrix.select("lenet-clean,plaincnn-clean-r1")} == {
        "mnist-lenet-clean", "cifar10-plaincnn-clean-r1", "mnist-plaincnn-clean-r1"}
    assert cases.replica_of("gtsrb-preact18q-wanet-p10") == ("gtsrb-preact18q-wanet-p10", 0)
    assert cases.replica_of("x-r0") == ("x-r0", 0)


def test_exported_folders_of_replicas_are_asked_for(tmp_path, monkeypatch):
    for name in ("cifar10-plaincnn-badnets-p10", "cifar10-plaincnn-badnets-p10-r1", "mnist-plaincnn-clean-r1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"")
    monkeypatch.setattr(cases, "MATRIX", tmp_path)
    assert [f.name for f in cases.matrix_folders("matrix:plaincnn")] == ["cifar10-plaincnn-badnets-p10"]
    assert [f.name for f in cases.matrix_folders("matrix:cifar10-plaincnn-badnets-p10-r1")] == [
        "cifar10-plaincnn-badnets-p10-r1"]
    assert [f.name for f in cases.matrix_folders("matrix:plaincnn-r1")] == [
        "cifar10-plaincnn-badnets-p10-r1", "mnist-plaincnn-clean-r1"]
