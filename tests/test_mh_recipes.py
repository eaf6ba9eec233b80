"""The CMLM / Metropolis-Hastings block of the translation recipes (recipes/common/mh.sh), run as a
user would, in smoke mode on tiny fake data.

* the decoding names and their fairseq-generate flags, the `--methods mh` alias and the refusals
  (no pipeline: the shell functions called directly);
* multi30k: prepare.sh, then run.sh --methods mh: the autoregressive baseline, its distillation of the
  training set, fairseq's cmlm_transformer on raw and distilled data (--task translation_lev --noise
  random_mask --criterion nat_loss), the warm start and mask-predict (fairseq's iterative refinement
  generator), sacreBLEU with every test sentence accounted for;
* multi30k, stages 3-4 again with the sampler decodings (degenerate Gibbs, MH with E_local / E_raw:
  plain, block, annealed; --task translation_mh): one hypothesis per sentence, a stats file per
  decoding and its `MH ...` summary line.  This test needs fairseq_ext/tasks/translation_mh.py (the
  Metropolis-Hastings generator) and fails until it is there;
* wmt14_en_de in the de->en direction from fake release archives (file:// URLs), and wmt16_en_ro
  ro->en, each with run.sh --methods cmlm_raw (warm start and mask-predict).
Nothing here reads shared data sets or writes inside the repository.
"""
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "recipes")
sys.path.insert(0, os.path.join(RECIPES, "common"))

import nar_tools  # noqa: E402
import sentencepiece  # noqa: E402,F401  (scripts/install.sh installs it: a missing one must fail, not skip)

from fairseq_ext.testing import cli  # noqa: E402

import test_flowseq_recipes as fr  # noqa: E402  (the fake corpora of the FlowSeq recipe tests)

N_TRAIN, N_VALID, N_TEST = fr.N_TRAIN, fr.N_VALID, fr.N_TEST
CMLM_MODELS = ("cmlm_raw", "cmlm_kd")
# what the fairseq generators of today decode (no translation_mh needed)
LEV_DECODES = ("warm", "maskpredict")
# the samplers of the Metropolis-Hastings generator (--task translation_mh)
SAMPLER_DECODES = ("gibbs", "gibbs_t08", "mh_local", "mh_raw", "mh_local_block", "mh_raw_block",
                   "mh_local_anneal02_t08", "mh_raw_anneal02_t08")  # fmt: skip
BLEU_LINE = re.compile(r"^BLEU (\w+)/(\w+) = (\d+\.\d+) .*signature nrefs:1\|case:mixed", re.M)
MH_LINE = re.compile(r"^MH (\w+)/(\w+): acceptance (\S+) novel (\S+) E_local (\S+) E_raw (\S+) ", re.M)


def env(**extra):
    e = fr.env(**extra)
    for k in [k for k in e if k.startswith("MH_") or k.startswith("CMLM_")]:
        if k not in extra:
            e.pop(k)
    return e


def bash(*args, **extra_env):
    proc = subprocess.run(["bash", *args], capture_output=True, text=True, env=env(**extra_env),
                          timeout=cli.HANG_TIMEOUT)  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def has_translation_mh():
    return os.path.exists(os.path.join(REPO, "fairseq_ext", "tasks", "translation_mh.py"))


# -- the decoding names, without a pipeline ----------------------------------------------------

SHELL = r"""
set -euo pipefail
source "$R/common/lib.sh"; source "$R/common/stages.sh"
DATA_DIR=/nonexistent EXP_DIR=/tmp/exp_dir SMOKE=${SMOKE:-0} ONLY_METHODS=${ONLY:-}
CMLM_MODEL=(--arch cmlm_transformer); CMLM_REG=(); CMLM_OPTIM=(); CMLM_BATCH=(); CMLM_LENGTH=(--max-epoch 1)
source "$R/common/flowseq.sh"; flowseq_setup
source "$R/common/mh.sh"; mh_setup
echo "ONLY=$ONLY_METHODS"
echo "DECODES=${DECODES_cmlm_raw[*]}"
echo "TRAIN=${FLAGS_cmlm_raw[*]} | ${MODEL_cmlm_raw[*]} | ${METHOD_DATA[cmlm_raw]} | ${METHOD_DATA[cmlm_kd]}"
for d in "$@"; do echo "FLAGS $d: $(decode_flags "$d" cmlm_raw)"; done
"""


