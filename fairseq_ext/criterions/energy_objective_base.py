"""The shared options and plumbing of the criteria ``energy_likelihood``, ``energy_pseudolikelihood``,
``energy_mlm`` and ``energy_kl_projection`` (one file each):
training a bidirectional masked LM (``--arch energy_mlm*``) as the energy model
E_raw(y) = - sum_t logit_t(y_t | y_\\t) (Goyal's thesis, CMU 2021, sections 6.2.1-6.2.2; the math is in
fairseq_ext/modules/energy_training.py).

Per data sequence y (nats, summed over the batch; sample_size = sentences, so ``loss`` is per sequence):

* ``energy_likelihood``        E_raw(y) + log Z, log Z by enumerating V^T in batches (6.2.2 "LL");
* ``energy_pseudolikelihood``  - sum_i log p(y_i | y_\\i), the MRF's true conditionals (6.2.2 "PLL");
* ``energy_mlm``               - sum_i log softmax(logit_i)[y_i], the free conditionals (6.2.1): with this
                               architecture every position's masked conditional comes from one pass, so the
                               objective is the full degenerate pseudolikelihood, not a random-mask estimate;
* ``energy_kl_projection``     sum_i KL(p_mlm(. | y_\\i) || p(. | y_\\i; theta)) to a frozen teacher MLM
                               (``--energy-teacher-path``), plus ``--energy-pll-weight`` x the PLL objective.

V is the set of real symbols of the dictionary: specials (BOS, pad, EOS, unk) and fairseq's
``madeupword`` fillers are excluded from the enumeration, from every softmax and from the data (a data
token outside V is an error).  Sequences come from ``sample["target"]`` with EOS and padding removed, so
the criteria run under ``--task language_modeling --sample-break-mode eos`` with one sequence per line;
a batch may mix lengths (each length is its own sequence space V^T).

Validation batches also log, per sequence in nats, the columns of Table 6.1: ``exact_nll`` (E_raw + log Z
by enumeration; only when |V|^T <= --energy-max-enumeration, else not logged), ``pseudo_nll`` (true
conditionals) and ``mlm_nll`` (free conditionals).
"""
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from torch import Tensor

from fairseq_ext.modules import energy_training as et



@dataclass
class EnergyCriterionConfig(FairseqDataclass):
    energy_max_enumeration: int = field(
        default=100000,
        metadata={
            "help": "largest |V|^T (real symbols ^ sequence length) enumerated for log Z: energy_likelihood refuses "
            "beyond it, the other criteria then skip the exact_nll validation metric"
        },
    )
    energy_batch_rows: int = field(
        default=4096,
        metadata={"help": "sequences per model pass when enumerating V^T or scoring the |V| single-site variants"},
    )


@dataclass
class EnergyKLProjectionConfig(EnergyCriterionConfig):
    energy_teacher_path: Optional[str] = field(
        default=None,
        metadata={"help": "checkpoint of the frozen pretrained MLM (an energy_mlm model on the same dictionary) whose "
                  "free conditionals are projected; required"},
    )  # fmt: skip
    energy_pll_weight: float = field(
        default=0.0,
        metadata={"help": "weight of the exact pseudolikelihood objective added to the KL; 0 = KL projection alone"},
    )


