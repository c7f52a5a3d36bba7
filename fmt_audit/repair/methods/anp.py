"""``anp``: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021; :mod:`fmt_audit.repair.anp`): the channels whose
masks, optimised against neuron perturbations, end low; it prunes and stops, as its reference does."""

from __future__ import annotations

from dataclasses import asdict

from fmt_audit.repair.methods.base import Removal, RepairInputs, RepairMethod


class AdversarialNeuronPruning(RepairMethod):
    name = "anp"
    summary = ("Adversarial Neuron Pruning (channels whose masks, optimised against neuron perturbations, end low; "
               "no fine-tuning)")
    fine_tunes = False
    without_fine_tuning = "ANP prunes and stops, as its reference does"
    compared = False        # its mask search (2,000 iterations by default) is left to be asked for

    def removal(self, inputs: RepairInputs) -> Removal:
        from fmt_audit.repair.anp import anp_channels
        from fmt_audit.repair.finetune import flip_decision

        tuning = inputs.config.fine_tune
        flip = tuning.augment and flip_decision(inputs.classifier, inputs.train, tuning.flip)[0]
        choice = anp_channels(inputs.classifier, inputs.loaded.layers, inputs.train, inputs.config.anp,
                              seed=inputs.scan_config.seed, augment=tuning.augment, flip=flip,
                              progress=inputs.progress)
        return Removal("anp", choice.channels, evidence=choice.evidence)

    def settings(self, config) -> dict:
        return {"anp": asdict(config.anp)}


ANP = AdversarialNeuronPruning()