def shell(*decodes, **extra_env):
    extra_env.setdefault("R", RECIPES)
    proc = subprocess.run(["bash", "-c", SHELL, "shell", *decodes], capture_output=True, text=True,
                          env=env(**extra_env), timeout=120)  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def flags_of(out, decode):
    m = re.search(rf"^FLAGS {decode}: (.*)$", out, re.M)
    assert m, out
    return m.group(1).split()


def value(flags, name):
    assert name in flags, (name, flags)
    return flags[flags.index(name) + 1]


def test_decode_names_and_flags():
    rc, out = shell(*LEV_DECODES, *SAMPLER_DECODES, "gibbs_block", "mh_raw_t20_p95", "mh_local_anneal06",
                    ONLY="flowseq,mh,baseline", MH_CHAINS="3", MH_BURN_IN="7", MH_EPOCHS="26", MH_BLOCK_SIZE="4")  # fmt: skip
    assert rc == 0, out
    # `mh` expands to the block; distill (in both blocks) once
    assert "ONLY=distill,flowseq_raw,flowseq_kd,nat_raw,nat_kd,cmlm_raw,cmlm_kd,baseline" in out
    assert "DECODES=" + " ".join(LEV_DECODES + SAMPLER_DECODES) in out
    train = re.search(r"^TRAIN=(.*)$", out, re.M).group(1)
    assert "--task translation_lev --criterion nat_loss --noise random_mask " in train
    assert "--arch cmlm_transformer --encoder-learned-pos --decoder-learned-pos --pred-length-offset" in train
    assert train.endswith("| /nonexistent/bin | /tmp/exp_dir/distill")
    warm = flags_of(out, "warm")
    assert value(warm, "--task") == "translation_lev" and value(warm, "--iter-decode-max-iter") == "0"
    mp = flags_of(out, "maskpredict")
    assert value(mp, "--task") == "translation_lev" and value(mp, "--iter-decode-max-iter") == "9"
    assert value(mp, "--iter-decode-with-beam") == "1" and "--iter-decode-force-max-iter" in mp
    for d in SAMPLER_DECODES + ("gibbs_block", "mh_raw_t20_p95", "mh_local_anneal06"):
        f = flags_of(out, d)
        assert value(f, "--task") == "translation_mh"
        assert value(f, "--mh-chains") == "3" and value(f, "--mh-burn-in-epochs") == "7"
        assert value(f, "--mh-sample-epochs") == "26"
        assert value(f, "--mh-stats-path") == f"/tmp/exp_dir/cmlm_raw/test.{d}.stats.jsonl"
        assert value(f, "--mh-sampler") == ("gibbs" if d.startswith("gibbs") else "mh")
        if d.startswith("mh_"):
            assert value(f, "--mh-energy") == d.split("_")[1]
        assert value(f, "--mh-block-size") == ("4" if "_block" in d else "1")
        assert ("--mh-block-anneal" in f) == ("_block" in d)
        if "anneal" in d:
            assert value(f, "--mh-target-temperature") == "1.0"
            assert value(f, "--mh-target-temperature-step") == "0." + re.search(r"anneal(\d\d)", d).group(1)
            assert value(f, "--mh-forced-accept-epochs") == "2" and value(f, "--mh-output") == "best"
        else:
            assert "--mh-target-temperature-step" not in f and value(f, "--mh-output") == "final"
    assert value(flags_of(out, "gibbs_t08"), "--mh-proposal-temperature") == "0.8"
    assert "--mh-proposal-temperature" not in flags_of(out, "gibbs")
    assert value(flags_of(out, "mh_raw_t20_p95"), "--mh-proposal-temperature") == "2.0"
    assert value(flags_of(out, "mh_raw_t20_p95"), "--mh-top-p") == "0.95"


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(MH_DECODES="warm gibbs_anneal02"), "MH_DECODES: unknown decoding 'gibbs_anneal02'"),
        (dict(MH_DECODES="mh_norm"), "MH_DECODES: unknown decoding 'mh_norm'"),
        (dict(MH_DECODES="mh_raw_t00"), "MH_DECODES: unknown decoding 'mh_raw_t00'"),
        (dict(MH_CHAINS="0"), "MH_CHAINS must be a positive integer"),
        (dict(MH_EPOCHS="x"), "MH_EPOCHS must be an integer >= 0"),
        (dict(MH_ORDER="sideways"), "MH_ORDER must be random or left_to_right"),
        (dict(MH_OUTPUT="samples"), "MH_OUTPUT must be final or best"),
    ],
)
def test_bad_settings_are_refused(extra, message):
    rc, out = shell(**extra)
    assert rc != 0 and message in out, out


