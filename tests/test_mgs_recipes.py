"""The MGS / MRT recipes (recipes/common/mgs.sh), run as a user would on tiny data made here.

* wikitext: prepare.sh on a fake WikiText directory (a few hundred short paragraphs with headings), then run.sh
  --smoke: the MLE transformer_lm, mgs (lm cost under the frozen MLE model) and mrt (edit cost) fine-tuned
  from it with --task text_completion, greedy continuations of every test prefix, the Table 1 metrics;
* iwslt14_de_en: run.sh --smoke --methods mgs_mrt on fake plain splits: the baseline, mgs and mrt with the
  bleu cost warm-started from it, beam 5 / greedy, sacreBLEU;
* without a pipeline: the criterion flags, the metrics on a hand-written fairseq-generate output, and
  prepare.sh's refusals (a missing or empty input file, an output directory inside the input) and units.
Nothing here reads shared data sets or writes inside the repository.
"""
import hashlib
import os
import random
import re
import subprocess

import pytest

from fairseq_ext.modules.completion_metrics import completion_metrics, parse_generate
from fairseq_ext.testing import cli

import test_recipes as tr  # noqa: E402  (the fake translation corpora and the environment of the recipe tests)

REPO = tr.REPO
RECIPES = tr.RECIPES
WORDS = "the a man woman dog cat child runs sits plays with ball in park on street red blue small big".split()
N_PARAGRAPHS = {"train": 300, "valid": 20, "test": 15}
COMPLETION_LINE = re.compile(
    r"^COMPLETION (\w+)/greedy: edit (\d\.\d+) nonterm (\d\.\d+) repetition (\d\.\d+|-) "
    r"length (\d+\.\d+) lm (\d+\.\d+)$",
    re.M,
)


def make_wikitext(directory, seed=0):
    """wiki.{train,valid,test}.tokens in the release's layout: ` = Title = ` headings, blank lines, paragraphs
    of 1-3 sentences of 8-20 tokens, each line starting with a space."""
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    for split, n in N_PARAGRAPHS.items():
        with open(os.path.join(directory, f"wiki.{split}.tokens"), "w", encoding="utf-8") as f:
            f.write(" \n = Title = \n \n")
            for i in range(n):
                sents = [
                    " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) + " ."
                    for _ in range(rng.randint(1, 3))
                ]
                f.write(" " + " ".join(sents) + " \n")
                if i % 10 == 9:
                    f.write(" \n = = Section = = \n \n")


def digest(directory):
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


def script(recipe, name):
    return os.path.join(RECIPES, recipe, name)


def env(**extra):
    e = tr.env()
    for k in [k for k in e if k.startswith(("MGS_", "MRT_", "LM_", "FT_", "MLE_"))]:
        e.pop(k)
    e.update(extra)
    return e


