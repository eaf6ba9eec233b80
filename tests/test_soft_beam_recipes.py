"""The soft beam search recipes, run as a user would, in smoke mode on tiny data made here.

* recipes/conll2003 NER: the cross-entropy baseline, the self-normalized model, soft beam search
  with local normalization warm-started from the baseline and with global normalization
  warm-started from the self-normalized model; decoded greedy, hard beam 3, soft beam 3 and hard
  beam 3 on raw scores; span F1; log Z of every model;
* recipes/conll2003 on the POS column (prepare.sh --tag-column 1): a non-chunk label set, so tag
  accuracy only, the uniform Hamming cost, the hinge objective;
* recipes/ccgbank on fake CCGbank AUTO files: the converter, the supertagger, beam 5;
* recipes/iwslt14_de_en: the attentional LSTM initialisers and the locally / globally normalized
  soft beam fine-tunes, decoded with --task search_aware_translation.

Every decoding must give every sentence exactly one hypothesis (the recipes check it, and so do
the tests).  The four pipelines run side by side, one thread each.
"""
import os
import random
import re
import subprocess
import sys

import pytest

from fairseq_ext.testing import cli
from fairseq_ext.testing.synthetic_tagging import write_conll_splits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "recipes")
SIZES = {"train": 120, "valid": 11, "test": 13}  # odd sizes: a dropped sentence would show
CCG_SENTENCES = {"train": 4, "valid": 7, "test": 9}  # per section file (20 train sections: 80 sentences)
MT_SIZES = {"train": 90, "valid": 7, "test": 13}

NER_METHODS = ("selfnorm", "sb_direct_annealed", "sb_global_direct_annealed")
NER_DECODES = ("greedy", "beam3", "softbeam3", "beam3raw")
POS_METHODS = ("sb_hinge_fixed",)
POS_DECODES = ("greedy", "beam3", "softbeam3")
CCG_METHODS = ("sb_direct_annealed",)
CCG_DECODES = ("greedy", "beam5", "softbeam5", "beam5raw")
MT_METHODS = ("lstm_ce", "selfnorm", "sb_local", "sb_global")
MT_DECODES = {"baseline": ("beam5", "greedy"), "lstm_ce": ("greedy", "beam3", "softbeam3", "beam3raw"),
              "selfnorm": ("greedy", "beam3", "softbeam3", "beam3raw"), "sb_local": ("greedy", "beam3", "softbeam3", "beam3raw"),
              "sb_global": ("greedy", "beam3", "softbeam3")}  # fmt: skip

F1_LINE = re.compile(r"^F1 (\w+)/(valid|test)/(\w+) = (\d+\.\d+) ", re.M)
ACC_LINE = re.compile(r"^ACC (\w+)/(valid|test)/(\w+) = (\d+\.\d+) ", re.M)
BLEU_LINE = re.compile(r"^BLEU (\w+)/(\w+) = (\d+\.\d+) .*signature nrefs:1", re.M)
LOGZ_LINE = re.compile(r"^LOGZ (\w+)/(train|valid) mean = (-?[0-9.]+) var = ([0-9.]+)", re.M)


def env(**extra):
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", DEVICE="cpu", PYTHON=sys.executable)
    e.pop("SMOKE", None)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e.update(extra)
    return e


def bash(*args, **extra):
    # the timeout only catches a hang (see cli.HANG_TIMEOUT), never a slow machine
    proc = subprocess.run(["bash", *args], capture_output=True, text=True, env=env(**extra), timeout=cli.HANG_TIMEOUT)
    return proc.returncode, proc.stdout + proc.stderr


def script(recipe, name):
    return os.path.join(RECIPES, recipe, name)


# -- fake CCGbank -------------------------------------------------------------------------------
CATEGORIES = ["N/N", "N", "NP", "(S[dcl]\\NP)/NP", "S[dcl]\\NP", "NP[nb]/N", ",", "."]


def auto_line(words, cats):
    """A derivation line in CCGbank's AUTO format (a right-branching tree over the leaves)."""
    leaves = [f"(<L {c} NN NN {w} {c}_1>)" for w, c in zip(words, cats)]
    tree = leaves[-1]
    for leaf in reversed(leaves[:-1]):
        tree = f"(<T S 0 2> {leaf} {tree} )"
    return tree


