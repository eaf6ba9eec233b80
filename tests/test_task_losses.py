"""Sequence-level task losses (fairseq_ext/modules/task_losses.py): hand cases and their libraries."""
import math
import os

import editdistance
import pytest
import sacrebleu
import torch
from fairseq import options, tasks
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from omegaconf import OmegaConf

from fairseq_ext.modules.task_losses import (
    TASK_LOSSES,
    CheckpointKindError,
    LanguageModelScorer,
    TaskLossBatch,
    compute_task_loss,
    get_task_loss,
    ngram_repetition,
    normalized_edit_distance,
    register_task_loss,
)
from fairseq_ext.testing import tiny
from fairseq_ext.testing.cli import USER_DIR


def word_dictionary(words):
    d = Dictionary()
    for w in words:
        d.add_symbol(w)
    return d


WORDS = "the cat sat on a mat dog ran".split()
D = word_dictionary(WORDS)


def ids(sentence):
    return [D.index(w) for w in sentence.split()]


def batch(hyps, refs, terminated=None, **kwargs):
    terminated = terminated if terminated is not None else [True] * len(hyps)
    return TaskLossBatch([ids(h) for h in hyps], terminated, [ids(r) for r in refs], dictionary=D, **kwargs)


HYPS = ["the cat sat on a mat", "the dog sat", "a cat ran on the mat", "mat"]
REFS = ["the cat sat on a mat", "the dog ran on a mat", "the cat sat on the mat", "the dog"]


def test_builtin_losses_are_registered():
    assert {"bleu", "chrf", "edit", "lm"} <= set(TASK_LOSSES)
    assert TASK_LOSSES["lm"].needs_scorer and not TASK_LOSSES["bleu"].needs_scorer


def test_sentence_bleu_cost_is_one_minus_sacrebleu():
    costs = compute_task_loss("bleu", batch(HYPS, REFS))
    expected = [1 - sacrebleu.sentence_bleu(h, [r], tokenize="none").score / 100 for h, r in zip(HYPS, REFS)]
    assert costs == pytest.approx(expected, abs=1e-12)
    assert costs[0] == pytest.approx(0.0, abs=1e-12)  # an exact match costs nothing
    assert all(0.0 <= c <= 1.0 for c in costs) and costs[1] > costs[0]


def test_sentence_chrf_cost_is_one_minus_sacrebleu():
    costs = compute_task_loss("chrf", batch(HYPS, REFS))
    expected = [1 - sacrebleu.sentence_chrf(h, [r]).score / 100 for h, r in zip(HYPS, REFS)]
    assert costs == pytest.approx(expected, abs=1e-12)
    assert costs[0] == pytest.approx(0.0, abs=1e-12)


def test_strings_follow_post_process_and_escape_reference_unknowns():
    d = word_dictionary(["the@@", "cat", "dog"])
    b = TaskLossBatch([[d.index("the@@"), d.index("cat")]], [True], [[d.unk(), d.index("cat")]], dictionary=d,
                      post_process="subword_nmt")  # fmt: skip
    assert b.hypothesis_strings() == ["thecat"]
    assert b.reference_strings() == ["<<unk>> cat"]


def test_edit_distance_hand_cases():
    eos = D.eos()
    b = TaskLossBatch(
        [ids("the cat sat"), ids("the cat"), ids("the cat sat on"), []],
        [True, True, False, False],
        [ids("the cat sat")] * 4,
        eos=eos,
    )
    # exact; one deletion; "on" where the EOS should be (one substitution); everything missing (3 words + EOS)
    assert compute_task_loss("edit", b) == pytest.approx([0.0, 1 / 4, 1 / 4, 4 / 4])


def test_edit_distance_agrees_with_the_library():
    hyp, ref = [5, 6, 7, 8, 9], [5, 7, 8, 10]
    assert normalized_edit_distance(hyp, ref) == editdistance.eval(hyp, ref) / 4 == 2 / 4
    costs = compute_task_loss("edit", batch(HYPS, REFS))
    expected = [editdistance.eval(ids(h) + [D.eos()], ids(r) + [D.eos()]) / (len(ids(r)) + 1) for h, r in zip(HYPS, REFS)]
    assert costs == pytest.approx(expected)


