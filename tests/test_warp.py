"""The warp search (:mod:`fmt_audit.verdict.evidence.warp`) and its part in the combined verdict: a smooth flow
field per class; a warping backdoor's target takes nearly every warped image, a clean or patch-poisoned model
is hardly moved by a sub-pixel warp."""

import json

import numpy as np
import pytest
import torch
from conftest import SAMPLES

from fmt_audit.backends.torch.logits import logit_classifier
from fmt_audit.data import Dataset, Preprocessing, load_npz
from fmt_audit.errors import ConfigError
from fmt_audit.model.loading import load_model
from fmt_audit.verdict import describe, figures
from fmt_audit.verdict.combined import WARP_CUT, TransferFigures, TriggerFigures, WarpFigures, combined_verdict
from fmt_audit.verdict.config import WarpConfig
from fmt_audit.verdict.evidence.warp import Warp, warp_search

TARGETS = {m["attack"]: m["target"] for m in json.loads((SAMPLES / "manifest.json").read_text())["models"]
           if m["attack"] != "none"}
NOTHING = [[0.0] * 5]
ORDINARY = TriggerFigures([0.10, 0.09, 0.11, 0.10, 0.12])                      # no class stands out
FLAT = TransferFigures([0.01], [[0.3, 0.35, 0.3, 0.0, 0.0]], NOTHING, NOTHING)     # a lead of 0.05


def value(verdict):
    return verdict.suspicion / (1 - verdict.suspicion)


def test_the_warp_config_is_checked():
    for bad in ({"budgets": ()}, {"budgets": (0.0,)}, {"budgets": (0.5, -1.0)}, {"grid": 1}, {"steps": 0},
                {"images": 0}, {"lr": float("nan")}):
        with pytest.raises(ConfigError, match="warp search"):
            WarpConfig(**bad)


