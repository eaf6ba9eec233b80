"""Criterion ``energy_likelihood``: exact log-likelihood of E_raw, log Z by enumerating V^T (Goyal's thesis,
section 6.2.2, "LL").

Shared options, data handling and validation metrics: fairseq_ext/criterions/energy_objective_base.py."""
from fairseq.criterions import register_criterion

from fairseq_ext.criterions.energy_objective_base import EnergyCriterionBase, EnergyCriterionConfig
from fairseq_ext.modules import energy_training as et


@register_criterion("energy_likelihood", dataclass=EnergyCriterionConfig)
class EnergyLikelihoodCriterion(EnergyCriterionBase):
    def objective(self, model, logits_fn, seqs, length):
        log_z = et.log_partition(logits_fn, self.symbol_ids.numel(), length, self.batch_rows, self.max_enumeration,
                                 seqs.device)  # fmt: skip
        return et.exact_nll(logits_fn, seqs, log_z, self.batch_rows)
