"""Real fairseq_ext checkpoints load through every fairseq path with torch's weights_only=True.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True`` and fairseq-fixed does not override
it; fairseq_ext's allowlist (installed when the plugin is imported) is what makes these loads work.
Nothing here passes ``weights_only=False`` or sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` (conftest.py
removes it from the environment that every subprocess inherits).
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary

from fairseq_ext.testing import cli
from fairseq_ext.testing.trained import MAX_TOKENS, VARIANTS, train_inner_updates

# every test here runs fairseq's command-line tools on checkpoints trained through them
pytestmark = pytest.mark.slow

SENTENCES = ["w1 w2 w3 w4", "w7 w5 w9", "w3 w3 w12 w0 w8 w19"]
SYMBOL = re.compile(r"^w\d+$")


def last_valid_loss(log):
    losses = re.findall(r"valid on 'valid' subset \| loss ([\d.]+)", log)
    assert losses, "no validation line in the training log"
    return float(losses[-1])


def ndarrays(obj, path=""):
    """(path, array) for every numpy array nested in dicts / lists / tuples."""
    if isinstance(obj, np.ndarray):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from ndarrays(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from ndarrays(v, f"{path}/{i}")


def is_symbol_sequence(text):
    return all(SYMBOL.match(tok) for tok in text.split())


@pytest.fixture(scope="module")
def checkpoints(reverse_checkpoints):
    """Tiny transformers trained 2 epochs with --criterion parallel_ss (conftest.py): variant -> run."""
    assert sorted(reverse_checkpoints) == sorted(VARIANTS)
    return reverse_checkpoints


@pytest.fixture(scope="module")
def trained(checkpoints):
    """The --eval-bleu run: its checkpoint needs every part of the allowlist (Namespace and numpy),
    so it is the one every loading path below is exercised with."""
    return checkpoints["eval_bleu"]


@pytest.fixture(scope="module")
def interactive_hypotheses(trained):
    """fairseq-interactive (beam 1) on SENTENCES fed through stdin: sentence index -> hypothesis."""
    out = cli.run_cli(
        "fairseq-interactive",
        [
            trained.data_bin, "--path", trained.checkpoint, "--cpu", "--source-lang", "src", "--target-lang", "tgt",
            "--beam", "1", "--buffer-size", "2", "--batch-size", "2",
        ],
        stdin="\n".join(SENTENCES) + "\n",
    )  # fmt: skip
    hyps = {}
    for line in out.splitlines():
        m = re.match(r"^H-(\d+)\t[^\t]+\t?(.*)$", line)
        if m:
            hyps[int(m.group(1))] = m.group(2).strip()
    return hyps


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_checkpoint_contents_and_in_process_load(checkpoints, variant):
    trained = checkpoints[variant]
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    state = checkpoint_utils.load_checkpoint_to_cpu(trained.checkpoint)  # torch.load with its default
    assert isinstance(state["cfg"]["model"], argparse.Namespace)  # legacy arch: the reason for the allowlist
    assert state["cfg"]["criterion"]["_name"] == "parallel_ss"
    assert state["optimizer_history"][-1]["num_updates"] == trained.num_updates
    arrays = list(ndarrays(state["extra_state"]))
    if trained.variant == "eval_bleu":
        # the --eval-bleu meters store numpy int64 counts: these need the numpy part of the allowlist
        assert arrays and all(a.dtype == np.int64 for _, a in arrays), arrays
        assert any("valid" in path for path, _ in arrays)
    else:
        assert arrays == []
    explicit = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)
    assert explicit["model"].keys() == state["model"].keys()
    assert all(torch.equal(explicit["model"][k], state["model"][k]) for k in state["model"])


NEGATIVE_CONTROL = textwrap.dedent(
    """
    import argparse, pickle, sys
    import torch

    def attempt(tag, path):
        try:
            torch.load(path, map_location="cpu")  # default weights_only
        except pickle.UnpicklingError as e:
            print(tag, path, "UNPICKLING_ERROR", " ".join(str(e).split()))
        else:
            print(tag, path, "LOADED")

    print("PLUGIN_IMPORTED", "fairseq_ext" in sys.modules)
    paths = sys.argv[1:]
    for path in paths:
        attempt("BARE", path)
    torch.serialization.add_safe_globals([argparse.Namespace])
    for path in paths:
        attempt("NAMESPACE_ONLY", path)
    import fairseq_ext
    for path in paths:
        attempt("PLUGIN", path)
    """
)


def test_default_torch_load_fails_without_the_allowlist(checkpoints):
    """Negative control: without fairseq_ext, torch's default load rejects fairseq checkpoints."""
    paths = {v: run.checkpoint for v, run in checkpoints.items()}
    proc = subprocess.run(
        [sys.executable, "-c", NEGATIVE_CONTROL, *paths.values()],
        capture_output=True, text=True, timeout=cli.HANG_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PLUGIN_IMPORTED False" in proc.stdout.splitlines()
    results = {}
    for line in proc.stdout.splitlines():
        parts = line.split(" ", 3)
        if len(parts) >= 3 and parts[0] in ("BARE", "NAMESPACE_ONLY", "PLUGIN"):
            results[parts[0], parts[1]] = " ".join(parts[2:])
    for variant, path in paths.items():
        bare = results["BARE", path]
        assert bare.startswith("UNPICKLING_ERROR") and "argparse.Namespace" in bare, bare
        namespace_only = results["NAMESPACE_ONLY", path]
        if variant == "eval_bleu":
            # Namespace alone is not enough: the --eval-bleu meters need numpy's array reconstruction
            assert namespace_only.startswith("UNPICKLING_ERROR") and "numpy" in namespace_only, namespace_only
        else:
            assert namespace_only == "LOADED"
        assert results["PLUGIN", path] == "LOADED", results["PLUGIN", path]


def test_fairseq_train_resumes_from_checkpoint_last(trained, tmp_path):
    save_dir = tmp_path / "resume"
    save_dir.mkdir()
    shutil.copy(trained.checkpoint, save_dir / "checkpoint_last.pt")
    flags = trained.flags + ["--max-epoch", "3"]  # later flags win: one epoch more
    log = cli.train(trained.data_bin, str(save_dir), flags)
    n = trained.num_updates
    # fairseq names the epoch the restored iterator starts next: 3, after the 2 epochs saved
    assert re.search(rf"Loaded checkpoint .*checkpoint_last\.pt \(epoch 3 @ {n} updates\)", log), log[-3000:]
    updates = train_inner_updates(log)
    per_epoch = n // 2
    assert updates == list(range(n + 1, n + per_epoch + 1))  # numbering continues, one more epoch
    assert "epoch 003" in log
    state = checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))
    assert state["optimizer_history"][-1]["num_updates"] == n + per_epoch
    assert state["extra_state"]["train_iterator"]["epoch"] == 4  # epoch 3 finished: 4 is next


