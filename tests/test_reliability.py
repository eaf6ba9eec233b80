"""Nothing lost, nothing silent: every sentence decoded, inputs never replaced, damaged checkpoints
named, errors before training, a clean exit status.  Each test reproduces the failure it guards."""
import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from fairseq import checkpoint_utils, options, tasks
from fairseq.data import LanguagePairDataset, data_utils, iterators
from fairseq.file_io import PathManager

import fairseq_ext
from fairseq_ext.checkpoint_safety import DamagedCheckpointError, atomic_copy
from fairseq_ext.data import conll
from fairseq_ext.modules import clean_exit, task_guards
from fairseq_ext.testing import cli, synthetic, synthetic_tagging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(fairseq_ext.__file__)))
RECIPES = os.path.join(REPO, "recipes")
HANG_TIMEOUT = 3600  # only catches a hang; the work takes seconds


def bash(*args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", DEVICE="cpu", PYTHON=sys.executable)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    proc = subprocess.run(["bash", *args], capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT)
    return proc.returncode, proc.stdout + proc.stderr


def snapshot(directory):
    """{relative path: bytes} of every file under directory."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = f.read()
    return found


def make_multi30k(directory, n=12):
    os.makedirs(directory, exist_ok=True)
    for name in ("train", "val", "test_2016_flickr"):
        for lang in ("en", "de"):
            with open(os.path.join(directory, f"{name}.{lang}"), "w", encoding="utf-8") as f:
                f.writelines(f"{lang} sentence {i} of {name}\n" for i in range(n))


# -- every sentence decoded -----------------------------------------------------------------------------
def batch_sizes(task, dataset, multiple):
    itr = task.get_batch_iterator(dataset=dataset, max_sentences=8, required_batch_size_multiple=multiple)
    return [b["nsentences"] for b in itr.next_epoch_itr(shuffle=False)]


def tiny_pair_dataset(task, n):
    d = task.source_dictionary
    items = [torch.tensor([d.index("w1")] * (1 + i % 5) + [d.eos()]) for i in range(n)]
    sizes = np.array([len(t) for t in items])
    return LanguagePairDataset(items, sizes, d, items, sizes, task.target_dictionary)


@pytest.fixture(scope="module")
def tagging_task():
    task, _, _ = synthetic_tagging.build_tagger()
    return task


def test_evaluation_batches_keep_every_sentence(tagging_task):
    """37 sentences at batch size 8 with fairseq's default multiple of 8: fairseq's batch_by_size drops the
    last batch of 5; the package's tasks keep it, except for the trainer's training batches."""
    dataset = tiny_pair_dataset(tagging_task, 37)
    plain = data_utils.batch_by_size(np.arange(37), dataset.num_tokens, max_sentences=8, required_batch_size_multiple=8)
    assert sum(len(b) for b in plain) == 32  # the failure being guarded: fairseq drops 5 sentences
    assert sum(batch_sizes(tagging_task, dataset, 8)) == 37

    # called from fairseq's Trainer.get_train_iterator: the multiple applies as the user asked
    from types import SimpleNamespace as NS

    from fairseq.trainer import Trainer

    tagging_task.datasets["train"] = dataset
    cfg = NS(
        dataset=NS(train_subset="train", max_tokens=None, batch_size=8, required_batch_size_multiple=8,
                   update_ordered_indices_seed=False, num_workers=0, data_buffer_size=0, grouped_shuffling=False,
                   update_epoch_batch_itr=True),
        common=NS(seed=1), optimization=NS(skip_remainder_batch=False),
    )  # fmt: skip
    stub = NS(cfg=cfg, task=tagging_task, model=NS(max_positions=lambda: None), data_parallel_world_size=1,
              data_parallel_rank=0, reset_dummy_batch=lambda batch: None)  # fmt: skip
    itr = Trainer.get_train_iterator(stub, epoch=1, load_dataset=False)
    assert sum(b["nsentences"] for b in itr.next_epoch_itr(shuffle=False)) == 32


def write_tagging_text(directory, sizes, reserved=None):
    """Aligned words/tags files; ``reserved``: (split, line, word) puts a reserved word into a sentence."""
    os.makedirs(directory, exist_ok=True)
    for k, (split, n) in enumerate(sorted(sizes.items())):
        sentences = synthetic_tagging.make_sentences(n, seed=100 + k)
        with open(os.path.join(directory, f"{split}.words"), "w") as fw, open(
            os.path.join(directory, f"{split}.tags"), "w"
        ) as ft:
            for i, (words, tags) in enumerate(sentences):
                if reserved and reserved[0] == split and reserved[1] == i + 1:
                    words = [reserved[2]] + list(words)
                    tags = ["O"] + list(tags)
                fw.write(" ".join(words) + "\n")
                ft.write(" ".join(tags) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["tagging", "search_aware_translation"])
def test_generate_without_batch_multiple_flag_decodes_every_sentence(tmp_path, task):
    """fairseq-generate with fairseq's default --required-batch-size-multiple (8) on a 37-sentence test set."""
    raw, data_bin, save = str(tmp_path / "raw"), str(tmp_path / "bin"), str(tmp_path / "ckpt")
    if task == "tagging":
        write_tagging_text(raw, {"train": 40, "valid": 11, "test": 37})
        synthetic_tagging.preprocess_tagging(raw, data_bin)
        flags = ["--task", "tagging", "-s", "words", "-t", "tags", "--arch", "seq2seq_tagger_ner",
                 *synthetic_tagging.TINY_TAGGER_FLAGS, "--criterion", "cross_entropy"]  # fmt: skip
    else:
        synthetic.write_parallel(raw, sizes={"train": 40, "valid": 11, "test": 37})
        cli.preprocess(raw, data_bin)
        flags = ["--task", task, *cli.TINY_TRANSFORMER, "--criterion", "cross_entropy"]
    cli.train(data_bin, save, flags + ["--max-update", "2"])
    args = [data_bin, "--path", os.path.join(save, "checkpoint_last.pt"), "--cpu", "--gen-subset", "test",
            "--batch-size", "8", "--beam", "1", "--num-workers", "0", *flags[:flags.index("--arch")]]  # fmt: skip
    out = cli.run_cli("fairseq-generate", args)
    assert sorted(cli.hypotheses(out)) == list(range(37)), out[-2000:]


# -- best checkpoint metric -----------------------------------------------------------------------------
def build_tagging(flags, tmp_path):
    synthetic_tagging.write_dictionaries(str(tmp_path))
    argv = [str(tmp_path), "--user-dir", cli.USER_DIR, "--cpu", "--task", "tagging", "-s", "words", "-t", "tags",
            "--arch", "seq2seq_tagger_ner", *synthetic_tagging.TINY_TAGGER_FLAGS, *flags]  # fmt: skip
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    task = tasks.setup_task(args)
    return task, args


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--eval-tagging", "--best-checkpoint-metric", "span_f1"], "add --maximize-best-checkpoint-metric"),
        (["--eval-tagging", "--best-checkpoint-metric", "tag_accuracy"], "add --maximize-best-checkpoint-metric"),
        (["--best-checkpoint-metric", "span_f1", "--maximize-best-checkpoint-metric"], "only with --eval-tagging"),
        (["--eval-tagging", "--eval-tagging-scheme", "none", "--best-checkpoint-metric", "span_f1",
          "--maximize-best-checkpoint-metric"], "tag_accuracy only"),  # fmt: skip
        (["--best-checkpoint-metric", "loss", "--maximize-best-checkpoint-metric"], "lower is better"),
    ],
)
def test_tagging_refuses_best_metric_read_the_wrong_way(tmp_path, flags, error):
    task, args = build_tagging(flags, tmp_path)
    with pytest.raises(ValueError, match=error):
        task.build_model(args)


