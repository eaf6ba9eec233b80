"""Task ``tagging``: sequence labelling as aligned translation (one label per source word).

Goyal's thesis (Goyal, Carnegie Mellon University), sections 4.5 and 5.4: NER and CCG supertagging
with a seq2seq model (``--arch seq2seq_tagger_ner`` / ``seq2seq_tagger_supertag``).  Data loading is
fairseq's translation task on aligned files (``python3 -m fairseq_ext.data.conll`` writes them),
binarised WITHOUT ``--joined-dictionary`` so that the target dictionary holds labels only:

    fairseq-preprocess --source-lang words --target-lang tags --trainpref D/train \\
        --validpref D/valid --testpref D/test --destdir BIN
    fairseq-train BIN --user-dir fairseq_ext --task tagging --arch seq2seq_tagger_ner \\
        --criterion label_smoothed_cross_entropy [--eval-tagging --best-checkpoint-metric span_f1 \\
        --maximize-best-checkpoint-metric]
    fairseq-generate BIN --user-dir fairseq_ext --task tagging --path CKPT --scoring span_f1

Loading a split checks that every target has as many tokens as its source.  Generation emits
exactly one label per source word (see fairseq_ext/generators/tagging_generator.py).
``--eval-tagging`` decodes the validation set greedily and logs ``span_f1``, ``span_precision``,
``span_recall`` (conlleval's chunk scores) and ``tag_accuracy``, percentages usable as
``--best-checkpoint-metric``.

Decoding options (fairseq_ext/generators/search_options.py), for every generator the task builds:
``--search-scores raw`` searches over the decoder's raw scores (globally normalised models, thesis
section 5.2) with the same one-label-per-word constraint; ``--soft-beam-decoding`` decodes with soft
beam search (section 4.3.4, k = ``--beam``), also exactly one label per word:

    fairseq-generate BIN --user-dir fairseq_ext --task tagging --path CKPT --beam 3 --soft-beam-decoding
"""
import logging
import os
from argparse import Namespace
from dataclasses import dataclass, field

import numpy as np
from fairseq import utils
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_ext.generators.raw_score_generator import raw_score_models
from fairseq_ext.generators.search_options import SearchDecodingConfig, check_search_options
from fairseq_ext.generators.soft_beam_generator import SoftBeamGenerator
from fairseq_ext.generators.tagging_generator import TaggingSequenceGenerator
from fairseq_ext.modules.task_guards import CheckpointMetricConfig, TaskGuardsMixin, misplaced_special
from fairseq_ext.scoring.span_f1 import ConllevalCounter, precision_recall_f1
from fairseq_ext.scoring.tag_accuracy import accuracy_percent

logger = logging.getLogger(__name__)

EVAL_SCHEME_CHOICES = ChoiceEnum(["conlleval", "none"])
# summed over validation batches and workers; the derived metrics are computed from the sums
_COUNT_KEYS = ("correct_chunks", "gold_chunks", "guessed_chunks", "correct_tags", "tokens")


@dataclass
class TaggingConfig(TranslationConfig, SearchDecodingConfig, CheckpointMetricConfig):
    eval_tagging: bool = field(
        default=False,
        metadata={
            "help": "decode the validation set greedily (beam 1, one label per word; --search-scores and "
            "--soft-beam-decoding apply) at every validation and log "
            "tag_accuracy and, with --eval-tagging-scheme conlleval, span_f1 / span_precision / span_recall "
            "(percentages; e.g. --best-checkpoint-metric span_f1 --maximize-best-checkpoint-metric)"
        },
    )
    eval_tagging_scheme: EVAL_SCHEME_CHOICES = field(
        default="conlleval",
        metadata={
            "help": "how --eval-tagging reads labels: conlleval = chunk tags (IOB1, BIO/IOB2 or IOE, read by "
            "conlleval's rules, no need to say which), scored by span F1 and tag accuracy; none = atomic labels "
            "(POS, supertags), tag accuracy only"
        },
    )


def length_mismatch(src_sizes, tgt_sizes):
    """Index of the first pair whose source and target lengths differ, or None."""
    differ = np.nonzero(np.asarray(src_sizes) != np.asarray(tgt_sizes))[0]
    return int(differ[0]) if differ.size else None


def check_reserved_words(sentences, dictionary, path: str) -> None:
    """Refuses a split whose text held fairseq's reserved words ``<s>``, ``<pad>`` or ``</s>`` (naming the
    file and line): fairseq-preprocess turns them into the reserved indices, and a ``<pad>`` word then
    shortens the source length, so the tagger would emit one label fewer than there are words."""
    found = misplaced_special(sentences, (dictionary.bos(), dictionary.pad()), dictionary.eos())
    if found is None:
        return
    sentence, position, symbol = found
    raise ValueError(
        f"--task tagging: {path}: line {sentence + 1} of the text file given to fairseq-preprocess, word "
        f"{position + 1}, is the literal word {dictionary[symbol]!r}, which fairseq reserves (beginning of "
        "sentence, padding, end of sentence); a tagger would then emit a label too few. Rename such words in "
        "the text files (python3 -m fairseq_ext.data.conll refuses them) and re-run fairseq-preprocess."
    )


