"""The recipes under recipes/, run as a user would, in smoke mode on tiny data made here.

Each recipe's prepare.sh + run.sh goes through all four stages (baseline, parallel_ss, generate,
sacreBLEU) on a few dozen fake sentence pairs written in the layout that recipe reads; the three
pipelines run side by side (one thread each).  Then prepare.sh's refusals: mismatched line counts,
empty or missing files, and an output directory that already holds something.
Nothing here reads shared data sets or writes inside the repository.
"""
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from fairseq_ext.testing import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "recipes")

import sentencepiece  # noqa: E402,F401  (scripts/install.sh installs it: a missing one must fail, not skip)

EN = "a man woman dog cat child runs sits plays with the ball in park on street red blue small big".split()
DE = "ein Mann Frau Hund Katze Kind läuft sitzt spielt mit dem Ball im Park auf Straße rot blau klein groß".split()
TO_DE = dict(zip(EN, DE))

# Odd sizes, so a batch-size rounding that drops sentences would show.
N_TRAIN, N_VALID, N_TEST = 90, 7, 13


def pairs(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(EN) for _ in range(rng.randint(3, 8))]
        out.append((" ".join(words).capitalize() + ".", " ".join(TO_DE[w] for w in words).capitalize() + "."))
    return out


def write_split(directory, name, n, seed, langs=("en", "de")):
    os.makedirs(directory, exist_ok=True)
    data = pairs(n, seed)
    for i, lang in enumerate(langs):
        # en is the first element of each pair, de the second, whatever the direction
        col = 0 if lang == "en" else 1
        with open(os.path.join(directory, f"{name}.{lang}"), "w", encoding="utf-8") as f:
            f.write("".join(p[col] + "\n" for p in data))


def make_multi30k(directory):
    for k, (name, n) in enumerate([("train", N_TRAIN), ("val", N_VALID), ("test_2016_flickr", N_TEST)]):
        write_split(directory, name, n, seed=k)


def make_plain(directory):
    for k, (name, n) in enumerate([("train", N_TRAIN), ("valid", N_VALID), ("test", N_TEST)]):
        write_split(directory, name, n, seed=10 + k)


def env():
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", DEVICE="cpu", PYTHON=sys.executable)
    e.pop("SMOKE", None)
    # the fairseq console scripts live next to this interpreter
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    return e


def bash(*args):
    # the timeout only catches a hang (see cli.HANG_TIMEOUT), never a slow machine
    proc = subprocess.run(["bash", *args], capture_output=True, text=True, env=env(), timeout=cli.HANG_TIMEOUT)
    return proc.returncode, proc.stdout + proc.stderr


def script(recipe, name):
    return os.path.join(RECIPES, recipe, name)