def test_tagging_accepts_maximized_metric_and_checkpoint_loads(tmp_path):
    task, args = build_tagging(["--eval-tagging", "--best-checkpoint-metric", "span_f1",
                                "--maximize-best-checkpoint-metric"], tmp_path)  # fmt: skip
    task.build_model(args)
    # a model built from a checkpoint (decoding) is never refused, whatever its training options were
    task, args = build_tagging(["--eval-tagging", "--best-checkpoint-metric", "span_f1"], tmp_path)
    task.build_model(args, from_checkpoint=True)


# -- reserved words in tagging data -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("word", ["<pad>", "</s>", "<s>"])
def test_tagging_refuses_reserved_words_at_load_time(tmp_path, word):
    raw, data_bin = str(tmp_path / "raw"), str(tmp_path / "bin")
    write_tagging_text(raw, {"train": 20, "valid": 5, "test": 9}, reserved=("test", 4, word))
    synthetic_tagging.preprocess_tagging(raw, data_bin)
    args = options.parse_args_and_arch(
        options.get_generation_parser(),
        [data_bin, "--user-dir", cli.USER_DIR, "--task", "tagging", "-s", "words", "-t", "tags"],
    )
    task = tasks.setup_task(args)
    task.load_dataset("valid")  # clean splits load
    with pytest.raises(ValueError, match=rf"test\.words-tags\.words: line 4 .*word 1, is the literal word '{word}'"):
        task.load_dataset("test")


