"""Self-contained HTML reports of a scan or a repair: tables, and plots embedded as PNG.

One file, no network assets: the plots are matplotlib figures (Agg backend)
inlined as base64 ``data:`` images, the styles are inline. A few lines of script
count the plots that rendered (``data-plots-rendered`` on ``<body>``), which the
browser test reads.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence

import numpy as np

from fmt_audit.report.json_report import RepairReport, ScanReport, format_self_check, format_trace

LAYERS_PER_FIGURE = 12
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: .2em .8em; border-bottom: 1px solid #eee;
  text-align: left; vertical-align: top; } th { background: #f6f6f6; }
code { font-size: .92em; } .verdict { font-size: 1.15em; padding: .6em 1em; border-radius: 4px; }
.flagged { background: #fdecea; } .quiet { background: #e8f5e9; } img { max-width: 100%; }
.note { color: #666; }
"""
SCRIPT = """
window.addEventListener("load", () => {
  const rendered = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.plotsRendered = String(rendered);
});
"""


def _esc(value) -> str:
    return html.escape(str(value))


def _table(rows: list[tuple[str, object]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows) + "</table>"


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _suspicion(report: ScanReport, layer) -> tuple[np.ndarray, str]:
    """Per channel, what selection ranked: the worst candidate's accuracy drop or class shift."""
    if report.config.get("score") == "accuracy":
        return 1.0 - np.asarray(layer.scores, dtype=float).min(axis=1), "accuracy drop (worst candidate)"
    return np.asarray(layer.shift, dtype=float).max(axis=1), "class shift (worst candidate)"


def _threshold(selection: dict) -> float | None:
    """The outlier rule's cut in score units: median + threshold * scale (reports before the scale was
    recorded: max(1.4826 MAD, noise floor), as it was computed)."""
    if selection.get("rule") != "outlier" or "median" not in selection:
        return None
    scale = selection.get("scale") or max(1.4826 * selection["mad"], selection["noise_floor"], 1e-12)
    return selection["median"] + selection["threshold"] * scale


def layer_plots(report: ScanReport) -> list[str]:
    """Small multiples, one panel per layer: each channel's score, flagged channels in red."""
    plt = _pyplot()
    images = []
    layers = report.layers
    for start in range(0, len(layers), LAYERS_PER_FIGURE):
        part = layers[start:start + LAYERS_PER_FIGURE]
        columns = min(3, len(part))
        rows = -(-len(part) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.4 * rows), squeeze=False)
        for axis in axes.flat[len(part):]:
            axis.set_visible(False)
        for axis, layer in zip(axes.flat, part):
            values, label = _suspicion(report, layer)
            channels = np.arange(len(values))
            flagged = np.zeros(len(values), bool)
            flagged[layer.flagged] = True
            axis.scatter(channels[~flagged], values[~flagged], s=8, color="#888888")
            axis.scatter(channels[flagged], values[flagged], s=22, color="#d62728", label="flagged")
            cut = _threshold(layer.selection)
            if cut is not None:
                axis.axhline(cut, color="#d62728", linestyle="--", linewidth=0.8)
            axis.set_title(layer.name if len(layer.name) <= 40 else "…" + layer.name[-39:], fontsize=8)
            axis.set_ylim(-0.03, 1.03)
            axis.tick_params(labelsize=7)
            axis.set_xlabel("channel", fontsize=7)
            axis.set_ylabel(label, fontsize=7)
        figure.tight_layout()
        images.append(_png(figure))
    return images


def class_plot(values: Sequence[float], target: int | None, label: str) -> str:
    """A class-level test's evidence: one bar per class, the class the verdict names in red."""
    plt = _pyplot()
    values = np.asarray(values, dtype=float)
    figure, axis = plt.subplots(figsize=(min(12, 2 + 0.35 * len(values)), 2.6))
    colors = ["#d62728" if k == target else "#888888" for k in range(len(values))]
    axis.bar(np.arange(len(values)), values, color=colors)
    axis.set_xlabel("class", fontsize=8)
    axis.set_ylabel(label, fontsize=8)
    axis.tick_params(labelsize=7)
    figure.tight_layout()
    return _png(figure)


# how every page begins, up to its title (the fleet recognises its own reports by it)
PAGE_OPENING = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>'
SCAN_TITLE = "fmt-audit scan: "
REPAIR_TITLE = "fmt-audit repair: "


def _page(title: str, body: list[str]) -> str:
    return (f"{PAGE_OPENING}{_esc(title)}</title>"
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body><h1>{_esc(title)}</h1>"
            + "\n".join(body) + "</body></html>\n")


def _verdict_line(verdict: dict) -> str:
    from fmt_audit.verdict import describe

    return (f'<p class="verdict {"quiet" if verdict["verdict"] == "clean" else "flagged"}">'
            f'{_esc(describe(verdict))}</p>')


def _verdict_figures(verdict: dict) -> list[str]:
    from fmt_audit.verdict import figures

    return [f"<h2>{_esc(figure.title)}</h2><p class=\"note\">{_esc(figure.note)}</p>"
            + class_plot(figure.values, verdict.get("target_class"), figure.label) for figure in figures(verdict)]