# recipe -> (prepare arguments given the fake data dir and the output dir, source, target)
RECIPE_ARGS = {
    "multi30k": (lambda raw, out: [raw, out], "en", "de", make_multi30k),
    "iwslt14_de_en": (lambda raw, out: [out, "--local", raw], "de", "en", make_plain),
    "wmt14_en_de": (lambda raw, out: [out, "--local", raw], "en", "de", make_plain),
}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Runs prepare.sh then run.sh --smoke for every recipe, concurrently; returns their results."""
    root = tmp_path_factory.mktemp("recipes")
    procs = {}
    for recipe, (prep_args, _, _, make) in RECIPE_ARGS.items():
        raw, data, exp = (str(root / recipe / d) for d in ("raw", "data", "exp"))
        make(raw)
        cmd = (
            f"bash {script(recipe, 'prepare.sh')} {' '.join(prep_args(raw, data))} --smoke"
            f" && bash {script(recipe, 'run.sh')} {data} {exp} --smoke"
        )
        log = str(root / f"{recipe}.log")
        procs[recipe] = (cli.run_pipeline(["bash", "-c", cmd], log, env=env()), log)
    results = {}
    for recipe, (proc, log) in procs.items():
        rc, out = cli.finish_pipeline(proc, log)  # fails only when a pipeline stops printing (a hang)
        results[recipe] = dict(rc=rc, out=out, data=str(root / recipe / "data"), exp=str(root / recipe / "exp"))
    return results


BLEU_LINE = re.compile(r"^BLEU (baseline|parallel_ss|dss_greedy|dss_sample)/(beam5|greedy) = (\d+\.\d+) .*signature nrefs:1\|case:mixed", re.M)
# the models each recipe trains: the baseline and its stage-2 methods
MODELS = {"multi30k": ("baseline", "parallel_ss"), "wmt14_en_de": ("baseline", "parallel_ss"),
          "iwslt14_de_en": ("baseline", "parallel_ss", "dss_greedy", "dss_sample")}  # fmt: skip
CRITERION = {"baseline": "label_smoothed_cross_entropy", "parallel_ss": "parallel_ss",
             "dss_greedy": "differentiable_ss", "dss_sample": "differentiable_ss"}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPE_ARGS))
def test_smoke_pipeline(pipelines, recipe):
    r = pipelines[recipe]
    assert r["rc"] == 0, f"{recipe} pipeline failed:\n{r['out'][-5000:]}"
    out, exp = r["out"], r["exp"]
    tgt = RECIPE_ARGS[recipe][2]
    for stage in (1, 2, 3, 4):
        assert f"stage {stage}:" in out
    # one sacreBLEU line per model and decoding, with its signature
    models = MODELS[recipe]
    found = {(m.group(1), m.group(2)) for m in BLEU_LINE.finditer(out)}
    assert found == {(m, d) for m in models for d in ("beam5", "greedy")}, out[-3000:]
    # every test sentence got exactly one hypothesis, in every decoding
    assert out.count(f"hypotheses: {N_TEST} / {N_TEST} test sentences") == 2 * len(models)
    for model in models:
        for decode in ("beam5", "greedy"):
            with open(os.path.join(exp, model, f"test.{decode}.hyp"), encoding="utf-8") as f:
                hyps = f.read().splitlines()
            assert len(hyps) == N_TEST
            assert not any("\u2581" in h for h in hyps), "hypotheses were not sentencepiece-decoded"
            with open(os.path.join(exp, model, f"test.{decode}.cmd"), encoding="utf-8") as f:
                gen_cmd = f.read()
            assert "--required-batch-size-multiple 1 " in gen_cmd
            assert f"--beam {5 if decode == 'beam5' else 1} " in gen_cmd
        with open(os.path.join(exp, model, "train.cmd"), encoding="utf-8") as f:
            train_cmd = f.read()
        assert f"--criterion {CRITERION[model]} " in train_cmd
        if model.startswith("dss_"):
            assert f"--dss-mode {model[4:]} " in train_cmd
    # each method was active: p = 0.5 and some conditioning inputs came from the model
    for model in models[1:]:
        with open(os.path.join(exp, model, "train.log"), encoding="utf-8") as f:
            epoch_lines = [ln for ln in f if re.search(r"\| train \| epoch 001", ln)]
        assert epoch_lines and "ss_prob 0.5" in epoch_lines[-1]
        assert float(re.search(r"ss_from_model ([0-9.]+)", epoch_lines[-1]).group(1)) > 0.1
    # results and the tee'd log land in the experiment directory; the reference is the raw text
    with open(os.path.join(exp, "results.txt"), encoding="utf-8") as f:
        assert len(BLEU_LINE.findall(f.read())) == 2 * len(models)
    assert os.path.getsize(os.path.join(exp, "run.log")) > 0
    assert f"raw reference {r['data']}/raw/test.{tgt}" in out


@pytest.mark.slow
def test_run_selects_stages(pipelines):
    """--stage 4 --stop-stage 4 only scores the existing hypotheses."""
    r = pipelines["multi30k"]
    assert r["rc"] == 0
    rc, out = bash(script("multi30k", "run.sh"), r["data"], r["exp"], "--stage", "4", "--stop-stage", "4", "--smoke")
    assert rc == 0, out
    assert "stage 4:" in out and "stage 1:" not in out and "stage 3:" not in out
    assert len(BLEU_LINE.findall(out)) == 4


@pytest.mark.slow
def test_run_selects_methods(pipelines):
    """--methods narrows stages 2-4 to the named methods (plus the baseline); an unknown name fails."""
    r = pipelines["iwslt14_de_en"]
    assert r["rc"] == 0
    rc, out = bash(script("iwslt14_de_en", "run.sh"), r["data"], r["exp"], "--stage", "4", "--stop-stage", "4",
                   "--methods", "dss_greedy", "--smoke")  # fmt: skip
    assert rc == 0, out
    assert {m.group(1) for m in BLEU_LINE.finditer(out)} == {"baseline", "dss_greedy"}
    rc, out = bash(script("iwslt14_de_en", "run.sh"), r["data"], r["exp"], "--methods", "dss_argmax", "--smoke")
    assert rc != 0 and "--methods: unknown method 'dss_argmax'" in out and "dss_greedy" in out


@pytest.mark.slow
def test_prepare_force_keeps_user_files(pipelines):
    """--force rebuilds the recipe's own outputs; a file the user put there survives."""
    r = pipelines["multi30k"]
    assert r["rc"] == 0
    user_file = os.path.join(r["data"], "my_notes.txt")
    with open(user_file, "w") as f:
        f.write("keep me\n")
    raw = os.path.join(os.path.dirname(r["data"]), "raw")
    rc, out = bash(script("multi30k", "prepare.sh"), raw, r["data"], "--smoke", "--force")
    assert rc == 0, out
    assert open(user_file).read() == "keep me\n"
    assert os.path.exists(os.path.join(r["data"], "bin", "test.en-de.en.bin"))


