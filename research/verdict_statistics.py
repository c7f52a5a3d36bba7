"""Which model-level statistic separates clean from backdoored models? Candidates, from the cached population.

Reads the reports ``verdict_population.py --gradient`` cached beside each model
and computes, per model, several candidate suspicion statistics; prints each
one's ROC-AUC (all models, and the odd-numbered held-out half), per attack, and
how often its class is the attack's target:

* ``default`` (with ``--probe``): the shipped verdict of the ``default`` preset,
  its probe run here;
* ``probe``: the same, read from the ``default`` scan report cached beside the
  model — the shipped statistic (:mod:`fmt_audit.verdict`, sink concentration)
  on the gradient test of 64 random channels;
* ``concentration``: the shipped statistic over the full gradient-mode scan;
* ``agreement``: where the outlier channels send predictions (below,
  :func:`outlier_agreement`);
* ``top10``: ``concentration`` over each layer's 10% most disruptive channels;
* ``combined``: the larger of ``concentration`` and ``agreement`` (and its
  class). Chosen after seeing the first 50 models (``--first 10`` tests it on
  models it was not chosen on);
* ``noise``: ``concentration`` divided by the share of its class among the
  errors random sign noise of the scan's eps causes (does it discount a clean
  model's natural attractor class?).

With ``--probe-sizes``, instead: how the shipped probe's AUC depends on its size
K. A probe of K channels is a seeded sample of the full gradient scan's channels
(the probe's per-channel test is the scan's: same images, eps and steps), so each
size is drawn with 20 seeds from the cached full scans; mean and spread of the AUC.

With ``--margin-test``, instead: the test pre-registered in session 8 (benchmarks/README.md,
"A different statistic"): the maximum-margin verdict, the sink probe and their mean on (A) digits
models 10-17 of each attack and clean models 10-29, and (B) 4 clean models and 2 per attack on each of
MNIST, CIFAR-10 and GTSRB, from the ``verdicts.json`` that ``verdict_population.py`` caches.
With ``--test-c``: the test pre-registered in session 10 ("Trigger search and a reference network"):
the universal-perturbation verdict, the margin test and the referenced margin on population (C).
With ``--test-d``: the test pre-registered in session 11 ("Does the easy class's perturbation transfer?"):
the transfer verdict, the margin test and the untransferred success on population (D).
With ``--test-e``: the test pre-registered in session 13 ("Which class is unnaturally easy?"): the shortcut
verdict, with the transfer verdict, the margin test, the ladder's lead and the margin gap without the
references beside, on population (E).
With ``--test-f F1|F2|F``: the test pre-registered in session 14 ("Developed on two populations"): the
untransferred verdict, with (E)'s statistics beside, on a half of population (F) or all of it.
With ``--export-figures [POPULATIONS]``: every model's per-class figures of (D) and (E), or the populations
named, into ``results/verdict_figures_<names>.json`` (``F1,F2`` for (F)). With ``--kept``: every shipped
statistic's ROC-AUC per population (D, E, F1, F2) and over all, from those kept figures alone.
With ``--test-cleanse``: the test pre-registered in session 15 ("A published detector"): the cleanse verdict
(Neural Cleanse) on the models of (D), (E), (F1) and (F2) it was computed for, with the larger of it and the
untransferred lead, each over its threshold, beside.
With ``--test-combined G|H|I|J|kept|all``: the combined verdict's pre-registered tests (sessions 16-19) or its
development figures (with ``--kept``, tested populations from their kept figures: ``--test-combined H,I
--kept``); ``--smooth-figures`` measures the smooth-image shares it checks the class with on every model of
(D)-(H) into ``results/verdict_smooth_D-H.json``.

    python benchmarks/verdict_statistics.py [--probe] [--first N] [--probe-sizes] [--margin-test] [--test-c]
        [--test-d] [--test-e] [--test-f F1|F2|F] [--export-figures [D,E|F1,F2]]
        [--kept] [--test-cleanse] [--test-combined G|H|I|J|kept|all] [--smooth-figures]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from verdict_population import ATTACKS, CACHE, auc, fit_threshold, folder_of, summarise

from fmt_audit.fmt.selection import select_outliers
from fmt_audit.verdict import MIN_SHIFT, sink_concentration

RESULTS = Path(__file__).resolve().parent / "results"    # the figures kept in the repository


def outlier_agreement(layers, samples: int, prior_weight: float = 1.0) -> tuple[float, int | None]:
    """Where the outlier channels send predictions: over the channels the outlier rule flags in each layer
    (robust z of the class shift > 3.5, as the scan's ``outlier`` selection), the shift-weighted sink votes;
    the largest class's share, with ``prior_weight`` of votes added to the total (one or two outliers alone
    are weak evidence). No outlier: 0."""
    votes = np.zeros(10)
    for layer in layers:
        shift, sink = np.asarray(layer["shift"], float), np.asarray(layer["sink"], int)
        for c in select_outliers(shift, 3.5, samples).flagged:
            use = sink[c] >= 0
            votes += np.bincount(sink[c][use], weights=shift[c][use], minlength=10)
    if not votes.sum():
        return 0.0, None
    return float(votes.max() / (votes.sum() + prior_weight)), int(votes.argmax())


def _top_channels(layers, share: float) -> np.ndarray:
    """Shift-weighted sink votes of each layer's top ``share`` of channels by their largest shift."""
    votes = np.zeros(10)
    for layer in layers:
        shift, sink = np.asarray(layer["shift"], float), np.asarray(layer["sink"], int)
        keep = np.argsort(-shift.max(1))[:max(1, round(share * len(shift)))]
        use = (shift[keep] >= MIN_SHIFT) & (sink[keep] >= 0)
        votes += np.bincount(sink[keep][use], weights=shift[keep][use], minlength=10)
    return votes


