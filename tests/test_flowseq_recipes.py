"""The FlowSeq block of the translation recipes, run as a user would, in smoke mode on tiny fake data.

* multi30k: prepare.sh, then run.sh --methods flowseq: the autoregressive baseline (stage 1), the
  distillation of the training set by it (recipes/common/distill.sh), FlowSeq and fairseq's NAT on
  raw and distilled data (stage 2), argmax / IWD / NPD (teacher = the baseline) and the NAT's single
  parallel pass (stage 3), sacreBLEU (stage 4); every test sentence gets one hypothesis;
* distill.sh on its own: refuses an existing directory without --force, reuses a finished one with
  --reuse, and rebuilds it with --force;
* wmt16_en_ro: prepare.sh from fake release archives (file:// URLs; Romanian normalisation and
  diacritics removal), then run.sh with the length filter of the NAR training sets.
Nothing here reads shared data sets or writes inside the repository.
"""
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "recipes")
sys.path.insert(0, os.path.join(RECIPES, "common"))

import nar_tools  # noqa: E402
import sentencepiece  # noqa: E402,F401  (scripts/install.sh installs it: a missing one must fail, not skip)

from fairseq_ext.testing import cli  # noqa: E402

EN = "a man woman dog cat child runs sits plays with the ball in park on street red blue small big".split()
DE = "ein Mann Frau Hund Katze Kind läuft sitzt spielt mit dem Ball im Park auf Straße rot blau klein groß".split()
# Romanian with diacritics, some written with the legacy cedilla code points (\u015f, \u0163)
RO = ("un bărbat femeie câine pisică copil aleargă stă joacă cu cel mingea în parc pe stradă roşu albastru mic "
      "mare").split()  # fmt: skip
RO[RO.index("roşu")] = "ro\u015fu"
RO[RO.index("stă")] = "st\u0103\u0163i"
TO = {"de": dict(zip(EN, DE)), "ro": dict(zip(EN, RO))}
N_TRAIN, N_VALID, N_TEST = 90, 7, 13  # odd sizes: a batch rounding that drops sentences would show
FLOWSEQ_MODELS = ("flowseq_raw", "flowseq_kd")
NAT_MODELS = ("nat_raw", "nat_kd")
SMOKE_DECODES = ("argmax", "iwd4", "npd4")


def pairs(n, seed, tgt="de"):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(EN) for _ in range(rng.randint(3, 8))]
        out.append((" ".join(words).capitalize() + ".", " ".join(TO[tgt][w] for w in words).capitalize() + "."))
    return out


def write_side(path, data, col):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(p[col] + "\n" for p in data))


def make_multi30k(directory):
    os.makedirs(directory, exist_ok=True)
    for k, (name, n) in enumerate([("train", N_TRAIN), ("val", N_VALID), ("test_2016_flickr", N_TEST)]):
        data = pairs(n, seed=k)
        write_side(os.path.join(directory, f"{name}.en"), data, 0)
        write_side(os.path.join(directory, f"{name}.de"), data, 1)


def env(**extra):
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", DEVICE="cpu", PYTHON=sys.executable)
    for k in ("SMOKE", "DISTILL_FORCE", "NAR_MAX_LEN", "FLOWSEQ_DECODES", "FLOWSEQ_LENGTHS", "DISTILL_BEAM"):
        e.pop(k, None)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e.update(extra)
    return e


def bash(*args, **extra_env):
    # the timeout only catches a hang (see cli.HANG_TIMEOUT), never a slow machine
    proc = subprocess.run(["bash", *args], capture_output=True, text=True, env=env(**extra_env),
                          timeout=cli.HANG_TIMEOUT)  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def script(recipe, name):
    return os.path.join(RECIPES, recipe, name)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


BLEU_LINE = re.compile(r"^BLEU (\w+)/(\w+) = (\d+\.\d+) .*signature nrefs:1\|case:mixed", re.M)


@pytest.fixture(scope="module")
def multi30k(tmp_path_factory):
    """prepare.sh + run.sh --methods flowseq --smoke on fake Multi30k."""
    root = tmp_path_factory.mktemp("flowseq_multi30k")
    raw, data, exp = (str(root / d) for d in ("raw", "data", "exp"))
    make_multi30k(raw)
    rc, out = bash(script("multi30k", "prepare.sh"), raw, data, "--smoke")
    assert rc == 0, out[-3000:]
    log = str(root / "run.log")
    cmd = ["bash", script("multi30k", "run.sh"), data, exp, "--methods", "flowseq", "--smoke"]
    proc = cli.run_pipeline(cmd, log, env())
    rc, out = cli.finish_pipeline(proc, log)  # fails only when the pipeline stops printing (a hang)
    return dict(rc=rc, out=out, data=data, exp=exp)