def test_run_rejects_bad_arguments(tmp_path):
    rc, out = bash(script("multi30k", "run.sh"), str(tmp_path / "nodata"), str(tmp_path / "exp"))
    assert rc != 0 and "pair.env not found" in out and "prepare.sh" in out
    rc, out = bash(script("multi30k", "run.sh"), str(tmp_path), str(tmp_path / "exp"), "--stage", "5")
    assert rc != 0 and "--stage" in out


# -- prepare.sh refuses bad input ---------------------------------------------------------------


def truncate_last_line(path):
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines[:-1])


def test_multi30k_prepare_refuses_mismatched_line_counts(tmp_path):
    raw = tmp_path / "raw"
    make_multi30k(str(raw))
    truncate_last_line(raw / "val.de")
    rc, out = bash(script("multi30k", "prepare.sh"), str(raw), str(tmp_path / "out"), "--smoke")
    assert rc != 0
    assert "line counts differ" in out and f"{raw}/val.de has {N_VALID - 1} lines" in out, out
    assert not (tmp_path / "out").exists(), "nothing may be written before the inputs are checked"


def test_multi30k_prepare_refuses_empty_and_missing_files(tmp_path):
    raw = tmp_path / "raw"
    make_multi30k(str(raw))
    open(raw / "test_2016_flickr.en", "w").close()
    rc, out = bash(script("multi30k", "prepare.sh"), str(raw), str(tmp_path / "out"))
    assert rc != 0 and f"empty input file: {raw}/test_2016_flickr.en" in out, out
    os.remove(raw / "test_2016_flickr.en")
    rc, out = bash(script("multi30k", "prepare.sh"), str(raw), str(tmp_path / "out"))
    assert rc != 0 and f"missing input file: {raw}/test_2016_flickr.en" in out, out


@pytest.mark.parametrize("recipe", ["iwslt14_de_en", "wmt14_en_de"])
def test_local_prepare_refuses_mismatched_line_counts(tmp_path, recipe):
    raw = tmp_path / "raw"
    make_plain(str(raw))
    truncate_last_line(raw / "train.en")
    rc, out = bash(script(recipe, "prepare.sh"), str(tmp_path / "out"), "--local", str(raw), "--smoke")
    assert rc != 0
    assert "line counts differ" in out and f"{raw}/train.en has {N_TRAIN - 1} lines" in out, out