def noise_share(folder, eps: float, sink: int) -> float:
    """Share of ``sink`` among the wrong predictions under random sign noise of size ``eps``."""
    from fmt_audit.backends.onnxrt.session import OrtClassifier
    from fmt_audit.data import Preprocessing, load_npz
    from fmt_audit.model.loading import load_model

    classifier = OrtClassifier(load_model(folder / "model.onnx").proto, "cpu", Preprocessing())
    data = load_npz(folder / "defender.npz")
    rng = np.random.default_rng(0)
    counts = np.zeros(10)
    for _ in range(8):
        noisy = np.clip(data.x + eps * rng.choice([-1.0, 1.0], size=data.x.shape), 0, 1).astype(np.float32)
        predicted = classifier.predict(noisy)
        counts += np.bincount(predicted[predicted != data.y], minlength=10)
    return float((counts[sink] + 1) / (counts.sum() + 10))     # add-one: no error at all is no evidence


def probe_verdict(folder):
    """The ``default`` preset's verdict: the mask-mode scan's probe, run alone."""
    from fmt_audit.data import load_npz
    from fmt_audit.fmt.scan import ScanConfig, verdict_probe
    from fmt_audit.model.loading import load_model

    loaded = load_model(folder / "model.onnx")
    config = ScanConfig()
    return verdict_probe(loaded, load_npz(folder / "defender.npz").take(config.samples, seed=config.seed), config,
                         list(loaded.layers))


def statistics(folder, probe_too: bool = False) -> dict:
    """Candidate -> (value, its class) for the model in ``folder``."""
    probe = json.loads((folder / "scan_default.json").read_text())["verdict"]
    full = json.loads((folder / "scan_gradient.json").read_text())
    layers = full["layers"]
    agreement = outlier_agreement(layers, full["config"]["samples"])
    shipped = sink_concentration([layer["shift"] for layer in layers], [layer["sink"] for layer in layers])
    concentration, sink = shipped.suspicion or 0.0, shipped.target_class
    top = _top_channels(layers, 0.1)
    stats = {}
    if probe_too:
        shipped = probe_verdict(folder)
        stats["default"] = (shipped.suspicion or 0.0, shipped.target_class)
    stats |= {"agreement": agreement,
             "concentration": (concentration, sink),
             "probe": (probe.get("concentration", probe["suspicion"]) or 0.0,
                       probe.get("target_class", probe.get("sink_class"))),     # reports before session 8: sink_class
             "top10": (float(top.max() / top.sum()) if top.sum() else 0.0, int(top.argmax()) if top.sum() else None),
             "combined": max(agreement, (concentration, sink), key=lambda pair: pair[0]),
             "noise": (concentration / noise_share(folder, float(full["config"]["eps"]), sink), sink)
             if sink is not None else (0.0, None)}
    return stats


PROBE_SIZES = (32, 64, 96, 128, 192)
PROBE_SEEDS = 20


def probe_of(layers: list[dict], size: int, seed: int) -> float:
    """The shipped statistic on a seeded sample of ``size`` channels of a full gradient scan (as
    ``fmt_audit.fmt.scan._sampled_channels`` draws them)."""
    pairs = [(i, c) for i, layer in enumerate(layers) for c in range(len(layer["shift"]))]
    chosen = np.random.default_rng(seed).choice(len(pairs), size=min(size, len(pairs)), replace=False)
    shifts: list[list] = [[] for _ in layers]
    sinks: list[list] = [[] for _ in layers]
    for i, c in (pairs[k] for k in sorted(chosen)):
        shifts[i].append(layers[i]["shift"][c])
        sinks[i].append(layers[i]["sink"][c])
    return sink_concentration(shifts, sinks).suspicion or 0.0


def probe_sizes(first: int) -> None:
    """AUC of the probe statistic by probe size, over the cached models numbered from ``first`` up and over
    the two populations apart (models 0-9 of each group, and from 10)."""
    models = []
    for attack in ("clean", *ATTACKS):
        for folder in sorted(CACHE.glob(f"{attack}_*")):
            facts = json.loads((folder / "facts.json").read_text())
            if not (folder / "scan_gradient.json").exists() or facts["number"] < first:
                continue
            if attack == "clean" or facts["asr"] >= 0.8:
                layers = json.loads((folder / "scan_gradient.json").read_text())["layers"]
                models.append((attack != "clean", facts["number"], layers))
    print(f"{len(models)} models, {sorted({sum(len(layer['shift']) for layer in m[2]) for m in models})} channels each")
    parts = {"all": lambda n: True, "first (0-9)": lambda n: n < 10, "fresh (10+)": lambda n: n >= 10}
    for size in (*PROBE_SIZES, None):
        cells = []
        for name, keep in parts.items():
            chosen = [m for m in models if keep(m[1])]
            if not chosen:
                continue
            aucs = []
            for seed in range(PROBE_SEEDS if size else 1):
                scores = [(backdoored, probe_of(layers, size or 10**9, seed)) for backdoored, _, layers in chosen]
                aucs.append(auc([v for b, v in scores if not b], [v for b, v in scores if b]))
            cells.append(f"{name} {np.mean(aucs):.3f} ± {np.std(aucs):.3f} (min {min(aucs):.3f})")
        print(f"K = {size or 'every channel':>13}: " + "; ".join(cells), flush=True)