# -- multi30k: training and the decodings of fairseq's own generators ---------------------------


@pytest.fixture(scope="module")
def multi30k(tmp_path_factory):
    """prepare.sh + run.sh --methods mh --smoke on fake Multi30k, decoding warm start and mask-predict."""
    root = tmp_path_factory.mktemp("mh_multi30k")
    raw, data, exp = (str(root / d) for d in ("raw", "data", "exp"))
    fr.make_multi30k(raw)
    rc, out = bash(fr.script("multi30k", "prepare.sh"), raw, data, "--smoke")
    assert rc == 0, out[-3000:]
    log = str(root / "run.log")
    cmd = ["bash", fr.script("multi30k", "run.sh"), data, exp, "--methods", "mh", "--smoke"]
    proc = cli.run_pipeline(cmd, log, env(MH_DECODES=" ".join(LEV_DECODES)))
    rc, out = cli.finish_pipeline(proc, log)
    return dict(rc=rc, out=out, data=data, exp=exp, root=str(root))


@pytest.mark.slow
def test_multi30k_cmlm_training_and_mask_predict(multi30k):
    r = multi30k
    assert r["rc"] == 0, r["out"][-5000:]
    out, exp, data = r["out"], r["exp"], r["data"]
    for stage in (1, 2, 3, 4):
        assert f"stage {stage}:" in out
    assert f"distilled: {N_TRAIN} / {N_TRAIN} training sentences got a teacher hypothesis" in out
    for model in CMLM_MODELS:
        cmd = read(os.path.join(exp, model, "train.cmd"))
        want = os.path.join(exp, "distill") if model == "cmlm_kd" else os.path.join(data, "bin")
        assert cmd.split()[1] == want, cmd
        for flag in ("--task translation_lev ", "--criterion nat_loss ", "--noise random_mask ",
                     "--arch cmlm_transformer ", "--pred-length-offset ", "--apply-bert-init "):  # fmt: skip
            assert flag in cmd, (flag, cmd)
        assert os.path.getsize(os.path.join(exp, model, "checkpoint_last.pt")) > 0
    # every test sentence has one hypothesis in every decoding (the recipes' check), and a BLEU line
    expected = {("baseline", "beam5"), ("baseline", "greedy")} | {(m, d) for m in CMLM_MODELS for d in LEV_DECODES}
    found = {(m.group(1), m.group(2)) for m in BLEU_LINE.finditer(out)}
    assert found == expected, sorted(found)
    assert out.count(f"hypotheses: {N_TEST} / {N_TEST} test sentences") == len(expected)
    for model in CMLM_MODELS:
        for decode in LEV_DECODES:
            hyps = read(os.path.join(exp, model, f"test.{decode}.hyp")).splitlines()
            assert len(hyps) == N_TEST and not any("\u2581" in h for h in hyps)
            cmd = read(os.path.join(exp, model, f"test.{decode}.cmd"))
            assert "--task translation_lev " in cmd and "--required-batch-size-multiple 1 " in cmd
            assert f"--path {exp}/{model}/checkpoint_last.pt " in cmd
        assert "--iter-decode-max-iter 9 --iter-decode-force-max-iter --iter-decode-with-beam 1 " in read(
            os.path.join(exp, model, "test.maskpredict.cmd"))
    assert len(BLEU_LINE.findall(read(os.path.join(exp, "results.txt")))) == len(expected)
    assert "MH " not in read(os.path.join(exp, "results.txt")), "no sampler ran: no chain statistics"


@pytest.mark.slow
def test_kd_model_without_distillation_names_the_step(multi30k, tmp_path):
    r = multi30k
    assert r["rc"] == 0
    exp = tmp_path / "exp"
    shutil.copytree(os.path.join(r["exp"], "baseline"), exp / "baseline")
    rc, out = bash(fr.script("multi30k", "run.sh"), r["data"], str(exp), "--stage", "2", "--stop-stage", "2",
                   "--methods", "cmlm_kd", "--smoke")  # fmt: skip
    assert rc != 0 and f"no binarised training data for cmlm_kd: {exp}/distill" in out and "--methods distill" in out


