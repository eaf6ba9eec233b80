"""bench/independent_runs.py: the ratio rows of several runs are read back and summarised by median and range."""
import pytest

from fairseq_ext.testing import cli


@pytest.fixture(scope="module")
def independent_runs():
    return cli.bench_script("independent_runs")


RUN = """round 0 teacher_forcing: 1,000 tokens/s
## Training throughput (2026-12-02 18:00)

| ratio of median tokens/s | wall | CPU | target |
|---|---:|---:|---|
| parallel_ss_k1 / teacher_forcing | 0.839 | {k1} | >= 0.85 |
| parallel_ss_k1 / sequential_ss | 1.2 | 1.3 | >= 50 |

### tagger_ner

| ratio of median step time | wall | CPU | target |
|---|---:|---:|---|
| soft_beam_k3 / ce | 2.80 | {sb} | <= 3 (thesis: ~k) |
"""


def test_ratio_rows_are_read_with_their_group(independent_runs):
    rows = independent_runs.parse_ratio_rows(RUN.format(k1="0.809", sb="2.74"))
    assert rows == {
        "parallel_ss_k1 / teacher_forcing": (0.839, 0.809, ">= 0.85"),
        "parallel_ss_k1 / sequential_ss": (1.2, 1.3, ">= 50"),
        "tagger_ner: soft_beam_k3 / ce": (2.80, 2.74, "<= 3 (thesis: ~k)"),
    }


def test_summary_reports_median_and_range_over_runs(independent_runs):
    runs = [independent_runs.parse_ratio_rows(RUN.format(k1=k1, sb="2.7")) for k1 in ("0.80", "0.85", "0.79")]
    summary = independent_runs.render_summary("python3 bench/throughput.py --runs 3", runs, RUN.format(k1=1, sb=1))
    row = next(line for line in summary.splitlines() if line.startswith("| parallel_ss_k1 / teacher_forcing"))
    assert "0.800 (0.790-0.850)" in row and "0.800, 0.850, 0.790" in row


def test_children_run_once_and_write_nothing(independent_runs):
    argv = independent_runs.child_argv(["--passes", "1", "--runs", "5", "--rounds=9", "--runs=4"])
    assert argv == ["--passes", "1", "--rounds=9", "--runs", "1", "--no-write"]
