"""i-BAU (``repair --method ibau``): the implicit hypergradient, the unlearning loop, and the repair."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import SAMPLES
from fmt_audit_cli.main import main

from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
from fmt_audit.data import Preprocessing, load_npz
from fmt_audit.errors import ConfigError
from fmt_audit.model.loading import load_model
from fmt_audit.repair.config import IbauConfig, RepairConfig
from fmt_audit.repair.ibau import _hypergradient, ibau_unlearn
from fmt_audit.repair.methods.registry import COMPARED, METHODS

BADNETS = SAMPLES / "badnets_op13.onnx"


def test_the_hypergradient_is_the_direct_gradient_plus_the_fixed_point_sum():
    """On a tiny network, against the formula written out with explicit Jacobians: with J = d map / d delta
    and B = d map / d weights at the perturbation, the weights' gradient is d outer / d weights +
    B^T sum_{k < K} (J^T)^k d outer / d delta."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 2), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(2, 3))
    weights = list(net.parameters())
    images, labels = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 1])
    delta = torch.randn(1, 1, 2, 2)
    config = IbauConfig(fixed_point_steps=3, patched_share=0.5)

    def inner_map(d):
        loss = -torch.nn.functional.cross_entropy(net(images[:2] + d), labels[:2]) + 0.001 * d.pow(2).sum()
        (g,) = torch.autograd.grad(loss, d, create_graph=True)
        return d - 0.1 * g

    _hypergradient(net, weights, delta.clone(), images, labels, inner_map, config, np.random.default_rng(5))
    got = [w.grad.clone() for w in weights]

    patched = torch.zeros(4, dtype=torch.bool)
    patched[torch.from_numpy(np.random.default_rng(5).choice(4, size=2, replace=False))] = True
    flat_weights = torch.cat([w.detach().reshape(-1) for w in weights])
    sizes = [w.numel() for w in weights]

    def with_weights(flat):
        parts = torch.split(flat, sizes)
        return {name: part.view_as(w) for (name, w), part in zip(net.named_parameters(), parts, strict=True)}

    def outer(d, flat):
        x = images + patched.view(-1, 1, 1, 1) * d.view(1, 1, 2, 2)
        return torch.nn.functional.cross_entropy(torch.func.functional_call(net, with_weights(flat), (x,)), labels)

    def mapped(d, flat):
        def loss(dd):
            out = torch.func.functional_call(net, with_weights(flat), (images[:2] + dd.view(1, 1, 2, 2),))
            return -torch.nn.functional.cross_entropy(out, labels[:2]) + 0.001 * dd.pow(2).sum()
        return d - 0.1 * torch.func.grad(loss)(d)

    d0 = delta.reshape(-1)
    g_delta, g_weights = torch.func.grad(outer, argnums=(0, 1))(d0, flat_weights)
    jac_delta, jac_weights = torch.autograd.functional.jacobian(mapped, (d0, flat_weights))
    v = torch.zeros_like(d0)
    for _ in range(3):
        v = jac_delta.T @ v + g_delta
    expected = torch.split(g_weights + jac_weights.T @ v, sizes)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.reshape(-1), e.reshape(-1), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def badnets():
    loaded = load_model(BADNETS)
    return loaded, load_npz(SAMPLES / "defender.npz")


def test_unlearning_is_seeded_changes_the_weights_and_ends_in_evaluation_mode(badnets):
    loaded, data = badnets
    quick = IbauConfig(rounds=2)
    states = []
    for _ in range(2):
        classifier = BridgedClassifier(to_torch(loaded.classifier), Preprocessing())
        before = {k: v.clone() for k, v in classifier.module.state_dict().items()}
        evidence = ibau_unlearn(classifier, data, quick, seed=4)
        after = classifier.module.state_dict()
        assert not classifier.module.training
        assert any(not torch.equal(before[k], after[k]) for k in before)
        assert len(evidence["perturbation_norms"]) == 2 and evidence["rounds"] == 2
        states.append(after)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_frozen_module_is_unlearned_and_left_frozen(badnets):
    loaded, data = badnets
    classifier = BridgedClassifier(to_torch(loaded.classifier), Preprocessing())
    for weight in classifier.module.parameters():
        weight.requires_grad_(False)
    before = {k: v.clone() for k, v in classifier.module.state_dict().items()}
    evidence = ibau_unlearn(classifier, data.take(64, seed=0), IbauConfig(rounds=1), seed=0)
    assert any(not torch.equal(before[k], v) for k, v in classifier.module.state_dict().items())
    assert not any(weight.requires_grad for weight in classifier.module.parameters())
    assert evidence["patched_per_round"] == 0 and "plain fine-tuning" in evidence["warning"]


def test_settings_are_checked():
    for kwargs, option in (({"rounds": 0}, "--ibau-rounds"), ({"lr": 0.0}, "--ibau-lr"),
                           ({"lr": float("nan")}, "--ibau-lr"), ({"batch_size": 0}, "batch size"),
                           ({"inner_step": -1.0}, "inner step"), ({"patched_share": 2.0}, "patched share")):
        with pytest.raises(ConfigError, match=option):
            IbauConfig(**kwargs)
    assert "ibau" in METHODS and "ibau" in COMPARED


def test_cli_repair_method_ibau_removes_nothing_and_does_not_fine_tune(tmp_path):
    runner = CliRunner()
    out, saved = tmp_path / "ibau.onnx", tmp_path / "r.json"
    result = runner.invoke(main, ["repair", str(BADNETS), "--data", str(SAMPLES / "defender.npz"), "--method", "ibau",
                                  "--ibau-rounds", "2", "--verdict", "none", "-o", str(out), "--json", str(saved)])
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(out))
    report = json.loads(saved.read_text())
    assert report["method"] == "ibau" and report["config"]["ibau"]["rounds"] == 2
    assert report["flagged"]["evidence"]["rounds"] == 2 and report["epochs"] == []
    assert sum(map(len, report["flagged"]["layers"].values())) == 0
    # 180 training images: batches of 100 and 80, 1% of them one image per round
    assert report["flagged"]["evidence"]["patched_per_round"] == 1 and not report["warnings"]
    assert report["timing"]["ibau_s"] > report["timing"]["fine_tune_s"] >= 0
    repaired = load_model(out)
    test = load_npz(SAMPLES / "test.npz")
    changed = BridgedClassifier(to_torch(repaired.classifier), Preprocessing()).logits(test.x[:8])
    given = BridgedClassifier(to_torch(load_model(BADNETS).classifier), Preprocessing()).logits(test.x[:8])
    assert not np.allclose(changed, given)
    bad = runner.invoke(main, ["repair", str(BADNETS), "--data", str(SAMPLES / "defender.npz"), "--method", "ibau",
                               "--ibau-rounds", "0", "-o", str(tmp_path / "bad.onnx")])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1 and "--ibau-rounds" in bad.output
    assert RepairConfig(method="ibau").ibau == IbauConfig()
