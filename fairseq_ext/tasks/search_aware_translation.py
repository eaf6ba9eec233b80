"""Task ``search_aware_translation``: fairseq's translation task with the decoding options of
search-aware models (Goyal's thesis, section 4.3.4 and section 5.2).

Data, training and everything else are ``--task translation``'s; only the generator differs, and
only when asked (fairseq_ext/generators/search_options.py):

    --search-scores raw       beam search over the decoder's raw scores (globally normalised models)
    --soft-beam-decoding      soft beam search decoding with k = --beam (--soft-beam-decoding-alpha)

Without them the generator is exactly ``--task translation``'s.  A model trained with
``--task translation`` decodes under this task unchanged (the dictionaries and data are the same):

    fairseq-generate BIN --user-dir fairseq_ext --task search_aware_translation --path CKPT \\
        --beam 5 --search-scores raw
    fairseq-generate BIN --user-dir fairseq_ext --task search_aware_translation --path CKPT \\
        --beam 5 --soft-beam-decoding --soft-beam-decoding-alpha 10

The options apply to every generator the task builds, ``--eval-bleu``'s validation decoding included.
Like every task of this package, it decodes every sentence of an evaluated split whatever
``--required-batch-size-multiple`` says (fairseq_ext/modules/task_guards.py).
"""
from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_ext.generators.raw_score_generator import raw_score_models
from fairseq_ext.generators.search_options import SearchDecodingConfig, check_search_options
from fairseq_ext.generators.soft_beam_generator import SoftBeamGenerator
from fairseq_ext.modules.task_guards import CheckpointMetricConfig, TaskGuardsMixin


@dataclass
class SearchAwareTranslationConfig(TranslationConfig, SearchDecodingConfig, CheckpointMetricConfig):
    pass


@register_task("search_aware_translation", dataclass=SearchAwareTranslationConfig)
class SearchAwareTranslationTask(TaskGuardsMixin, TranslationTask):
    """TranslationTask whose ``build_generator`` honours ``--search-scores`` and ``--soft-beam-decoding``."""

    cfg: SearchAwareTranslationConfig

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_allowed_tokens_fn=None):
        check_search_options(self.cfg, args, len(models), extra_gen_cls_kwargs)
        if self.cfg.soft_beam_decoding:
            return SoftBeamGenerator.from_args(models, self.target_dictionary, self.cfg, args, fixed_length=False)
        if str(self.cfg.search_scores) == "raw":
            models = raw_score_models(models)
        return super().build_generator(
            models,
            args,
            seq_gen_cls=seq_gen_cls,
            extra_gen_cls_kwargs=extra_gen_cls_kwargs,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        )
