"""Scorer ``span_f1``: chunk (span) precision, recall and F1 computed as conlleval.pl computes them.

conlleval.pl, the evaluation script of the CoNLL-2000 and CoNLL-2003 shared tasks, reads every tag
as PREFIX-TYPE split at the first hyphen (``B-ORG`` -> (B, ORG), ``I-MISC-X`` -> (I, MISC-X),
``O`` -> (O, ''); a tag without a hyphen is its own prefix with an empty type).  It needs no
declared scheme: where chunks start and end follows from each pair of consecutive tags
(:func:`start_of_chunk`, :func:`end_of_chunk`), which reads IOB2/BIO, IOB1 and IOE alike:

* ``B-X`` starts a chunk after B, I or O, whatever the types.
* ``I-X`` starts a chunk after ``O`` and after a tag of another type (``I-X`` after ``B-Y``,
  ``I-Y`` or ``E-Y``); after ``B-X`` or ``I-X`` it continues that chunk.  This is how IOB1 is read:
  there a chunk begins with ``I-`` and ``B-`` appears only where a chunk directly follows a chunk
  of the same type, so ``I-PER I-PER B-PER I-PER`` is two PER chunks of two tokens each, and
  ``I-PER I-LOC`` is two chunks.  The same rules make an ill-formed BIO ``I-X`` after ``O`` a chunk
  start rather than an error.
* ``E-X`` (IOE) closes its chunk: a following ``E`` or ``I`` starts a new one; ``E-X`` after ``O``
  starts a chunk.
* ``O`` is outside chunks and ends any open chunk.
* A change of type between non-``O`` tags ends the previous chunk and starts a new one.
* ``[`` and ``]`` are one-token chunks and ``.`` neither starts nor ends one (conlleval's bracket
  conventions, kept so the counts stay exact).
* ``S-`` (IOBES singletons) is not a conlleval prefix: ``S-X`` acts only through the type rule,
  so two adjacent ``S-X`` tokens form one chunk.  Convert IOBES to BIO before scoring.
* A sentence boundary ends every chunk (conlleval treats a blank line as an ``O O`` token that is
  not counted).

A predicted chunk is correct when a reference chunk starts at the same token with the same type and
both end at the same token.  Precision = correct / predicted chunks, recall = correct / reference
chunks, F1 = 2PR / (P + R); each is 0 when its denominator is 0, so a corpus without any chunk
scores F1 = 0, as conlleval prints it.  Accuracy counts tokens whose (prefix, type) pairs agree.
All values are percentages.

    fairseq-generate DATA --task tagging --path CKPT --scoring span_f1
"""
import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence, Tuple

from fairseq.dataclass import FairseqDataclass
from fairseq.scoring import BaseScorer, register_scorer

from fairseq_ext.scoring.tag_accuracy import accuracy_percent, check_same_length

OUTSIDE = "O"


def split_tag(tag: str) -> Tuple[str, str]:
    """(prefix, type) of a tag, split at the first hyphen: 'B-PER' -> ('B', 'PER'), 'O' -> ('O', '')."""
    prefix, hyphen, kind = tag.partition("-")
    return (prefix, kind) if hyphen else (tag, "")


def end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """conlleval's endOfChunk: does a chunk end between the previous token and this one?

    Tags here are prefixes (B, I, E, O, '[', ']', '.'); types are the parts after the hyphen.
    """
    ends = (prev_tag, tag) in {("B", "B"), ("B", "O"), ("I", "B"), ("I", "O"), ("E", "E"), ("E", "I"), ("E", "O")}
    if prev_tag != OUTSIDE and prev_tag != "." and prev_type != type_:
        ends = True
    if prev_tag in ("[", "]"):
        ends = True
    return ends


def start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """conlleval's startOfChunk: does a chunk start at this token?  Arguments as in :func:`end_of_chunk`."""
    starts = (prev_tag, tag) in {("B", "B"), ("I", "B"), ("O", "B"), ("O", "I"), ("E", "E"), ("E", "I"), ("O", "E")}
    if tag != OUTSIDE and tag != "." and prev_type != type_:
        starts = True
    if tag in ("[", "]"):
        starts = True
    return starts


@dataclass
class ChunkCounts:
    """conlleval's counters (its variable names in brackets)."""

    correct_chunks: int = 0  # correctChunk
    gold_chunks: int = 0  # foundCorrect: chunks in the reference
    guessed_chunks: int = 0  # foundGuessed: chunks in the prediction
    correct_tags: int = 0  # correctTags
    tokens: int = 0  # tokenCounter
    correct_by_type: Counter = field(default_factory=Counter)
    gold_by_type: Counter = field(default_factory=Counter)
    guessed_by_type: Counter = field(default_factory=Counter)


def precision_recall_f1(correct: int, gold: int, guessed: int) -> Tuple[float, float, float]:
    """Percentages (precision, recall, F1) from chunk counts; each 0 when undefined, as in conlleval."""
    precision = 100.0 * correct / guessed if guessed > 0 else 0.0
    recall = 100.0 * correct / gold if gold > 0 else 0.0
    f1 = 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