def _scan_sections(report: ScanReport) -> list[str]:
    s, c = report.summary, report.config
    flagged = s["flagged"]
    tone = "flagged" if flagged else "quiet"
    body = [f'<p class="verdict {tone}">{flagged} of {s["channels_tested"]} channels flagged in '
            f'{s["layers_tested"]} layers; clean accuracy {s["clean_accuracy"]:.4f} on {c["samples"]} images.</p>',
            '<p class="note">A flagged channel is one whose disturbance moved the model far more than its layer\'s '
            "other channels did (the channels a backdoor would use). A scan that flags nothing is not proof of a "
            "clean model.</p>"]
    if report.verdict:
        body.insert(0, _verdict_line(report.verdict))
    if report.model.get("nonfinite_weights"):
        body.append(f'<p class="verdict flagged">NaN or Inf in weights: '
                    f'{_esc(", ".join(report.model["nonfinite_weights"]))}</p>')
    body.append("<h2>Model</h2>" + _table([("path", report.model["path"]), ("sha256", report.model["sha256"]),
                                           ("opset", report.model["opset"]),
                                           ("input", json.dumps(report.model["input"]))]))
    if report.verdict:
        body += _verdict_figures(report.verdict)
    if report.trace:
        body.append(f"<p>{_esc(format_trace(report.trace))}</p>")
    rows = [(layer.name, ", ".join(map(str, layer.flagged))) for layer in report.layers if layer.flagged]
    body.append("<h2>Flagged channels</h2>" + (_table(rows) if rows else "<p>None.</p>"))
    body.append("<h2>Channel scores by layer</h2><p class=\"note\">Each point is a channel; red: flagged; dashed: "
                "the outlier rule's cut.</p>" + "".join(layer_plots(report)))
    shown = {k: v for k, v in c.items() if k != "calibration"}
    body.append("<h2>Configuration</h2>" + _table([(k, json.dumps(v)) for k, v in shown.items()]))
    if c.get("calibration"):
        body.append("<h3>eps calibration</h3>" + _table([(f"eps {t['eps']}", f"median relative drop "
                                                          f"{t['median_relative_drop']}") for t in c["calibration"]]))
    body.append("<h2>Device and timing</h2>" + _table(
        [("device", c.get("device_used")), ("ONNX Runtime provider", c.get("ort_provider"))]
        + [(k, v) for k, v in report.timing.items()]
        + [(k, json.dumps(v)) for k, v in report.resources.items()]))
    return body


def scan_html(report: ScanReport) -> str:
    """The HTML page of a scan report."""
    return _page(f"{SCAN_TITLE}{report.model['path']}", _scan_sections(report))


def repair_html(report: RepairReport, scan: ScanReport | None = None) -> str:
    """The HTML page of a repair: what was removed, how accuracy moved, the training curve, the scan."""
    a = report.accuracy

    def pct(value):
        return "–" if value is None else f"{value:.4f}"

    body = [f'<p class="verdict {"flagged" if report.flagged_count else "quiet"}">Removed {report.flagged_count} of '
            f"{report.channels_total} channels (from the {report.source}), fine-tuned "
            f"{report.config['epochs']} epochs; holdout accuracy {pct(a.get('before'))} → "
            f"{pct(a.get('after'))}.</p>",
            "<h2>Accuracy on the held-out clean images</h2>" + _table(
                [("before", pct(a.get("before"))), ("after removal", pct(a.get("after_removal"))),
                 ("after fine-tuning", pct(a.get("after")))]),
            '<p class="note">Attack success rate and robust accuracy need triggered images: '
            "<code>fmt-audit evaluate</code> measures them.</p>"]
    if report.self_check:
        body.append(f'<h2>Self-check: {_esc(report.self_check["status"])}</h2>'
                    f'<p>{_esc(format_self_check(report.self_check).removeprefix("self-check   "))}</p>')
    rows = [(layer, ", ".join(map(str, channels))) for layer, channels in report.flagged.items()]
    body.append("<h2>Removed channels</h2>" + (_table(rows) if rows else "<p>None.</p>"))
    evidence = report.evidence or {}
    if report.source == "trace" and evidence.get("verdict"):
        body += ["<h2>The verdict the channels were traced from</h2>", _verdict_line(evidence["verdict"]),
                 f"<p>{_esc(format_trace(evidence['trace']))}</p>", *_verdict_figures(evidence["verdict"])]
    if report.epochs:
        plt = _pyplot()
        figure, axis = plt.subplots(figsize=(6, 2.8))
        epochs = [e["epoch"] for e in report.epochs]
        axis.plot(epochs, [e["loss"] for e in report.epochs], marker="o", label="training loss")
        held = [e.get("holdout_accuracy") for e in report.epochs]
        if any(h is not None for h in held):
            twin = axis.twinx()
            twin.plot(epochs, held, marker="s", color="#2ca02c", label="holdout accuracy")
            twin.set_ylabel("holdout accuracy")
        axis.set_xlabel("epoch")
        axis.set_ylabel("loss")
        axis.xaxis.get_major_locator().set_params(integer=True)
        body.append("<h2>Fine-tuning</h2>" + _png(figure))
    body.append("<h2>Verification</h2>" + _table([(k, json.dumps(v)) for k, v in report.verification.items()]))
    if report.output:
        body.append("<h2>Output</h2>" + _table(list(report.output.items())))
    body.append("<h2>Configuration</h2>" + _table([(k, json.dumps(v)) for k, v in report.config.items()]))
    body.append("<h2>Timing</h2>" + _table(list(report.timing.items())))
    if report.warnings:
        body.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{_esc(w)}</li>" for w in report.warnings) + "</ul>")
    if scan is not None:
        body.append("<h2>The scan</h2>")
        body += _scan_sections(scan)
    return _page(f"{REPAIR_TITLE}{report.model.get('path', '')}", body)
