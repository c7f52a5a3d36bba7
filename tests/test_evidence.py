"""The evidence the combined verdict gathers, on the sample models: reversed triggers, the universal
ladder, reference networks and what transfers to them."""

import json

import numpy as np
import pytest
import torch
from conftest import SAMPLES

from fmt_audit.backends.torch.logits import logit_classifier
from fmt_audit.data import Dataset, Preprocessing, load_npz
from fmt_audit.errors import ConfigError, DataError
from fmt_audit.model.loading import load_model
from fmt_audit.verdict.combined import mask_ratio, transferred
from fmt_audit.verdict.config import CleanseConfig, ReferenceConfig, UniversalConfig
from fmt_audit.verdict.evidence.cleanse import cleanse_test, reverse_triggers
from fmt_audit.verdict.evidence.reference import train_reference
from fmt_audit.verdict.evidence.transfer import ReferenceCache, trained_references, transfer_to_references
from fmt_audit.verdict.evidence.universal import universal_ladder, universal_test

TARGETS = {m["attack"]: m["target"] for m in json.loads((SAMPLES / "manifest.json").read_text())["models"]
           if m["attack"] != "none"}
DATA = SAMPLES / "defender.npz"
QUICK_SEARCH = CleanseConfig(steps=100, images=16)     # a third of the default steps on half the images
QUICK_LADDER = UniversalConfig(images=16, steps=8)     # a sliver of the default effort (32 images, 20 steps)
FEW_STEPS = ReferenceConfig(steps=150)                 # of the default 400


def test_evidence_configs_are_checked():
    bad_settings = [(CleanseConfig, {"steps": 0}), (CleanseConfig, {"level": 1.5}), (CleanseConfig, {"cost": 0.0}),
                    (UniversalConfig, {"first": 0.0}), (UniversalConfig, {"factor": 1.0}),
                    (UniversalConfig, {"rungs": 0}), (UniversalConfig, {"level": 0.0}),
                    (ReferenceConfig, {"count": 0}), (ReferenceConfig, {"lr": float("nan")}),
                    (ReferenceConfig, {"crop": -1})]
    for config, bad in bad_settings:
        with pytest.raises(ConfigError):
            config(**bad)


def test_the_badnets_target_needs_a_far_smaller_trigger_found_where_the_patch_is():
    """On the sample BadNets model the target's reversed trigger is far smaller than the other classes'
    and sits in the patch's corner; on the clean sample the smallest class is an ordinary one."""
    data = load_npz(DATA).take(128, seed=0)
    found = {}
    for name in ("clean", "badnets"):
        loaded = load_model(SAMPLES / f"{name}_op13.onnx")
        triggers, notes = cleanse_test(loaded.proto, loaded.image_input, Preprocessing(), data, "cpu", QUICK_SEARCH)
        assert notes == [] and len(triggers.norms) == 10 and all(triggers.reached)
        assert triggers.masks.shape == (10, 1, 16, 16) and triggers.patterns.shape == (10, 1, 16, 16)
        assert all(0 < n < 1 for n in triggers.norms) and all(0 <= s <= 1 for s in triggers.success)
        found[name] = (triggers, *mask_ratio(triggers.norms))
    (bad_triggers, bad_class, bad_ratio), (clean_triggers, clean_class, clean_ratio) = found["badnets"], found["clean"]
    assert bad_class == TARGETS["badnets"] and bad_ratio > 2.5 > clean_ratio

    def corner(triggers, k):    # the share of the mask's mass in the patch's corner (rows and columns 12-15)
        mask = triggers.masks[k, 0]
        return float(mask[12:, 12:].sum() / mask.sum())
    assert corner(bad_triggers, bad_class) > 0.25 > 0.1 > corner(clean_triggers, clean_class)


def test_the_trigger_search_counts_its_steps_over_every_chunk_of_classes():
    """Classes fitted a few at a time (here 3, then 3, 3 and 1): the count runs over every chunk's steps, and
    counting changes no figure."""
    loaded = load_model(SAMPLES / "badnets_op13.onnx")
    data = load_npz(DATA).take(64, seed=0)
    config = CleanseConfig(steps=5, images=4, batch=12)
    classifier, classes, _ = logit_classifier(loaded.proto, loaded.image_input, Preprocessing(), "cpu", None, "test")
    told = []
    counted = reverse_triggers(classifier, data, classes, config, lambda done, total: told.append((done, total)))
    assert told == [(k, 20) for k in range(21)]
    plain = reverse_triggers(classifier, data, classes, config)
    assert counted == plain and np.array_equal(counted.masks, plain.masks)