@register_task("tagging", dataclass=TaggingConfig)
class TaggingTask(TaskGuardsMixin, TranslationTask):
    """Translation data loading with aligned lengths, length-constrained generation, and tagging metrics."""

    cfg: TaggingConfig
    # the --eval-tagging metrics: percentages, higher is better
    MAXIMIZED_METRICS = frozenset({"span_f1", "span_precision", "span_recall", "tag_accuracy"})

    @classmethod
    def setup_task(cls, cfg: TaggingConfig, **kwargs):
        task = super().setup_task(cfg, **kwargs)
        if task.src_dict.symbols == task.tgt_dict.symbols:
            logger.warning(
                "tagging: the source and target dictionaries are identical (fairseq-preprocess --joined-dictionary?); "
                "the generator then may emit any source word as a label. Binarise tagging data without "
                "--joined-dictionary so that the target dictionary holds the labels only."
            )
        return task

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        dataset = self.datasets[split]
        paths = utils.split_paths(self.cfg.data)
        data_path = paths[(epoch - 1) % len(paths)] if split == self.cfg.train_subset else paths[0]
        src, tgt = self.cfg.source_lang, self.cfg.target_lang
        prefix = os.path.join(data_path, f"{split}.{src}-{tgt}")
        check_reserved_words(dataset.src, self.src_dict, f"{prefix}.{src}")
        if dataset.tgt is None:
            return  # source only (e.g. fairseq-interactive): nothing to align
        check_reserved_words(dataset.tgt, self.tgt_dict, f"{prefix}.{tgt}")
        first = length_mismatch(dataset.src_sizes, dataset.tgt_sizes)
        if first is not None:
            # sizes count the EOS fairseq appends to both sides
            raise ValueError(
                f"--task tagging: split '{split}' of {prefix}.{{{src},{tgt}}}: sentence pair {first + 1} (line "
                f"{first + 1} of the text files given to fairseq-preprocess) has {int(dataset.src_sizes[first]) - 1} "
                f"source tokens but {int(dataset.tgt_sizes[first]) - 1} target tokens; a tagger needs exactly one "
                "label per word. Re-run the converter (python3 -m fairseq_ext.data.conll INPUT PREFIX --tag-column N, "
                "which checks the alignment) or check your files with fairseq_ext.data.conll.check_aligned, then "
                "re-run fairseq-preprocess."
            )

    def unlogged_metric_reason(self, metric):
        if metric not in self.MAXIMIZED_METRICS:
            return super().unlogged_metric_reason(metric)
        if not self.cfg.eval_tagging:
            return f"--task tagging logs {metric} only with --eval-tagging; add it or pick another metric"
        if metric.startswith("span_") and str(self.cfg.eval_tagging_scheme) != "conlleval":
            return (
                f"--eval-tagging-scheme {self.cfg.eval_tagging_scheme} scores atomic labels by tag_accuracy only; "
                "use --best-checkpoint-metric tag_accuracy, or --eval-tagging-scheme conlleval for chunk tags"
            )
        return None

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_allowed_tokens_fn=None):
        check_search_options(self.cfg, args, len(models), extra_gen_cls_kwargs)
        if getattr(args, "score_reference", False):
            return super().build_generator(models, args)
        if getattr(args, "match_source_len", False):
            raise ValueError(
                "--match-source-len: --task tagging already emits exactly one label per source word; drop it"
            )
        if getattr(args, "print_alignment", None):
            raise ValueError("--print-alignment: the tagging model has no attention to print; label i is word i's")
        if self.cfg.soft_beam_decoding:
            return SoftBeamGenerator.from_args(models, self.target_dictionary, self.cfg, args, fixed_length=True)
        if str(self.cfg.search_scores) == "raw":
            models = raw_score_models(models)  # the tagging ensemble then masks raw scores
        return super().build_generator(
            models,
            args,
            seq_gen_cls=seq_gen_cls or TaggingSequenceGenerator,
            extra_gen_cls_kwargs=extra_gen_cls_kwargs,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        )

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if self.cfg.eval_tagging:
            self.tagging_generator = self.build_generator([model], Namespace(beam=1))
        return model

    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if self.cfg.eval_tagging:
            counts = self._decode_and_count(sample, model)
            for key in _COUNT_KEYS:
                logging_output[f"_tagging_{key}"] = getattr(counts, key)
        return loss, sample_size, logging_output

    def _decode_and_count(self, sample, model):
        hypos = self.inference_step(self.tagging_generator, [model], sample, prefix_tokens=None)
        counter = ConllevalCounter()
        pad, eos = self.tgt_dict.pad(), self.tgt_dict.eos()
        for i, hypo in enumerate(hypos):
            gold = [self.tgt_dict[t] for t in utils.strip_pad(sample["target"][i], pad).tolist() if t != eos]
            guessed = [self.tgt_dict[t] for t in hypo[0]["tokens"].tolist() if t != eos]
            counter.add_sentence(gold, guessed)
        return counter.counts()

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if not self.cfg.eval_tagging:
            return

        def total(key):
            return sum(utils.item(log.get(f"_tagging_{key}", 0)) for log in logging_outputs)

        if total("tokens") == 0:
            return
        for key in _COUNT_KEYS:
            metrics.log_scalar(f"_tagging_{key}", total(key))  # meters keep the sum over batches

        def summed(meters, key):
            return meters[f"_tagging_{key}"].sum

        def chunk_scores(meters):  # (precision, recall, F1)
            counts = (summed(meters, k) for k in ("correct_chunks", "gold_chunks", "guessed_chunks"))
            return precision_recall_f1(*counts)

        metrics.log_derived(
            "tag_accuracy", lambda m: round(accuracy_percent(summed(m, "correct_tags"), summed(m, "tokens")), 2)
        )
        if str(self.cfg.eval_tagging_scheme) == "conlleval":
            for index, name in enumerate(("span_precision", "span_recall", "span_f1")):
                metrics.log_derived(name, lambda m, index=index: round(chunk_scores(m)[index], 2))