@pytest.mark.parametrize("recipe", sorted(RECIPE_ARGS))
def test_prepare_refuses_to_overwrite(tmp_path, recipe):
    raw, out_dir = tmp_path / "raw", tmp_path / "out"
    prep_args, _, _, make = RECIPE_ARGS[recipe]
    make(str(raw))
    out_dir.mkdir()
    (out_dir / "results_i_care_about.txt").write_text("precious\n")
    rc, out = bash(script(recipe, "prepare.sh"), *prep_args(str(raw), str(out_dir)), "--smoke")
    assert rc != 0 and "refusing to overwrite" in out and "--force" in out, out
    assert sorted(os.listdir(out_dir)) == ["results_i_care_about.txt"]
    assert (out_dir / "results_i_care_about.txt").read_text() == "precious\n"


# -- IWSLT'14 from the release archive (the download path, with a file:// URL) -----------------


def write_release(directory):
    """A tiny archive shaped like the IWSLT'14 de-en release: train.tags + one XML per test set."""
    rel = os.path.join(directory, "de-en")
    os.makedirs(rel)
    train = pairs(46, seed=20)
    for lang, col in (("de", 1), ("en", 0)):
        with open(os.path.join(rel, f"train.tags.de-en.{lang}"), "w", encoding="utf-8") as f:
            f.write("<url>http://example.org/talk</url>\n<keywords>talks</keywords>\n")
            f.write(f"<title>{train[0][col]}</title>\n")
            f.writelines(p[col] + "\n" for p in train[1:])
        for k, name in enumerate(["TED.dev2010", "TED.tst2010", "TED.tst2011", "TED.tst2012", "TEDX.dev2012"]):
            segs = pairs(3, seed=30 + k)
            with open(os.path.join(rel, f"IWSLT14.{name}.de-en.{lang}.xml"), "w", encoding="utf-8") as f:
                f.write('<mteval>\n<doc docid="1">\n<title>ignored</title>\n')
                f.writelines(f'<seg id="{i + 1}"> {p[col]} </seg>\n' for i, p in enumerate(segs))
                f.write("</doc>\n</mteval>\n")
    archive = os.path.join(directory, "de-en.tgz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(rel, arcname="de-en")
    return archive


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None and shutil.which("wget") is None, reason="needs curl or wget")
def test_iwslt14_prepare_from_release_archive(tmp_path, monkeypatch):
    archive = write_release(str(tmp_path / "mirror"))
    out_dir = tmp_path / "out"
    monkeypatch.setenv("IWSLT14_URL", "file://" + archive)
    rc, out = bash(script("iwslt14_de_en", "prepare.sh"), str(out_dir), "--smoke")
    assert rc == 0, out
    lines = lambda name: (out_dir / "raw" / name).read_text(encoding="utf-8").splitlines()  # noqa: E731
    assert len(lines("test.de")) == len(lines("test.en")) == 15  # five sets of three <seg>s
    # 46 training pairs (the title is one): every 23rd goes to valid
    assert len(lines("valid.de")) == 2 and len(lines("train.de")) == 44
    assert not any(ln.startswith("<") for ln in lines("train.de") + lines("test.en"))
    assert (out_dir / "bin" / "test.de-en.de.bin").exists()

    # a broken archive is reported by name
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not a tarball")
    monkeypatch.setenv("IWSLT14_URL", "file://" + str(bad))
    rc, out = bash(script("iwslt14_de_en", "prepare.sh"), str(tmp_path / "out2"), "--smoke")
    assert rc != 0 and "not a readable .tgz" in out and "de-en.tgz" in out, out


# -- WMT'14 from the five release archives (file:// URLs) -------------------------------------