def write_ccgbank(root, seed=3):
    """root/data/AUTO/<NN>/wsj_<NN>01.auto for sections 00 and 02-21 and 23; returns the sentences of 23."""
    rng = random.Random(seed)
    sections = {"00": CCG_SENTENCES["valid"], "23": CCG_SENTENCES["test"]}
    sections.update({f"{s:02d}": CCG_SENTENCES["train"] for s in range(2, 22)})
    test = []
    for sec, n in sections.items():
        d = os.path.join(root, "data", "AUTO", sec)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"wsj_{sec}01.auto"), "w") as f:
            for i in range(n):
                length = rng.randint(2, 8)
                words = [f"w{rng.randrange(15)}" for _ in range(length)]
                cats = [CATEGORIES[int(w[1:]) % len(CATEGORIES)] for w in words]
                f.write(f"ID=wsj_{sec}01.{i + 1} PARSER=GOLD NUMPARSE=1\n{auto_line(words, cats)}\n")
                if sec == "23":
                    test.append((words, cats))
    return test


def write_mt(directory):
    en = "a man woman dog cat child runs sits plays with the ball in park".split()
    de = "ein Mann Frau Hund Katze Kind läuft sitzt spielt mit dem Ball im Park".split()
    to_de = dict(zip(en, de))
    os.makedirs(directory, exist_ok=True)
    for k, (split, n) in enumerate(MT_SIZES.items()):
        rng = random.Random(50 + k)
        pairs = []
        for _ in range(n):
            words = [rng.choice(en) for _ in range(rng.randint(3, 7))]
            pairs.append((" ".join(words).capitalize() + ".", " ".join(to_de[w] for w in words).capitalize() + "."))
        for lang, col in (("en", 0), ("de", 1)):
            with open(os.path.join(directory, f"{split}.{lang}"), "w", encoding="utf-8") as f:
                f.write("".join(p[col] + "\n" for p in pairs))


# test -> the pipeline it reads (only the pipelines of the selected tests run)
NEEDS = {"test_ner_soft_beam_pipeline": "ner", "test_pos_column_reports_tag_accuracy_only": "pos",
         "test_ccgbank_prepare_and_pipeline": "ccg", "test_iwslt14_soft_beam_pipeline": "mt",
         "test_warm_start_needs_its_initialiser_and_unknown_methods_fail": "ner",
         "test_rerun_resumes_instead_of_restarting_from_the_initialiser": "ner"}  # fmt: skip


@pytest.fixture(scope="module")
def pipelines(request, tmp_path_factory):
    """Runs the smoke pipelines the selected tests need, concurrently; returns their exit codes,
    output and directories."""
    wanted = {NEEDS[item.originalname] for item in request.session.items if item.originalname in NEEDS}
    root = tmp_path_factory.mktemp("soft_beam_recipes")
    conll_raw = str(root / "conll_raw")
    write_conll_splits(conll_raw, SIZES, scheme="bio", seed=5)
    ccg_test = write_ccgbank(str(root / "ccgbank_release"))
    write_mt(str(root / "mt_raw"))
    d = {name: {k: str(root / name / k) for k in ("data", "exp")} for name in ("ner", "pos", "ccg", "mt")}
    conll = lambda name, prep, methods, extra="": (  # noqa: E731
        f"bash {script('conll2003', 'prepare.sh')} {conll_raw} {d[name]['data']} {prep}"
        f" && {extra} bash {script('conll2003', 'run.sh')} {d[name]['data']} {d[name]['exp']} --smoke"
        f" --methods {','.join(methods)}"
    )
    cmds = {
        "ner": conll("ner", "", NER_METHODS, "TAG_SPLITS=test"),
        "pos": conll("pos", "--tag-column 1", POS_METHODS, f"TAG_DECODES='{' '.join(POS_DECODES)}'"),
        "ccg": f"bash {script('ccgbank', 'prepare.sh')} {root / 'ccgbank_release'} {d['ccg']['data']}"
               f" && TAG_SPLITS=test bash {script('ccgbank', 'run.sh')} {d['ccg']['data']} {d['ccg']['exp']} --smoke"
               f" --methods {','.join(CCG_METHODS)}",
        "mt": f"bash {script('iwslt14_de_en', 'prepare.sh')} {d['mt']['data']} --local {root / 'mt_raw'} --smoke"
              f" && bash {script('iwslt14_de_en', 'run.sh')} {d['mt']['data']} {d['mt']['exp']} --smoke"
              f" --methods {','.join(MT_METHODS)}",
    }  # fmt: skip
    procs = {}
    for name, cmd in cmds.items():
        if name not in wanted:
            continue
        log = str(root / f"{name}.log")
        procs[name] = (cli.run_pipeline(["bash", "-c", cmd], log, env=env()), log)
    results = {}
    for name, (proc, log) in procs.items():
        rc, out = cli.finish_pipeline(proc, log)  # fails only when a pipeline stops printing (a hang)
        results[name] = dict(rc=rc, out=out, **d[name])
    results["ccg_test"] = ccg_test
    results["root"] = root
    return results


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def check_tagging_pipeline(r, methods, decodes, splits, line_re):
    assert r["rc"] == 0, r["out"][-5000:]
    out, exp, data = r["out"], r["exp"], r["data"]
    for stage in (1, 2, 3, 4):
        assert f"stage {stage}:" in out
    models = ("baseline",) + methods
    results = read(os.path.join(exp, "results.txt"))
    found = {m.groups()[:3] for m in line_re.finditer(results)}
    assert found == {(m, s, dec) for m in models for s in splits for dec in decodes}, results
    for split in splits:
        with open(os.path.join(data, "raw", f"{split}.words")) as f:
            lengths = [len(line.split()) for line in f]
        n = len(lengths)
        assert out.count(f"hypotheses: {n} / {n} test sentences") >= len(models) * len(decodes)
        for model in models:
            for decode in decodes:
                with open(os.path.join(exp, model, f"{split}.{decode}.hyp")) as f:
                    assert [len(line.split()) for line in f] == lengths, (model, decode)  # one label per word
                cmd = read(os.path.join(exp, model, f"{split}.{decode}.cmd"))
                assert "--required-batch-size-multiple 1 " in cmd
                assert ("--soft-beam-decoding " in cmd) == decode.startswith("softbeam"), cmd
                k = re.sub(r"\D", "", decode) or "1"
                assert f"--beam {k} " in cmd
    return out, exp


