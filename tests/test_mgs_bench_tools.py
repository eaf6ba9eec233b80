"""The helpers of the MGS benchmarks: the training-curve reader of bench/mgs_plots.py (Figures 1-3 and 7 of
Welleck and Cho, AAAI 2021, drawn from fairseq-train logs), the metrics of bench/mgs_translation_table.py (the
miniature of the paper's Table 4) and the proposal-ablation rows of bench/mgs_quality_table.py (Table 7).
matplotlib is never needed here."""
import os
import subprocess
import sys

import pytest

from fairseq_ext.modules.task_losses import normalized_edit_distance
from fairseq_ext.testing.cli import bench_script

plots = bench_script("mgs_plots")
translation_table = bench_script("mgs_translation_table")
quality_table = bench_script("mgs_quality_table")

LOG = """2026-12-03 10:00:01 | INFO | fairseq_cli.train | {'model': 'transformer'}
2026-12-03 10:00:01 | INFO | train_inner | epoch 001:     2 / 90 loss=6.756, mgs_cost=47.1266, mgs_weight_std=0.3279, num_updates=2, lr=0.0003
2026-12-03 10:00:02 | INFO | train_inner | epoch 001:     4 / 90 loss=6.759, mgs_cost=26.6321, num_updates=4, lr=0.0003
2026-12-03 10:00:03 | INFO | train | epoch 001 | loss 6.7 | mgs_cost 30.0 | num_updates 4
"""


def test_train_inner_series_reads_only_the_lines_with_the_key(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(LOG)
    assert plots.train_inner_series(str(log), "mgs_cost") == [(2, 47.1266), (4, 26.6321)]
    assert plots.train_inner_series(str(log), "mgs_weight_std") == [(2, 0.3279)]
    assert plots.train_inner_series(str(log), "mrt_risk") == []


def test_plots_text_mode_and_bad_arguments(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(LOG)
    script = os.path.join(os.path.dirname(plots.__file__), "mgs_plots.py")
    out = subprocess.run([sys.executable, script, "--text", "--keys", "mgs_cost", f"MGS={log}"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert out.strip() == "MGS mgs_cost 2:47.1266 4:26.6321"
    bad = subprocess.run([sys.executable, script, "--text", f"MGS={tmp_path / 'missing.log'}"], capture_output=True, text=True)
    assert bad.returncode != 0 and "LABEL=TRAIN_LOG" in bad.stderr


def test_sentence_bleu_mean_is_100_on_the_references_and_lower_otherwise():
    refs = ["ein Mann fährt Fahrrad .", "zwei Hunde spielen im Schnee ."]
    assert translation_table.sentence_bleu_mean(refs, refs) == pytest.approx(100.0)
    assert translation_table.sentence_bleu_mean(["ein Mann .", "zwei Katzen ."], refs) < 50.0


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    sentencepiece = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    text = folder / "text.txt"
    text.write_text("\n".join(["ein Mann fährt Fahrrad .", "zwei Hunde spielen im Schnee .", "eine Frau liest ."] * 20))
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "spm"), vocab_size=30,
                                             model_type="unigram", minloglevel=2)  # fmt: skip
    return str(folder / "spm.model")


def test_edit_mean_is_the_edit_task_loss_on_pieces_with_eos(spm_model):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    hyps, refs = ["ein Mann liest .", "zwei Hunde ."], ["ein Mann fährt Fahrrad .", "zwei Hunde spielen im Schnee ."]
    expected = [
        normalized_edit_distance(sp.encode(h, out_type=str) + ["</s>"], sp.encode(r, out_type=str) + ["</s>"])
        for h, r in zip(hyps, refs)
    ]
    assert translation_table.edit_mean(hyps, refs, spm_model) == pytest.approx(100 * sum(expected) / 2)
    assert translation_table.edit_mean(refs, refs, spm_model) == 0.0


def test_scores_refuse_a_hypothesis_file_of_the_wrong_length(tmp_path, spm_model):
    (tmp_path / "test.beam5.hyp").write_text("a\n")
    (tmp_path / "test.greedy.hyp").write_text("a\nb\n")
    with pytest.raises(SystemExit, match="test.beam5.hyp has 1 lines for 2 references"):
        translation_table.scores(str(tmp_path), ["a", "b"], spm_model)


def test_table_7_needs_all_three_proposals():
    def fmt(v, digits):
        return f"{v:.{digits}f}"

    row = {"lm": 10.0, "nonterm": 0.1, "ppl": 90.0}
    assert quality_table.table_7({"mgs_lm": row, "mgs_lm_zero": row}, fmt) == []
    lines = quality_table.table_7({"mgs_lm": row, "mgs_lm_zero": row, "mgs_lm_mle": row}, fmt)
    assert [line.split(" | ")[0] for line in lines[-3:]] == ["| q_MGS", "| q_zero", "| q_MLE"]
    assert "| 10.0 | 0.100 | 90.00 | 141.6 | 0.351 | 20.9 |" in lines[-1]