@pytest.mark.slow
def test_multi30k_flowseq_pipeline(multi30k):
    r = multi30k
    assert r["rc"] == 0, r["out"][-5000:]
    out, exp, data = r["out"], r["exp"], r["data"]
    for stage in (1, 2, 3, 4):
        assert f"stage {stage}:" in out
    # distillation: every training sentence decoded by the baseline, same dictionaries, valid/test untouched
    assert f"distilled: {N_TRAIN} / {N_TRAIN} training sentences got a teacher hypothesis" in out
    kd = os.path.join(exp, "distill")
    for name in ("dict.en.txt", "dict.de.txt", "valid.en-de.de.bin", "test.en-de.en.idx", "test.en-de.de.bin"):
        with open(os.path.join(kd, name), "rb") as a, open(os.path.join(data, "bin", name), "rb") as b:
            assert a.read() == b.read(), name
    gen_cmd = read(os.path.join(kd, "distill", "train.generate.cmd"))
    assert "--gen-subset train " in gen_cmd and "--required-batch-size-multiple 1 " in gen_cmd
    assert f"--path {exp}/baseline/checkpoint_last.pt " in gen_cmd and "--beam 2 " in gen_cmd
    src = read(os.path.join(data, "spm", "train.en")).splitlines()
    kd_src = read(os.path.join(kd, "distill", "train.en")).splitlines()
    kd_tgt = read(os.path.join(kd, "distill", "train.de")).splitlines()
    assert kd_src == src, "the distilled corpus must keep the sources, in order"
    assert len(kd_tgt) == N_TRAIN and all(t.strip() for t in kd_tgt)
    assert kd_tgt != read(os.path.join(data, "spm", "train.de")).splitlines(), "targets were not replaced"
    from fairseq.data import data_utils

    assert len(data_utils.load_indexed_dataset(os.path.join(kd, "train.en-de.de"), None)) == N_TRAIN

    # training: FlowSeq and NAT, each on its data; the prior was initialised after the pre-training
    for model in FLOWSEQ_MODELS + NAT_MODELS:
        cmd = read(os.path.join(exp, model, "train.cmd"))
        want_data = kd if model.endswith("_kd") else os.path.join(data, "bin")
        assert cmd.split()[1] == want_data, cmd
        if model.startswith("flowseq"):
            assert "--task translation_flowseq " in cmd and "--criterion flowseq_loss " in cmd
            assert "--arch flowseq_tiny " in cmd and "--flowseq-init-updates 3 " in cmd
            assert "data-dependent init of the prior" in read(os.path.join(exp, model, "train.log"))
        else:
            assert "--task translation_lev " in cmd and "--criterion nat_loss " in cmd and "--noise full_mask " in cmd
            assert "--arch nonautoregressive_transformer " in cmd and "--pred-length-offset " in cmd

    # decoding: one hypothesis per test sentence in every decoding; the flags of each
    expected = {("baseline", "beam5"), ("baseline", "greedy")}
    expected |= {(m, d) for m in FLOWSEQ_MODELS for d in SMOKE_DECODES} | {(m, "nat") for m in NAT_MODELS}
    found = {(m.group(1), m.group(2)) for m in BLEU_LINE.finditer(out)}
    assert found == expected, sorted(found)
    assert out.count(f"hypotheses: {N_TEST} / {N_TEST} test sentences") == len(expected)
    for model, decode in expected:
        hyps = read(os.path.join(exp, model, f"test.{decode}.hyp")).splitlines()
        assert len(hyps) == N_TEST
        assert not any("\u2581" in h for h in hyps), "hypotheses were not sentencepiece-decoded"
        cmd = read(os.path.join(exp, model, f"test.{decode}.cmd"))
        assert "--required-batch-size-multiple 1 " in cmd and "--gen-subset test " in cmd
        if model.startswith("flowseq"):
            assert "--task translation_flowseq " in cmd
            assert f"--flowseq-decoding {decode[:3] if decode != 'argmax' else 'argmax'} " in cmd
            if decode == "npd4":
                assert f"--flowseq-teacher-path {exp}/baseline/checkpoint_last.pt" in cmd
                assert "--flowseq-length-candidates 2 --flowseq-samples 2 " in cmd
            if decode == "iwd4":
                assert "--flowseq-iwd-samples 2" in cmd
        if model.startswith("nat"):
            assert "--task translation_lev " in cmd and "--iter-decode-max-iter 0 " in cmd
    results = read(os.path.join(exp, "results.txt"))
    assert len(BLEU_LINE.findall(results)) == len(expected)


