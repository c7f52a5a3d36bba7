"""``clp``: Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022; :mod:`fmt_audit.repair.pruning`): channels
with an unusually large Lipschitz bound, from the weights alone."""

from __future__ import annotations

from fmt_audit.repair.methods.base import Removal, RepairInputs, RepairMethod


class ChannelLipschitzPruning(RepairMethod):
    name = "clp"
    summary = "Channel Lipschitzness-based Pruning (data-free, no fine-tuning)"
    needs_data = False
    fine_tunes = False
    without_fine_tuning = "clp is data-free"

    def removal(self, inputs: RepairInputs) -> Removal:
        from fmt_audit.repair.pruning import clp_channels

        loaded = inputs.loaded
        choice = clp_channels(loaded.proto, loaded.layers, inputs.config.clp_u)
        return Removal("clp", choice.channels, evidence=choice.evidence)

    def settings(self, config) -> dict:
        return {"clp_u": config.clp_u}


CLP = ChannelLipschitzPruning()
