"""Criterion ``energy_pseudolikelihood``: exact pseudolikelihood of E_raw: the MRF's true conditionals
(Goyal's thesis, section 6.2.2, "PLL").

Shared options, data handling and validation metrics: fairseq_ext/criterions/energy_objective_base.py."""
from fairseq.criterions import register_criterion

from fairseq_ext.criterions.energy_objective_base import EnergyCriterionBase, EnergyCriterionConfig
from fairseq_ext.modules import energy_training as et


@register_criterion("energy_pseudolikelihood", dataclass=EnergyCriterionConfig)
class EnergyPseudolikelihoodCriterion(EnergyCriterionBase):
    def objective(self, model, logits_fn, seqs, length):
        cond = et.exact_conditionals(logits_fn, seqs, self.symbol_ids.numel(), self.batch_rows)
        return et.pseudo_nll(cond, seqs)