def test_ngram_repetition():
    assert ngram_repetition([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 - 4 / 5)
    assert ngram_repetition([1, 2, 3, 4, 5]) == 0.0
    assert ngram_repetition([1, 2, 3]) is None
    assert ngram_repetition([7] * 10, n=4) == pytest.approx(1 - 1 / 7)


def test_registering_a_loss_and_the_registry_errors():
    @register_task_loss("test_length_gap", "|len(hyp) - len(ref)|")
    def length_gap(b):
        return [abs(len(h) - len(r)) for h, r in zip(b.hypotheses, b.references)]

    try:
        assert compute_task_loss("test_length_gap", batch(HYPS, REFS)) == [0, 3, 0, 1]
        with pytest.raises(ValueError, match="already registered"):
            register_task_loss("test_length_gap", "again")(length_gap)
    finally:
        TASK_LOSSES.pop("test_length_gap")
    with pytest.raises(ValueError, match=r"--mgs-task-loss 'meteor' is not a registered task loss.*bleu"):
        get_task_loss("meteor")
    with pytest.raises(ValueError, match="returned 1 costs for 4"):
        register_task_loss("test_bad", "wrong length")(lambda b: [0.0])
        try:
            compute_task_loss("test_bad", batch(HYPS, REFS))
        finally:
            TASK_LOSSES.pop("test_bad")
    with pytest.raises(ValueError, match="disagree"):
        TaskLossBatch([[1]], [True, False], [[1]])


# -- the lm loss: a frozen fairseq language model ------------------------------------------------------
def save_tiny_checkpoint(directory, arch, num_symbols, lm_task="language_modeling"):
    """A fairseq checkpoint (cfg + model weights, as fairseq saves them) of an untrained tiny ``arch``."""
    data_dir = os.path.join(directory, f"data_{arch}_{num_symbols}")
    lm = arch.endswith("_lm")
    tiny.write_dictionary(data_dir, num_symbols, ("dict.txt",) if lm else ("dict.src.txt", "dict.tgt.txt"))
    if lm:
        task_flags = ["--task", lm_task, "--tokens-per-sample", "32"]
    else:
        task_flags = ["--task", "translation", "-s", "src", "-t", "tgt"]
    argv = [data_dir, "--user-dir", USER_DIR, "--cpu", "--arch", arch, *task_flags, *tiny.TINY_ARCH_FLAGS[arch]]
    argv += tiny.ZERO_DROPOUT
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    task = tasks.setup_task(args)
    torch.manual_seed(0)
    model = task.build_model(args)
    cfg = OmegaConf.to_container(convert_namespace_to_omegaconf(args), resolve=True, enum_to_str=True)
    path = os.path.join(directory, f"{arch}_{num_symbols}_{lm_task if lm else 'translation'}.pt")
    history = [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam", "num_updates": 0,
                "lr_scheduler_state": {}}]  # fairseq's loader reads the last entry
    state = {"cfg": cfg, "args": None, "model": model.state_dict(), "optimizer_history": history, "extra_state": {}}
    torch.save(state, path)
    return path, task, model


def test_lm_cost_is_the_continuation_nll_under_the_frozen_model(tmp_path):
    path, lm_task, model = save_tiny_checkpoint(str(tmp_path), "transformer_lm", 8)
    d = lm_task.source_dictionary
    scorer = LanguageModelScorer.from_checkpoint(path, d)
    assert all(not p.requires_grad for p in scorer.model.parameters())
    w = [d.index(f"w{i}") for i in range(8)]
    prefixes = [[w[0], w[1]], [], [w[2]]]
    continuations = [[w[3], w[4], w[5]], [w[6]], [w[7], w[7]]]
    terminated = [True, False, True]
    b = TaskLossBatch(continuations, terminated, [[w[0]]] * 3, dictionary=d, prefixes=prefixes, scorer=scorer)
    costs = compute_task_loss("lm", b)
    model.eval()
    for prefix, cont, done, cost in zip(prefixes, continuations, terminated, costs):
        tokens = torch.tensor([[d.eos()] + prefix + cont])
        with torch.no_grad():
            lprobs = model.get_normalized_probs(model(tokens), log_probs=True)[0]  # L x V
        targets = prefix + cont + [d.eos()]
        scored = range(len(prefix), len(prefix) + len(cont) + (1 if done else 0))
        expected = -sum(float(lprobs[t, targets[t]]) for t in scored)
        assert cost == pytest.approx(expected, rel=1e-5)
    # terminating costs the EOS's -log p on top of the tokens
    b2 = TaskLossBatch(continuations, [False] * 3, [[w[0]]] * 3, dictionary=d, prefixes=prefixes, scorer=scorer)
    assert compute_task_loss("lm", b2)[0] < costs[0]


def test_lm_scorer_refuses_other_checkpoints(tmp_path):
    translation, _, _ = save_tiny_checkpoint(str(tmp_path), "transformer", 8)
    lm, lm_task, _ = save_tiny_checkpoint(str(tmp_path), "transformer_lm", 8)
    d = lm_task.source_dictionary
    with pytest.raises(CheckpointKindError, match="--mgs-lm-scorer-path .*--task translation.*language_modeling"):
        LanguageModelScorer.from_checkpoint(translation, d)
    bigger = word_dictionary([f"w{i}" for i in range(12)])
    with pytest.raises(CheckpointKindError, match="do not fit a model over the target dictionary"):
        LanguageModelScorer.from_checkpoint(lm, bigger)
    with pytest.raises(FileNotFoundError, match="--mgs-lm-scorer-path"):
        LanguageModelScorer.from_checkpoint(str(tmp_path / "missing.pt"), d)
    with pytest.raises(ValueError, match="--mgs-lm-scorer-path"):
        compute_task_loss("lm", TaskLossBatch([[4]], [True], [[4]], dictionary=d))
    assert math.isfinite(LanguageModelScorer.from_checkpoint(lm, d).nll([[4]], [True])[0])


def test_a_text_completion_checkpoint_scores_as_its_language_model(tmp_path):
    """MGS-LM's scorer is usually the MLE model of the same text_completion run: it reads [EOS] + prefix +
    continuation like a language_modeling model, so it is accepted and scores with the same weights."""
    lm, lm_task, _ = save_tiny_checkpoint(str(tmp_path), "transformer_lm", 8)
    tc, _, _ = save_tiny_checkpoint(str(tmp_path), "transformer_lm", 8, lm_task="text_completion")
    d = lm_task.source_dictionary
    args = ([[4, 5], [6]], [True, False], [[7], []])
    assert LanguageModelScorer.from_checkpoint(tc, d).nll(*args) == pytest.approx(
        LanguageModelScorer.from_checkpoint(lm, d).nll(*args), rel=1e-6
    )