class EnergyCriterionBase(FairseqCriterion):
    """Shared plumbing: data sequences by length, the symbol map, the logits callable, validation metrics."""

    def __init__(self, task, cfg: EnergyCriterionConfig):
        super().__init__(task)
        if cfg.energy_max_enumeration < 1 or cfg.energy_batch_rows < 1:
            raise ValueError("--energy-max-enumeration and --energy-batch-rows must be >= 1")
        self.max_enumeration = cfg.energy_max_enumeration
        self.batch_rows = cfg.energy_batch_rows
        dictionary = task.target_dictionary
        self.eos = dictionary.eos()
        self.symbol_ids = et.real_symbols(dictionary)
        if self.symbol_ids.numel() < 2:
            raise ValueError("the energy criteria need a dictionary with at least 2 real symbols")

    # -- plumbing ---------------------------------------------------------------------------------------
    def logits_fn(self, model):
        ids = self.symbol_ids

        def fn(seqs: Tensor) -> Tensor:  # N x T symbol indices -> N x T x V
            i = ids.to(seqs.device)
            return model(i[seqs])[0][..., i]

        return fn

    def groups(self, sample):
        """{T: n x T symbol indices} from ``sample["target"]`` (EOS and padding removed)."""
        target = sample["target"]  # B x L
        mask = target.ne(self.padding_idx) & target.ne(self.eos)  # B x L
        lengths = mask.sum(dim=1)  # B
        out = {}
        for t in et.group_by_length(lengths):
            if t == 0:
                raise ValueError("an empty sequence in the data: the energy criteria need T >= 1 symbols per line")
            rows = target[lengths == t]  # n x L
            body = rows[mask[lengths == t]].view(-1, t)  # n x T (real tokens lead every row)
            out[t] = et.to_symbol_index(body, self.symbol_ids)
        return out

    def objective(self, model, logits_fn, seqs: Tensor, length: int) -> Tensor:
        """Per-sequence loss: n x T -> n."""
        raise NotImplementedError

    # -- fairseq API --------------------------------------------------------------------------------------
    def forward(self, model, sample, reduce=True):
        logits_fn = self.logits_fn(model)
        groups = self.groups(sample)
        losses = [self.objective(model, logits_fn, seqs, t) for t, seqs in groups.items()]
        loss = torch.cat(losses).sum()
        nsentences = sum(s.size(0) for s in groups.values())
        log: Dict[str, float] = {
            "loss": loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": nsentences,
            "sample_size": nsentences,
        }
        if not model.training:
            log.update(self.validation_metrics(logits_fn, groups))
        return loss, nsentences, log

    @torch.no_grad()
    def validation_metrics(self, logits_fn, groups) -> Dict[str, float]:
        v = self.symbol_ids.numel()
        out = {"pseudo_nll": 0.0, "mlm_nll": 0.0, "exact_nll": 0.0, "exact_nll_count": 0}
        for t, seqs in groups.items():
            logits = torch.cat(list(et.chunked_logits(logits_fn, seqs, self.batch_rows)))  # n x T x V
            out["mlm_nll"] += float(et.mlm_nll(logits, seqs).sum())
            cond = et.exact_conditionals(logits_fn, seqs, v, self.batch_rows)
            out["pseudo_nll"] += float(et.pseudo_nll(cond, seqs).sum())
            if et.enumeration_size(v, t) <= self.max_enumeration:
                log_z = et.log_partition(logits_fn, v, t, self.batch_rows, self.max_enumeration, seqs.device)
                out["exact_nll"] += float(et.exact_nll(logits_fn, seqs, log_z, self.batch_rows).sum())
                out["exact_nll_count"] += seqs.size(0)
        return out

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        loss = sum(utils.item(log.get("loss", 0)) for log in logging_outputs)
        size = sum(log.get("sample_size", 0) for log in logging_outputs)
        metrics.log_scalar("loss", loss / max(size, 1), size, round=3)  # nats per sequence
        nsent = sum(log.get("nsentences", 0) for log in logging_outputs)
        if any("pseudo_nll" in log for log in logging_outputs):
            for name in ("pseudo_nll", "mlm_nll"):
                metrics.log_scalar(name, sum(log.get(name, 0.0) for log in logging_outputs) / max(nsent, 1), nsent,
                                   round=3)  # fmt: skip
            count = sum(log.get("exact_nll_count", 0) for log in logging_outputs)
            if count > 0:
                metrics.log_scalar("exact_nll", sum(log.get("exact_nll", 0.0) for log in logging_outputs) / count,
                                   count, round=3)  # fmt: skip

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return False  # the validation metrics are averaged over their own counts