@pytest.mark.slow
def test_rerun_reuses_the_distillation_and_methods_select(multi30k):
    """A rerun of stage 2 reuses EXP_DIR/distill; --methods picks single models of the block."""
    r = multi30k
    assert r["rc"] == 0
    rc, out = bash(script("multi30k", "run.sh"), r["data"], r["exp"], "--stage", "2", "--stop-stage", "2",
                   "--methods", "distill", "--smoke")  # fmt: skip
    assert rc == 0, out[-3000:]
    assert "reusing the distilled data" in out and "decodes the" not in out
    rc, out = bash(script("multi30k", "run.sh"), r["data"], r["exp"], "--stage", "4", "--stop-stage", "4",
                   "--methods", "flowseq_kd,nat_raw", "--smoke")  # fmt: skip
    assert rc == 0, out[-3000:]
    assert {m.group(1) for m in BLEU_LINE.finditer(out)} == {"baseline", "flowseq_kd", "nat_raw"}
    rc, out = bash(script("multi30k", "run.sh"), r["data"], r["exp"], "--methods", "flowseq_argmax", "--smoke")
    assert rc != 0 and "--methods: unknown method 'flowseq_argmax'" in out and "flowseq_kd" in out
    rc, out = bash(script("multi30k", "run.sh"), r["data"], r["exp"], "--stage", "3", "--methods", "flowseq_raw",
                   "--smoke", FLOWSEQ_DECODES="argmax npd5")  # fmt: skip
    assert rc != 0 and "npd5" in out and "multiple of FLOWSEQ_LENGTHS=2" in out


@pytest.mark.slow
def test_kd_model_without_distillation_names_the_step(multi30k, tmp_path):
    r = multi30k
    assert r["rc"] == 0
    exp = tmp_path / "exp"
    shutil.copytree(os.path.join(r["exp"], "baseline"), exp / "baseline")
    rc, out = bash(script("multi30k", "run.sh"), r["data"], str(exp), "--stage", "2", "--stop-stage", "2",
                   "--methods", "flowseq_kd", "--smoke")  # fmt: skip
    assert rc != 0 and f"no binarised training data for flowseq_kd: {exp}/distill" in out and "--methods distill" in out


@pytest.mark.slow
def test_distill_script_refuses_reuses_and_forces(multi30k, tmp_path):
    r = multi30k
    assert r["rc"] == 0
    tool = os.path.join(RECIPES, "common", "distill.sh")
    teacher = os.path.join(r["exp"], "baseline", "checkpoint_last.pt")
    data_bin = os.path.join(r["data"], "bin")
    # the recipe's directory: a finished distillation, refused without --reuse / --force
    rc, out = bash(tool, data_bin, teacher, os.path.join(r["exp"], "distill"), "--beam", "2")
    assert rc != 0 and "already holds distilled data" in out and "--force" in out, out[-2000:]
    # a user's directory with other files: refused, untouched
    other = tmp_path / "kd"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    rc, out = bash(tool, data_bin, teacher, str(other))
    assert rc != 0 and "refusing to overwrite" in out and sorted(os.listdir(other)) == ["notes.txt"]
    # a fresh directory, with the length filter; then --reuse keeps it and --force rebuilds it
    fresh = tmp_path / "fresh"
    rc, out = bash(tool, data_bin, teacher, str(fresh), "--beam", "1", "--max-len", "6", "--", "--max-len-b", "5")
    assert rc == 0, out[-3000:]
    m = re.search(r"clean: kept (\d+) pairs, dropped (\d+)", out)
    assert m and int(m.group(1)) + int(m.group(2)) == N_TRAIN and int(m.group(2)) > 0, out[-2000:]
    assert "--beam 1 " in read(str(fresh / "distill" / "train.generate.cmd"))
    rc, out = bash(tool, data_bin, teacher, str(fresh), "--beam", "1", "--max-len", "6", "--reuse", "--", "--max-len-b", "5")
    assert rc == 0 and "reusing the distilled data" in out, out[-2000:]
    rc, out = bash(tool, data_bin, teacher, str(fresh), "--beam", "1", "--max-len", "6", "--reuse")
    assert rc != 0 and "already holds distilled data" in out  # other generate flags: not reused
    rc, out = bash(tool, data_bin, teacher, str(fresh), "--beam", "2", "--reuse")
    assert rc != 0 and "already holds distilled data" in out  # another setting: not reused
    rc, out = bash(tool, data_bin, teacher, str(fresh), "--beam", "2", "--force")
    assert rc == 0 and "--force: replacing" in out, out[-2000:]
    assert "beam=2" in read(str(fresh / "distill" / "DONE"))