class ConllevalCounter:
    """conlleval's main loop, fed one sentence at a time (each followed by a sentence boundary)."""

    def __init__(self):
        self._counts = ChunkCounts()
        self._last_correct, self._last_correct_type = OUTSIDE, ""
        self._last_guessed, self._last_guessed_type = OUTSIDE, ""
        self._in_correct = False  # inside a reference chunk that the prediction matches so far

    def add_sentence(self, gold: Sequence[str], guessed: Sequence[str]):
        for correct_tag, guessed_tag in zip(gold, guessed):
            self._step(split_tag(correct_tag), split_tag(guessed_tag), is_token=True)
        self._step((OUTSIDE, ""), (OUTSIDE, ""), is_token=False)  # the blank line after a sentence

    def _step(self, correct: Tuple[str, str], guessed: Tuple[str, str], is_token: bool):
        (tag_c, type_c), (tag_g, type_g) = correct, guessed
        last_c, last_tc = self._last_correct, self._last_correct_type
        last_g, last_tg = self._last_guessed, self._last_guessed_type
        counts = self._counts
        end_c, start_c = end_of_chunk(last_c, tag_c, last_tc, type_c), start_of_chunk(last_c, tag_c, last_tc, type_c)
        end_g, start_g = end_of_chunk(last_g, tag_g, last_tg, type_g), start_of_chunk(last_g, tag_g, last_tg, type_g)
        if self._in_correct:
            if end_c and end_g and last_tg == last_tc:
                self._in_correct = False
                counts.correct_chunks += 1
                counts.correct_by_type[last_tc] += 1
            elif end_c != end_g or type_g != type_c:
                self._in_correct = False
        if start_c and start_g and type_g == type_c:
            self._in_correct = True
        if start_c:
            counts.gold_chunks += 1
            counts.gold_by_type[type_c] += 1
        if start_g:
            counts.guessed_chunks += 1
            counts.guessed_by_type[type_g] += 1
        if is_token:
            counts.correct_tags += int(correct == guessed)
            counts.tokens += 1
        self._last_correct, self._last_correct_type = tag_c, type_c
        self._last_guessed, self._last_guessed_type = tag_g, type_g

    def counts(self) -> ChunkCounts:
        """The totals so far, closing a matched chunk still open at the end of the input."""
        result = copy.deepcopy(self._counts)
        if self._in_correct:
            result.correct_chunks += 1
            result.correct_by_type[self._last_correct_type] += 1
        return result


def evaluate(gold_sentences: Iterable[Sequence[str]], guessed_sentences: Iterable[Sequence[str]]) -> ChunkCounts:
    """conlleval's counts over sentences of reference and predicted tags (equal lengths per sentence)."""
    counter = ConllevalCounter()
    for number, (gold, guessed) in enumerate(zip(gold_sentences, guessed_sentences), start=1):
        check_same_length(gold, guessed, number, "span_f1")
        counter.add_sentence(gold, guessed)
    return counter.counts()


def span_f1(counts: ChunkCounts) -> float:
    return precision_recall_f1(counts.correct_chunks, counts.gold_chunks, counts.guessed_chunks)[2]


def conlleval_report(counts: ChunkCounts) -> str:
    """conlleval's printed summary: totals, the overall line, then one line per chunk type."""
    lines = [
        f"processed {counts.tokens} tokens with {counts.gold_chunks} phrases; "
        f"found: {counts.guessed_chunks} phrases; correct: {counts.correct_chunks}."
    ]
    if counts.tokens > 0:
        p, r, f = precision_recall_f1(counts.correct_chunks, counts.gold_chunks, counts.guessed_chunks)
        accuracy = accuracy_percent(counts.correct_tags, counts.tokens)
        lines.append(f"accuracy: {accuracy:6.2f}%; precision: {p:6.2f}%; recall: {r:6.2f}%; FB1: {f:6.2f}")
    for kind in sorted(set(counts.gold_by_type) | set(counts.guessed_by_type)):
        guessed = counts.guessed_by_type[kind]
        p, r, f = precision_recall_f1(counts.correct_by_type[kind], counts.gold_by_type[kind], guessed)
        lines.append(f"{kind:>17}: precision: {p:6.2f}%; recall: {r:6.2f}%; FB1: {f:6.2f}  {guessed}")
    return "\n".join(lines)


@dataclass
class SpanF1ScorerConfig(FairseqDataclass):
    pass


@register_scorer("span_f1", dataclass=SpanF1ScorerConfig)
class SpanF1Scorer(BaseScorer):
    """fairseq scorer: ``add_string(reference, hypothesis)`` per sentence, space-separated tags;
    ``score()`` is the chunk F1 and ``result_string()`` conlleval's report."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.counter = ConllevalCounter()
        self.sentences = 0

    def add_string(self, ref: str, pred: str):
        gold, guessed = ref.split(), pred.split()
        self.sentences += 1
        check_same_length(gold, guessed, self.sentences, "span_f1")
        self.counter.add_sentence(gold, guessed)

    def score(self) -> float:
        return span_f1(self.counter.counts())

    def result_string(self) -> str:
        return conlleval_report(self.counter.counts())