def test_misplaced_special_finds_reserved_indices():
    pad, eos, bos = 1, 2, 0
    sentences = [np.array([5, 6, eos]), np.array([5, eos, 7, eos]), np.array([pad, 5, eos])]
    assert task_guards.misplaced_special(sentences[:1], (bos, pad), eos) is None
    assert task_guards.misplaced_special(sentences[1:], (bos, pad), eos) == (0, 1, eos)
    assert task_guards.misplaced_special(sentences[2:], (bos, pad), eos) == (0, 0, pad)


# -- the CoNLL converter ---------------------------------------------------------------------------------
CONLL = "-DOCSTART- -X- -X- O\n\nEU NNP I-NP B-ORG\nrejects VBZ I-VP O\n\nPeter NNP I-NP B-PER\n"


def test_conll_refuses_output_that_is_its_input(tmp_path):
    source = tmp_path / "train.tags"
    source.write_text(CONLL)
    rc = conll.main([str(source), str(tmp_path / "train")])  # train.tags would be the input
    assert rc == 1 and source.read_text() == CONLL
    link = tmp_path / "link"
    os.symlink(source, tmp_path / "link.words")
    assert conll.main([str(source), str(link)]) == 1 and source.read_text() == CONLL
    assert conll.main([str(source), str(tmp_path / "out"), "--target-suffix", "words"]) == 1
    assert not (tmp_path / "out.words").exists()


@pytest.mark.parametrize(
    "text, where",
    [
        (CONLL.replace("rejects", "<pad>"), ":4: the token '<pad>'"),
        (CONLL.replace("B-PER", "</s>"), ":6: the tag '</s>'"),
        (CONLL.replace("rejects", "<unk>"), ":4: the token '<unk>'"),
        (CONLL.replace("rejects VBZ", "rejects\rVBZ"), ":4: a carriage return"),
    ],
    ids=["pad-token", "eos-tag", "unk-token", "carriage-return"],
)
def test_conll_names_file_and_line_of_bad_input(tmp_path, text, where):
    source = tmp_path / "in.txt"
    source.write_bytes(text.encode("utf-8"))
    with pytest.raises(conll.ConllFormatError, match=f"{source}{where}"):
        conll.read_conll(str(source), 3)