# -- the helpers -------------------------------------------------------------------------------


def test_distill_corpus_needs_every_sentence(tmp_path):
    gen = tmp_path / "gen.out"
    gen.write_text("S-1\tb c\nT-1\tB C\nH-1\t-0.5\tx y\nS-0\ta\nT-0\tA\nH-0\t-0.1\t\nH-0\t-0.9\tz\n", encoding="utf-8")
    nar_tools.main(["distill-corpus", str(gen), str(tmp_path / "train"), "src", "tgt", "--expected", "2"])
    assert (tmp_path / "train.src").read_text() == "a\nb c\n"
    # sentence 0's best hypothesis is empty: it keeps its reference (not the second-best hypothesis)
    assert (tmp_path / "train.tgt").read_text() == "A\nx y\n"
    with pytest.raises(SystemExit, match=r"2 hypotheses for 3 training sentences \(first missing ids: \[2\]"):
        nar_tools.main(["distill-corpus", str(gen), str(tmp_path / "t2"), "src", "tgt", "--expected", "3"])


def test_romanian_normalisation():
    line = "\u015ei \u0162ara \u201ebun\u0103\u201d \u2013 \u00een\u015fel\u0103tor\u00a0 \u00e2"
    assert nar_tools.ro_normalise_line(line) == 'Și Țara "bună" - înșelător â'
    assert nar_tools.ro_normalise_line(line, remove_diacritics=True) == 'Si Tara "buna" - inselator a'


# -- WMT'16 en-ro: the download path on fake archives, and the length-filtered NAR data ---------


def sgm(data, col, setid):
    segs = "".join(f'<seg id="{i + 1}">{p[col]}</seg>\n' for i, p in enumerate(data))
    return f'<refset setid="{setid}" srclang="any">\n<doc sysid="ref" docid="1">\n{segs}</doc>\n</refset>\n'


def write_wmt16_mirror(base):
    """Archives shaped like the WMT'16 en-ro release files prepare.sh downloads."""

    def tgz(name, members):
        path = os.path.join(base, name)
        src = path + ".d"
        for member, text in members.items():
            os.makedirs(os.path.dirname(os.path.join(src, member)), exist_ok=True)
            with open(os.path.join(src, member), "w", encoding="utf-8") as f:
                f.write(text)
        with tarfile.open(path, "w:gz") as tar:
            for member in members:
                tar.add(os.path.join(src, member), arcname=member)

    def side(data, col):
        return "".join(p[col] + "\n" for p in data)

    ep, st, dev, test = pairs(40, 50, "ro"), pairs(30, 51, "ro"), pairs(N_VALID, 52, "ro"), pairs(N_TEST, 53, "ro")
    # three long pairs (16 words): kept by prepare.sh, dropped by the NAR length filter of the test below
    rng = random.Random(54)
    for _ in range(3):
        words = [rng.choice(EN) for _ in range(16)]
        ep.append((" ".join(words) + ".", " ".join(TO["ro"][w] for w in words) + "."))
    ep_en = side(ep, 0).splitlines()
    ep_en[5] = " ".join(["word"] * 300)  # too long: dropped with its pair
    os.makedirs(base, exist_ok=True)
    tgz("training-parallel-ep-v8.tgz", {"training-parallel-ep-v8/europarl-v8.ro-en.en": "\n".join(ep_en) + "\n",
                                        "training-parallel-ep-v8/europarl-v8.ro-en.ro": side(ep, 1)})  # fmt: skip
    with zipfile.ZipFile(os.path.join(base, "en-ro.txt.zip"), "w") as z:
        z.writestr("SETIMES.en-ro.en", side(st, 0))
        z.writestr("SETIMES.en-ro.ro", side(st, 1))
        z.writestr("README", "fake\n")
    members = {}
    for kind, data in (("dev", dev), ("test", test)):
        name = "newsdev2016" if kind == "dev" else "newstest2016"
        members[kind] = {f"{kind}/{name}-enro-src.en.sgm": sgm(data, 0, name), f"{kind}/{name}-enro-ref.ro.sgm": sgm(data, 1, name),
                         f"{kind}/{name}-roen-src.ro.sgm": sgm(data, 1, name), f"{kind}/{name}-roen-ref.en.sgm": sgm(data, 0, name)}  # fmt: skip
    tgz("dev-romanian-updated.tgz", members["dev"])
    tgz("test.tgz", members["test"])
    return 43 + 30 - 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None and shutil.which("wget") is None, reason="needs curl or wget")
