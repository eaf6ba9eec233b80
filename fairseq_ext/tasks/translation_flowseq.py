"""Task ``translation_flowseq``: translation with FlowSeq (Ma et al., EMNLP 2019).

fairseq's translation task (data, ``--eval-bleu``) with

* the FlowSeq generator (``fairseq_ext/generators/flowseq_generator.py``; its ``--flowseq-*``
  decoding options are fields of this task, since fairseq's GenerationConfig cannot be extended),
  used by ``fairseq-generate`` and by ``--eval-bleu`` on the validation set;
* checks, before any training step, that the model is a FlowSeq architecture and the criterion
  ``flowseq_loss``;
* non-finite steps skipped: a mini-batch whose loss or gradients are NaN / inf is dropped
  (its gradients zeroed and its logging values zeroed; counted as ``nonfinite_skipped``), and an
  update whose every mini-batch was dropped (the gradient is exactly zero on every worker after
  the all-reduce) makes no optimizer step, as the reference implementation skips NaN steps.
  Without this fairseq's Trainer raises FloatingPointError ("gradients are Nan/Inf") and stops;
* the prior frozen during the criterion's autoencoder pre-training: its gradients are dropped
  before the optimizer step (under ``legacy_ddp`` the all-reduce turns its missing gradients into
  zeros, on which Adam's weight decay would still act).

    fairseq-train BIN --user-dir fairseq_ext --task translation_flowseq --arch flowseq_base \\
        --criterion flowseq_loss --label-smoothing 0.1 --share-all-embeddings ...
    fairseq-generate BIN --user-dir fairseq_ext --task translation_flowseq --path CKPT \\
        --flowseq-decoding argmax ...
"""
import logging
from dataclasses import dataclass, field

import torch
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_ext.criterions.flowseq_loss import FlowSeqLossCriterion, unwrap_flowseq
from fairseq_ext.generators.flowseq_generator import FlowSeqGenerationConfig, FlowSeqGenerator
from fairseq_ext.modules.task_guards import CheckpointMetricConfig, TaskGuardsMixin

logger = logging.getLogger(__name__)

_FLOWSEQ_ARCHS = "flowseq, flowseq_base, flowseq_large, flowseq_iwslt_de_en, flowseq_wmt_en_de or flowseq_tiny"


@dataclass
class TranslationFlowSeqConfig(TranslationConfig, FlowSeqGenerationConfig, CheckpointMetricConfig):
    flowseq_inject_nonfinite: str = field(
        default="",
        metadata={
            "help": "for testing the non-finite step skipping: comma-separated update counts (0-based, as the "
            "trainer passes them to train_step) whose training loss is made NaN; empty = none"
        },
    )


def parse_update_list(spec: str, flag: str):
    if not spec:
        return frozenset()
    try:
        values = frozenset(int(v) for v in spec.split(","))
    except ValueError:
        values = None
    if values is None or any(v < 0 for v in values):
        raise ValueError(f"{flag} must be a comma-separated list of update counts >= 0, got {spec!r}")
    return values


def all_finite(tensors) -> bool:
    """True when every given tensor is finite (one host sync)."""
    checks = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(checks).all()) if checks else True


def check_ddp_wrapper(model):
    """PyTorch DDP must be told that the prior goes unused during pre-training (before any update)."""
    inner = model
    while inner is not None:
        if isinstance(inner, torch.nn.parallel.DistributedDataParallel) and not inner.find_unused_parameters:
            raise ValueError(
                "--task translation_flowseq: the prior gets no gradient during --flowseq-init-updates, which "
                "--ddp-backend pytorch_ddp only allows with --find-unused-parameters; or use --ddp-backend legacy_ddp"
            )
        inner = getattr(inner, "module", None)