# the populations of the session-8 test: (dataset, group, model numbers)
# The pre-registered test populations (benchmarks/README.md): (A) and (B) for the session-8 margin test,
# (C) for the session-10 test of the universal-perturbation ladder (warping left out on CIFAR-10).
POPULATIONS = {"A": [("digits", "clean", range(10, 30))] + [("digits", a, range(10, 18)) for a in ATTACKS],
               "B": [(d, "clean", range(4)) for d in ("mnist", "cifar10", "gtsrb")]
               + [(d, a, range(2)) for d in ("mnist", "cifar10", "gtsrb") for a in ATTACKS],
               "C": [("digits", "clean", range(30, 40))] + [("digits", a, range(18, 22)) for a in ATTACKS]
               + [("cifar10", "clean", range(4, 8))]
               + [("cifar10", a, range(2, 4)) for a in ("badnets", "blended", "sig")],
               "D": [("digits", "clean", range(40, 52))] + [("digits", a, range(22, 26)) for a in ATTACKS]
               + [("mnist", "clean", range(4, 8))] + [("mnist", a, range(2, 4)) for a in ATTACKS]
               + [("cifar10", "clean", range(8, 12))]
               + [("cifar10", a, range(4, 6)) for a in ("badnets", "blended", "sig")],
               "E": [("digits", "clean", range(52, 64))] + [("digits", a, range(26, 30)) for a in ATTACKS]
               + [("mnist", "clean", range(8, 12))] + [("mnist", a, range(4, 6)) for a in ATTACKS]
               + [("cifar10", "clean", range(12, 16))]
               + [("cifar10", a, range(6, 8)) for a in ("badnets", "blended", "sig")],
               # (F): pre-registered in session 14, built in two halves (F1 now, F2 next session).
               "F1": [("digits", "clean", range(64, 84))] + [("digits", a, range(30, 36)) for a in ATTACKS]
               + [("mnist", "clean", range(12, 18))] + [("mnist", a, range(6, 8)) for a in ATTACKS]
               + [("cifar10", "clean", range(16, 20))]
               + [("cifar10", a, range(8, 10)) for a in ("badnets", "blended", "sig")],
               "F2": [("digits", "clean", range(84, 104))] + [("digits", a, range(36, 42)) for a in ATTACKS]
               + [("mnist", "clean", range(18, 24))] + [("mnist", a, range(8, 10)) for a in ATTACKS]
               + [("cifar10", "clean", range(20, 24))]
               + [("cifar10", a, range(10, 12)) for a in ("badnets", "blended", "sig")],
               # (G): pre-registered in session 16 for the combined verdict
               "G": [("digits", "clean", range(104, 124))] + [("digits", a, range(42, 47)) for a in ATTACKS]
               + [("mnist", "clean", range(24, 34))] + [("mnist", a, range(10, 13)) for a in ATTACKS]
               + [("cifar10", "clean", range(24, 30))]
               + [("cifar10", a, range(12, 14)) for a in ("badnets", "blended", "sig")],
               # (H): pre-registered in session 17 for the combined verdict with the lead counting from 0.35
               "H": [("digits", "clean", range(124, 144))] + [("digits", a, range(47, 52)) for a in ATTACKS]
               + [("mnist", "clean", range(34, 44))] + [("mnist", a, range(13, 16)) for a in ATTACKS]
               + [("cifar10", "clean", range(30, 36))]
               + [("cifar10", a, range(14, 16)) for a in ("badnets", "blended", "sig")],
               # (I): pre-registered in session 18 for the combined verdict with its two checks on the class
               "I": [("digits", "clean", range(144, 164))] + [("digits", a, range(52, 57)) for a in ATTACKS]
               + [("mnist", "clean", range(44, 54))] + [("mnist", a, range(16, 19)) for a in ATTACKS]
               + [("cifar10", "clean", range(36, 41))]
               + [("cifar10", a, range(16, 18)) for a in ("badnets", "blended", "sig")],
               # (J): pre-registered in session 19, the same rule as (I) unchanged, tested again on fresh models
               "J": [("digits", "clean", range(164, 174))] + [("digits", a, range(57, 60)) for a in ATTACKS]
               + [("mnist", "clean", range(54, 59))] + [("mnist", a, range(19, 21)) for a in ATTACKS]
               + [("cifar10", "clean", range(41, 44))]
               + [("cifar10", a, range(18, 19)) for a in ("badnets", "blended", "sig")]}