def test_wmt16_prepare_from_archives_and_run_with_length_filter(tmp_path):
    n_train = write_wmt16_mirror(str(tmp_path / "mirror"))
    urls = dict(WMT16_BASE_URL="file://" + str(tmp_path / "mirror"),
                WMT16_SETIMES_URL="file://" + str(tmp_path / "mirror" / "en-ro.txt.zip"))  # fmt: skip
    data = tmp_path / "data"
    rc, out = bash(script("wmt16_en_ro", "prepare.sh"), str(data), "--smoke", **urls)
    assert rc == 0, out[-3000:]
    lines = lambda name: (data / "raw" / name).read_text(encoding="utf-8").splitlines()  # noqa: E731
    assert len(lines("train.en")) == len(lines("train.ro")) == n_train
    assert f"kept {n_train} pairs, dropped 1" in out
    assert len(lines("valid.ro")) == N_VALID and len(lines("test.ro")) == len(lines("test.en")) == N_TEST
    ro_text = "\n".join(lines("train.ro") + lines("test.ro"))
    assert not re.search("[\u0102\u0103\u00c2\u00e2\u00ce\u00ee\u0218\u0219\u021a\u021b\u015e\u015f\u0162\u0163]", ro_text)
    assert "rosu" in ro_text or "stati" in ro_text
    assert not any("<seg" in ln for ln in lines("test.ro") + lines("valid.en"))
    assert (data / "pair.env").read_text() == "SRC=en\nTGT=ro\n"
    # the other direction, keeping the diacritics (normalised: comma-below s/t only)
    data_roen = tmp_path / "data_roen"
    rc, out = bash(script("wmt16_en_ro", "prepare.sh"), str(data_roen), "--src", "ro", "--tgt", "en",
                   "--keep-diacritics", "--smoke", **urls)  # fmt: skip
    assert rc == 0, out[-3000:]
    src = (data_roen / "raw" / "train.ro").read_text(encoding="utf-8") + (data_roen / "raw" / "test.ro").read_text(encoding="utf-8")
    assert ("\u0219" in src or "\u021b" in src) and "\u0103" in src and "\u015f" not in src and "\u0163" not in src
    assert (data_roen / "pair.env").read_text() == "SRC=ro\nTGT=en\n"
    # a broken archive is named
    (tmp_path / "mirror" / "test.tgz").write_bytes(b"not a tarball")
    rc, out = bash(script("wmt16_en_ro", "prepare.sh"), str(tmp_path / "data3"), "--smoke", **urls)
    assert rc != 0 and "not a readable .tgz" in out and "test.tgz" in out, out[-2000:]

    # run.sh: baseline, distillation with the length filter (raw and distilled), FlowSeq on raw, argmax
    exp = tmp_path / "exp"
    rc, out = bash(script("wmt16_en_ro", "run.sh"), str(data), str(exp), "--methods", "distill,flowseq_raw",
                   "--smoke", NAR_MAX_LEN="14", FLOWSEQ_DECODES="argmax")  # fmt: skip
    assert rc == 0, out[-5000:]
    kept = [tuple(map(int, m)) for m in re.findall(r"clean: kept (\d+) pairs, dropped (\d+)", out)]
    assert len(kept) == 2 and all(k + d == n_train and k > 0 for k, d in kept), kept  # distilled, then raw
    assert kept[1][1] >= 3, kept  # the three long raw pairs at least
    assert read(str(exp / "flowseq_raw" / "train.cmd")).split()[1] == str(exp / "raw_max14")
    assert {(m.group(1), m.group(2)) for m in BLEU_LINE.finditer(out)} == {
        ("baseline", "beam5"), ("baseline", "greedy"), ("flowseq_raw", "argmax")}  # fmt: skip
    assert out.count(f"hypotheses: {N_TEST} / {N_TEST} test sentences") == 3