@pytest.mark.slow
def test_multi30k_sampler_decodings(multi30k):
    """Stages 3-4 with every sampler decoding: needs the Metropolis-Hastings generator
    (fairseq_ext/tasks/translation_mh.py); fails until it exists."""
    r = multi30k
    assert r["rc"] == 0
    assert has_translation_mh(), "fairseq_ext/tasks/translation_mh.py (--task translation_mh) is not there yet"
    exp = r["exp"]
    rc, out = bash(fr.script("multi30k", "run.sh"), r["data"], exp, "--stage", "3", "--methods", "cmlm_raw",
                   "--smoke", MH_DECODES=" ".join(LEV_DECODES + SAMPLER_DECODES))  # fmt: skip
    assert rc == 0, out[-5000:]
    expected = {("baseline", "beam5"), ("baseline", "greedy")} | {("cmlm_raw", d) for d in LEV_DECODES + SAMPLER_DECODES}
    assert {(m.group(1), m.group(2)) for m in BLEU_LINE.finditer(out)} == expected
    assert out.count(f"hypotheses: {N_TEST} / {N_TEST} test sentences") == len(expected)
    mh_lines = {m.group(2): m for m in MH_LINE.finditer(out) if m.group(1) == "cmlm_raw"}
    assert set(mh_lines) == set(SAMPLER_DECODES), sorted(mh_lines)
    results = read(os.path.join(exp, "results.txt"))
    assert len(MH_LINE.findall(results)) == len(SAMPLER_DECODES)
    for d in SAMPLER_DECODES:
        stats = os.path.join(exp, "cmlm_raw", f"test.{d}.stats.jsonl")
        records = nar_tools.read_mh_stats(stats)
        # smoke: 1 burn-in + 1 sample epoch after the warm start (epoch 0)
        assert {rec["epoch"] for rec in records} == {0, 1, 2}, d
        assert {rec["phase"] for rec in records} == {"warm_start", "burn_in", "sample"}, d
        # every epoch counts the same chains (none lost between epochs)
        per_epoch = nar_tools.mh_per_epoch(records)
        assert len({chains for _e, _p, chains, _m in per_epoch}) == 1, (d, per_epoch)
        m = mh_lines[d]
        acc, novel = float(m.group(3)), float(m.group(4))
        assert 0.0 <= novel <= acc <= 1.0, m.group(0)
        if d.startswith("gibbs"):
            assert acc == 1.0, m.group(0)  # Gibbs accepts every proposal by design
        hyps = read(os.path.join(exp, "cmlm_raw", f"test.{d}.hyp")).splitlines()
        assert len(hyps) == N_TEST
        cmd = read(os.path.join(exp, "cmlm_raw", f"test.{d}.cmd"))
        assert "--task translation_mh " in cmd and f"--mh-stats-path {stats}" in cmd


# -- WMT'14 de->en and WMT'16 ro->en: the download paths, then the CMLM stages -----------------


