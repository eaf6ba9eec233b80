"""fairseq-train --user-dir fairseq_ext with --arch energy_mlm_tiny and each energy criterion (Goyal's thesis,
CMU 2021, section 6.2.2) on palindrome data of section 6.2.3 (|V| = 5, T = 5): every run trains, lowers the
quantity it optimises on held-out data and logs the exact NLL by enumeration; the KL projection starts
from the checkpoint of the MLM run."""
import os
import re

import pytest

from fairseq_ext.data import energy_toys
from fairseq_ext.testing import cli

pytestmark = pytest.mark.slow

VALID = re.compile(
    r"valid on 'valid' subset \| loss ([\d.]+) \| pseudo_nll ([\d.]+) \| mlm_nll ([\d.]+) \| exact_nll ([\d.]+)"
)
FLAGS = [
    "--task", "language_modeling", "--sample-break-mode", "eos", "--tokens-per-sample", "16",
    "--arch", "energy_mlm_tiny", "--batch-size", "50", "--max-epoch", "8", "--lr", "0.03", "--log-interval", "100",
]  # fmt: skip
COLUMN = {"loss": 0, "pseudo_nll": 1, "mlm_nll": 2, "exact_nll": 3}


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("energy_toys"))
    energy_toys.main(["--generator", "palindrome", "--out", os.path.join(root, "raw"), "--train-size", "400",
                      "--valid-size", "60", "--test-size", "20"])  # fmt: skip
    cli.preprocess_lm(os.path.join(root, "raw"), os.path.join(root, "bin"))
    return os.path.join(root, "bin")


def train(data_bin, save_dir, criterion, extra=()):
    out = cli.train(data_bin, save_dir, [*FLAGS, "--criterion", criterion, *extra])
    rows = [tuple(map(float, m)) for m in VALID.findall(out)]
    assert len(rows) == 8, out[-3000:]
    return rows


def assert_improved(rows, metric, by):
    first, last = rows[0][COLUMN[metric]], rows[-1][COLUMN[metric]]
    assert last < first - by, (metric, first, last)


@pytest.fixture(scope="module")
def mlm_run(data_bin, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("mlm"))
    return save, train(data_bin, save, "energy_mlm")


def test_likelihood(data_bin, tmp_path):
    rows = train(data_bin, str(tmp_path), "energy_likelihood", ["--energy-batch-rows", "1024"])
    assert all(abs(r[0] - r[3]) < 1e-3 for r in rows)  # its loss is the exact NLL
    assert_improved(rows, "exact_nll", 0.3)


def test_pseudolikelihood(data_bin, tmp_path):
    assert_improved(train(data_bin, str(tmp_path), "energy_pseudolikelihood"), "pseudo_nll", 0.3)


def test_mlm(mlm_run):
    assert_improved(mlm_run[1], "mlm_nll", 0.5)


def test_kl_projection_from_the_mlm(data_bin, mlm_run, tmp_path):
    teacher = os.path.join(mlm_run[0], "checkpoint_last.pt")
    rows = train(data_bin, str(tmp_path), "energy_kl_projection",
                 ["--energy-teacher-path", teacher, "--energy-pll-weight", "1.0"])  # fmt: skip
    assert_improved(rows, "loss", 0.2)
    assert_improved(rows, "pseudo_nll", 0.2)
