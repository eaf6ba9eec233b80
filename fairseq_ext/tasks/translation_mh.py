"""Task ``translation_mh``: decoding a conditional masked LM by Metropolis-Hastings sampling from its energy.

Goyal, "Characterizing and Overcoming the Limitations of Neural Autoregressive Models" (PhD thesis, CMU
2021), chapter 6 (Goyal, Dyer and Berg-Kirkpatrick).  fairseq's ``translation_lev`` task (the same data,
BOS-prefixed targets, and the ``cmlm_transformer`` checkpoints it trains with ``--noise random_mask
--criterion nat_loss``) whose generator is chosen by ``--mh-sampler``:

* ``mh``: Metropolis-Hastings with the masked conditionals as proposal over E_local or E_raw
  (``fairseq_ext/generators/mh_generator.py``; the ``--mh-*`` options are fields of this task, since
  fairseq's GenerationConfig cannot be extended);
* ``gibbs``: degenerate Gibbs sampling (section 6.6), the same generator with every proposal accepted;
* ``mask_predict``: fairseq's own IterativeRefinementGenerator (``--iter-decode-max-iter`` etc.).

Each refuses, before decoding, a checkpoint that is not a CMLM (fairseq's ``CMLMNATransformerModel``) and
options that cannot define a sampler (naming the flag).  Every sentence of a split is decoded whatever
``--required-batch-size-multiple`` says (``TaskGuardsMixin``).

    fairseq-train BIN --task translation_lev --noise random_mask --arch cmlm_transformer --criterion nat_loss ...
    fairseq-generate BIN --user-dir fairseq_ext --task translation_mh --path CKPT --mh-sampler mh \\
        --mh-energy raw --mh-chains 5 --mh-stats-path stats.jsonl
"""
from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.translation_lev import TranslationLevenshteinConfig, TranslationLevenshteinTask
from omegaconf import II

from fairseq_ext.generators.mh_generator import MHGenerationConfig, MHGenerator, check_masked_lm, validate_mh_config
from fairseq_ext.modules.task_guards import CheckpointMetricConfig, TaskGuardsMixin


@dataclass
class TranslationMHConfig(TranslationLevenshteinConfig, MHGenerationConfig, CheckpointMetricConfig):
    # read-only view of --seed (no flag of its own): the base of the samplers' random streams
    seed: int = II("common.seed")


@register_task("translation_mh", dataclass=TranslationMHConfig)
class TranslationMHTask(TaskGuardsMixin, TranslationLevenshteinTask):
    cfg: TranslationMHConfig

    def __init__(self, cfg: TranslationMHConfig, src_dict, tgt_dict):
        validate_mh_config(cfg)
        super().__init__(cfg, src_dict, tgt_dict)

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, **unused):
        sampler = str(self.cfg.mh_sampler)
        for model in models:
            check_masked_lm(model, f"--task translation_mh --mh-sampler {sampler}")
        if sampler == "mask_predict":
            return super().build_generator(models, args)
        seed = self.cfg.seed
        seed = 1 if seed is None or (isinstance(seed, str) and seed.startswith("${")) else int(seed)
        return MHGenerator(models, self.target_dictionary, self.cfg, seed=seed)