def test_fairseq_generate(trained):
    out = cli.generate(trained.data_bin, trained.checkpoint)  # raises unless all 20 sentences got a hypothesis
    hyps = cli.hypotheses(out)
    assert len(hyps) == cli.count_lines(trained.data_bin, "test") == 20
    assert all(is_symbol_sequence(h) for h in hyps.values())


def test_fairseq_interactive(interactive_hypotheses):
    assert sorted(interactive_hypotheses) == list(range(len(SENTENCES)))
    assert all(is_symbol_sequence(h) for h in interactive_hypotheses.values())


def test_fairseq_validate_reproduces_the_training_validation_loss(trained):
    out = cli.run_cli(
        "fairseq-validate",
        [trained.data_bin, "--path", trained.checkpoint, "--task", "translation", "--cpu",
         "--valid-subset", "valid", "--max-tokens", MAX_TOKENS, "--num-workers", "0",
         "--required-batch-size-multiple", "1"],
    )  # fmt: skip
    m = re.search(r"valid on 'valid' subset \| loss ([\d.]+)", out)
    assert m, out[-3000:]
    # the same weights and batches, teacher-forced in both: the last epoch's logged validation loss
    assert float(m.group(1)) == pytest.approx(last_valid_loss(trained.log), abs=1e-3)


HUB = textwrap.dedent(
    """
    import json, sys
    from fairseq.models.transformer import TransformerModel
    save_dir, data_bin, user_dir, sentences = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    assert "fairseq_ext" not in sys.modules  # from_pretrained(user_dir=...) must import it itself
    model = TransformerModel.from_pretrained(
        save_dir, checkpoint_file="checkpoint_last.pt", data_name_or_path=data_bin, user_dir=user_dir
    )
    model.eval()
    print("HUB_RESULT", json.dumps([model.translate(s, beam=1) for s in sentences]))
    """
)


def test_hub_from_pretrained_translates_like_interactive(trained, interactive_hypotheses):
    proc = subprocess.run(
        [sys.executable, "-c", HUB, trained.save_dir, trained.data_bin, cli.USER_DIR, json.dumps(SENTENCES)],
        capture_output=True, text=True, timeout=cli.HANG_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("HUB_RESULT ")]
    assert line, proc.stdout[-3000:]
    translations = json.loads(line[0][len("HUB_RESULT ") :])
    # the same model and the same greedy search: the hub agrees with fairseq-interactive
    assert [t.strip() for t in translations] == [interactive_hypotheses[i] for i in range(len(SENTENCES))]


LM_FLAGS = [
    "--task", "language_modeling", "--arch", "transformer_lm",
    "--decoder-layers", "1", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
    "--decoder-attention-heads", "2", "--tokens-per-sample", "64", "--sample-break-mode", "eos",
    "--criterion", "parallel_ss", "--ss-prob", "0.5", "--max-tokens", "1000", "--max-epoch", "2",
]  # fmt: skip


def test_transformer_lm_checkpoint_through_eval_lm(lm_data_bin, tmp_path):
    data_bin, save_dir = lm_data_bin, str(tmp_path / "ckpt")
    cli.train(data_bin, save_dir, LM_FLAGS)
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint)
    assert state["cfg"]["model"]["_name"] == "transformer_lm"
    assert state["cfg"]["criterion"]["_name"] == "parallel_ss"

    out = cli.run_cli(
        "fairseq-eval-lm",
        [data_bin, "--path", checkpoint, "--cpu", "--gen-subset", "test", "--max-tokens", "1000",
         "--tokens-per-sample", "64", "--sample-break-mode", "eos", "--num-workers", "0",
         "--required-batch-size-multiple", "1"],
    )  # fmt: skip
    m = re.search(r"Evaluated (\d+) tokens.*?Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", out, re.S)
    assert m, out[-3000:]
    with open(os.path.join(os.path.dirname(data_bin), "raw", "test.txt")) as f:
        expected_tokens = sum(len(line.split()) + 1 for line in f)  # every word and end of sentence
    assert int(m.group(1)) == expected_tokens
    dictionary_size = len(Dictionary.load(os.path.join(data_bin, "dict.txt")))
    loss = float(m.group(2))
    # finite, and below a uniform model over the dictionary: the trained weights were loaded
    assert 0.0 < loss < math.log2(dictionary_size), (m.group(0), dictionary_size)
