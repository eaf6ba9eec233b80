"""The chain statistics of the Metropolis-Hastings decodings: reading the stats files (one JSON line per
decoded batch and epoch) and the chain-weighted averages per epoch and per run that the recipes'
`MH ...` lines, bench/mh_quality_table.py and bench/plot_mh_stats.py (Figures 6.2-6.4 of Goyal's thesis,
chapter 6) print.  matplotlib is never needed here: --text prints the series the figures would draw.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "recipes", "common"))

import nar_tools  # noqa: E402


def load_bench(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot = load_bench("plot_mh_stats")


def rec(epoch, phase, chains, acc=None, novel=None, e_local=10.0, e_raw=50.0, temp=1.0, block=1):
    return dict(epoch=epoch, phase=phase, chains=chains, acceptance_rate=acc, novel_rate=novel,
                energy_local=e_local, energy_raw=e_raw, target_temperature=temp, block_size=block)  # fmt: skip


def write(path, records, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def run_records():
    """Two batches (30 and 10 chains), warm start, 1 burn-in and 2 sample epochs."""
    out = []
    for chains, offset in ((30, 0.0), (10, 0.4)):
        out.append(rec(0, "warm_start", chains, e_local=40.0 + 10 * offset))
        out.append(rec(1, "burn_in", chains, acc=0.5 + offset, novel=0.3, e_local=30.0 - 10 * offset, block=3))
        out.append(rec(2, "sample", chains, acc=0.5 + offset, novel=0.1 + offset / 2, e_local=20.0 + 10 * offset, temp=0.98, block=2))
        out.append(rec(3, "sample", chains, acc=0.6, novel=0.1, e_local=10.0, temp=0.96))
    return out


def test_per_epoch_means_weigh_each_batch_by_its_chains(tmp_path):
    rows = nar_tools.mh_per_epoch(nar_tools.read_mh_stats(write(tmp_path / "s.jsonl", run_records())))
    assert [(e, p, c) for e, p, c, _ in rows] == [(0, "warm_start", 40), (1, "burn_in", 40), (2, "sample", 40), (3, "sample", 40)]
    m = {e: means for e, _p, _c, means in rows}
    # (30 x 0.5 + 10 x 0.9) / 40 = 0.6, not the batch mean 0.7
    assert m[2]["acceptance_rate"] == pytest.approx(0.6)
    assert m[2]["novel_rate"] == pytest.approx((30 * 0.1 + 10 * 0.3) / 40)
    assert m[2]["energy_local"] == pytest.approx((30 * 20.0 + 10 * 24.0) / 40)
    assert m[0]["energy_local"] == pytest.approx((30 * 40.0 + 10 * 44.0) / 40)
    assert m[0]["acceptance_rate"] is None  # the warm start proposes nothing
    assert m[1]["block_size"] == 3 and m[3]["target_temperature"] == pytest.approx(0.96)


def test_run_summary_averages_the_sample_epochs(tmp_path):
    s = nar_tools.mh_summary(nar_tools.read_mh_stats(write(tmp_path / "s.jsonl", run_records())))
    # sample epochs 2 and 3, each batch weighted by its chains: (30 x 0.5 + 10 x 0.9 + 40 x 0.6) / 80
    assert s["acceptance_rate"] == pytest.approx((15 + 9 + 24) / 80)
    assert s["energy_local"] == pytest.approx((30 * 20 + 10 * 24 + 40 * 10) / 80)
    assert s["epochs"] == (2, 3) and s["chain_epochs"] == 80
    assert s["warm_energy_local"] == pytest.approx(41.0) and s["final_energy_local"] == pytest.approx(10.0)
    assert s["final_target_temperature"] == pytest.approx(0.96)
    with_burn = nar_tools.mh_summary(nar_tools.read_mh_stats(write(tmp_path / "s.jsonl", run_records())), ("burn_in", "sample"))
    assert with_burn["chain_epochs"] == 120 and with_burn["epochs"] == (1, 3)


def test_several_files_pool_like_one(tmp_path):
    records = run_records()
    a = write(tmp_path / "a.jsonl", [r for r in records if r["chains"] == 30])
    b = write(tmp_path / "b.jsonl", [r for r in records if r["chains"] == 10])
    both = write(tmp_path / "both.jsonl", records)
    assert plot.load_series([a, b]) == plot.load_series([both])
    assert plot.burn_in_end(plot.load_series([both])) == 1
    xs, ys = plot.column(plot.load_series([both]), "acceptance_rate")
    assert xs == [1, 2, 3] and ys == pytest.approx([0.6, 0.6, 0.6])
    xs, ys = plot.column(plot.load_series([both]), "energy_local", negate=True)
    assert xs == [0, 1, 2, 3] and ys[0] == pytest.approx(-41.0)


def test_nan_counts_as_missing(tmp_path):
    path = write(tmp_path / "s.jsonl", [rec(1, "sample", 4, acc=0.5)],
                 ['{"epoch": 1, "phase": "sample", "chains": 4, "acceptance_rate": NaN, "novel_rate": null, '
                  '"energy_local": 1.0, "energy_raw": 2.0, "target_temperature": 1.0, "block_size": 1}'])  # fmt: skip
    (_e, _p, chains, means), = nar_tools.mh_per_epoch(nar_tools.read_mh_stats(path))
    assert chains == 8 and means["acceptance_rate"] == pytest.approx(0.5) and means["novel_rate"] is None


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "not a JSON line"),
        ('{"epoch": 1}', "missing keys"),
        (json.dumps(rec(-1, "sample", 2)), "epoch must be an integer >= 0"),
        (json.dumps(rec(1, "sampling", 2)), "phase must be one of"),
        (json.dumps(rec(1, "sample", 0)), "chains must be a positive integer"),
        (json.dumps(rec(1, "sample", 2, acc="high")), "acceptance_rate must be a number or null"),
    ],
)
def test_malformed_lines_are_named(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", [rec(0, "warm_start", 2)], [line])
    with pytest.raises(ValueError, match=message) as e:
        nar_tools.read_mh_stats(path)
    assert f"{path}:2" in str(e.value)


def test_an_epoch_of_two_phases_is_refused(tmp_path):
    path = write(tmp_path / "s.jsonl", [rec(1, "burn_in", 2, acc=0.5), rec(1, "sample", 2, acc=0.5)])
    with pytest.raises(ValueError, match="epoch 1 has records of several phases"):
        nar_tools.mh_per_epoch(nar_tools.read_mh_stats(path))


def test_mh_stats_command_line(tmp_path):
    path = write(tmp_path / "s.jsonl", run_records())
    out = subprocess.run([sys.executable, os.path.join(REPO, "recipes", "common", "nar_tools.py"), "mh-stats",
                          "--name", "cmlm_raw/mh_local", path], capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert out.startswith("MH cmlm_raw/mh_local: acceptance 0.600 novel 0.125 E_local 15.50 ")
    assert "(sample epochs 2-3, chain-weighted over 80 chain-epochs)" in out
    proc = subprocess.run([sys.executable, os.path.join(REPO, "recipes", "common", "nar_tools.py"), "mh-stats",
                           write(tmp_path / "empty.jsonl", [])], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode != 0 and "no chain statistics" in proc.stderr


def test_recipe_run_figures_as_text_without_matplotlib(tmp_path):
    """--exp finds each figure's decodings; --text prints the series; matplotlib is never imported."""
    model = tmp_path / "exp" / "cmlm_raw"
    model.mkdir(parents=True)
    for name in ("mh_raw", "mh_local", "gibbs", "mh_raw_block", "mh_local_block",
                 "mh_raw_anneal02_t08", "mh_raw_anneal06_t08", "mh_local_anneal02_t08"):  # fmt: skip
        write(model / f"test.{name}.stats.jsonl", run_records())
    found = plot.find_run_series(str(tmp_path / "exp"), "cmlm_raw", "6.4")
    assert [label for label, _ in found] == ["raw, annealed (mh_raw_anneal02_t08)", "raw, annealed (mh_raw_anneal06_t08)",
                                             "norm, annealed"]  # fmt: skip
    assert [label for label, _ in plot.find_run_series(str(tmp_path / "exp"), "cmlm_raw", "6.3")] == ["raw, block", "norm, block"]
    script = os.path.join(REPO, "bench", "plot_mh_stats.py")
    code = (f"import sys, runpy; sys.argv = [{script!r}] + sys.argv[1:]; runpy.run_path({script!r}, run_name='__main__'); "
            "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, "--exp", str(tmp_path / "exp"), "--text"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("== Fig. 6.") == 3 and "-- deg (burn-in ends at epoch 1)" in proc.stdout
    assert "2\tsample\t40\t0.6000\t0.1500" in proc.stdout
    # the labelled form, and a per-epoch BLEU file
    bleu = tmp_path / "bleu.txt"
    bleu.write_text("# epoch bleu\n0 10.5\n1 12.0\n")
    assert plot.read_bleu(str(bleu)) == ([0, 1], [10.5, 12.0])
    assert plot.parse_labelled([f"raw={model}/test.mh_raw.stats.jsonl", f"{model}/test.gibbs.stats.jsonl"]) == [
        ("raw", [f"{model}/test.mh_raw.stats.jsonl"]), ("gibbs", [f"{model}/test.gibbs.stats.jsonl"])]  # fmt: skip


def test_table_script_subset_and_rows(tmp_path):
    table = load_bench("mh_quality_table")
    src, tgt = tmp_path / "t.en", tmp_path / "t.de"
    src.write_text("a b c\n" + " ".join(["w"] * 25) + "\nd e\nf g h i\n")
    tgt.write_text("A B C\nlong\nD E\nF G H I\n")
    out_src, out_tgt, note = tmp_path / "o.en", tmp_path / "o.de", tmp_path / "SUBSET"
    table.main(["select-test", "--src", str(src), "--tgt", str(tgt), "--max-src-words", "20", "--max-lines", "2",
                "--out-src", str(out_src), "--out-tgt", str(out_tgt), "--note", str(note)])  # fmt: skip
    assert out_src.read_text() == "a b c\nd e\n" and out_tgt.read_text() == "A B C\nD E\n"
    assert "the first 2 of the 3 (of 4) sentences" in note.read_text() and "at most 20 words" in note.read_text()
    # a results.txt, a stats file, timings -> the table
    exp = tmp_path / "exp"
    (exp / "cmlm_raw").mkdir(parents=True)
    write(exp / "cmlm_raw" / "test.mh_local.stats.jsonl", run_records())
    (exp / "cmlm_raw" / "test.mh_local.cmd").write_text("fairseq-generate x --mh-chains 2 --mh-burn-in-epochs 1 "
                                                        "--mh-sample-epochs 2 --mh-order random\n")  # fmt: skip
    (exp / "results.txt").write_text(
        "BLEU cmlm_raw/warm = 10.00  (BLEU = ...)\nBLEU cmlm_raw/mh_local = 12.50  (BLEU = ...)\n"
        "MH cmlm_raw/mh_local: acceptance 0.600 ...\n")  # fmt: skip
    (exp / "timing.txt").write_text("train cmlm_raw 100.0 5.0 60.0\ngenerate cmlm_raw mh_local 30.0 2.0 20.0\n")
    md = tmp_path / "t.md"
    table.main(["table", "--exp", str(exp), "--subset", str(note), "--md", str(md)])
    text = md.read_text()
    assert "| `warm` | warm start (one greedy pass over all masks) | 10.00 | 41.00 | n/a | n/a | n/a |" in text
    assert "| `mh_local` | MH, E_local | 12.50 | 15.50 | 0.600 | 0.125 | 32 | 6.2 (20): BLEU 24.74" in text
    assert "2 chains per sentence x (1 burn-in + 2 sample epochs after the warm start)" in text
    assert "Training CPU time (user + system s): cmlm_raw 105." in text


def test_paired_bootstrap_of_bleu_differences():
    table = load_bench("mh_quality_table")
    refs = ["ein Mann fährt Fahrrad .", "zwei Hunde spielen im Schnee .", "eine Frau liest ein Buch ."] * 4
    worse = ["ein Mann .", "zwei Katzen spielen .", "eine Frau ."] * 4
    full, low, high, share = table.paired_bootstrap(refs, refs, refs, resamples=200)
    assert (full, low, high, share) == (0.0, 0.0, 0.0, 1.0)
    full, low, high, share = table.paired_bootstrap(refs, worse, refs, resamples=200)
    assert full > 0 and 0 < low <= full <= high and share == 0.0
    assert table.paired_bootstrap(refs, worse, refs, resamples=200) == (full, low, high, share)  # seeded