@register_task("translation_flowseq", dataclass=TranslationFlowSeqConfig)
class TranslationFlowSeqTask(TaskGuardsMixin, TranslationTask):
    cfg: TranslationFlowSeqConfig

    def __init__(self, cfg: TranslationFlowSeqConfig, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self._inject_nonfinite = parse_update_list(cfg.flowseq_inject_nonfinite, "--flowseq-inject-nonfinite")
        self._freeze_prior = False

    def build_model(self, cfg, from_checkpoint=False):
        from fairseq.models import ARCH_MODEL_REGISTRY

        from fairseq_ext.models.flowseq import FlowSeqModel

        arch = getattr(cfg, "arch", None) or getattr(cfg, "_name", None)
        model_cls = ARCH_MODEL_REGISTRY.get(arch) if arch is not None else None
        if model_cls is not None and not issubclass(model_cls, FlowSeqModel):
            raise ValueError(f"--task translation_flowseq needs a FlowSeq model: --arch {_FLOWSEQ_ARCHS}; got --arch {arch}")
        model = super().build_model(cfg, from_checkpoint)
        unwrap_flowseq(model, "--task translation_flowseq")
        return model

    def build_criterion(self, cfg, from_checkpoint=False):
        criterion = super().build_criterion(cfg, from_checkpoint)
        if not isinstance(criterion, FlowSeqLossCriterion):
            raise ValueError(
                f"--task translation_flowseq trains with --criterion flowseq_loss (the ELBO); got {type(criterion).__name__}"
            )
        return criterion

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_allowed_tokens_fn=None):
        for model in models:
            unwrap_flowseq(model, "--task translation_flowseq's generator")
        return FlowSeqGenerator(models, self.target_dictionary, self.cfg, src_dict=self.source_dictionary)

    # -- training step with non-finite skipping ------------------------------------------------
    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
        check_ddp_wrapper(model)
        model.train()
        model.set_num_updates(update_num)
        freezes = getattr(criterion, "freezes_prior", None)
        self._freeze_prior = bool(freezes(update_num)) if freezes is not None else False
        amp = isinstance(optimizer, AMPOptimizer)
        with torch.autograd.profiler.record_function("forward"):
            with torch.autocast(device_type="cuda", enabled=amp):
                loss, sample_size, logging_output = criterion(model, sample)
        if update_num in self._inject_nonfinite:
            loss = loss * float("nan")
        if ignore_grad:
            loss = loss * 0
        # backward even when the loss is not finite: under c10d DDP every worker must join the
        # gradient all-reduce (the NaN then reaches every worker, and every worker drops it)
        with torch.autograd.profiler.record_function("backward"):
            optimizer.backward(loss)
        if amp or getattr(optimizer, "scaler", None) is not None:
            # --fp16 / --amp: an overflow is the loss scaler's business (fairseq skips the step and
            # lowers the scale); zeroing the gradients here would hide it from the scaler for ever
            finite = True
        else:
            finite = all_finite([loss.detach()] + [p.grad for p in model.parameters()])
        if not finite:
            # drops this mini-batch; with --update-freq > 1 the gradients accumulated from the earlier
            # mini-batches of this update go too (keeping them would need a copy of every gradient)
            logger.warning(f"non-finite loss or gradients at update {update_num + 1}: skipping this batch")
            optimizer.zero_grad()
            logging_output = {k: 0 for k in logging_output}
            sample_size = 0
        logging_output["nonfinite_skipped"] = 0 if finite else 1
        return loss, sample_size, logging_output

    def optimizer_step(self, optimizer, model, update_num):
        if self._freeze_prior:
            for p in unwrap_flowseq(model, "--task translation_flowseq").prior.parameters():
                p.grad = None
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        # all-reduced gradients are the same on every worker, so every worker takes the same branch
        if not grads or not bool(torch.stack([g.abs().sum() for g in grads]).sum() > 0):
            logger.warning(f"update {update_num + 1}: no finite gradient in this update, optimizer step skipped")
            return
        optimizer.step()