def test_a_warp_moves_pixels_by_at_most_its_budget():
    warp = Warp(16, 16, 0.5)
    # alternating large arguments: the bicubic curve between its points overshoots them, and is clamped
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])
    checker = signs[:, None] * signs[None, :]
    arguments = 50.0 * torch.stack([checker, -checker])[None]
    field = warp.fields(arguments)[0]
    assert field.shape == (2, 16, 16) and field.abs().max() <= 0.5 + 1e-6
    # the lattice's points (pixels 0, 5, 10, 15 of 16, corners aligned) are the bounded arguments themselves
    assert torch.allclose(field[:, ::5, ::5], 0.5 * torch.tanh(arguments[0]), atol=1e-6)
    gentle = 0.3 * torch.randn((1, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(warp.fields(gentle)[0][:, ::5, ::5], 0.5 * torch.tanh(gentle[0]), atol=1e-6)
    image = torch.zeros(1, 1, 16, 16)
    image[..., 8] = 1.0                                     # a vertical line at column 8
    shifted = warp.apply(image, torch.stack([torch.full((16, 16), 1.0), torch.zeros(16, 16)]))
    # each pixel is read one pixel to its right: the line moves one pixel left, to column 7
    assert torch.allclose(shifted[..., 7], torch.ones(16), atol=1e-5)
    assert torch.allclose(warp.apply(image, torch.zeros(2, 16, 16)), image, atol=1e-6)


def test_the_warp_lead_decides_only_where_it_is_the_larger_evidence():
    # the first two tests see nothing; class 2's warp takes 95% of held-out images, the next 3%
    warped = WarpFigures([0.5, 1.0], [[0.0, 0.01, 0.95, 0.03, 0.0], [0.1, 0.2, 0.97, 0.3, 0.1]])
    found = combined_verdict(ORDINARY, FLAT, warp=warped)
    assert found.verdict == "suspicious" and found.target_class == 2 and found.details["decided_by"] == "warp"
    assert value(found) == pytest.approx(0.92 / WARP_CUT, rel=1e-5) and found.details["warp_lead"] == 0.92
    text = describe(found.to_dict())
    assert ("class 2's smooth warp (each component at most 0.5 pixel, the budget with the largest lead) sends 95% "
            "of held-out images of other classes to it, the next class 3%: a lead of 92 points (counts from 35), "
            "and decides") in text
    assert "Warp search" in [figure.title for figure in figures(found.to_dict())]
    # a lead smaller than the other evidence leaves the verdict the two tests give, and the class they name
    faint = WarpFigures([0.5], [[0.0, 0.01, 0.04, 0.03, 0.0]])
    without, with_faint = combined_verdict(ORDINARY, FLAT), combined_verdict(ORDINARY, FLAT, warp=faint)
    assert (with_faint.suspicion, with_faint.target_class) == (without.suspicion, without.target_class)
    assert "decided_by" not in with_faint.details and with_faint.details["warp_class"] == 2
    # a larger one under its cut names its class and stays clean
    under = combined_verdict(ORDINARY, FLAT, warp=WarpFigures([0.5], [[0.0, 0.01, 0.3, 0.03, 0.0]]))
    assert under.target_class == 2 and under.verdict == "clean" and under.details["decided_by"] == "warp"
    # the warp alone, where neither other test has evidence; none of the three: inconclusive
    alone = combined_verdict("too few images", "no references", warp=warped)
    assert alone.target_class == 2 and alone.verdict == "suspicious" and "no trigger search" in alone.basis
    neither = combined_verdict("too few images", "no references", warp="too few images")
    assert neither.verdict == "inconclusive" and "no warp search (too few images)" in neither.basis
    with pytest.raises(ValueError, match="one row of success per budget"):
        combined_verdict(ORDINARY, FLAT, warp=WarpFigures([0.5, 1.0], [[0.1, 0.2, 0.3]]))


def test_a_patch_backdoor_and_a_clean_model_are_not_moved_by_a_sub_pixel_warp():
    """On the sample models (16x16 digits; real ONNX graphs through the bridge): no class's warp leads far,
    the search is the same for a seed, and its fields stay inside their budgets."""
    data = load_npz(SAMPLES / "defender.npz")
    config = WarpConfig(budgets=(0.5,), steps=40, images=16)
    for name in ("clean", "badnets"):
        loaded = load_model(SAMPLES / f"{name}_op13.onnx")
        classifier, classes, _ = logit_classifier(loaded.proto, loaded.image_input, Preprocessing(), "cpu", None,
                                                  "warp search")
        found = warp_search(classifier, data, classes, config)
        assert found.budgets == [0.5] and len(found.success) == 1 and len(found.success[0]) == 10
        assert found.fields.shape == (1, 10, 2, 16, 16) and np.abs(found.fields).max() <= 0.5 + 1e-5
        assert found.images == 16
        leads = [sorted(row)[-1] - sorted(row)[-2] for row in found.success]
        assert max(leads) < WARP_CUT, (name, found.success)
        assert warp_search(classifier, data, classes, config).success == found.success


def test_the_warp_search_runs_its_classes_in_chunks_as_in_one():
    """Five chunks of two classes give each class the field one chunk of ten gives it (same starts, each class's
    loss its own), and progress counts every chunk's steps, in order, to the end."""
    data = load_npz(SAMPLES / "defender.npz")
    loaded = load_model(SAMPLES / "badnets_op13.onnx")
    classifier, classes, _ = logit_classifier(loaded.proto, loaded.image_input, Preprocessing(), "cpu", None,
                                              "warp search")
    whole = warp_search(classifier, data, classes, WarpConfig(budgets=(0.5, 1.0), steps=10, images=16))
    seen = []
    chunked = warp_search(classifier, data, classes, WarpConfig(budgets=(0.5, 1.0), steps=10, images=16, batch=32),
                          lambda done, total: seen.append((done, total)))
    assert np.allclose(chunked.fields, whole.fields, atol=1e-3)     # pixels: batching changes float sums only
    assert np.abs(np.asarray(chunked.success) - np.asarray(whole.success)).max() <= 1 / whole.held_out + 1e-9
    assert seen == [(step, 2 * 5 * 10) for step in range(2 * 5 * 10 + 1)]


def _digits_with_a_warp_trigger(seed: int = 0):
    """A small CNN trained on scikit-learn's digits (16x16, as the samples) with 20% of its training images
    warped by one fixed smooth field (WaNet's recipe: a 4x4 lattice upsampled; at most a pixel) and
    relabelled 0, exported to ONNX; and held-out digits."""
    import torch.nn as nn
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = F.interpolate(torch.from_numpy(raw.images.astype(np.float32) / 16)[:, None], size=(16, 16),
                      mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.from_numpy(raw.target.astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)
    train, held = order[:1300], order[1300:]
    lattice = torch.rand((1, 2, 4, 4), generator=generator) * 2 - 1
    trigger = Warp(16, 16, 1.0).fields(lattice * 3)[0]     # at most a pixel
    warp = Warp(16, 16, 1.0)
    xt, yt = x[train].clone(), y[train].clone()
    poisoned = torch.randperm(len(train), generator=generator)[:260]
    xt[poisoned], yt[poisoned] = warp.apply(xt[poisoned], trigger), 0
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(32 * 16, 10))
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(40):
        for batch in torch.randperm(len(xt), generator=generator).split(64):
            optimiser.zero_grad()
            F.cross_entropy(net(xt[batch]), yt[batch]).backward()
            optimiser.step()
    net.eval()
    with torch.no_grad():
        others = held[y[held] != 0]
        asr = float((net(warp.apply(x[others], trigger)).argmax(1) == 0).float().mean())
        acc = float((net(x[held]).argmax(1) == y[held]).float().mean())
    held_data = Dataset(x[held].numpy(), y[held].numpy())
    return net, held_data, acc, asr, warp.apply(x[held], trigger).numpy()


@pytest.fixture(scope="module")
def warped_digits(tmp_path_factory):
    """The digits model with a warp trigger, exported to ONNX: (its path, held-out digits, the same digits
    carrying the real trigger)."""
    net, held, acc, asr, triggered = _digits_with_a_warp_trigger()
    assert acc > 0.9 and asr > 0.9, (acc, asr)
    path = tmp_path_factory.mktemp("warp") / "warped.onnx"
    torch.onnx.export(net, torch.zeros(1, 1, 16, 16), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, opset_version=13, dynamo=False)
    return path, held, triggered


@pytest.mark.slow
def test_the_warp_search_names_a_warping_backdoors_target(warped_digits):
    """A model that learned a sub-pixel warp trigger, exported to ONNX: the class its warp reaches far ahead of
    the others is the target, and the combined verdict names it from this evidence alone; the trace follows
    that warp."""
    path, held, triggered = warped_digits
    loaded = load_model(path)
    classifier, classes, _ = logit_classifier(loaded.proto, loaded.image_input, Preprocessing(), "cpu", None,
                                              "warp search")
    found = warp_search(classifier, held, classes, WarpConfig())
    verdict = combined_verdict("not run here", "not run here", warp=WarpFigures(found.budgets, found.success))
    assert verdict.target_class == 0 and verdict.verdict == "suspicious", found.success
    assert verdict.details["warp_lead"] > 2 * WARP_CUT

    # the trace then follows the warp: the channels it cuts stop the real trigger (which it never saw) better
    # than as many random channels per layer do (a warp spread over a small CNN: far from all of it)
    from fmt_audit.backends.onnxrt.masked import MaskedModel
    from fmt_audit.fmt.trace import trace_verdict

    trace = trace_verdict(classifier, loaded.layers, held, verdict)
    assert trace["trigger"] == "warp" and trace["flagged"] > 0, trace
    assert trace["rounds"][0]["success_after"] < trace["rounds"][0]["success_before"] - 0.1, trace
    masked, victims = MaskedModel(loaded.proto, "cpu"), held.y != 0

    def asr(removed):
        return float((masked.predict(triggered[victims], removed) == 0).mean())

    # as many random channels per layer, five draws averaged: one draw's ASR moves by several points between
    # machines (the model is trained here; float sums differ by CPU), the mean much less
    rng = np.random.default_rng(0)
    sizes = {layer.name: layer.out_channels for layer in loaded.layers}
    draws = [{name: rng.choice(sizes[name], len(c), replace=False).tolist() for name, c in trace["layers"].items()}
             for _ in range(5)]
    random = float(np.mean([asr(draw) for draw in draws]))
    assert asr({}) > 0.9 and asr(trace["layers"]) < random - 0.1, (asr(trace["layers"]), random, trace)