def with_secondaries(row: dict) -> dict:
    """The row with (D)'s secondary statistics beside, from the figures of its ``transfer`` verdict: the
    margin test's own verdict (under ``margin``: ``1 - p`` at the same class, the transfer verdict's first
    step, so it is not run twice) and the untransferred success at the universal ladder's leading class,
    ``s_t - t_t`` (under ``untransferred_top``; not the ``untransferred`` verdict, which reads the lead)."""
    from fmt_audit.verdict import transferred

    verdict = row["transfer"]
    if verdict.get("suspicion") is None:
        return row | {s: {"suspicion": None, "target_class": None} for s in ("margin", "untransferred_top")}
    margin = row.get("margin") or {"suspicion": round(1.0 - verdict["p_value"], 6),
                                   "target_class": verdict["target_class"]}
    last = np.asarray(verdict["success"][-1])
    moved = transferred(verdict["reference_success"], verdict["reference_baseline"], len(last))
    top = int(last.argmax())
    return row | {"margin": margin,
                  "untransferred_top": {"suspicion": float(np.clip(last[top] - moved[top], 0, 1)),
                                        "target_class": top}}


def with_shortcut(row: dict) -> dict:
    """The row with (E)'s statistics beside, all from the figures of its ``transfer`` verdict (one run of the
    margin test, the ladder and the references): ``shortcut`` (the test), as ``scan --verdict shortcut``
    computes it from the same ladder and references; the margin test (``margin``), the ladder's lead
    (``universal``), and the margin gap without the references (``gap``: the shortcut statistic with every
    reference margin left where it was)."""
    from fmt_audit.verdict import shortcut_verdict, universal_verdict

    row, v = with_secondaries(row), row["transfer"]
    if v.get("suspicion") is None:
        return row | {s: {"suspicion": None, "target_class": None} for s in ("shortcut", "universal", "gap")}
    still = v["reference_margin_baseline"]
    return row | {
        "shortcut": shortcut_verdict(v["budgets"], v["success"], v["held_out_margin"], v["reference_margin"],
                                     still).to_dict(),
        "universal": universal_verdict(v["budgets"], v["success"]).to_dict(),
        "gap": shortcut_verdict(v["budgets"], v["success"], v["held_out_margin"], still, still).to_dict()}


def with_untransferred(row: dict) -> dict:
    """The row with (F)'s statistics beside, all from the figures of its ``transfer`` verdict: ``untransferred``
    (the test), as ``scan --verdict untransferred`` computes it from the same ladder and references, and
    (E)'s statistics (:func:`with_shortcut`). A transfer verdict without figures (its margin test
    inconclusive) is announced: ``scan --verdict untransferred`` does not need the margin test, so such a
    model's own run (``verdict_population.py --statistics untransferred``) is what the test counts."""
    return with_shortcut(row) | {"untransferred": untransferred_of(row)}


def untransferred_of(row: dict) -> dict:
    """The row's ``untransferred`` verdict: the scan's own where it computed one, otherwise as ``scan --verdict
    untransferred`` computes it from the figures of the row's ``transfer`` verdict."""
    from fmt_audit.verdict import untransferred_verdict

    if "untransferred" in row:      # computed by the scan itself
        return row["untransferred"]
    v = row["transfer"]
    if v.get("suspicion") is None:
        print(f"no transfer figures: {row.get('dataset')} {row['attack']} {row['number']}; run "
              "verdict_population.py --statistics untransferred on it", flush=True)
        return {"suspicion": None, "target_class": None}
    return untransferred_verdict(v["budgets"], v["success"], v["reference_success"],
                                 v["reference_baseline"]).to_dict()


FIGURES = ("margins", "p_value", "budgets", "success", "transferred", "reference_success", "reference_baseline",
           "held_out_margin", "reference_margin", "reference_margin_baseline")


def write_kept(name: str, records: list[dict]) -> Path:
    """Write ``records`` to ``results/name`` as a JSON list, one model a line (so a diff shows which changed)."""
    out = RESULTS / name
    out.write_text("[\n" + ",\n".join(json.dumps(record) for record in records) + "\n]\n")
    return out


def export_figures(names: tuple[str, ...] = ("D", "E")) -> None:
    """Every model's per-class figures from the cached verdicts of populations ``names`` (the transfer verdict's,
    and the shortcut verdict's margins where the transfer verdict predates them), into one results file: the
    development data of later statistics, kept in the repository because the model cache is not."""
    rows = []
    for population in names:
        for dataset, attack, numbers in POPULATIONS[population]:
            for number in numbers:
                folder = folder_of(attack, number, dataset)
                facts = json.loads((folder / "facts.json").read_text())
                found = json.loads((folder / "verdicts.json").read_text())
                figures = found.get("shortcut", {}) | found["transfer"]
                rows.append({"population": population, **{k: facts.get(k) for k in (
                    "dataset", "attack", "number", "architecture", "target", "poison_rate", "acc", "asr")},
                    **{k: json.loads(json.dumps(figures[k]), parse_float=lambda v: round(float(v), 4))
                       for k in FIGURES if k in figures}})
    out = write_kept(f"verdict_figures_{'-'.join(names)}.json", rows)
    print(f"{len(rows)} models: {out}")


KEPT = ("verdict_figures_D-E.json", "verdict_figures_F1-F2.json")     # the populations whose figures are kept