def bash(*args, **extra_env):
    # the timeout only catches a hang (see cli.HANG_TIMEOUT), never a slow machine
    proc = subprocess.run(["bash", *args], capture_output=True, text=True, env=env(**extra_env),
                          timeout=cli.HANG_TIMEOUT)  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """The wikitext and the iwslt14 mgs/mrt pipelines, side by side (one thread each)."""
    root = tmp_path_factory.mktemp("mgs_recipes")
    wt_raw, iw_raw = str(root / "wikitext" / "raw"), str(root / "iwslt" / "raw")
    make_wikitext(wt_raw)
    tr.make_plain(iw_raw)
    before = digest(wt_raw)
    cmds = {
        "wikitext": (
            f"bash {script('wikitext', 'prepare.sh')} {wt_raw} {root}/wikitext/data"
            f" && bash {script('wikitext', 'run.sh')} {root}/wikitext/data {root}/wikitext/exp --smoke",
            env(MGS_TASK_LOSS="lm", MRT_TASK_LOSS="edit"),
        ),
        "iwslt14_de_en": (
            f"bash {script('iwslt14_de_en', 'prepare.sh')} {root}/iwslt/data --local {iw_raw} --smoke"
            f" && bash {script('iwslt14_de_en', 'run.sh')} {root}/iwslt/data {root}/iwslt/exp --smoke"
            " --methods mgs_mrt",
            env(),
        ),
    }
    procs = {}
    for name, (cmd, e) in cmds.items():
        log = str(root / f"{name}.log")
        procs[name] = (cli.run_pipeline(["bash", "-c", cmd], log, env=e), log)
    results = {}
    for name, (proc, log) in procs.items():
        rc, out = cli.finish_pipeline(proc, log)
        sub = "wikitext" if name == "wikitext" else "iwslt"
        results[name] = dict(rc=rc, out=out, data=str(root / sub / "data"), exp=str(root / sub / "exp"))
    results["wikitext"]["inputs_unchanged"] = digest(wt_raw) == before
    return results


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.mark.slow
def test_wikitext_pipeline(pipelines):
    r = pipelines["wikitext"]
    assert r["rc"] == 0, r["out"][-5000:]
    assert r["inputs_unchanged"]
    out, exp = r["out"], r["exp"]
    for stage in (1, 2, 3, 4):
        assert f"stage {stage}:" in out
    n_test = len(read(os.path.join(r["data"], "text", "test.txt")).splitlines())
    assert n_test > 10
    assert out.count(f"hypotheses: {n_test} / {n_test} test sentences") == 3
    # both fine-tunes started from the MLE model, with their own criterion and cost
    mle = os.path.join(exp, "mle", "checkpoint_last.pt")
    for m in ("mgs", "mrt"):
        assert f"Loaded checkpoint {mle} " in read(os.path.join(exp, m, "train.log"))
    mgs_cmd = read(os.path.join(exp, "mgs", "train.cmd"))
    assert "--mgs-task-loss lm" in mgs_cmd and f"--mgs-lm-scorer-path {mle}" in mgs_cmd
    assert "--task text_completion" in mgs_cmd
    assert "--mrt-task-loss edit" in read(os.path.join(exp, "mrt", "train.cmd"))
    assert "--required-batch-size-multiple 1" in read(os.path.join(exp, "mgs", "test.greedy.cmd"))
    rows = {m.group(1): m.groups()[1:] for m in COMPLETION_LINE.finditer(read(os.path.join(exp, "results.txt")))}
    assert set(rows) == {"mle", "mgs", "mrt"}, read(os.path.join(exp, "results.txt"))
    for edit, nonterm, *_ in rows.values():
        assert 0.0 <= float(nonterm) <= 1.0 and float(edit) >= 0.0


@pytest.mark.slow
def test_iwslt14_mgs_mrt_stages(pipelines):
    r = pipelines["iwslt14_de_en"]
    assert r["rc"] == 0, r["out"][-5000:]
    out, exp = r["out"], r["exp"]
    found = set(re.findall(r"^BLEU (\w+)/(beam5|greedy) = \d+\.\d+ .*signature nrefs:1", out, re.M))
    assert found == {(m, d) for m in ("baseline", "mgs", "mrt") for d in ("beam5", "greedy")}, out[-3000:]
    assert out.count(f"hypotheses: {tr.N_TEST} / {tr.N_TEST} test sentences") == 6
    base = os.path.join(exp, "baseline", "checkpoint_last.pt")
    for m in ("mgs", "mrt"):
        log = read(os.path.join(exp, m, "train.log"))
        assert f"Loaded checkpoint {base} " in log
        cmd = read(os.path.join(exp, m, "train.cmd"))
        assert f"--criterion {m} --{m}-task-loss bleu" in cmd and f"--{m}-post-process sentencepiece" in cmd
        assert "--label-smoothing" not in cmd


# -- without a pipeline ------------------------------------------------------------------------

FLAGS = r"""
set -euo pipefail
source "$R/common/lib.sh"; source "$R/common/mgs.sh"
mgs_criterion_flags "$1" /ckpt/mle.pt | tr '\n' ' '
"""


def flags(method, **extra):
    return bash("-c", FLAGS, "flags", method, R=RECIPES, **extra)


def test_criterion_flags():
    rc, out = flags("mgs", MGS_TASK_LOSS="edit")
    assert rc == 0 and "--criterion mgs --mgs-task-loss edit" in out and "--mgs-alpha 100" in out
    assert "scorer" not in out
    rc, out = flags("mgs", MGS_TASK_LOSS="lm")
    assert rc == 0 and "--mgs-alpha 1 " in out and "--mgs-lm-scorer-path /ckpt/mle.pt" in out
    rc, out = flags("mrt", MGS_TASK_LOSS="bleu", MRT_TASK_LOSS="lm", POST_PROCESS="sentencepiece")
    assert rc == 0 and "--mrt-task-loss lm" in out and "--mrt-lm-scorer-path /ckpt/mle.pt" in out
    assert "--mrt-post-process sentencepiece" in out
    rc, out = flags("mgs", MGS_TASK_LOSS="rouge")
    assert rc != 0 and "unknown task loss 'rouge'" in out


