"""The self-check's patch evidence (fmt_audit.repair.patch_evidence): the patch's shape, the classes compared, when
a class leads, the stamp the stronger try uses, and the search on the bundled samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SAMPLES

from fmt_audit.repair.patch_evidence import (
    FLOOR,
    FoundPatch,
    measurable,
    patch_shape,
    reference_classes,
    stands_out,
)

TARGET = next(m["target"] for m in json.loads((SAMPLES / "manifest.json").read_text())["models"]
              if m["attack"] == "badnets")


@pytest.mark.parametrize(("height", "width", "shape"), [(32, 32, (4, 2)), (28, 28, (4, 2)), (16, 16, (2, 1)),
                                                       (224, 200, (25, 12)), (8, 8, (1, 1))])
def test_the_patch_is_an_eighth_of_the_shorter_side_on_a_grid_of_half_that(height, width, shape):
    assert patch_shape(height, width) == shape


def test_the_classes_compared_are_all_others_or_a_seeded_sample():
    assert reference_classes(10, 3, seed=0) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    many = reference_classes(43, 7, seed=0)
    assert len(many) == 9 and 7 not in many and many == sorted(many) and many == reference_classes(43, 7, seed=0)
    assert many != reference_classes(43, 7, seed=1)


@pytest.mark.parametrize(("success", "others", "expected"), [
    (0.95, [0.48, 0.3, 0.27, 0.2], True),       # the failed repair's figures (development)
    (0.224, [0.214, 0.2, 0.167, 0.1], False),   # ahead of every other class, not twice their median
    (0.543, [0.543, 0.3, 0.19], False),         # a tie is no lead
    (0.08, [0.01, 0.0], False),                 # leads, but under the floor
    (FLOOR + 0.01, [], True),                   # nothing to compare with: the floor alone
])
def test_a_class_leads_when_above_the_floor_every_other_class_and_twice_their_median(success, others, expected):
    assert stands_out(success, others) is expected


def test_a_sample_too_small_to_measure_a_patch_is_not_searched():
    from fmt_audit.data import Dataset

    y = np.repeat(np.arange(10), 4)         # 36 images of other classes for every class
    assert measurable(Dataset(np.zeros((40, 1, 8, 8), np.float32), y), 3, 10)
    assert not measurable(Dataset(np.zeros((20, 1, 8, 8), np.float32), y[::2]), 3, 10)
    # the bound: twice the images the content is fitted on, of other classes than every class searched
    at_bound = np.array([0] * 40 + [1] * 16 + [2] * 16)      # 32 images not of class 0
    assert measurable(Dataset(np.zeros((72, 1, 8, 8), np.float32), at_bound), 1, 3)
    below = np.array([0] * 40 + [1] * 15 + [2] * 16)         # 31: class 0 is a class that 1 is compared with
    assert not measurable(Dataset(np.zeros((71, 1, 8, 8), np.float32), below), 1, 3)


def test_the_grid_covers_every_row_and_column_of_a_wide_image():
    from fmt_audit.repair.patch_evidence import grid

    spots = grid(20, 32, 3, 2)
    rows, columns = sorted({r for r, _ in spots}), sorted({c for _, c in spots})
    assert rows == [0, 2, 4, 6, 8, 10, 12, 14, 16, 17] and columns[-1] == 29 and len(columns) == 16
    assert len(spots) == len(rows) * len(columns)
    covered = np.zeros((20, 32), bool)
    for r, c in spots:
        covered[r:r + 3, c:c + 3] = True
    assert covered.all()


def test_the_stamp_puts_the_patch_at_its_place():
    content = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3) / 20
    mask, pattern = FoundPatch(0, 0.9, (4, 1), content).stamp((2, 8, 8))
    assert mask.shape == (1, 8, 8) and pattern.shape == (2, 8, 8)
    assert mask.sum() == 9 and mask[0, 4:7, 1:4].eq(1).all()
    assert torch.equal(pattern[:, 4:7, 1:4], torch.from_numpy(content)) and pattern.sum() == content.sum()


def test_the_anchored_evidence_leads_on_an_unrepaired_backdoor_and_not_on_the_clean_model():
    """The BadNets sample searched as if it were its own repair: the target's patch at the anchor (near the
    trigger) leads the other classes' patches there; the clean sample's does not."""
    from fmt_audit.backends.torch.logits import logit_classifier
    from fmt_audit.data import Preprocessing, load_data
    from fmt_audit.model.loading import load_model
    from fmt_audit.repair.patch_evidence import patch_evidence

    figures = {}
    for name in ("badnets", "clean"):
        loaded = load_model(SAMPLES / f"{name}_op13.onnx")
        sample = load_data(SAMPLES / "defender.npz", loaded.image_input, loaded.num_classes).take(180, seed=0)
        classifier, classes, _ = logit_classifier(loaded.proto, loaded.image_input, Preprocessing(), "cpu", None,
                                                  "test")
        evidence = patch_evidence(classifier, classifier, sample, TARGET, classes, seed=0)
        figures[name] = evidence.to_dict()
        again = patch_evidence(None, classifier, sample, TARGET, classes, seed=0, before=evidence)
        assert again.to_dict() == figures[name] and again.seconds > 0      # same seed, same fit; its time apart
    backdoor = figures["badnets"]
    assert backdoor["leads"] is True and backdoor["success"] > 0.5 and len(backdoor["references"]) == 9, backdoor
    assert backdoor["spot"][0] + 2 > 10 and backdoor["spot"][1] + 2 > 10     # the trigger's rows and columns: 13..15
    assert figures["clean"]["leads"] is False, figures["clean"]
