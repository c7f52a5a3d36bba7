"""``fp``: Fine-Pruning (Liu et al., RAID 2018): the last Conv layer's dormant channels
(:mod:`fmt_audit.repair.pruning`), then fine-tuning."""

from __future__ import annotations

from fmt_audit.repair.methods.base import Removal, RepairInputs, RepairMethod


class FinePruning(RepairMethod):
    name = "fp"
    summary = "Fine-Pruning (the last Conv layer's dormant channels, then fine-tuning)"

    def removal(self, inputs: RepairInputs) -> Removal:
        from fmt_audit.repair.pruning import dormant_channels

        loaded = inputs.loaded
        choice = dormant_channels(inputs.classifier, loaded.classifier, loaded.layers, inputs.train,
                                  inputs.config.prune_drop, seed=inputs.scan_config.seed)
        return Removal("fine-pruning", choice.channels, evidence=choice.evidence)

    def settings(self, config) -> dict:
        return {"prune_drop": config.prune_drop}


FP = FinePruning()
