"""recipes/conll2003, run as a user would (smoke mode) on synthetic CoNLL files made here."""
import os
import re
import subprocess
import sys

import pytest

from fairseq_ext.testing import cli
from fairseq_ext.testing.synthetic_tagging import write_conll_splits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE = os.path.join(REPO, "recipes", "conll2003", "prepare.sh")
RUN = os.path.join(REPO, "recipes", "conll2003", "run.sh")
METHODS = ("hss_greedy", "dss_sample_annealed")
SIZES = {"train": 150, "valid": 17, "test": 13}  # odd sizes: a dropped sentence would show
F1_LINE = re.compile(r"^F1 (\w+)/(valid|test)/(greedy|beam5) = (\d+\.\d+) ", re.M)


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", DEVICE="cpu", PYTHON=sys.executable)
    e.pop("SMOKE", None)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    return e


def bash(*args):
    # the timeout only catches a hang (see cli.HANG_TIMEOUT), never a slow machine
    proc = subprocess.run(["bash", *args], capture_output=True, text=True, env=env(), timeout=cli.HANG_TIMEOUT)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("conll2003")
    raw, data, exp = (str(root / d) for d in ("raw", "data", "exp"))
    write_conll_splits(raw, SIZES, scheme="bio", seed=5)
    log = str(root / "pipeline.log")
    cmd = f"bash {PREPARE} {raw} {data} --smoke && bash {RUN} {data} {exp} --smoke --methods {','.join(METHODS)}"
    rc, out = cli.finish_pipeline(cli.run_pipeline(["bash", "-c", cmd], log, env=env()), log)  # fails only on a hang
    return dict(rc=rc, out=out, raw=raw, data=data, exp=exp)


@pytest.mark.slow
def test_smoke_pipeline_trains_decodes_and_scores(pipeline):
    assert pipeline["rc"] == 0, pipeline["out"][-5000:]
    out, data, exp = pipeline["out"], pipeline["data"], pipeline["exp"]
    for stage in (1, 2, 3, 4):
        assert f"stage {stage}:" in out
    models = ("baseline",) + METHODS
    found = {m.groups()[:3] for m in F1_LINE.finditer(out)}
    assert found == {(m, s, d) for m in models for s in ("valid", "test") for d in ("greedy", "beam5")}
    with open(os.path.join(exp, "results.txt")) as f:
        assert len(F1_LINE.findall(f.read())) == 12
    for split, n in (("valid", SIZES["valid"]), ("test", SIZES["test"])):
        assert out.count(f"hypotheses: {n} / {n} test sentences") == 2 * len(models)
        with open(os.path.join(data, "raw", f"{split}.words")) as f:
            lengths = [len(line.split()) for line in f]
        for model in models:
            with open(os.path.join(exp, model, f"{split}.greedy.hyp")) as f:
                assert [len(line.split()) for line in f] == lengths  # one label per word
            with open(os.path.join(exp, model, f"{split}.greedy.cmd")) as f:
                assert "--required-batch-size-multiple 1 " in f.read()
    for model, criterion in zip(models, ("label_smoothed_cross_entropy", "sequential_ss", "differentiable_ss")):
        with open(os.path.join(exp, model, "train.cmd")) as f:
            assert f"--criterion {criterion} " in f.read()
    with open(os.path.join(exp, "dss_sample_annealed", "train.log")) as f:
        epoch = [ln for ln in f if "| train | epoch 001" in ln][-1]
    assert "ss_prob 0.5" in epoch and float(re.search(r"ss_from_model ([0-9.]+)", epoch).group(1)) > 0.1
    assert re.search(r"dss_alpha [0-9.]+", epoch)
    with open(os.path.join(exp, "baseline", "test.greedy.conlleval")) as f:
        assert f.read().startswith(f"processed {sum(lengths)} tokens with ")


@pytest.mark.slow  # prepare.sh starts several Python processes before it reaches the bad line
def test_prepare_refuses_a_malformed_line_and_names_it(tmp_path):
    raw = tmp_path / "raw"
    write_conll_splits(str(raw), {"train": 20, "valid": 5, "test": 5}, seed=2)
    lines = (raw / "valid.txt").read_text().splitlines()
    bad = next(i for i, line in enumerate(lines) if len(line.split()) == 4 and not line.startswith("-DOCSTART-"))
    lines[bad] = lines[bad].split()[0]  # a token without its columns
    (raw / "valid.txt").write_text("\n".join(lines) + "\n")
    rc, out = bash(PREPARE, str(raw), str(tmp_path / "out"))
    assert rc != 0 and f"valid.txt:{bad + 1}" in out.replace(", line ", ":"), out[-2000:]


@pytest.mark.slow
def test_prepare_refuses_options_it_would_ignore_and_existing_output(tmp_path, pipeline):
    rc, out = bash(PREPARE, pipeline["raw"], str(tmp_path / "out"), "--vocab-size", "8000")
    assert rc != 0 and "--vocab-size" in out
    rc, out = bash(PREPARE, pipeline["raw"], pipeline["data"])
    assert rc != 0 and "refusing to overwrite" in out