def kept_statistics() -> None:
    """Every shipped statistic that one transfer run's figures give, recomputed from the kept figures (no model
    cache needed): ROC-AUC per kept population, each population alone and all together. A new statistic is
    judged the same way, on the populations it was not developed on."""
    from fmt_audit.verdict import (
        margin_verdict,
        shortcut_verdict,
        transfer_verdict,
        universal_verdict,
        untransferred_verdict,
    )

    statistics = {
        "margin": lambda r: margin_verdict(r["margins"]),
        "universal": lambda r: universal_verdict(r["budgets"], r["success"]),
        "transfer": lambda r: transfer_verdict(r["margins"], r["budgets"], r["success"], r["reference_success"],
                                               r["reference_baseline"]),
        "shortcut": lambda r: shortcut_verdict(r["budgets"], r["success"], r["held_out_margin"],
                                               r["reference_margin"], r["reference_margin_baseline"]),
        "untransferred": lambda r: untransferred_verdict(r["budgets"], r["success"], r["reference_success"],
                                                         r["reference_baseline"])}
    rows = [row for name in KEPT for row in json.loads((RESULTS / name).read_text())]
    parts = {population: [r for r in rows if r["population"] == population]
             for population in dict.fromkeys(r["population"] for r in rows)} | {"all": rows}
    print(f"{'statistic':14s}" + "".join(f"{name:>8s}" for name in parts))
    for statistic, verdict in statistics.items():
        scores = {id(r): verdict(r).suspicion or 0.0 for r in rows}
        line = [auc([scores[id(r)] for r in part if r["attack"] == "clean"],
                    [scores[id(r)] for r in part if r["attack"] != "clean"]) for part in parts.values()]
        print(f"{statistic:14s}" + "".join(f"{value:8.3f}" for value in line), flush=True)


def population_test(names: tuple[str, ...] = ("A", "B"), pooled: str | None = None) -> None:
    """A pre-registered test's figures, per population and per dataset, from the cached verdicts; for (C)
    with the referenced margin (``verdict_reference.py``) among the statistics. ``pooled``: one name for all
    of ``names`` together (the halves of (F))."""
    parts: dict[str, list[dict]] = {}
    for part in names:
        population = pooled or part
        for dataset, attack, numbers in POPULATIONS[part]:
            for number in numbers:
                folder = folder_of(attack, number, dataset)
                if not (folder / "verdicts.json").exists():
                    print(f"missing: {folder}")
                    continue
                row = json.loads((folder / "facts.json").read_text()) | json.loads(
                    (folder / "verdicts.json").read_text())
                parts.setdefault(population, []).append(row)
                if population != "A":
                    parts.setdefault(f"{population} {dataset}", []).append(row)
    for name, rows in parts.items():
        if name.startswith("F"):    # the frozen statistic of session 14 and (E)'s beside, from the transfer figures
            from fmt_audit.verdict import SHORTCUT_THRESHOLD

            print(name, json.dumps(summarise([with_untransferred(r) for r in rows],
                                             {"gap": SHORTCUT_THRESHOLD, "untransferred_top": None})), flush=True)
        elif name.startswith("E"):    # every statistic from the transfer verdict's figures
            from fmt_audit.verdict import SHORTCUT_THRESHOLD

            print(name, json.dumps(summarise([with_shortcut(r) for r in rows], {"gap": SHORTCUT_THRESHOLD})),
                  flush=True)
        elif name.startswith("D"):    # margin and untransferred success beside, from the transfer verdict's figures
            print(name, json.dumps(summarise([with_secondaries(r) for r in rows], {"untransferred_top": None})),
                  flush=True)
        elif name.startswith("C"):    # the referenced margin beside (verdict_reference.py)
            from verdict_reference import with_referenced

            from fmt_audit.verdict import MARGIN_THRESHOLD

            print(name, json.dumps(summarise(with_referenced(rows), {"referenced": MARGIN_THRESHOLD})), flush=True)
        else:
            print(name, json.dumps(summarise(rows)), flush=True)


def with_either(row: dict) -> dict:
    """The row with the cleanse test's secondary beside (``either``): the larger of the anomaly index over
    Neural Cleanse's 2 and the ``untransferred`` lead over its 0.2, suspicious from 1 (when either is); it
    names the class of whichever is further over its threshold."""
    from fmt_audit.verdict import CLEANSE_INDEX, UNTRANSFERRED_THRESHOLD

    # not with_untransferred: (D)'s transfer verdicts predate the margin figures its (E) statistics read
    row = row | {"untransferred": untransferred_of(row)}
    cleanse, lead = row["cleanse"], row["untransferred"]
    index = cleanse.get("anomaly_index")
    if cleanse.get("suspicion") is None:
        index = 0.0
    elif index is None:         # infinite: every other class at the median
        index = float("inf")
    over = [(index / CLEANSE_INDEX, cleanse.get("target_class")),
            ((lead.get("suspicion") or 0.0) / UNTRANSFERRED_THRESHOLD, lead.get("target_class"))]
    value, target = max(over, key=lambda pair: pair[0])
    return row | {"either": {"suspicion": min(value, 1e9), "target_class": target}}


def measured(names: tuple[str, ...], statistic: str) -> list[dict]:
    """Every model of populations ``names`` with a cached ``statistic`` verdict, as a row of its facts, its
    verdicts and its population; the models without one are listed."""
    rows, missing = [], []
    for population in names:
        for dataset, attack, numbers in POPULATIONS[population]:
            for number in numbers:
                folder = folder_of(attack, number, dataset)
                path = folder / "verdicts.json"
                found = json.loads(path.read_text()) if path.exists() else {}
                if statistic in found:
                    facts = json.loads((folder / "facts.json").read_text())
                    rows.append(facts | found | {"population": population})
                elif (published := published_row(dataset, attack, number, statistic)) is not None:
                    rows.append(published | {"population": population})
                else:
                    missing.append(f"{population} {dataset} {attack} {number}")
    print(f"measured {len(rows)} ({sum(SUMMARY_ONLY in r[statistic] for r in rows)} from their published rows "
          f"alone), not measured {len(missing)}: {missing}", flush=True)
    return rows