def check_soft_beam_training(exp, method, init, normalization, objective):
    cmd = read(os.path.join(exp, method, "train.cmd"))
    assert "--criterion soft_beam_loss " in cmd
    assert f"--restore-file {exp}/{init}/checkpoint_last.pt " in cmd
    for flag in ("--reset-optimizer", "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler"):
        assert flag in cmd
    assert f"--soft-beam-normalization {normalization} " in cmd and f"--soft-beam-objective {objective} " in cmd
    assert "--label-smoothing" not in cmd
    epoch = [ln for ln in read(os.path.join(exp, method, "train.log")).splitlines() if "| train | epoch 001" in ln]
    assert epoch and re.search(r"sb_alpha [0-9.]+", epoch[-1]), epoch
    return cmd


@pytest.mark.slow
def test_ner_soft_beam_pipeline(pipelines):
    r = pipelines["ner"]
    out, exp = check_tagging_pipeline(r, NER_METHODS, NER_DECODES, ("test",), F1_LINE)
    local = check_soft_beam_training(exp, "sb_direct_annealed", "baseline", "local", "direct")
    # NER: a wrong O costs twice (Goyal, Characterizing and Overcoming the Limitations of Neural
    # Autoregressive Models, PhD thesis, section 4.5.1)
    assert "--soft-beam-cost-weights O:2 " in local
    assert "--soft-beam-alpha-schedule exponential " in local and "--soft-beam-size 3 " in local
    check_soft_beam_training(exp, "sb_global_direct_annealed", "selfnorm", "global", "direct")
    assert "--criterion self_normalized_cross_entropy " in read(os.path.join(exp, "selfnorm", "train.cmd"))
    # the globally normalized model searches its raw scores; the others only in beam3raw
    for model in ("baseline",) + NER_METHODS:
        raw = "--search-scores raw" in read(os.path.join(exp, model, "test.beam3.cmd"))
        assert raw == (model == "sb_global_direct_annealed"), model
        assert "--search-scores raw" in read(os.path.join(exp, model, "test.beam3raw.cmd"))
    logz = {(m.group(1), m.group(2)) for m in LOGZ_LINE.finditer(read(os.path.join(exp, "logz.txt")))}
    assert logz == {(m, s) for m in ("baseline",) + NER_METHODS for s in ("train", "valid")}


@pytest.mark.slow
def test_pos_column_reports_tag_accuracy_only(pipelines):
    r = pipelines["pos"]
    out, exp = check_tagging_pipeline(r, POS_METHODS, POS_DECODES, ("valid", "test"), ACC_LINE)
    assert not F1_LINE.search(read(os.path.join(exp, "results.txt")))
    assert "stage 4: tag accuracy" in out
    cmd = check_soft_beam_training(exp, "sb_hinge_fixed", "baseline", "local", "hinge")
    assert "--soft-beam-cost-weights" not in cmd  # no O label: the uniform Hamming cost
    assert "--scoring tag_accuracy " in read(os.path.join(exp, "baseline", "test.greedy.cmd"))


