"""Issue 31, set selection by a reversed trigger: which channels carry it, and the smallest set that stops it.

For each matrix cell (removal only, no fine-tuning):

1. the class: ``--class target`` takes the cell's real target (to test the mechanism apart from the
   verdict), ``--class verdict`` the class the ``combined`` verdict names;
2. Neural Cleanse's reversed trigger for that class (``fmt_audit.verdict.evidence.cleanse``) on 32 defender
   images of other classes;
3. each Conv channel's response to it on held-out defender images of other classes: the shift of its
   spatial mean, stamped against clean, in clean standard deviations (``--score shift``), or that shift times
   the gradient of the class's margin (``--score attribution``);
4. channels removed in order of response, the set growing geometrically, until the reversed trigger sends
   at most ``--stop`` of the held-out images to the class.

Reported: ACC and the real trigger's ASR (test images of ``benchmarks/cases.py``) with the chosen set removed,
next to as many random channels per layer, and the curve along the way.

    cd benchmarks && PYTHONPATH=. python ../research/trigger_guided.py matrix:cifar10-vgg-badnets-p10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from cases import cases, normalisation
from removal import acc_asr, opened, random_like

RESULTS = Path(__file__).resolve().parent / "results"


def every_case(name: str):
    """The cases of ``name``, clean matrix cells too (no trigger: ASR not measured)."""
    import json as _json

    from cases import Case, matrix_folders

    from fmt_audit.data import load_npz

    if not name.startswith("matrix:"):
        yield from cases(name)
        return
    for folder in matrix_folders(name):
        facts = _json.loads((folder / "facts.json").read_text())
        if facts["attack"] != "clean":
            yield from cases(f"matrix:{folder.name}")
            continue
        mean, std = normalisation(folder / "model.onnx")
        test = load_npz(folder / "test.npz").take(2000, seed=1)
        yield Case(f"matrix {facts['name']}", folder / "model.onnx", folder / "defender.npz", facts["target"],
                   test, None, mean, std)


def top(scores: dict[str, np.ndarray], k: int) -> dict[str, list[int]]:
    flat = sorted(((-float(v), name, c) for name, arr in scores.items() for c, v in enumerate(arr)))
    out: dict[str, list[int]] = {}
    for _, name, c in flat[:k]:
        out.setdefault(name, []).append(c)
    return out


def attribution(classifier, layers, x_clean, x_stamped, k, batch: int = 128):
    """Per channel: mean over images of (a_stamped - a_clean) * d(margin of k)/d a at the stamped image
    (spatially summed), a first-order share of the trigger's effect on the class's margin."""
    import torch

    modules = {layer.name: classifier.bridge.channel_modules.get(layer.name, classifier.bridge.conv_modules[layer.name])
               for layer in layers}
    totals = {name: np.zeros(layer.out_channels) for name, layer in zip(modules, layers)}
    for start in range(0, len(x_clean), batch):
        clean_acts = {}

        def keep(name, store=clean_acts):
            def hook(_m, _i, output):
                store[name] = output.detach()
            return hook

        handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
        with torch.no_grad():
            classifier(torch.from_numpy(x_clean[start:start + batch]))
        for h in handles:
            h.remove()
        stamped_acts = {}

        def grab(name, store=stamped_acts):
            def hook(_m, _i, output):
                output.retain_grad()
                store[name] = output
            return hook

        handles = [m.register_forward_hook(grab(n)) for n, m in modules.items()]
        logits = classifier(torch.from_numpy(x_stamped[start:start + batch]))
        for h in handles:
            h.remove()
        others = logits.clone()
        others[:, k] = -1e9
        margin = (logits[:, k] - others.max(1).values).sum()
        margin.backward()
        for name, act in stamped_acts.items():
            contribution = ((act.detach() - clean_acts[name]) * act.grad).sum((2, 3)).sum(0)
            totals[name] += contribution.numpy()
    return {name: v / len(x_clean) for name, v in totals.items()}


def table(path: Path) -> None:
    """The Markdown table of a results file (the last row of each model)."""
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[row["model"]] = row
    print("| cell | verdict (class) | rounds | flagged | ACC | ACC pruned | ASR | ASR pruned | random: ACC / ASR | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        verdict = row.get("verdict") or {}
        cut = [r for r in row["rounds"] if "pruned" in r]
        last = cut[-1] if cut else None
        acc, asr = row["base"]
        pct = 100 * row["flagged"] / row["channels"]

        def pc(v):
            return "–" if v is None else f"{100 * v:.1f}"

        print(f"| {name.removeprefix('matrix ')} | {verdict.get('verdict', '?')} ({verdict.get('class')}) | "
              f"{len(cut)} | {row['flagged']} ({pct:.1f}%) | {pc(acc)} | {pc(last['pruned'][0]) if last else '–'} | "
              f"{pc(asr)} | {pc(last['pruned'][1]) if last else '–'} | "
              f"{pc(last['random'][0]) + ' / ' + pc(last['random'][1]) if last else '–'} | {row['time s']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--table", type=Path, default=None, help="print the Markdown table of a results file")
    parser.add_argument("--tag", default="dev")
    parser.add_argument("--class", dest="which", default="target", choices=("target", "verdict"))
    parser.add_argument("--score", default="shift", choices=("shift", "attribution"))
    parser.add_argument("--stop", type=float, default=0.2)
    parser.add_argument("--held", type=int, default=500)
    parser.add_argument("--max-share", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if args.table:
        table(args.table)
        return

    import torch

    from fmt_audit.backends.torch.bridge import channels_held_at_zero
    from fmt_audit.fmt.trace import channel_means
    from fmt_audit.verdict.combined import RATIO_CUT
    from fmt_audit.verdict.config import CleanseConfig
    from fmt_audit.verdict.evidence.cleanse import _search, stamped

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"trigger_guided_{args.tag}.jsonl"
    for case in (c for name in args.models for c in every_case(name)):
        started = time.perf_counter()
        loaded, masked, classifier, defender = opened(case)
        sizes = {layer.name: layer.out_channels for layer in loaded.layers}
        total = sum(sizes.values())
        classifier.module.eval()
        for p in classifier.module.parameters():
            p.requires_grad_(False)
        median_norm = None
        verdict_row = None
        if args.which == "target":
            k = case.target
        else:
            from fmt_audit.verdict import VerdictConfig, VerdictInputs, gather
            verdict = gather(VerdictInputs(loaded, defender.take(256, seed=0), classifier.preprocessing,
                                           "cpu"), VerdictConfig())
            verdict_row = {"verdict": verdict.verdict, "suspicion": verdict.suspicion, "class": verdict.target_class,
                           "s": round(time.perf_counter() - started, 1)}
            print(json.dumps({"model": case.label, **verdict_row}), file=sys.stderr, flush=True)
            if verdict.verdict != "suspicious":
                row = {"model": case.label, "verdict": verdict_row, "flagged": 0, "base": acc_asr(masked, case, None),
                       "channels": total, "time s": round(time.perf_counter() - started, 1), "rounds": []}
                print(json.dumps(row), flush=True)
                with out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                continue
            k = verdict.target_class
            norms = np.asarray(verdict.details["norms"], dtype=float)
            median_norm = float(np.median(np.delete(norms, k)))
        rng = np.random.default_rng(0)
        others = np.flatnonzero(defender.y != k)
        order = rng.permutation(others)
        fit, held = order[:32], order[32:32 + args.held]
        x = torch.from_numpy(defender.x)
        h, w = defender.x.shape[2:]
        x_clean = defender.x[held]
        removed: dict[str, list[int]] = {}
        rounds = []
        for round_number in range(args.rounds):
            generator = torch.Generator().manual_seed(round_number)
            mask_start = torch.logit(torch.rand((1, 1, h, w), generator=generator), eps=1e-3)
            pattern_start = torch.logit(torch.rand((1, defender.x.shape[1], h, w), generator=generator), eps=1e-3)
            with channels_held_at_zero(classifier.bridge.channel_modules, removed):
                masks, patterns = _search(classifier, x, [fit], [k], mask_start, pattern_start, CleanseConfig())
                if masks[0] is None:
                    rounds.append({"round": round_number, "stop": "no reversed trigger reached the level"})
                    break
                mask, pattern = masks[0].detach(), patterns[0].detach()
                if median_norm is not None and float(mask.mean()) >= median_norm / RATIO_CUT:
                    rounds.append({"round": round_number, "mask L1 share": round(float(mask.mean()), 4),
                                   "stop": f"not anomalous: median other class {median_norm:.4f} / {RATIO_CUT}"})
                    break
                x_stamp = stamped(torch.from_numpy(x_clean), mask, pattern).numpy()
                if args.score == "shift":
                    clean_means = channel_means(classifier, loaded.layers, x_clean)
                    stamp_means = channel_means(classifier, loaded.layers, x_stamp)
                    scores = {n: (stamp_means[n].mean(0) - clean_means[n].mean(0)) / (clean_means[n].std(0) + 1e-6)
                              for n in clean_means}
                else:
                    scores = attribution(classifier, loaded.layers, x_clean, x_stamp, k)
            for name, channels in removed.items():
                scores[name][channels] = -np.inf

            def merged(extra, removed=removed):
                out = {n: sorted(set(removed.get(n, [])) | set(extra.get(n, []))) for n in set(removed) | set(extra)}
                return out

            def success(chosen, x_stamp=x_stamp, masked=masked, k=k):
                return float((masked.predict(x_stamp, chosen) == k).mean())

            curve, chosen, kk = [], {}, 1
            before = success(removed)
            room = args.max_share * total - sum(len(c) for c in removed.values())
            while kk <= room:
                chosen = merged(top(scores, kk))
                s_now = success(chosen)
                curve.append((kk, round(s_now, 3)))
                if s_now <= args.stop:
                    break
                kk = max(kk + 1, round(kk * 1.25))
            removed = chosen
            n = sum(len(c) for c in removed.values())
            rounds.append({"round": round_number, "mask L1 share": round(float(mask.mean()), 4),
                           "reversed success before": round(before, 3), "added": kk, "flagged": n,
                           "pruned": acc_asr(masked, case, removed),
                           "random": acc_asr(masked, case, random_like(removed, sizes, 0)),
                           "time s": round(time.perf_counter() - started, 1), "curve": curve})
            print(json.dumps({"model": case.label, **rounds[-1]}), file=sys.stderr, flush=True)
        n = sum(len(c) for c in removed.values())
        row = {"model": case.label, "class": k, "true target": case.target, "score": args.score,
               "verdict": verdict_row, "median other norm": median_norm,
               "channels": total, "flagged": n, "flagged %": round(100 * n / total, 2),
               "base": acc_asr(masked, case, None), "rounds": rounds,
               "time s": round(time.perf_counter() - started, 1)}
        print(json.dumps(row), flush=True)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{case.label}: done", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
