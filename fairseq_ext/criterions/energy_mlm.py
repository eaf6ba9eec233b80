"""Criterion ``energy_mlm``: the MLM objective on E_raw's network: the degenerate pseudolikelihood of the free
conditionals (Goyal's thesis, section 6.2.1).

Shared options, data handling and validation metrics: fairseq_ext/criterions/energy_objective_base.py."""
import torch
from fairseq.criterions import register_criterion

from fairseq_ext.criterions.energy_objective_base import EnergyCriterionBase, EnergyCriterionConfig
from fairseq_ext.modules import energy_training as et


@register_criterion("energy_mlm", dataclass=EnergyCriterionConfig)
class EnergyMLMCriterion(EnergyCriterionBase):
    def objective(self, model, logits_fn, seqs, length):
        logits = torch.cat(list(et.chunked_logits(logits_fn, seqs, self.batch_rows)))  # n x T x V
        return et.mlm_nll(logits, seqs)