FACTS = ("population", "dataset", "attack", "number", "architecture", "target", "poison_rate", "acc", "asr")
SUMMARY_ONLY = "summary_only"   # marks a verdict known by its suspicion and class alone (no figures kept)


def published_row(dataset: str, attack: str, number: int, statistic: str) -> dict | None:
    """The model's row as its own build published it (``verdict_population.py --first N --models-per-group N+1``
    writes ``results/verdict_population_[<dataset>_]N-N+1_<attack>_threads*.json``), for a model whose cache
    is gone: its facts and the scan's ``statistic`` verdict, suspicion and class only, marked
    :data:`SUMMARY_ONLY` (the figures that :func:`with_parts` recomputes from were in the cache)."""
    prefix = "" if dataset == "digits" else f"{dataset}_"
    for path in sorted(RESULTS.glob(f"verdict_population_{prefix}{number}-{number + 1}_{attack}_threads*.json")):
        for row in json.loads(path.read_text()):
            if row["attack"] == attack and row.get(statistic) not in (None, "", "–"):
                facts = {k: (None if row.get(k) in ("–", "") else row.get(k))
                         for k in ("architecture", "target", "poison_rate", "acc", "asr")}
                return facts | {"dataset": dataset, "attack": attack, "number": number,
                                statistic: {"suspicion": row[statistic], "target_class": row[f"{statistic} class"],
                                            SUMMARY_ONLY: True}}
    return None


