"""conlleval's chunk counting (span_f1) and tag accuracy, against hand-computed numbers."""
import random

import pytest
from fairseq import scoring

from fairseq_ext.scoring.span_f1 import ConllevalCounter, conlleval_report, evaluate, precision_recall_f1, span_f1
from fairseq_ext.scoring.tag_accuracy import accuracy_percent, count_correct_tags


def scores(gold_sentences, guessed_sentences):
    c = evaluate(gold_sentences, guessed_sentences)
    p, r, f = precision_recall_f1(c.correct_chunks, c.gold_chunks, c.guessed_chunks)
    return (c.gold_chunks, c.guessed_chunks, c.correct_chunks), (round(p, 2), round(r, 2), round(f, 2)), round(
        accuracy_percent(c.correct_tags, c.tokens), 2
    )


# (gold, guessed) -> (gold chunks, guessed chunks, correct), (P, R, F1), accuracy; each row worked by hand
CASES = {
    # BIO: PER[0-1] found; LOC[3] guessed as ORG[3]. P = R = 1/2; 3 of 4 tags right
    "bio": ("B-PER I-PER O B-LOC", "B-PER I-PER O B-ORG", (2, 2, 1), (50.0, 50.0, 50.0), 75.0),
    # IOB1: gold PER[0-1] PER[2] LOC[4] (B- after the same type starts the 2nd PER); guessed PER[0-2] LOC[4];
    # only LOC matches. P = 1/2, R = 1/3, F = 2PR/(P+R) = 40; tag 2 differs: 4 of 5
    "iob1": ("I-PER I-PER B-PER O I-LOC", "I-PER I-PER I-PER O I-LOC", (3, 2, 1), (50.0, 33.33, 40.0), 80.0),
    # I- after O starts a chunk: both read PER[1-2]; the tags differ at 1 (I vs B): 3 of 4
    "i_after_o": ("O I-PER I-PER O", "O B-PER I-PER O", (1, 1, 1), (100.0, 100.0, 100.0), 75.0),
    # a type change without B- starts a chunk: gold PER[0] LOC[1]; guessed PER[0-1] ends later: no match
    "type_change": ("I-PER I-LOC", "B-PER I-PER", (2, 1, 0), (0.0, 0.0, 0.0), 0.0),
    # IOB1 gold, BIO guess of the same two one-token chunks: both match; tag 0 differs (I vs B)
    "iob1_vs_bio": ("I-PER B-PER", "B-PER B-PER", (2, 2, 2), (100.0, 100.0, 100.0), 50.0),
    # nothing predicted: P = R = F = 0; only the O at 1 is right
    "empty_prediction": ("B-PER O B-LOC I-LOC", "O O O O", (2, 0, 0), (0.0, 0.0, 0.0), 25.0),
    # no chunks anywhere: conlleval prints 0 for P, R, F1; all tags right
    "all_o": ("O O O", "O O O", (0, 0, 0), (0.0, 0.0, 0.0), 100.0),
    # same start, different end
    "late_end": ("B-PER I-PER I-PER", "B-PER I-PER O", (1, 1, 0), (0.0, 0.0, 0.0), 66.67),
    # same end, different start
    "late_start": ("B-PER I-PER I-PER", "O B-PER I-PER", (1, 1, 0), (0.0, 0.0, 0.0), 33.33),
    # a chunk on the last token of the sentence
    "chunk_at_end": ("O O B-MISC", "O O B-MISC", (1, 1, 1), (100.0, 100.0, 100.0), 100.0),
    # types split at the first hyphen keep their own hyphens
    "hyphenated_type": ("B-ORG-X I-ORG-X O", "B-ORG-X I-ORG-X O", (1, 1, 1), (100.0, 100.0, 100.0), 100.0),
    # IOE: E- closes a chunk, so E after E starts one: NP[0-1] NP[2]
    "ioe": ("I-NP E-NP E-NP", "I-NP E-NP E-NP", (2, 2, 2), (100.0, 100.0, 100.0), 100.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hand_computed_case(name):
    gold, guessed, counts, prf, accuracy = CASES[name]
    assert scores([gold.split()], [guessed.split()]) == (counts, prf, accuracy)


def test_counts_add_up_over_a_corpus():
    # "bio" + "iob1": gold 2 + 3, guessed 2 + 2, correct 1 + 1: P = 2/4, R = 2/5, F = 2*50*40/90; 7 of 9 tags
    sentences = [CASES["bio"], CASES["iob1"]]
    result = scores([s[0].split() for s in sentences], [s[1].split() for s in sentences])
    assert result == ((5, 4, 2), (50.0, 40.0, 44.44), 77.78)


def test_a_sentence_boundary_ends_every_chunk():
    # a chunk at the end of one sentence and an I- chunk opening the next are two chunks, not one
    two = scores([["O", "B-PER"], ["I-PER", "O"]], [["O", "B-PER"], ["I-PER", "O"]])
    one = scores([["O", "B-PER", "I-PER", "O"]], [["O", "B-PER", "I-PER", "O"]])
    assert two[0] == (2, 2, 2) and one[0] == (1, 1, 1)


def test_per_type_counts_and_report():
    gold, guessed = CASES["bio"][0].split(), CASES["bio"][1].split()
    counter = ConllevalCounter()
    counter.add_sentence(gold, guessed)
    c = counter.counts()
    assert (c.gold_by_type, c.guessed_by_type, c.correct_by_type) == (
        {"PER": 1, "LOC": 1}, {"PER": 1, "ORG": 1}, {"PER": 1}
    )  # fmt: skip
    assert conlleval_report(c).splitlines() == [
        "processed 4 tokens with 2 phrases; found: 2 phrases; correct: 1.",
        "accuracy:  75.00%; precision:  50.00%; recall:  50.00%; FB1:  50.00",
        "              LOC: precision:   0.00%; recall:   0.00%; FB1:   0.00  0",
        "              ORG: precision:   0.00%; recall:   0.00%; FB1:   0.00  1",
        "              PER: precision: 100.00%; recall: 100.00%; FB1: 100.00  1",
    ]


def reference_spans(tags):
    """(start, end, type) chunks of B/I/O tags, written from the chunk definition rather than
    conlleval's state machine: a chunk starts at B-X, or at I-X not continuing an X chunk, and
    extends over the following I-X tokens."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, t = tag.partition("-")
        continues = start is not None and prefix == "I" and t == kind
        if start is not None and not continues:
            spans.add((start, i, kind))
            start = None
        if prefix != "O" and not continues:
            start, kind = i, t
    return spans


def test_conlleval_counts_equal_exact_span_matching_on_random_tag_sequences():
    rng = random.Random(0)
    tags = ["O", "B-A", "I-A", "B-B", "I-B"]
    for _ in range(300):
        n = rng.randint(0, 8)
        gold, guessed = [rng.choice(tags) for _ in range(n)], [rng.choice(tags) for _ in range(n)]
        g, p = reference_spans(gold), reference_spans(guessed)
        c = evaluate([gold], [guessed])
        assert (c.gold_chunks, c.guessed_chunks, c.correct_chunks) == (len(g), len(p), len(g & p)), (gold, guessed)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="sentence 2 has 2 reference tags but 1 predicted"):
        evaluate([["O"], ["O", "O"]], [["O"], ["O"]])


def test_tag_accuracy_function():
    assert count_correct_tags(["B-PER", "I-PER", "O"], ["B-PER", "O", "O"]) == (2, 3)
    assert accuracy_percent(0, 0) == 0.0


def test_fairseq_scorers_span_f1_and_tag_accuracy():
    import fairseq_ext  # noqa: F401  (registers the scorers)

    f1 = scoring.build_scorer("span_f1", None)
    accuracy = scoring.build_scorer("tag_accuracy", None)
    for gold, guessed in (CASES["bio"][:2], CASES["iob1"][:2]):
        f1.add_string(gold, guessed)
        accuracy.add_string(gold, guessed)
    assert round(f1.score(), 2) == 44.44 and "FB1:  44.44" in f1.result_string()
    assert round(accuracy.score(), 2) == 77.78
    assert accuracy.result_string() == "tag accuracy:  77.78% (7 of 9 tokens, 2 sentences)"
    assert span_f1(evaluate([["B-X"]], [["B-X"]])) == 100.0
    with pytest.raises(ValueError, match="sentence 3"):
        f1.add_string("O O", "O")