def test_iwslt14_rejects_unknown_task_loss(tmp_path):
    data = tmp_path / "data"
    (data / "bin").mkdir(parents=True)
    (data / "pair.env").write_text("SRC=de\nTGT=en\n")
    rc, out = bash(script("iwslt14_de_en", "run.sh"), str(data), str(tmp_path / "exp"), "--methods", "mgs",
                   MGS_TASK_LOSS="rouge")  # fmt: skip
    assert rc != 0 and "unknown task loss 'rouge'" in out


def test_completion_metrics_on_generate_output(tmp_path):
    # example 0: "c d" then EOS (3 scores for 2 tokens); example 1: "e e e e e" cut without EOS (5 scores)
    gen = tmp_path / "gen.out"
    gen.write_text("S-0\ta b\nH-0\t-0.5\tc d\nP-0\t-0.1 -0.2 -0.3\n"
                   "H-1\t-2.0\te e e e e\nP-1\t-1 -1 -1 -1 -1\n")  # fmt: skip
    outputs = parse_generate(str(gen))
    assert outputs == {0: (["c", "d"], True), 1: (["e"] * 5, False)}
    eos = 2
    m = completion_metrics([[10, 11], [12] * 5], [True, False], [[10, 11], [12, 13]], eos, lm_nll=[1.0, 3.0])
    # edit: 0 for the exact match; [12]*5 vs [12, 13, EOS]: 1 match, 2 substitutions, 2 insertions -> 4 / 3
    assert m["edit"] == pytest.approx((0.0 + 4 / 3) / 2)
    assert m["nonterm"] == 0.5 and m["length"] == 3.5 and m["lm"] == 2.0
    # repetition: only the second has a 4-gram: 2 four-grams, 1 unique -> 0.5
    assert m["repetition"] == 0.5


def test_prepare_refuses_missing_and_empty_files(tmp_path):
    raw = tmp_path / "raw"
    make_wikitext(str(raw))
    os.remove(raw / "wiki.valid.tokens")
    rc, out = bash(script("wikitext", "prepare.sh"), str(raw), str(tmp_path / "out"))
    assert rc != 0 and f"missing input file: {raw}/wiki.valid.tokens" in out
    assert not (tmp_path / "out").exists()
    (raw / "wiki.valid.tokens").write_text("")
    rc, out = bash(script("wikitext", "prepare.sh"), str(raw), str(tmp_path / "out"))
    assert rc != 0 and f"empty input file: {raw}/wiki.valid.tokens" in out
    assert not (tmp_path / "out").exists()


def test_prepare_never_writes_into_its_input(tmp_path):
    raw = tmp_path / "raw"
    make_wikitext(str(raw))
    before = digest(str(raw))
    for out_dir in (raw, raw / "out"):
        rc, out = bash(script("wikitext", "prepare.sh"), str(raw), str(out_dir), "--force")
        assert rc != 0 and "ERROR" in out, out
    assert sorted(os.listdir(raw)) == ["wiki.test.tokens", "wiki.train.tokens", "wiki.valid.tokens"]
    assert digest(str(raw)) == before


@pytest.mark.slow
def test_prepare_paragraph_unit(tmp_path):
    raw = tmp_path / "raw"
    make_wikitext(str(raw))
    out_dir = tmp_path / "out"
    rc, out = bash(script("wikitext", "prepare.sh"), str(raw), str(out_dir), "--unit", "paragraph")
    assert rc == 0, out
    lines = read(out_dir / "text" / "test.txt").splitlines()
    # one line per paragraph of more than 10 tokens (the prefix), whitespace normalised, headings dropped
    paragraphs = [p.split() for p in read(raw / "wiki.test.tokens").splitlines()]
    expected = [" ".join(p) for p in paragraphs if len(p) > 10 and p[0] != "="]
    assert lines == expected and len(lines) > 5
    assert "UNIT=paragraph" in read(out_dir / "lm.env") and "MAX_TOKENS=512" in read(out_dir / "lm.env")
    assert (out_dir / "bin" / "test.bin").stat().st_size > 0
