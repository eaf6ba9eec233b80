"""CoNLL-like data -> converter -> fairseq-preprocess -> fairseq-train --task tagging -> fairseq-generate
--scoring span_f1, as a user runs them; and the task's alignment check on load."""
import os
import re

import pytest
from fairseq import options, tasks

from fairseq_ext.data.conll import convert
from fairseq_ext.testing import cli, synthetic_tagging

SIZES = {"train": 700, "valid": 60, "test": 53}  # 53: not a multiple of any batch size


@pytest.fixture(scope="module")
def tagging_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tagging")
    conll = synthetic_tagging.write_conll_splits(str(root / "conll"), SIZES, scheme="iob1")
    for split, path in conll.items():
        convert(path, str(root / "text" / split), tag_column=3, to_scheme="bio")
    synthetic_tagging.preprocess_tagging(str(root / "text"), str(root / "bin"))
    return root


def test_train_then_generate_one_label_per_word_with_high_span_f1(tagging_data, tmp_path):
    data_bin, save = str(tagging_data / "bin"), str(tmp_path / "ckpt")
    log = cli.train(data_bin, save, [
        "--task", "tagging", "--arch", "seq2seq_tagger_ner", "--dropout", "0.1",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--lr", "0.01", "--max-tokens", "150", "--max-epoch", "8", "--log-interval", "50",
        "--eval-tagging", "--best-checkpoint-metric", "span_f1", "--maximize-best-checkpoint-metric",
    ])  # fmt: skip
    updates = [int(m) for m in re.findall(r"num_updates (\d+)", log)]
    assert updates and updates[-1] >= 200, log[-3000:]
    valid_f1 = [float(m) for m in re.findall(r"\| valid on 'valid' subset \|.*?\| span_f1 ([\d.]+)", log)]
    assert len(valid_f1) == 8 and valid_f1[-1] > 90, log[-3000:]
    assert re.search(r"best_span_f1 [\d.]+", log) and "tag_accuracy" in log

    best = os.path.join(save, "checkpoint_best.pt")
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


def test_loading_a_misaligned_split_names_the_path_split_and_line(tagging_data, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "valid.words").write_text("Per1 w2\nw3\nw4 Loc1 w5\nw6\n")
    (raw / "valid.tags").write_text("B-PER O\nO\nO B-LOC\nO\n")  # line 3: 3 words, 2 tags
    bin_dir = str(tmp_path / "bin")
    cli.run_cli("fairseq-preprocess", [
        "--source-lang", "words", "--target-lang", "tags", "--validpref", str(raw / "valid"), "--destdir", bin_dir,
        "--srcdict", str(tagging_data / "bin" / "dict.words.txt"),
        "--tgtdict", str(tagging_data / "bin" / "dict.tags.txt"),
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
