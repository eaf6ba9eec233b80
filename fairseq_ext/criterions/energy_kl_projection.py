"""Criterion ``energy_kl_projection``: KL projection of a frozen teacher MLM's conditionals onto E_raw's true
conditionals, plus a weighted pseudolikelihood (Goyal's thesis, section 6.2.2).

Shared options, data handling and validation metrics: fairseq_ext/criterions/energy_objective_base.py."""
import torch
from fairseq import checkpoint_utils
from fairseq.criterions import register_criterion

from fairseq_ext.criterions.energy_objective_base import EnergyCriterionBase, EnergyKLProjectionConfig
from fairseq_ext.modules import energy_training as et


@register_criterion("energy_kl_projection", dataclass=EnergyKLProjectionConfig)
class EnergyKLProjectionCriterion(EnergyCriterionBase):
    def __init__(self, task, cfg: EnergyKLProjectionConfig):
        super().__init__(task, cfg)
        if not cfg.energy_teacher_path:
            raise ValueError("--criterion energy_kl_projection needs --energy-teacher-path (a pretrained energy_mlm "
                             "checkpoint, e.g. trained with --criterion energy_mlm)")  # fmt: skip
        if not cfg.energy_pll_weight >= 0.0:
            raise ValueError(f"--energy-pll-weight must be >= 0, got {cfg.energy_pll_weight}")
        self.pll_weight = cfg.energy_pll_weight
        models, _ = checkpoint_utils.load_model_ensemble([cfg.energy_teacher_path], task=task)
        self.set_teacher(models[0])

    def set_teacher(self, teacher) -> None:
        """The frozen teacher, held outside the module tree (never trained, moved or saved with the criterion)."""
        out = getattr(getattr(teacher, "decoder", None), "fc_out", None)
        if out is None or out.out_features != len(self.task.target_dictionary):
            raise ValueError("--energy-teacher-path must hold an energy_mlm model over the same dictionary as the data")
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self._teacher = (teacher,)

    def objective(self, model, logits_fn, seqs, length):
        teacher = self._teacher[0]
        if next(teacher.parameters()).device != seqs.device:
            teacher.to(seqs.device)
        with torch.no_grad():
            teacher_fn = self.logits_fn(teacher)
            t_logits = torch.cat(list(et.chunked_logits(teacher_fn, seqs, self.batch_rows)))  # n x T x V
        cond = et.exact_conditionals(logits_fn, seqs, self.symbol_ids.numel(), self.batch_rows)  # n x T x V
        loss = et.kl_projection(t_logits, cond)
        if self.pll_weight > 0:
            loss = loss + self.pll_weight * et.pseudo_nll(cond, seqs)
        return loss
