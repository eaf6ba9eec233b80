"""Criterion ``parallel_ss``: Parallel Scheduled Sampling (Duckworth et al., Algorithm 2).

K passes of parallel prediction and mixing choose the conditioning tokens; the label-smoothed loss
is computed against the gold targets on the final pass only (as tensor2tensor does: the
teacher-forced first pass contributes no loss and no gradient).  Sampling passes run without
gradient, in the model's current (training) mode as in tensor2tensor and OR-NMT, and reuse the
encoder output of the loss pass.
"""
from dataclasses import dataclass, field

import torch
from fairseq.criterions import register_criterion

from fairseq_ext.criterions.scheduled_sampling_base import ScheduledSamplingConfig, ScheduledSamplingCriterionBase
from fairseq_ext.modules.scheduled_sampling import parallel_scheduled_sampling


@dataclass
class ParallelScheduledSamplingConfig(ScheduledSamplingConfig):
    ss_num_passes: int = field(
        default=1,
        metadata={
            "help": "K, passes of parallel prediction and mixing before the loss pass (Algorithm 2); with "
            "--ss-prob 1 and K >= target length the conditioning tokens are an ancestral sample (Theorem 2.1)"
        },
    )


@register_criterion("parallel_ss", dataclass=ParallelScheduledSamplingConfig)
class ParallelScheduledSamplingCriterion(ScheduledSamplingCriterionBase):
    criterion_name = "parallel_ss"

    def __init__(self, task, cfg: ParallelScheduledSamplingConfig):
        super().__init__(task, cfg)
        if cfg.ss_num_passes < 1:
            raise ValueError(f"--ss-num-passes must be >= 1, got {cfg.ss_num_passes}")
        self.num_passes = cfg.ss_num_passes

    def conditioned_forward(self, driver, sample, prob):
        encoder_out = driver.encode(sample)  # with gradient: the loss pass reuses it
        gold = driver.decoder_inputs(sample)

        def predict(tokens, outputs):
            return driver.selected_scores(sample, tokens, outputs, encoder_out)  # N x V

        with torch.no_grad():
            tokens, from_model = parallel_scheduled_sampling(
                gold,
                self.replaceable(gold),
                prob,
                self.num_passes,
                predict,
                self.draw,
                timestep=self.timesteps(gold),
            )
        net_output = driver.forward(sample, tokens, encoder_out)
        return net_output, tokens, from_model
