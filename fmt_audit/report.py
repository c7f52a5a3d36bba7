"""Scan reports: the JSON document (schema in README) and the short table on stdout."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class LayerResult:
    name: str
    channels: int
    depthwise: bool
    scores: list[list[float]]       # accuracy on each of the channel's candidate batches (layout per mode)
    shift: list[list[float]]        # class shift on each candidate batch (see fmt_audit.scores)
    flagged: list[int]
    selection: dict

    def to_dict(self) -> dict:
        return {"name": self.name, "channels": self.channels, "depthwise": self.depthwise,
                "scores": self.scores, "shift": self.shift, "flagged": self.flagged, "selection": self.selection}


@dataclass
class ScanReport:
    model: dict
    config: dict
    layers: list[LayerResult]
    clean_accuracy: float
    skipped_layers: list[str] = field(default_factory=list)
    timing: dict = field(default_factory=dict)

    @property
    def flagged_count(self) -> int:
        return sum(len(layer.flagged) for layer in self.layers)

    @property
    def summary(self) -> dict:
        tested = sum(layer.channels for layer in self.layers)
        return {
            "layers_tested": len(self.layers), "channels_tested": tested, "flagged": self.flagged_count,
            "flagged_fraction": round(self.flagged_count / tested, 6) if tested else 0.0,
            "degenerate_layers": [layer.name for layer in self.layers if layer.selection.get("degenerate")],
            "skipped_layers": self.skipped_layers, "clean_accuracy": round(self.clean_accuracy, 6),
        }

    def to_dict(self) -> dict:
        return {"model": self.model, "config": self.config, "layers": [layer.to_dict() for layer in self.layers],
                "summary": self.summary, "timing": self.timing}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def format_text(self) -> str:
        s = self.summary
        c = self.config
        column = "accuracy" if c["score"] == "accuracy" else "class shift"
        lines = [f"{'layer':40s} {'channels':>8s} {'flagged':>8s}  median/worst {column}"]
        for layer in self.layers:
            # a channel's worst candidate batch: lowest accuracy or largest shift
            values = [min(row) for row in layer.scores] if c["score"] == "accuracy" else [max(r) for r in layer.shift]
            ordered = sorted(values, reverse=c["score"] != "accuracy")
            note = "  (all scores equal)" if layer.selection.get("degenerate") else ""
            lines.append(f"{layer.name:40s} {layer.channels:8d} {len(layer.flagged):8d}  "
                         f"{ordered[len(ordered) // 2]:.3f}/{ordered[0]:.3f}{note}")
        how = (f"eps {c['eps']}, {c['steps']} step(s)" if c["mode"] == "gradient" else f"gain {c['gain']}")
        lines.append(f"{s['flagged']} of {s['channels_tested']} channels flagged in {s['layers_tested']} layers "
                     f"(preset {c['preset']}: {c['mode']} mode, {how}, {c['score']} scores, "
                     f"{c['selection']} selection); clean accuracy {s['clean_accuracy']:.4f} on {c['samples']} images")
        if s["degenerate_layers"]:
            lines.append(f"warning: in {len(s['degenerate_layers'])} layer(s) every channel scored the same; "
                         "the test moved no prediction there (try a larger --eps, or --eps auto)")
        return "\n".join(lines)