@pytest.mark.slow
def test_ccgbank_prepare_and_pipeline(pipelines):
    r = pipelines["ccg"]
    out, exp = check_tagging_pipeline(r, CCG_METHODS, CCG_DECODES, ("test",), ACC_LINE)
    words = [" ".join(w) for w, _ in pipelines["ccg_test"]]
    tags = [" ".join(c) for _, c in pipelines["ccg_test"]]
    assert read(os.path.join(r["data"], "raw", "test.words")).splitlines() == words
    assert read(os.path.join(r["data"], "raw", "test.tags")).splitlines() == tags
    assert len(read(os.path.join(r["data"], "raw", "train.words")).splitlines()) == 20 * CCG_SENTENCES["train"]
    cmd = check_soft_beam_training(exp, "sb_direct_annealed", "baseline", "local", "direct")
    assert "--soft-beam-size 5 " in cmd and "--soft-beam-cost-weights" not in cmd
    assert "--arch seq2seq_tagger_supertag " in read(os.path.join(exp, "baseline", "train.cmd"))


def test_ccgbank_prepare_names_a_missing_copy(tmp_path):
    rc, out = bash(script("ccgbank", "prepare.sh"), str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert rc != 0 and f"CCGbank directory not found: {tmp_path / 'nowhere'}" in out and "LDC" in out
    (tmp_path / "empty").mkdir()
    rc, out = bash(script("ccgbank", "prepare.sh"), str(tmp_path / "empty"), str(tmp_path / "out"))
    assert rc != 0 and f"no CCGbank AUTO sections under {tmp_path / 'empty'}" in out and "data/AUTO" in out
    write_ccgbank(str(tmp_path / "partial"))
    for name in os.listdir(tmp_path / "partial" / "data" / "AUTO" / "23"):
        os.remove(tmp_path / "partial" / "data" / "AUTO" / "23" / name)
    rc, out = bash(script("ccgbank", "prepare.sh"), str(tmp_path / "partial"), str(tmp_path / "out"))
    assert rc != 0 and "missing CCGbank section 23 (test)" in out, out
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_iwslt14_soft_beam_pipeline(pipelines):
    r = pipelines["mt"]
    assert r["rc"] == 0, r["out"][-5000:]
    out, exp = r["out"], r["exp"]
    results = read(os.path.join(exp, "results.txt"))
    found = {(m.group(1), m.group(2)) for m in BLEU_LINE.finditer(results)}
    assert found == {(m, dec) for m, decs in MT_DECODES.items() for dec in decs}, results
    n = MT_SIZES["test"]
    assert out.count(f"hypotheses: {n} / {n} test sentences") == sum(len(v) for v in MT_DECODES.values())
    for model, decodes in MT_DECODES.items():
        for decode in decodes:
            hyps = read(os.path.join(exp, model, f"test.{decode}.hyp")).splitlines()
            assert len(hyps) == n
            cmd = read(os.path.join(exp, model, f"test.{decode}.cmd"))
            assert ("--task search_aware_translation" in cmd) == (model != "baseline")
            assert ("--soft-beam-decoding " in cmd) == decode.startswith("softbeam")
            assert ("--search-scores raw" in cmd) == (decode.endswith("raw") or (model == "sb_global" and decode != "greedy"))
    for model in ("lstm_ce", "selfnorm", "sb_local", "sb_global"):
        assert "--arch lstm " in read(os.path.join(exp, model, "train.cmd"))
    for method, init, norm in (("sb_local", "lstm_ce", "local"), ("sb_global", "selfnorm", "global")):
        cmd = check_soft_beam_training(exp, method, init, norm, "direct")
        assert "--soft-beam-length free " in cmd


@pytest.mark.slow
def test_warm_start_needs_its_initialiser_and_unknown_methods_fail(pipelines, tmp_path):
    r = pipelines["ner"]
    assert r["rc"] == 0
    rc, out = bash(script("conll2003", "run.sh"), r["data"], str(tmp_path / "exp"), "--stage", "2", "--stop-stage", "2",
                   "--methods", "sb_global_direct_annealed", "--smoke")  # fmt: skip
    assert rc != 0 and f"warm-started from {tmp_path / 'exp'}/selfnorm/checkpoint_last.pt, which does not exist" in out
    assert "--methods selfnorm,sb_global_direct_annealed" in out
    rc, out = bash(script("conll2003", "run.sh"), r["data"], str(tmp_path / "exp"), "--methods", "sb_direct_sometimes",
                   "--smoke")  # fmt: skip
    assert rc != 0 and "unknown method 'sb_direct_sometimes'" in out and "sb_hinge_annealed" in out


@pytest.mark.slow
def test_rerun_resumes_instead_of_restarting_from_the_initialiser(pipelines):
    r = pipelines["ner"]
    assert r["rc"] == 0
    rc, out = bash(script("conll2003", "run.sh"), r["data"], r["exp"], "--stage", "2", "--stop-stage", "2",
                   "--methods", "sb_direct_annealed", "--smoke")  # fmt: skip
    assert rc == 0, out[-3000:]
    cmd = read(os.path.join(r["exp"], "sb_direct_annealed", "train.cmd"))
    assert "--restore-file" not in cmd and "--criterion soft_beam_loss " in cmd
