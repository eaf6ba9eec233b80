"""Criterion ``sequential_ss``: Sequential Scheduled Sampling (Bengio et al. 2015; Duckworth et al.,
Algorithm 1), the reference baseline of ``parallel_ss``.

The decoder runs step by step with fairseq's incremental state; each next input is chosen (model
token with probability p, gold otherwise) as soon as the current step is predicted.  The model's token
is drawn given the mixed prefix actually fed (Bengio et al. 2015; tensor2tensor), not given the
model's own earlier samples as the algorithm box of Duckworth et al. reads (see
``sequential_scheduled_sampling``).  Left-padded batches re-run the whole prefix per step instead of
using incremental state, which fairseq's transformer decoders compute for right padding only.  The loss
sums the label-smoothed log-likelihood of the gold targets over the steps, with gradient through
every step's decoder computation (the chosen tokens themselves are discrete).
"""
from dataclasses import dataclass

from fairseq.criterions import register_criterion

from fairseq_ext.criterions.scheduled_sampling_base import (
    ScheduledSamplingConfig,
    ScheduledSamplingCriterionBase,
    stack_net_output,
)
from fairseq_ext.modules.decoder_driver import UnsupportedModelError
from fairseq_ext.modules.scheduled_sampling import sequential_scheduled_sampling


@dataclass
class SequentialScheduledSamplingConfig(ScheduledSamplingConfig):
    pass


@register_criterion("sequential_ss", dataclass=SequentialScheduledSamplingConfig)
class SequentialScheduledSamplingCriterion(ScheduledSamplingCriterionBase):
    criterion_name = "sequential_ss"

    def __init__(self, task, cfg: SequentialScheduledSamplingConfig):
        super().__init__(task, cfg)

    def conditioned_forward(self, driver, sample, prob):
        if not driver.direct:
            raise UnsupportedModelError(
                "--criterion sequential_ss steps the decoder directly, which torch DDP/FSDP wrappers do not "
                "synchronise: use --ddp-backend legacy_ddp for distributed training"
            )
        encoder_out = driver.encode(sample)  # None for a language model
        gold = driver.decoder_inputs(sample)
        incremental_state = self.step_state(gold)  # a fresh decoding state per forward (None: full prefixes)

        def step(prefix):
            return driver.step(prefix, encoder_out, incremental_state)  # B x C

        def log_probs(out):
            return driver.log_probs((out.unsqueeze(1), None)).squeeze(1)

        outputs, tokens, from_model = sequential_scheduled_sampling(
            gold, self.replaceable(gold), prob, step, log_probs, self.draw
        )
        return stack_net_output(outputs), tokens, from_model
