import fairseq_ext  # noqa: F401  (first: installs the checkpoint allowlist for in-process torch.load)

import os

import pytest

from fairseq_ext.testing import trained

# Checkpoints must load with torch's default weights_only=True: never inherit the blunt override.
os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)


def pytest_configure(config):
    # Registered here (not in an ini file) so `--strict-markers` accepts it from any working directory.
    config.addinivalue_line(
        "markers",
        "slow: runs a fairseq CLI, a recipe or a float64 gradcheck; deselect with -m 'not slow' for the fast tier",
    )


# -- training runs shared by several test files (each run once per session) -------------------------
@pytest.fixture(scope="session")
def reverse_data_bin(tmp_path_factory):
    """A tiny binarised reverse task (200 train pairs: 4 batches of --max-tokens 500 per epoch)."""
    return trained.reverse_data(str(tmp_path_factory.mktemp("reverse")))


@pytest.fixture(scope="session")
def reverse_checkpoints(reverse_data_bin, tmp_path_factory):
    """Tiny transformers trained 2 epochs with --criterion parallel_ss: variant ("plain", "eval_bleu") -> run.

    The checkpoint tests load them through every fairseq path; the decoding tests decode with the
    "eval_bleu" one (any trained translation model serves them)."""
    return {
        v: trained.train_reverse_variant(v, reverse_data_bin, str(tmp_path_factory.mktemp(f"ckpt_{v}")))
        for v in sorted(trained.VARIANTS)
    }


@pytest.fixture(scope="session")
def lm_data_bin(tmp_path_factory):
    """Binarised synthetic monolingual data (raw text in the sibling folder raw/)."""
    return trained.lm_data(str(tmp_path_factory.mktemp("lm")))


@pytest.fixture(scope="session")
def tagging_run(tmp_path_factory):
    """The synthetic NER data (IOB1 CoNLL files -> BIO -> binarised) and a tagger trained on it to a
    high span F1; the tagging end-to-end test checks the run, the decoding tests decode with it."""
    root = str(tmp_path_factory.mktemp("tagging"))
    data = trained.tagging_data(root)
    return trained.train_tagger(data["bin"], os.path.join(root, "ckpt"))
