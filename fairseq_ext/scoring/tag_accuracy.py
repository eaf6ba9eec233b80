"""Scorer ``tag_accuracy``: the percentage of tokens whose predicted tag equals the reference tag.

This is conlleval's "accuracy" line (correctly tagged tokens / tokens, whole tags compared, 'O'
included) and the word-level accuracy of CCG supertagging (Goyal's thesis, section 4.5.2).

    fairseq-generate DATA --task tagging --path CKPT --scoring tag_accuracy
"""
from dataclasses import dataclass
from typing import Sequence, Tuple

from fairseq.dataclass import FairseqDataclass
from fairseq.scoring import BaseScorer, register_scorer


def check_same_length(gold: Sequence[str], guessed: Sequence[str], sentence: int, scorer: str = "tagging"):
    """Raises ValueError unless a sentence has as many predicted tags as reference tags."""
    if len(gold) != len(guessed):
        raise ValueError(
            f"{scorer}: sentence {sentence} has {len(gold)} reference tags but {len(guessed)} predicted tags; "
            "tags are compared position by position, so decode with --task tagging, whose generator emits "
            "exactly one tag per source word"
        )


def count_correct_tags(gold: Sequence[str], guessed: Sequence[str]) -> Tuple[int, int]:
    """(tokens whose two tags are equal, tokens) for one sentence of equally long tag sequences."""
    check_same_length(gold, guessed, sentence=1)
    return sum(g == p for g, p in zip(gold, guessed)), len(gold)


def accuracy_percent(correct: int, total: int) -> float:
    """100 * correct / total, and 0 for no tokens."""
    return 100.0 * correct / total if total > 0 else 0.0


@dataclass
class TagAccuracyScorerConfig(FairseqDataclass):
    pass


@register_scorer("tag_accuracy", dataclass=TagAccuracyScorerConfig)
class TagAccuracyScorer(BaseScorer):
    """fairseq scorer: ``add_string(reference, hypothesis)`` per sentence, space-separated tags."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sentences = 0
        self.correct = 0
        self.total = 0

    def add_string(self, ref: str, pred: str):
        gold, guessed = ref.split(), pred.split()
        self.sentences += 1
        check_same_length(gold, guessed, self.sentences, "tag_accuracy")
        correct, total = count_correct_tags(gold, guessed)
        self.correct += correct
        self.total += total

    def score(self) -> float:
        return accuracy_percent(self.correct, self.total)

    def result_string(self) -> str:
        return f"tag accuracy: {self.score():6.2f}% ({self.correct} of {self.total} tokens, {self.sentences} sentences)"
