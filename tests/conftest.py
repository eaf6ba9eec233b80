import fairseq_ext  # noqa: F401  (first: installs the checkpoint allowlist for in-process torch.load)

import os

import pytest

from fairseq_ext.testing import cli, synthetic

# Checkpoints must load with torch's default weights_only=True: never inherit the blunt override.
os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)


@pytest.fixture(scope="session")
def reverse_data_bin(tmp_path_factory):
    """A tiny binarised reverse task (200 train pairs: 4 batches of --max-tokens 500 per epoch)."""
    root = tmp_path_factory.mktemp("reverse")
    synthetic.write_parallel(str(root / "raw"), task="reverse", sizes={"train": 200, "valid": 30, "test": 20})
    cli.preprocess(str(root / "raw"), str(root / "bin"))
    return str(root / "bin")