def test_conll_names_file_and_line_of_non_utf8(tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_bytes(CONLL.replace("Peter", "P\xe9ter").encode("latin-1"))
    assert conll.main([str(source), str(tmp_path / "out")]) == 1
    assert f"{source}:6: not UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "out.words").exists()


# -- recipes: inputs never replaced, lines counted as the tools count them, failures leave nothing -------
@pytest.mark.parametrize("via_link", [False, True])
def test_prepare_force_never_deletes_its_input(tmp_path, via_link):
    """Multi30k's release keeps its files in data/task1/raw: prepare.sh DATA=OUT/raw OUT --force."""
    out = tmp_path / "task1"
    make_multi30k(str(out / "raw"))
    before = snapshot(str(out))
    data = out / "raw"
    if via_link:
        os.symlink(out / "raw", tmp_path / "elsewhere")
        data = tmp_path / "elsewhere"
    rc, log = bash(os.path.join(RECIPES, "multi30k", "prepare.sh"), str(data), str(out), "--smoke", "--force")
    assert rc != 0 and "destroy its own input" in log, log
    assert "pass --force" not in log
    assert snapshot(str(out)) == before


def test_prepare_counts_lines_as_the_tools_do(tmp_path):
    """A stray carriage return: wc -l sees 12 lines in both files, Python and fairseq 13 in one."""
    raw = tmp_path / "raw"
    make_multi30k(str(raw))
    with open(raw / "val.de", "rb") as f:
        lines = f.read().split(b"\n")
    lines[6] = lines[6].replace(b" of ", b"\rof ")
    (raw / "val.de").write_bytes(b"\n".join(lines))
    rc, log = bash(os.path.join(RECIPES, "multi30k", "prepare.sh"), str(raw), str(tmp_path / "out"), "--smoke")
    assert rc != 0 and f"{raw}/val.de:7: a carriage return" in log, log
    assert not (tmp_path / "out").exists()


def test_prepare_non_utf8_input_writes_nothing(tmp_path):
    raw = tmp_path / "conll"
    paths = synthetic_tagging.write_conll_splits(str(raw), {"train": 5, "valid": 3, "test": 3})
    with open(paths["test"], "ab") as f:
        f.write("Caf\xe9 NN O O\n".encode("latin-1"))
    rc, log = bash(os.path.join(RECIPES, "conll2003", "prepare.sh"), str(raw), str(tmp_path / "out"))
    assert rc != 0 and f"{paths['test']}:" in log and "not UTF-8" in log, log
    assert not (tmp_path / "out").exists()


def test_prepare_failure_removes_only_what_it_wrote(tmp_path):
    """A failure after writing (a malformed CoNLL line in the valid split, found while converting it)."""
    raw, out = tmp_path / "conll", tmp_path / "out"
    paths = synthetic_tagging.write_conll_splits(str(raw), {"train": 5, "valid": 3, "test": 3})
    with open(paths["valid"], "a") as f:
        f.write("lonely\n")
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    rc, log = bash(os.path.join(RECIPES, "conll2003", "prepare.sh"), str(raw), str(out), "--force")
    assert rc != 0 and "expected at least 4" in log, log
    assert sorted(os.listdir(out)) == ["notes.txt"], "the run's partial raw/ must go, the user's file stay"
    fresh = tmp_path / "fresh"
    rc, log = bash(os.path.join(RECIPES, "conll2003", "prepare.sh"), str(raw), str(fresh))
    assert rc != 0 and not fresh.exists(), "an output directory the failed run created is removed"


def test_warm_start_must_really_load_its_checkpoint(tmp_path):
    """stages.sh train_method: the warm-start checkpoint is passed and its loading checked in the log."""
    exp = tmp_path / "exp"
    (exp / "baseline").mkdir(parents=True)
    (exp / "baseline" / "checkpoint_last.pt").write_bytes(b"x")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "dict.words.txt").write_text("a 1\n")
    script = textwrap.dedent(f"""
        set -euo pipefail
        source {RECIPES}/common/lib.sh
        source {RECIPES}/common/stages.sh
        SRC=words; TGT=tags; DATA_DIR={tmp_path}; EXP_DIR={exp}; DEVICE_FLAGS=(--cpu)
        MODEL=(); REG=(); OPTIM=(); BATCH=(); LENGTH=()
        FLAGS_sb=(--criterion soft_beam_loss); METHOD_INIT[sb]=baseline
        # a fairseq-train that trains from scratch, as fairseq does when --restore-file is not loaded
        fairseq-train() {{
          echo "No existing checkpoint found $FAKE_RESTORED"; echo x > "$EXP_DIR/sb/checkpoint_last.pt"
        }}
        train_method sb
    """)
    rc, log = bash("-c", script, env_extra={"FAKE_RESTORED": str(exp / "baseline" / "checkpoint_last.pt")})
    assert rc != 0 and "did not load" in log, log


# -- checkpoints ---------------------------------------------------------------------------------------
def save_checkpoint(path, value):
    torch.save({"model": {"w": torch.full((64,), float(value))}, "args": None}, path)


def test_truncated_checkpoint_is_named_with_an_intact_one(tmp_path):
    good, last = str(tmp_path / "checkpoint_best.pt"), str(tmp_path / "checkpoint_last.pt")
    save_checkpoint(good, 1)
    save_checkpoint(last, 2)
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 2)  # a copy cut short
    with pytest.raises(DamagedCheckpointError, match=rf"checkpoint {last} is damaged.*checkpoint_best\.pt"):
        checkpoint_utils.load_checkpoint_to_cpu(last)
    # an intact checkpoint's own errors are left alone (this minimal one lacks what fairseq's upgrade reads)
    with pytest.raises(KeyError):
        checkpoint_utils.load_checkpoint_to_cpu(good)


