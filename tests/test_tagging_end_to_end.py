"""CoNLL-like data -> converter -> fairseq-preprocess -> fairseq-train --task tagging -> fairseq-generate
--scoring span_f1, as a user runs them; and the task's alignment check on load."""
import os
import re

import pytest
from fairseq import options, tasks

from fairseq_ext.testing import cli, synthetic_tagging
from fairseq_ext.testing.trained import TAGGER_EPOCHS, TAGGING_SIZES as SIZES

# every test here runs fairseq's command-line tools
pytestmark = pytest.mark.slow


def test_train_then_generate_one_label_per_word_with_high_span_f1(tagging_run):
    # the run (conftest.py): IOB1 CoNLL files converted to BIO, binarised, a tagger trained with
    # --eval-tagging and span F1 as the best-checkpoint metric
    data_bin, log = tagging_run.data_bin, tagging_run.log
    updates = [int(m) for m in re.findall(r"num_updates (\d+)", log)]
    assert updates and updates[-1] >= 200, log[-3000:]
    valid_f1 = [float(m) for m in re.findall(r"\| valid on 'valid' subset \|.*?\| span_f1 ([\d.]+)", log)]
    assert len(valid_f1) == TAGGER_EPOCHS and valid_f1[-1] > 90, log[-3000:]
    assert re.search(r"best_span_f1 [\d.]+", log) and "tag_accuracy" in log

    best = tagging_run.checkpoint
    assert os.path.basename(best) == "checkpoint_best.pt"
    out = cli.generate(data_bin, best, ["--task", "tagging", "--scoring", "span_f1"])
    sources = {int(m.group(1)): m.group(2) for m in re.finditer(r"^S-(\d+)\t(.*)$", out, re.M)}
    hyps = cli.hypotheses(out)
    assert len(hyps) == len(sources) == SIZES["test"]  # every test sentence got a hypothesis
    labels = set(synthetic_tagging.NER_TAGS)
    for i, hyp in hyps.items():
        assert len(hyp.split()) == len(sources[i].split()) and set(hyp.split()) <= labels, (sources[i], hyp)
    f1 = float(re.search(r"Generate test with beam=1: .*?FB1:\s+([\d.]+)", out, re.S).group(1))
    assert f1 > 90, out[-2000:]

    out = cli.generate(data_bin, best,
                       ["--task", "tagging", "--beam", "3", "--nbest", "3", "--scoring", "tag_accuracy"])  # fmt: skip
    nbest = re.findall(r"^H-(\d+)\t\S+\t(.*)$", out, re.M)
    assert len(nbest) > 2 * SIZES["test"]  # a one-word sentence may have fewer than 3 labellings
    assert all(len(h.split()) == len(sources[int(i)].split()) and set(h.split()) <= labels for i, h in nbest)
    assert float(re.search(r"tag accuracy:\s+([\d.]+)%", out).group(1)) > 95


def test_loading_a_misaligned_split_names_the_path_split_and_line(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "valid.words").write_text("Per1 w2\nw3\nw4 Loc1 w5\nw6\n")
    (raw / "valid.tags").write_text("B-PER O\nO\nO B-LOC\nO\n")  # line 3: 3 words, 2 tags
    # fairseq dictionaries (symbol count) of exactly these words and labels: no training data needed
    (raw / "dict.words.txt").write_text("".join(f"{w} 1\n" for w in "Per1 w2 w3 w4 Loc1 w5 w6".split()))
    (raw / "dict.tags.txt").write_text("".join(f"{t} 1\n" for t in "O B-PER B-LOC".split()))
    bin_dir = str(tmp_path / "bin")
    cli.run_cli("fairseq-preprocess", [
        "--source-lang", "words", "--target-lang", "tags", "--validpref", str(raw / "valid"), "--destdir", bin_dir,
        "--srcdict", str(raw / "dict.words.txt"), "--tgtdict", str(raw / "dict.tags.txt"),
        "--workers", "1",
    ])  # fmt: skip
    args = options.parse_args_and_arch(options.get_training_parser(), [
        bin_dir, "--user-dir", cli.USER_DIR, "--task", "tagging", "-s", "words", "-t", "tags",
        "--arch", "seq2seq_tagger_ner",
    ])  # fmt: skip
    task = tasks.setup_task(args)
    with pytest.raises(ValueError) as err:
        task.load_dataset("valid")
    message = str(err.value)
    assert os.path.join(bin_dir, "valid.words-tags") in message and "split 'valid'" in message
    assert "sentence pair 3 (line 3 " in message and "3 source tokens but 2 target tokens" in message
    assert "python3 -m fairseq_ext.data.conll" in message
