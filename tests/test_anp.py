"""Adversarial Neuron Pruning (``repair --method anp``): the mask search, its settings, and the repair."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import SAMPLES, build_synthetic
from fmt_audit_cli.main import main

from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
from fmt_audit.data import Dataset, Preprocessing, load_npz
from fmt_audit.errors import ConfigError
from fmt_audit.model.graph import conv_layers, with_node_names
from fmt_audit.model.loading import load_model
from fmt_audit.repair.anp import anp_channels
from fmt_audit.repair.config import AnpConfig, FineTuneConfig, RepairConfig, repair_config
from fmt_audit.repair.pipeline import nonzero_removed, repair

BADNETS = SAMPLES / "badnets_op13.onnx"
QUICK = AnpConfig(iterations=8, batch_size=32)


@pytest.fixture(scope="module")
def badnets():
    loaded = load_model(BADNETS)
    return loaded, BridgedClassifier(to_torch(loaded.classifier), Preprocessing()), load_npz(SAMPLES / "defender.npz")


def _snapshot(module: torch.nn.Module):
    return ({key: value.detach().clone() for key, value in module.state_dict().items()},
            [sub.training for sub in module.modules()], [p.requires_grad for p in module.parameters()])


def _same(module: torch.nn.Module, snapshot) -> bool:
    state, modes, grads = snapshot
    now = module.state_dict()
    return (all(torch.equal(now[key], value) for key, value in state.items())
            and [sub.training for sub in module.modules()] == modes
            and [p.requires_grad for p in module.parameters()] == grads)


def test_the_search_is_deterministic_bounded_and_leaves_the_module_as_it_was(badnets):
    loaded, classifier, data = badnets
    before = _snapshot(classifier.module)
    first = anp_channels(classifier, loaded.layers, data, QUICK, seed=3)
    assert _same(classifier.module, before)
    assert all(not module._forward_hooks for module in classifier.bridge.channel_modules.values())
    again = anp_channels(classifier, loaded.layers, data, QUICK, seed=3)
    assert first.channels == again.channels and first.evidence["masks"] == again.evidence["masks"]
    evidence = first.evidence
    masks = evidence["masks"]
    assert set(masks) == {layer.name for layer in loaded.layers}
    assert all(len(masks[layer.name]) == layer.out_channels for layer in loaded.layers)
    values = np.concatenate([np.asarray(v) for v in masks.values()])
    assert values.min() >= 0 and values.max() <= 1 and values.min() < 1     # clipped, and moved
    # the rule: exactly the masks at or below the threshold
    assert first.channels == {name: [c for c, v in enumerate(m) if v <= QUICK.threshold]
                              for name, m in masks.items() if any(v <= QUICK.threshold for v in m)}
    assert evidence["iterations_run"] == 8 and evidence["settings"]["eps"] == 0.4
    assert evidence["settings"]["mode"] == "train" and evidence["rule"] == "prune where mask <= 0.2"
    assert set(evidence["carriers"].values()) == {"conv, batch-normalised"}     # BatchNorm folded in the sample
    assert evidence["trace"][-1]["iteration"] == 8
    # the clean pass at mask 1 is the model (train-mode normalisation with the clean statistics): the search
    # starts from the model's accuracy, not from a broken network
    assert evidence["trace"][0]["clean_accuracy"] > 0.8


def test_a_kept_batchnorm_carries_the_neuron_and_its_statistics_come_back():
    model = build_synthetic()
    layers = conv_layers(with_node_names(model))
    bridge = to_torch(model)
    classifier = BridgedClassifier(bridge, Preprocessing())
    rng = np.random.default_rng(0)
    data = Dataset(rng.random((40, 3, 8, 8), dtype=np.float32), rng.integers(0, 5, 40))
    norm = bridge.channel_modules["conv1"]
    assert isinstance(norm, torch.nn.modules.batchnorm._BatchNorm)
    before = _snapshot(bridge.module)
    choice = anp_channels(classifier, layers, data, AnpConfig(iterations=3, batch_size=8), seed=0)
    assert choice.evidence["carriers"]["conv1"] == "batchnorm"
    assert _same(bridge.module, before)     # the running statistics training mode moved are restored
    assert not bridge.module.training


def test_different_seeds_draw_different_batches(badnets):
    loaded, classifier, data = badnets
    one = anp_channels(classifier, loaded.layers, data, QUICK, seed=0).evidence["masks"]
    other = anp_channels(classifier, loaded.layers, data, QUICK, seed=1).evidence["masks"]
    assert one != other


@pytest.mark.parametrize(("settings", "message"), [
    ({"eps": -0.1}, "--anp-eps must be a number in \\[0, 1\\]; got -0.1"),
    ({"eps": float("nan")}, "--anp-eps"),
    ({"tradeoff": 1.5}, "--anp-tradeoff must be a number in \\[0, 1\\]; got 1.5"),
    ({"iterations": 0}, "--anp-iterations must be a whole number of at least 1; got 0"),
    ({"iterations": 2.5}, "--anp-iterations"),
    ({"threshold": 1.0}, "--anp-threshold must be a number in \\[0, 1\\)"),
    ({"steps": 0}, "adversary's steps"),
    ({"batch_size": 1}, "batch size must be at least 2"),
    ({"lr": 0}, "learning rate must be a positive number"),
])
def test_settings_are_checked_with_what_was_expected_and_given(settings, message):
    with pytest.raises(ConfigError, match=message):
        AnpConfig(**settings)


def test_repair_config_takes_the_flat_options_and_defaults_are_the_references():
    assert AnpConfig() == AnpConfig(eps=0.4, steps=1, tradeoff=0.2, lr=0.2, iterations=2000, batch_size=128,
                                    threshold=0.2)
    config = repair_config(method="anp", anp_eps=0.3, anp_tradeoff=0.5, anp_iterations=7, anp_threshold=0.1)
    assert config.anp == AnpConfig(eps=0.3, tradeoff=0.5, iterations=7, threshold=0.1)
    with pytest.raises(ConfigError, match="--anp-iterations"):
        repair_config(method="anp", anp_iterations=-1)


def test_repair_prunes_without_fine_tuning_and_verifies(badnets):
    loaded, _, data = badnets
    config = RepairConfig(FineTuneConfig(epochs=3), method="anp", anp=AnpConfig(iterations=6, batch_size=32,
                                                                                 threshold=0.6))
    report = repair(loaded, data, config).report
    assert report.method == "anp" and report.source == "anp"
    assert report.epochs == [] and report.config["epochs"] == 0      # ANP prunes and stops
    assert report.config["anp"]["iterations"] == 6 and report.evidence["threshold"] == 0.6
    assert report.evidence["summary"]["pruned"] == report.flagged_count
    assert report.verification["checker"] == "passed"
    assert report.accuracy["after"] == report.accuracy["after_removal"]


def test_cli_repair_method_anp_writes_the_model_and_refuses_bad_values(tmp_path):
    runner = CliRunner()
    out, saved = tmp_path / "anp.onnx", tmp_path / "r.json"
    result = runner.invoke(main, ["repair", str(BADNETS), "--data", str(SAMPLES / "defender.npz"), "--method", "anp",
                                  "--anp-iterations", "4", "--anp-threshold", "0.5", "--verdict", "none",
                                  "-o", str(out), "--json", str(saved)])
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(out))
    report = json.loads(saved.read_text())
    assert report["method"] == "anp" and report["config"]["anp"]["threshold"] == 0.5
    assert report["flagged"]["evidence"]["iterations_run"] == 4
    assert nonzero_removed(onnx.load(str(out)), report["flagged"]["layers"]) == []
    for option, value in (("--anp-eps", "2"), ("--anp-iterations", "0"), ("--anp-tradeoff", "-1"),
                          ("--anp-threshold", "1")):
        bad = runner.invoke(main, ["repair", str(BADNETS), "--data", str(SAMPLES / "defender.npz"), "--method", "anp",
                                   option, value, "-o", str(tmp_path / "bad.onnx")])
        assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1, bad.output
        assert option in bad.output


def test_compare_runs_anp_when_listed_and_not_by_default():
    from fmt_audit.repair.comparison import compare
    from fmt_audit.repair.methods.registry import COMPARED, METHODS

    assert "anp" in METHODS and "anp" not in COMPARED
    comparison = compare(BADNETS, SAMPLES / "defender.npz", SAMPLES / "test.npz", methods=["anp"],
                         config=RepairConfig(anp=AnpConfig(iterations=3, batch_size=16)))
    outcome = comparison.outcomes[0]
    assert outcome.error is None and outcome.repair.method == "anp" and outcome.repair.epochs == []