def test_missing_restore_file_is_refused(tmp_path):
    """fairseq logs "No existing checkpoint found" and trains from scratch; the package refuses."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(restore_file=str(tmp_path / "typo.pt"), save_dir=str(tmp_path), continue_once=None,
                          finetune_from_model=None)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="typo.pt: no such file"):
        checkpoint_utils.load_checkpoint(cfg, SimpleNamespace(checkpoint_suffix=""))


def test_checkpoint_copy_is_atomic_under_a_kill(tmp_path):
    """fairseq copies the epoch checkpoint to checkpoint_last.pt with PathManager.copy; a SIGKILL in the
    middle of that copy must leave the old checkpoint_last.pt whole."""
    src, dst = tmp_path / "checkpoint3.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    dst.write_bytes(b"old intact checkpoint")
    child = textwrap.dedent(f"""
        import sys, time
        import fairseq_ext
        from fairseq_ext import checkpoint_safety
        from fairseq.file_io import PathManager

        def slow_chunks(fsrc, fdst):
            fdst.write(fsrc.read(1024 * 1024))
            fdst.flush()
            print("half", flush=True)
            time.sleep(3600)

        checkpoint_safety._copy_chunks = slow_chunks
        PathManager.copy({str(src)!r}, {str(dst)!r}, overwrite=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "half"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=HANG_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert dst.read_bytes() == b"old intact checkpoint"
    # and an uninterrupted copy through fairseq's entry point is complete
    assert PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == src.read_bytes()
    assert not os.path.exists(f"{dst}.copy-tmp")


def test_atomic_copy_leaves_destination_on_error(tmp_path, monkeypatch):
    from fairseq_ext import checkpoint_safety

    src, dst = tmp_path / "a.pt", tmp_path / "b.pt"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old")

    def broken(fsrc, fdst):
        fdst.write(fsrc.read(10))
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_safety, "_copy_chunks", broken)
    with pytest.raises(KeyboardInterrupt):
        atomic_copy(str(src), str(dst))
    assert dst.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt"]


# -- a clean exit status -------------------------------------------------------------------------------
def test_background_consumers_are_stopped_before_exit():
    """fairseq's batch thread blocked on a full queue is stopped and joined by the exit handler."""
    produced = threading.Event()

    def batches():
        for i in range(10**6):
            produced.set()
            yield torch.zeros(4) + i

    class Endless:
        def __iter__(self):
            return batches()

        def __len__(self):
            return 10**6

    itr = iterators.BufferedIterator(2, Endless())
    next(itr)
    produced.wait(HANG_TIMEOUT)
    thread = itr._consumer
    assert thread.is_alive()
    # stopping takes milliseconds; 60 s only bounds the wait so that a consumer never stopped fails the test
    assert clean_exit.stop_background_consumers(timeout_s=60) == 0
    assert not thread.is_alive()


@pytest.mark.slow
def test_refused_model_exits_with_status_1(tmp_path):
    """soft_beam_loss refuses fconv on the first batch; with --num-workers 0 fairseq's batch thread is
    still collating when the interpreter finalizes, which ended in SIGABRT (exit 134)."""
    raw, data_bin = str(tmp_path / "raw"), str(tmp_path / "bin")
    synthetic.write_parallel(raw, sizes={"train": 3000, "valid": 11, "test": 7})
    cli.preprocess(raw, data_bin)
    args = [data_bin, "--arch", "fconv", "--criterion", "soft_beam_loss", "--cpu", "--max-tokens", "100",
            "--max-epoch", "1", "--save-dir", str(tmp_path / "ckpt"), "--optimizer", "adam", "--lr", "0.001",
            "--no-progress-bar", "--num-workers", "0"]  # fmt: skip
    proc = subprocess.run(cli._tool("fairseq-train") + args + ["--user-dir", cli.USER_DIR], capture_output=True,
                          text=True, timeout=HANG_TIMEOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert "FConvDecoder" in proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-1500:])


def test_every_task_of_the_package_has_the_guards():
    """Every task this package registers (and every one added later) decodes every sentence and checks its
    best-checkpoint metric: TaskGuardsMixin before fairseq's task, CheckpointMetricConfig in its config."""
    from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY

    from fairseq_ext.modules.task_guards import CheckpointMetricConfig, TaskGuardsMixin

    ours = {name: cls for name, cls in TASK_REGISTRY.items() if cls.__module__.startswith("fairseq_ext.")}
    assert {"tagging", "search_aware_translation", "translation_flowseq"} <= set(ours)
    for name, cls in ours.items():
        mro = cls.__mro__
        fairseq_bases = [k for k, base in enumerate(mro) if base.__module__.startswith("fairseq.tasks")]
        assert TaskGuardsMixin in mro and mro.index(TaskGuardsMixin) < min(fairseq_bases), name
        assert issubclass(TASK_DATACLASS_REGISTRY[name], CheckpointMetricConfig), name
