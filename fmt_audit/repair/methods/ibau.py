"""``ibau``: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022; :mod:`fmt_audit.repair.ibau`): a
minimax over one shared input perturbation with an implicit hypergradient; nothing removed, and its unlearning
is the repair."""

from __future__ import annotations

from dataclasses import asdict

from fmt_audit.repair.methods.base import Removal, RepairInputs, RepairMethod


class ImplicitBackdoorUnlearning(RepairMethod):
    name = "ibau"
    summary = ("Implicit Backdoor Adversarial Unlearning (minimax over one shared input perturbation, implicit "
               "hypergradient; nothing removed, no fine-tuning)")
    fine_tunes = False
    without_fine_tuning = "i-BAU's unlearning is the repair"

    def removal(self, inputs: RepairInputs) -> Removal:
        return Removal("none (i-BAU unlearns without removing)", {})

    def after_removal(self, inputs: RepairInputs) -> dict:
        from fmt_audit.repair.ibau import ibau_unlearn

        return ibau_unlearn(inputs.classifier, inputs.train, inputs.config.ibau, seed=inputs.scan_config.seed,
                            progress=inputs.progress)

    def settings(self, config) -> dict:
        return {"ibau": asdict(config.ibau)}


IBAU = ImplicitBackdoorUnlearning()
