"""bench/energy_objectives.py (Table 6.1 / Figure 6.1 of Goyal's thesis): the pure helpers that summarise seeds
and size the runs (the runs themselves are the benchmark, not a test)."""
import math

import pytest

from fairseq_ext.testing import cli


@pytest.fixture(scope="module")
def bench():
    return cli.bench_script("energy_objectives")


def test_summarize_and_cell(bench):
    assert bench.summarize([6.0, 5.0, 7.0, None, math.nan]) == {"mean": 6.0, "min": 5.0, "max": 7.0, "n": 3}
    assert bench.summarize([]) == {"n": 0}
    assert bench.cell([5.0, 7.0]) == "6.00 [5.00, 7.00]"
    assert bench.cell([5.961]) == "5.96"
    assert bench.cell([None]) == "-"


def test_epochs_for(bench):
    assert bench.epochs_for(100, updates=200, batch_size=100) == 200  # one update per epoch
    assert bench.epochs_for(3000, updates=200, batch_size=100) == 7  # 30 updates per epoch, rounded up
    assert bench.epochs_for(10**6, updates=10, batch_size=100, min_epochs=2) == 2


def test_thesis_table_has_every_row(bench):
    assert set(bench.THESIS_TABLE) == set(bench.TOY_ROWS) | {"phoneme"}
    assert all(len(v) == 6 for v in bench.THESIS_TABLE.values())
