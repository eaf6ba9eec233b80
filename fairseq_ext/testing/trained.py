"""Tiny models trained once through the fairseq CLI and shared by several test files.

The test suite's conftest.py wraps these in session-scoped fixtures, so that the checkpoint tests,
the decoding tests and the tagging tests read the same few training runs instead of each training
its own copy.  Each run is as small as its users allow: a few updates on a few hundred sentences.
"""
import os
import re
from types import SimpleNamespace
from typing import Dict, List

from fairseq_ext.testing import cli, synthetic, synthetic_tagging

# -- the reverse task: tiny transformers trained with parallel_ss ---------------------------------
REVERSE_SIZES = {"train": 200, "valid": 30, "test": 20}  # 4 batches of --max-tokens 500 per epoch
MAX_TOKENS = "500"
TRAIN_FLAGS = cli.TINY_TRANSFORMER + [
    "--task", "translation", "--criterion", "parallel_ss", "--ss-prob", "0.5",
    "--max-tokens", MAX_TOKENS, "--max-epoch", "2",
]  # fmt: skip
EVAL_BLEU = [
    "--eval-bleu", "--eval-bleu-args", '{"beam":1}',
    "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
]  # fmt: skip
# "plain" stores no numpy arrays in its checkpoint; "eval_bleu" stores the BLEU meters' numpy counts
VARIANTS = {"plain": [], "eval_bleu": EVAL_BLEU}


def reverse_data(root: str) -> str:
    """Binarised reverse-task data under ``root``; returns the data-bin directory."""
    synthetic.write_parallel(os.path.join(root, "raw"), task="reverse", sizes=REVERSE_SIZES)
    cli.preprocess(os.path.join(root, "raw"), os.path.join(root, "bin"))
    return os.path.join(root, "bin")


def train_inner_updates(log: str) -> List[int]:
    return [int(m.group(1)) for m in re.finditer(r"\| train_inner \|.*?num_updates=(\d+)", log)]


def train_reverse_variant(variant: str, data_bin: str, save_dir: str) -> SimpleNamespace:
    """fairseq-train of one of VARIANTS for 2 epochs; the run's paths, flags, log and update count."""
    flags = TRAIN_FLAGS + VARIANTS[variant]
    log = cli.train(data_bin, save_dir, flags)
    updates = train_inner_updates(log)
    if not updates or updates != list(range(1, len(updates) + 1)):
        raise cli.CliError(f"unexpected update numbering {updates} in:\n{log[-3000:]}")
    return SimpleNamespace(
        variant=variant,
        data_bin=data_bin,
        save_dir=save_dir,
        checkpoint=os.path.join(save_dir, "checkpoint_last.pt"),
        flags=flags,
        log=log,
        num_updates=updates[-1],
    )


# -- language modelling data -------------------------------------------------------------------------
LM_SIZES = {"train": 200, "valid": 30, "test": 20}


def lm_data(root: str) -> str:
    """Binarised monolingual data under ``root`` (raw text in root/raw); returns the data-bin directory."""
    synthetic.write_monolingual(os.path.join(root, "raw"), sizes=LM_SIZES)
    cli.preprocess_lm(os.path.join(root, "raw"), os.path.join(root, "bin"))
    return os.path.join(root, "bin")


# -- NER tagging: the synthetic entity rule, learned to a high span F1 --------------------------------
TAGGING_SIZES = {"train": 700, "valid": 60, "test": 53}  # 53: not a multiple of any batch size
TAGGER_EPOCHS = 8
TAGGER_FLAGS = [
    "--task", "tagging", "--arch", "seq2seq_tagger_ner", "--dropout", "0.1",
    "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    "--lr", "0.01", "--max-tokens", "150", "--max-epoch", str(TAGGER_EPOCHS), "--log-interval", "50",
    "--eval-tagging", "--best-checkpoint-metric", "span_f1", "--maximize-best-checkpoint-metric",
]  # fmt: skip


def tagging_data(root: str) -> Dict[str, str]:
    """IOB1 CoNLL files converted to BIO words/tags and binarised under ``root``; returns the paths."""
    from fairseq_ext.data.conll import convert

    conll = synthetic_tagging.write_conll_splits(os.path.join(root, "conll"), TAGGING_SIZES, scheme="iob1")
    for split, path in conll.items():
        convert(path, os.path.join(root, "text", split), tag_column=3, to_scheme="bio")
    synthetic_tagging.preprocess_tagging(os.path.join(root, "text"), os.path.join(root, "bin"))
    return {"root": root, "bin": os.path.join(root, "bin")}


def train_tagger(data_bin: str, save_dir: str) -> SimpleNamespace:
    """The NER tagger of TAGGER_FLAGS; its best checkpoint (by validation span F1) and its log."""
    log = cli.train(data_bin, save_dir, TAGGER_FLAGS)
    return SimpleNamespace(data_bin=data_bin, save_dir=save_dir, log=log,
                           checkpoint=os.path.join(save_dir, "checkpoint_best.pt"))  # fmt: skip


def fine_tune(mle: SimpleNamespace, save_dir: str, flags: List[str], lr: str = "0.0005") -> str:
    """Trains from ``mle`` (a :func:`train_reverse_variant` run) with fresh optimizer, data loader, meters and
    schedule, as sequence-level methods are fine-tuned from an MLE model; returns the log after checking
    that fairseq really loaded the checkpoint (``--restore-file`` silently starts from scratch otherwise)."""
    restore = ["--restore-file", mle.checkpoint, "--reset-optimizer", "--reset-dataloader", "--reset-meters",
               "--reset-lr-scheduler", "--lr", lr]  # fmt: skip
    log = cli.train(mle.data_bin, save_dir, list(flags) + restore)
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt", log), log[-3000:]
    return log