def test_same_seed_same_triggers_and_a_small_set_is_refused():
    loaded = load_model(SAMPLES / "blended_op13.onnx")
    data = load_npz(DATA).take(64, seed=0)
    config = CleanseConfig(steps=10, images=8)
    runs = [cleanse_test(loaded.proto, loaded.image_input, Preprocessing(), data, "cpu", config)[0]
            for _ in range(2)]
    assert runs[0] == runs[1] and np.array_equal(runs[0].masks, runs[1].masks)
    other = cleanse_test(loaded.proto, loaded.image_input, Preprocessing(), data, "cpu",
                         CleanseConfig(steps=10, images=8, seed=1))[0]
    assert other.norms != runs[0].norms
    few = Dataset(data.x[:12], data.y[:12])
    with pytest.raises(DataError, match="trigger search needs, for every class, at least 8 held-out images"):
        cleanse_test(loaded.proto, loaded.image_input, Preprocessing(), few, "cpu", config)


def test_the_badnets_target_is_reached_far_ahead_of_the_clean_models_best_class():
    """On the sample BadNets model one faint perturbation sends most images to the target while the other
    classes stay far behind; on the clean sample the ladder climbs higher before any class leads."""
    data = load_npz(DATA).take(128, seed=0)
    ladders = {}
    for name in ("clean", "badnets"):
        loaded = load_model(SAMPLES / f"{name}_op13.onnx")
        ladder, notes = universal_test(loaded.proto, loaded.image_input, Preprocessing(), data, "cpu", QUICK_LADDER)
        assert notes == [] and len(ladder.budgets) == len(ladder.success) and len(ladder.success[0]) == 10
        assert ladder.budgets == sorted(ladder.budgets) and ladder.budgets[0] == QUICK_LADDER.first
        ladders[name] = ladder
    badnets, clean = ladders["badnets"], ladders["clean"]
    assert int(np.argmax(badnets.success[-1])) == TARGETS["badnets"]
    assert max(badnets.success[-1]) >= QUICK_LADDER.level         # the ladder stopped where a class took 90%
    assert badnets.budgets[-1] < clean.budgets[-1]


def test_same_seed_same_ladder_and_a_small_set_is_refused():
    loaded = load_model(SAMPLES / "badnets_op13.onnx")
    data = load_npz(DATA).take(64, seed=0)
    config = UniversalConfig(images=8, steps=4, rungs=2)
    runs = [universal_test(loaded.proto, loaded.image_input, Preprocessing(), data, "cpu", config)[0]
            for _ in range(2)]
    assert runs[0] == runs[1]
    other = universal_test(loaded.proto, loaded.image_input, Preprocessing(), data, "cpu",
                           UniversalConfig(images=8, steps=4, rungs=2, seed=1))[0]
    assert other.success != runs[0].success          # another seed draws other images to fit and to measure
    few = Dataset(data.x[:12], data.y[:12])
    with pytest.raises(DataError, match="at least 8 held-out images.* held out and [0-9]+ to fit"):
        universal_test(loaded.proto, loaded.image_input, Preprocessing(), few, "cpu", config)


def test_a_reference_learns_the_images_the_same_way_for_a_seed():
    data = load_npz(DATA).take(128, seed=0)
    runs = [train_reference(data, 10, "cpu", FEW_STEPS, seed) for seed in (0, 0, 1)]
    x = torch.from_numpy(data.x)
    with torch.no_grad():
        logits = [r(x).numpy() for r in runs]
    assert np.array_equal(logits[0], logits[1]) and not np.allclose(logits[0], logits[2])
    assert (logits[0].argmax(1) == data.y).mean() > 0.6      # far above the 10% of chance
    with pytest.raises(DataError, match="labels in \\[0, 4\\]"):
        train_reference(data, 5, "cpu", FEW_STEPS)
    with pytest.raises(DataError, match="at least 2 NCHW images"):
        train_reference(Dataset(data.x[:1], data.y[:1]), 10, "cpu", FEW_STEPS)


def test_a_reference_cache_trains_once_per_images_and_recipe(monkeypatch):
    """An explicit cache (a fleet on one data file) trains the references once; other images or another
    recipe train anew; without a cache nothing is kept."""
    import fmt_audit.verdict.evidence.transfer as transfer

    data = load_npz(DATA).take(64, seed=0)
    recipe = ReferenceConfig(count=2, steps=10)
    trained = []
    monkeypatch.setattr(transfer, "train_reference", lambda *a: trained.append(a) or train_reference(*a))
    cache = ReferenceCache(kept=4)
    first = trained_references(data, 10, "cpu", recipe, 0, cache)
    again = trained_references(Dataset(data.x.copy(), data.y.copy()), 10, "cpu", recipe, 0, cache)  # equal, not same
    assert again is first and len(first) == 2 and len(trained) == 2
    relabelled = Dataset(data.x, (data.y + 1) % 10)
    for other in ((relabelled, recipe, 0), (data, ReferenceConfig(count=2, steps=11), 0), (data, recipe, 1)):
        assert trained_references(other[0], 10, "cpu", other[1], other[2], cache) is not first
    assert len(trained) == 8
    trained_references(data.take(32, seed=1), 10, "cpu", recipe, 0, cache)
    assert trained_references(data, 10, "cpu", recipe, 0, cache) is not first      # the oldest set was dropped
    assert trained_references(data, 10, "cpu", recipe, 0) is not trained_references(data, 10, "cpu", recipe, 0)
    fresh, x = train_reference(data, 10, "cpu", recipe, 1), torch.from_numpy(data.x)
    with torch.no_grad():     # a kept network is the one a fresh training gives
        assert torch.equal(first[1](x), fresh(x))