def parts_of(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows all together, then per population, dataset, and dataset and architecture."""
    parts = {"all": rows}
    for key in ("population", "dataset"):
        for value in dict.fromkeys(r.get(key, "digits") for r in rows):
            parts[value] = [r for r in rows if r.get(key, "digits") == value]
    for dataset, architecture in dict.fromkeys((r.get("dataset", "digits"), r["architecture"]) for r in rows):
        parts[f"{dataset} {architecture}"] = [r for r in rows if (r.get("dataset", "digits"), r["architecture"])
                                              == (dataset, architecture)]
    return parts


def cleanse_population_test() -> None:
    """Session 15's pre-registered test (benchmarks/README.md, "A published detector"): the ``cleanse`` verdict
    on every model of (D), (E), (F1) and (F2) it was computed for, pooled first, then per population, dataset,
    dataset and architecture; ``either`` (:func:`with_either`) and ``untransferred`` beside on the same models.
    Every measured model's figures are kept in ``results/verdict_cleanse_D-F2.json``."""
    rows = [with_either(row) for row in measured(("D", "E", "F1", "F2"), "cleanse")]
    write_kept("verdict_cleanse_D-F2.json", [{     # per-class figures
        **{k: r.get(k) for k in ("population", "dataset", "attack", "number", "architecture", "target", "acc",
                                 "asr")},
        **{k: r["cleanse"].get(k) for k in ("suspicion", "target_class", "anomaly_index", "norms", "reached")},
        "trigger_success": r["cleanse"].get("trigger_success", r["cleanse"].get("success"))} for r in rows])
    for name, part in parts_of(rows).items():
        summary = summarise(part, {"either": 1.0})
        print(name, json.dumps({k: summary.get(k) for k in ("models", "clean", "backdoored", "cleanse", "either",
                                                             "untransferred")}), flush=True)


SMOOTH_KEPT = "verdict_smooth_D-H.json"     # every model's smooth-image shares, measured in session 18


def smooth_figures() -> None:
    """Measure the smooth-image shares (:func:`fmt_audit.verdict.evidence.smooth.smooth_test`, as the scan's
    combined verdict does) of every model of (D)-(H) and keep them in ``results/`` (:data:`SMOOTH_KEPT`)."""
    write_kept(SMOOTH_KEPT, [{"population": population, "dataset": dataset, "attack": attack, "number": number,
                              "smooth_shares": measure_smooth(folder_of(attack, number, dataset))}
                             for population in ("D", "E", "F1", "F2", "G", "H")
                             for dataset, attack, numbers in POPULATIONS[population] for number in numbers])


def measure_smooth(folder) -> list[float]:
    """The smooth-image shares of the model in ``folder``, as the scan's ``default`` preset measures them."""
    from fmt_audit.fmt.scan import ScanConfig
    from fmt_audit.model.loading import load_model
    from fmt_audit.verdict.evidence.smooth import smooth_test

    loaded = load_model(folder / "model.onnx")
    return smooth_test(loaded.proto, loaded.image_input, ScanConfig.from_preset("default").preprocessing, "cpu")[0]


def kept_smooth() -> dict[tuple, list[float]]:
    """The kept smooth-image shares, by (population, dataset, attack, number)."""
    return {(r["population"], r["dataset"], r["attack"], r["number"]): r["smooth_shares"]
            for r in json.loads((RESULTS / SMOOTH_KEPT).read_text())}


def with_parts(row: dict) -> dict:
    """The row with the combined verdict recomputed from its figures by the shipped rule (``combined``; the
    cached verdict may predate it; the smooth-image shares from ``row["combined"]["smooth_shares"]``), and
    beside it: its two parts, ``cleanse`` (Neural Cleanse's anomaly index) and ``untransferred`` (the lead);
    ``session17`` (the rule tested on (H): no checks on the class); ``tests_agree`` (the one check that needs
    no smooth images); ``ratio`` (the mask ratio alone, over the same cut as in ``combined``); ``session16``
    (the rule tested on (G): session 17's with the lead counting from the untransferred threshold, 0.2); and
    session 15's ``either`` (:func:`with_either`)."""
    from fmt_audit.verdict import (
        UNTRANSFERRED_THRESHOLD,
        cleanse_verdict,
        combined_verdict,
        inconclusive,
        untransferred_verdict,
    )

    v = row["combined"]
    cleanse = (cleanse_verdict(v["norms"], v.get("trigger_success"), v.get("reached")) if "norms" in v
               else inconclusive("cleanse", "no figures"))
    lead = (untransferred_verdict(v["budgets"], v["success"], v["reference_success"], v["reference_baseline"])
            if "budgets" in v else inconclusive("untransferred", "no figures"))
    parts = {"combined": combined_verdict(cleanse, lead, smooth=v.get("smooth_shares")),
             "session17": combined_verdict(cleanse, lead, agreement=1.0),
             "tests_agree": combined_verdict(cleanse, lead),
             "session16": combined_verdict(cleanse, lead, UNTRANSFERRED_THRESHOLD, agreement=1.0),
             "ratio": combined_verdict(cleanse, inconclusive("untransferred", "left out"), agreement=1.0),
             "cleanse": cleanse, "untransferred": lead}
    return with_either(row | {name: verdict.to_dict() for name, verdict in parts.items()})


def kept_parts() -> list[dict]:
    """The kept figures of (D)-(F) as rows ``with_parts`` reads: every model measured with Neural Cleanse in
    session 15 (results/verdict_cleanse_D-F2.json) with its transfer figures (:data:`KEPT`), both under
    ``combined``, where a measured row carries them."""
    figures = {(r["population"], r["dataset"], r["attack"], r["number"]): r
               for name in KEPT for r in json.loads((RESULTS / name).read_text())}
    smooth = kept_smooth()
    return [with_smooth(c, c | figures[(c["population"], c["dataset"], c["attack"], c["number"])], smooth)
            for c in json.loads((RESULTS / "verdict_cleanse_D-F2.json").read_text())]


def with_smooth(row: dict, figures: dict, smooth: dict[tuple, list[float]]) -> dict:
    """:func:`with_parts` of ``row`` with ``figures`` as its combined verdict's, and the smooth-image shares:
    the scan's own where the figures have them, else the kept ones (``smooth``, :func:`kept_smooth`), else
    measured now."""
    if figures.get(SUMMARY_ONLY):    # nothing to recompute from: the scan's own verdict, no secondaries
        return {k: row.get(k) for k in FACTS} | {
            "combined": {k: figures[k] for k in ("suspicion", "target_class", SUMMARY_ONLY)}}
    key = (row["population"], row.get("dataset", "digits"), row["attack"], row["number"])
    shares = (figures.get("smooth_shares") or smooth.get(key)
              or measure_smooth(folder_of(row["attack"], row["number"], key[1])))
    return with_parts(row | {"combined": figures | {"smooth_shares": shares}})


def combined_population_test(names: tuple[str, ...], kept: bool = False) -> None:
    """The pre-registered tests of the combined verdict (benchmarks/README.md, "Both families of evidence"):
    session 16's on population (G), session 17's on (H), session 18's on (I), session 19's on (J) with
    (I); pooled, then per dataset, attack
    and architecture, with its parts and the earlier rules beside (:func:`with_parts`). ``names`` ("kept"): the
    same figures on the development data of (D)-(F) instead; ("all"): the kept figures of (D)-(H); with
    ``kept``, the tested populations named from their kept figures (``results/verdict_combined_<name>.json``)
    instead of their cached verdicts. The smooth-image shares: the scan's own where its verdict has them,
    else the kept ones (:data:`SMOOTH_KEPT`), else measured now. The measured models' figures are kept in
    ``results/verdict_combined_<names>.json``, with the suspicion by the shipped rule."""
    smooth = kept_smooth()

    def kept_tested(tested: tuple[str, ...]) -> list[dict]:
        return [with_smooth(r, r, smooth) for name in tested
                for r in json.loads((RESULTS / f"verdict_combined_{name}.json").read_text())]

    if names == ("kept",):
        rows = kept_parts()
    elif names == ("all",):     # every kept figure: (D)-(F)'s and the tested populations' (G), (H)
        rows = kept_parts() + kept_tested(("G", "H"))
    elif kept:
        rows = kept_tested(names)
    else:
        rows = [with_smooth(row, row["combined"], smooth) for row in measured(names, "combined")]
        write_kept(f"verdict_combined_{'-'.join(names)}.json", [{
            **{k: r.get(k) for k in FACTS},
            **{k: r["combined"].get(k) for k in ("suspicion", "target_class", "mask_ratio", "lead", "lead_cut",
                                                 "tests_agree", "smooth_agrees", "agreement_factor",
                                                 "smooth_shares", "norms", "trigger_success", "reached", "budgets",
                                                 "success", "reference_success", "reference_baseline")},
            **({SUMMARY_ONLY: True} if SUMMARY_ONLY in r["combined"] else {})}
            for r in rows])
    secondaries = {"session17": 0.5, "tests_agree": 0.5, "session16": 0.5, "ratio": 0.5, "either": 1.0}

    def show(name: str, part: list[dict]) -> None:
        summary = summarise(part, secondaries)
        print(name, json.dumps({k: summary.get(k) for k in ("models", "clean", "backdoored", "combined",
                                                             *secondaries, "cleanse", "untransferred")}),
              flush=True)

    for name, part in parts_of(rows).items():
        show(name, part)
        with_figures = [r for r in part if SUMMARY_ONLY not in r["combined"]]
        if 0 < len(with_figures) < len(part):   # the secondaries, on the models whose figures are known
            show(f"{name} (with figures)", with_figures)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", action="store_true", help="also run the default preset's verdict probe")
    parser.add_argument("--first", type=int, default=0, help="only models numbered from this up (a fresh part)")
    parser.add_argument("--probe-sizes", action="store_true", help="AUC of the probe by its size, then stop")
    parser.add_argument("--margin-test", action="store_true", help="the session-8 test's figures, then stop")
    parser.add_argument("--test-c", action="store_true",
                        help="the session-10 test's figures on population (C), then stop")
    parser.add_argument("--test-d", action="store_true",
                        help="the session-11 test's figures on population (D), then stop")
    parser.add_argument("--export-figures", nargs="?", const="D,E", default=None, metavar="POPULATIONS",
                        help="write every model's per-class figures of these populations, comma-separated "
                             "(default D,E), to results/, then stop")
    parser.add_argument("--test-e", action="store_true",
                        help="the session-13 test's figures on population (E), then stop")
    parser.add_argument("--kept", action="store_true",
                        help="every shipped statistic's AUC per population, from the kept figures, then stop")
    parser.add_argument("--test-f", choices=("F1", "F2", "F"), default=None,
                        help="the session-14 test's figures on population (F), or a half of it, then stop")
    parser.add_argument("--test-cleanse", action="store_true",
                        help="the session-15 test's figures (cleanse on D, E, F1, F2), then stop")
    parser.add_argument("--test-combined", nargs="?", const="G", default=None, metavar="POPULATIONS",
                        help="the combined verdict's tests (on G, session 16's; on H, session 17's; on I, "
                             "session 18's; on J, or I,J --kept, session 19's; 'kept': on D-F's kept figures; "
                             "'all': on D-H's), then stop")
    parser.add_argument("--smooth-figures", action="store_true",
                        help="measure the smooth-image shares of every model of D-H into results/, then stop")
    args = parser.parse_args()
    if args.smooth_figures:
        smooth_figures()
        return
    if args.test_combined:
        combined_population_test(tuple(args.test_combined.split(",")), kept=args.kept)
        return
    if args.test_cleanse:
        cleanse_population_test()
        return
    if args.export_figures:
        export_figures(tuple(args.export_figures.split(",")))
        return
    if args.kept:
        kept_statistics()
        return
    if args.test_f:
        whole = args.test_f == "F"
        population_test(("F1", "F2") if whole else (args.test_f,), pooled="F" if whole else None)
        return
    if args.margin_test or args.test_c or args.test_d or args.test_e:
        population_test(("C",) if args.test_c else ("D",) if args.test_d else ("E",) if args.test_e else ("A", "B"))
        return
    if args.probe_sizes:
        probe_sizes(args.first)
        return
    rows = []
    for attack in ("clean", *ATTACKS):
        for folder in sorted(CACHE.glob(f"{attack}_*")):
            if not (folder / "scan_gradient.json").exists():
                continue
            facts = json.loads((folder / "facts.json").read_text())
            if facts["number"] < args.first:
                continue
            if attack != "clean" and facts["asr"] < 0.8:
                continue
            rows.append({**facts, "stats": statistics(folder, args.probe)})
            print(folder.name, {k: (round(v, 3), c) for k, (v, c) in rows[-1]["stats"].items()}, flush=True)
    for name in rows[0]["stats"]:
        def scores(part, backdoored, name=name):
            return [r["stats"][name][0] for r in part if (r["attack"] != "clean") == backdoored]
        held = [r for r in rows if r["number"] % 2 == 1]
        hits = sum(r["stats"][name][1] == r.get("target") for r in rows if r["attack"] != "clean")
        per_attack = {a: round(auc(scores(rows, False), [r["stats"][name][0] for r in rows if r["attack"] == a]), 3)
                      for a in ATTACKS}
        fit = [r for r in rows if r["number"] % 2 == 0]
        cut = fit_threshold(scores(fit, False), scores(fit, True))
        fpr = np.mean([v >= cut for v in scores(held, False)])
        tpr = np.mean([v >= cut for v in scores(held, True)])
        print(f"{name:13s} AUC all {auc(scores(rows, False), scores(rows, True)):.3f}  held-out "
              f"{auc(scores(held, False), scores(held, True)):.3f}  threshold fitted on the even half {cut:.3f}: "
              f"held-out FPR {fpr:.2f} TPR {tpr:.2f}  class = target {hits}/"
              f"{sum(r['attack'] != 'clean' for r in rows)}  per attack {per_attack}")


if __name__ == "__main__":
    main()