def write_wmt14_mirror(base):
    """Archives shaped like statmt.org's WMT'14 ones; the test set has all four de-en files."""

    def tgz(rel_path, members):
        path = os.path.join(base, rel_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tarfile.open(path, "w:gz") as tar:
            for name, text in members.items():
                src = os.path.join(path + ".d", name)
                os.makedirs(os.path.dirname(src), exist_ok=True)
                with open(src, "w", encoding="utf-8") as f:
                    f.write(text)
                tar.add(src, arcname=name)

    def side(data, lang):
        return "".join((p[0] if lang == "en" else p[1]) + "\n" for p in data)

    def sgm(data, lang, kind):
        segs = "".join(f'<seg id="{i + 1}">{p[0] if lang == "en" else p[1]}</seg>\n' for i, p in enumerate(data))
        return f'<{kind}set setid="newstest2014" srclang="any">\n<doc sysid="ref" docid="1">\n{segs}</doc>\n</{kind}set>\n'

    ep, cc, nc, dev, test = fr.pairs(40, 60), fr.pairs(30, 61), fr.pairs(20, 62), fr.pairs(N_VALID, 63), fr.pairs(N_TEST, 64)
    tgz("wmt13/training-parallel-europarl-v7.tgz", {f"training/europarl-v7.de-en.{lg}": side(ep, lg) for lg in ("en", "de")})
    tgz("wmt13/training-parallel-commoncrawl.tgz", {f"commoncrawl.de-en.{lg}": side(cc, lg) for lg in ("en", "de")})
    tgz("wmt14/training-parallel-nc-v9.tgz", {f"training/news-commentary-v9.de-en.{lg}": side(nc, lg) for lg in ("en", "de")})
    tgz("wmt14/dev.tgz", {f"dev/newstest2013.{lg}": side(dev, lg) for lg in ("en", "de")})
    tgz("wmt14/test-full.tgz", {f"test-full/newstest2014-deen-{kind}.{lg}.sgm": sgm(test, lg, kind)
                                for kind in ("src", "ref") for lg in ("en", "de")})  # fmt: skip
    return 40 + 30 + 20, test


def check_cmlm_run(out, exp, n_test):
    expected = {("baseline", "beam5"), ("baseline", "greedy")} | {("cmlm_raw", d) for d in LEV_DECODES}
    assert {(m.group(1), m.group(2)) for m in BLEU_LINE.finditer(out)} == expected, out[-3000:]
    assert out.count(f"hypotheses: {n_test} / {n_test} test sentences") == len(expected)
    assert "--arch cmlm_transformer " in read(os.path.join(exp, "cmlm_raw", "train.cmd"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None and shutil.which("wget") is None, reason="needs curl or wget")
def test_wmt14_de_en_from_release_archives_and_cmlm(tmp_path):
    n_train, test = write_wmt14_mirror(str(tmp_path / "mirror"))
    url = dict(WMT14_BASE_URL="file://" + str(tmp_path / "mirror"))
    data = tmp_path / "data"
    rc, out = bash(fr.script("wmt14_en_de", "prepare.sh"), str(data), "--src", "de", "--tgt", "en", "--smoke", **url)
    assert rc == 0, out[-3000:]
    assert (data / "pair.env").read_text() == "SRC=de\nTGT=en\n"
    lines = lambda name: (data / "raw" / name).read_text(encoding="utf-8").splitlines()  # noqa: E731
    # the German source and the English reference of newstest2014, SGML stripped, in order
    assert lines("test.de") == [p[1] for p in test] and lines("test.en") == [p[0] for p in test]
    assert len(lines("train.de")) == len(lines("train.en")) == n_train
    assert (data / "bin" / "test.de-en.de.bin").exists()
    rc, out = bash(fr.script("wmt14_en_de", "prepare.sh"), str(tmp_path / "bad"), "--src", "de", "--tgt", "fr",
                   "--smoke", **url)  # fmt: skip
    assert rc != 0 and "en-de or de-en, got de-fr" in out
    exp = tmp_path / "exp"
    rc, out = bash(fr.script("wmt14_en_de", "run.sh"), str(data), str(exp), "--methods", "cmlm_raw", "--smoke",
                   MH_DECODES=" ".join(LEV_DECODES), NAR_MAX_LEN="0")  # fmt: skip
    assert rc == 0, out[-5000:]
    check_cmlm_run(out, str(exp), N_TEST)
    assert read(str(exp / "cmlm_raw" / "train.cmd")).split()[1] == str(data / "bin")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None and shutil.which("wget") is None, reason="needs curl or wget")
def test_wmt16_ro_en_from_release_archives_and_cmlm_with_length_filter(tmp_path):
    fr.write_wmt16_mirror(str(tmp_path / "mirror"))
    urls = dict(WMT16_BASE_URL="file://" + str(tmp_path / "mirror"),
                WMT16_SETIMES_URL="file://" + str(tmp_path / "mirror" / "en-ro.txt.zip"))  # fmt: skip
    data = tmp_path / "data"
    rc, out = bash(fr.script("wmt16_en_ro", "prepare.sh"), str(data), "--src", "ro", "--tgt", "en", "--smoke", **urls)
    assert rc == 0, out[-3000:]
    assert (data / "pair.env").read_text() == "SRC=ro\nTGT=en\n"
    exp = tmp_path / "exp"
    # the raw CMLM trains on the length-filtered training set that the distillation step writes (a
    # generous limit: the one-epoch teacher's distilled targets are long)
    rc, out = bash(fr.script("wmt16_en_ro", "run.sh"), str(data), str(exp), "--methods", "distill,cmlm_raw",
                   "--smoke", MH_DECODES=" ".join(LEV_DECODES), NAR_MAX_LEN="60")  # fmt: skip
    assert rc == 0, out[-5000:]
    kept = [tuple(map(int, m)) for m in re.findall(r"clean: kept (\d+) pairs, dropped (\d+)", out)]
    assert len(kept) == 2 and all(k > 0 for k, _ in kept), kept  # distilled, then raw
    check_cmlm_run(out, str(exp), N_TEST)
    assert read(str(exp / "cmlm_raw" / "train.cmd")).split()[1] == str(exp / "raw_max60")