def test_a_reference_cache_with_a_folder_trains_once_across_processes(monkeypatch, tmp_path, caplog):
    """A cache with a folder keeps each set on disk: a second cache on the folder (another process) loads the
    same networks without training; other images make another file; a file cut short or of another
    architecture is trained again and replaced; the files hold arrays only."""
    import fmt_audit.verdict.evidence.transfer as transfer

    data, recipe = load_npz(DATA).take(64, seed=0), ReferenceConfig(count=2, steps=10)
    trained = []
    monkeypatch.setattr(transfer, "train_reference", lambda *a: trained.append(a) or train_reference(*a))
    folder = tmp_path / "cache" / "references"      # made when first written
    first = trained_references(data, 10, "cpu", recipe, 0, ReferenceCache(folder=folder))
    files = list(folder.iterdir())
    assert len(trained) == 2 and len(files) == 1 and files[0].suffix == ".npz"
    with np.load(files[0], allow_pickle=False) as stored:      # readable without pickle
        assert len(stored.files) == 2 * len(first[0].module.state_dict())
    loaded = trained_references(data, 10, "cpu", recipe, 0, ReferenceCache(folder=folder))
    assert len(trained) == 2 and loaded is not first
    x = torch.from_numpy(data.x)
    with torch.no_grad():
        assert all(torch.equal(a(x), b(x)) for a, b in zip(first, loaded))
    trained_references(Dataset(data.x, (data.y + 1) % 10), 10, "cpu", recipe, 0, ReferenceCache(folder=folder))
    assert len(trained) == 4 and len(list(folder.iterdir())) == 2
    files[0].write_bytes(files[0].read_bytes()[:100])     # cut short
    again = trained_references(data, 10, "cpu", recipe, 0, ReferenceCache(folder=folder))
    assert len(trained) == 6 and "training them again" in caplog.text
    with torch.no_grad():
        assert all(torch.equal(a(x), b(x)) for a, b in zip(first, again))
    assert trained_references(data, 10, "cpu", recipe, 0, ReferenceCache(folder=folder)) and len(trained) == 6
    np.savez(files[0], **{"0/other": np.zeros(3)})      # not a set of reference networks
    trained_references(data, 10, "cpu", recipe, 0, ReferenceCache(folder=folder))
    assert len(trained) == 8 and not list(tmp_path.rglob("*.tmp"))
    arrays = dict(np.load(files[0]))
    np.savez(files[0], **{name: value.astype(str) for name, value in arrays.items()})    # text of the right shapes
    trained_references(data, 10, "cpu", recipe, 0, ReferenceCache(folder=folder))
    assert len(trained) == 10
    # a folder that cannot be written: the set is trained and used all the same, with a warning
    (tmp_path / "a file").write_text("")
    unkept = trained_references(data, 10, "cpu", recipe, 0, ReferenceCache(folder=tmp_path / "a file" / "cache"))
    assert len(trained) == 12 and "not kept" in caplog.text
    with torch.no_grad():
        assert all(torch.equal(a(x), b(x)) for a, b in zip(first, unkept))


def test_the_badnets_targets_perturbation_does_not_move_the_references():
    """On the sample BadNets model the ladder stops at the target, and the target's perturbation moves the
    model's held-out images into it but leaves the references where they were."""
    data = load_npz(DATA).take(128, seed=0)
    loaded = load_model(SAMPLES / "badnets_op13.onnx")
    classifier, classes, _ = logit_classifier(loaded.proto, loaded.image_input, Preprocessing(), "cpu", None, "test")
    ladder = universal_ladder(classifier, data, classes, QUICK_LADDER)
    moved = transfer_to_references(ladder, data, classes, "cpu", FEW_STEPS, QUICK_LADDER.seed)
    target = TARGETS["badnets"]
    assert len(moved.reference_success) == len(moved.reference_baseline) == FEW_STEPS.count
    assert ladder.perturbations.shape == (10, *data.x.shape[1:])
    assert all(len(h) >= 8 and (data.y[h] != k).all() for k, h in enumerate(ladder.held))
    assert int(np.argmax(ladder.success[-1])) == target and ladder.success[-1][target] >= QUICK_LADDER.level
    assert transferred(moved.reference_success, moved.reference_baseline, 10)[target] < 0.1