def write_wmt14_mirror(base):
    """Archives shaped like statmt.org's WMT'14 ones, at the paths prepare.sh downloads."""

    def tgz(rel_path, members):
        path = os.path.join(base, rel_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        src = path + ".d"
        for name, text in members.items():
            os.makedirs(os.path.dirname(os.path.join(src, name)) or src, exist_ok=True)
            with open(os.path.join(src, name), "w", encoding="utf-8") as f:
                f.write(text)
        with tarfile.open(path, "w:gz") as tar:
            for name in members:
                tar.add(os.path.join(src, name), arcname=name)

    def side(data, lang):
        return "".join((p[0] if lang == "en" else p[1]) + "\n" for p in data)

    def sgm(data, lang):
        segs = "".join(f'<seg id="{i + 1}">{p[0] if lang == "en" else p[1]}</seg>\n' for i, p in enumerate(data))
        return f'<srcset setid="newstest2014" srclang="any">\n<doc sysid="ref" docid="1" genre="news">\n{segs}</doc>\n</srcset>\n'

    ep, cc, nc, dev, test = pairs(30, 40), pairs(20, 41), pairs(10, 42), pairs(7, 43), pairs(9, 44)
    cc_en = side(cc, "en").splitlines()
    cc_en[3] = " ".join(["word"] * 300)  # too long: dropped by the length filter with its pair
    tgz("wmt13/training-parallel-europarl-v7.tgz",
        {f"training/europarl-v7.de-en.{lg}": side(ep, lg) for lg in ("en", "de")})
    tgz("wmt13/training-parallel-commoncrawl.tgz",
        {"commoncrawl.de-en.en": "\n".join(cc_en) + "\n", "commoncrawl.de-en.de": side(cc, "de")})
    tgz("wmt14/training-parallel-nc-v9.tgz",
        {f"training/news-commentary-v9.de-en.{lg}": side(nc, lg) for lg in ("en", "de")})
    tgz("wmt14/dev.tgz", {f"dev/newstest2013.{lg}": side(dev, lg) for lg in ("en", "de")})
    tgz("wmt14/test-full.tgz", {"test-full/newstest2014-deen-src.en.sgm": sgm(test, "en"),
                                "test-full/newstest2014-deen-ref.de.sgm": sgm(test, "de")})  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None and shutil.which("wget") is None, reason="needs curl or wget")
def test_wmt14_prepare_from_release_archives(tmp_path, monkeypatch):
    write_wmt14_mirror(str(tmp_path / "mirror"))
    monkeypatch.setenv("WMT14_BASE_URL", "file://" + str(tmp_path / "mirror"))
    out_dir = tmp_path / "out"
    rc, out = bash(script("wmt14_en_de", "prepare.sh"), str(out_dir), "--smoke")
    assert rc == 0, out
    lines = lambda name: (out_dir / "raw" / name).read_text(encoding="utf-8").splitlines()  # noqa: E731
    assert len(lines("train.en")) == len(lines("train.de")) == 30 + 20 + 10 - 1
    assert len(lines("valid.de")) == 7
    assert len(lines("test.en")) == len(lines("test.de")) == 9
    assert not any("<seg" in ln for ln in lines("test.en") + lines("test.de"))
    assert "kept 59 pairs, dropped 1" in out
    assert (out_dir / "bin" / "test.en-de.de.bin").exists()


# -- the pipeline runner the recipe tests use: a slow pipeline is waited for, a silent one is ended ----


def test_pipeline_runner_waits_for_a_slow_pipeline_that_keeps_printing(tmp_path):
    log = str(tmp_path / "slow.log")
    # 3 s in all, longer than the stall limit, but never silent for more than 0.05 s (a 40x margin)
    proc = cli.run_pipeline(["bash", "-c", "for i in $(seq 60); do echo line $i; sleep 0.05; done"], log)
    rc, out = cli.finish_pipeline(proc, log, stall_timeout=2)
    assert rc == 0 and out.splitlines() == [f"line {i}" for i in range(1, 61)], out[-500:]


def test_pipeline_runner_ends_a_silent_pipeline_with_its_children(tmp_path):
    log = str(tmp_path / "hung.log")
    # bash waits on a silent child: the child must go too, or it would outlive the test
    proc = cli.run_pipeline(["bash", "-c", "echo started; sleep 30; echo finished"], log)
    try:
        rc, out = cli.finish_pipeline(proc, log, stall_timeout=1)
        assert rc < 0 and out.startswith("started\n") and "finished" not in out
        assert "no output for 1 s: killed as hung" in out
        for _ in range(100):  # a killed child is gone at once; 10 s (well below its 30 s) only catch a survivor
            try:
                os.killpg(proc.pid, 0)  # signal 0: is anyone of the process group still there?
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the silent pipeline's child survived it")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever this test started, if something survived
        except ProcessLookupError:
            pass
