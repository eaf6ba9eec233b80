"""Masked LMs as energy models: Table 6.1 and Figure 6.1 of Goyal's thesis ("Characterizing and Overcoming
the Limitations of Neural Autoregressive Models", CMU 2021), section 6.2.3.

``table``:  per row (p-1k .. h-10k+: palindrome / hmm_low / hmm_high with 1k or 10k training sequences; and the
            CMUdict phoneme rows) and data seed, one ``fairseq-train --user-dir fairseq_ext`` run per objective
            (``energy_likelihood``, ``energy_pseudolikelihood``, ``energy_mlm``), early-stopped on the validation
            loss (the trained objective); its ``checkpoint_best.pt`` is then scored on the held-out test split
            in-process, exactly: NLL = E_raw + log Z by enumerating V^T, -PLL with the true conditionals, -MLM with
            the free conditionals (nats per sequence; fairseq_ext/modules/energy_training.py).
``figure``: Figure 6.1 on the palindrome data: a masked LM pretrained (``energy_mlm``) on a large separate set
            (DPLL), then per training-set size ``energy_kl_projection`` from it with PL weight 0 (KL) and 1
            (KL + PL), and ``energy_pseudolikelihood`` from scratch (PL only); test NLL against size, with the
            TRUE NLL and the DPLL model's own NLL as lines.

Every step writes its result next to it in the run dir (default bench/runs/energy_objectives) and is skipped
when that result exists, so an interrupted run resumes.  Commands go to ``--log``; the tables to ``--md``.
CPU time: user + system of every subprocess (``/usr/bin/time``) plus the in-process scoring.

    python bench/energy_objectives.py table
    python bench/energy_objectives.py figure
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(ROOT, "fairseq_ext")
RESULTS = os.path.join(ROOT, "bench", "results")
if ROOT not in sys.path:  # the checkout's fairseq_ext, also without an installed package
    sys.path.insert(0, ROOT)
CMUDICT = os.path.join(os.path.dirname(ROOT), "shared", "data", "cmudict", "cmudict.dict")

TOY_ROWS = {  # row -> (generator, training sequences)
    "p-1k": ("palindrome", 1000), "p-10k": ("palindrome", 10000),
    "h-1k": ("hmm_low", 1000), "h-10k": ("hmm_low", 10000),
    "h-1k+": ("hmm_high", 1000), "h-10k+": ("hmm_high", 10000),
}  # fmt: skip
OBJECTIVES = {"LL": "energy_likelihood", "PLL": "energy_pseudolikelihood", "MLM": "energy_mlm"}
# Table 6.1 of the thesis: row -> (True, NLL of LL, NLL of PLL, NLL of MLM, -PLL of PLL, -MLM of MLM); None = "-"
THESIS_TABLE = {
    "p-1k": (5.32, 6.74, 7.01, 7.71, 5.74, 5.87), "p-10k": (5.35, 6.21, 6.57, 7.23, 4.88, 5.28),
    "h-1k": (4.97, 5.07, 5.16, 6.01, 4.58, 4.46), "h-10k": (5.02, 5.03, 5.04, 5.94, 4.45, 4.49),
    "h-1k+": (6.45, 6.51, 6.53, 7.07, 6.27, 6.23), "h-10k+": (6.41, 6.42, 6.43, 6.88, 6.14, 6.13),
    "phoneme": (None, None, 14.58, 18.20, 13.31, 13.12),
}  # fmt: skip
TOY_VOCAB = [f"s{i}" for i in range(5)]
FIGURE_METHODS = {"KL": ("energy_kl_projection", 0.0), "KL+PL": ("energy_kl_projection", 1.0),
                  "PL": ("energy_pseudolikelihood", None)}  # fmt: skip

_log_lock = threading.Lock()


# ----------------------------------------------------------------------------------------------------
# Small pure helpers (tested in tests/test_energy_objectives_bench.py)
# ----------------------------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """mean, min, max and count of the finite values (NaN-free); empty -> count 0."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"n": 0}
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def cell(values: Sequence[float]) -> str:
    """'5.96 [5.90, 6.02]' (mean [min, max] over seeds), '5.96' for one seed, '-' for none."""
    s = summarize(values)
    if s["n"] == 0:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.2f}"
    return f"{s['mean']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"


def seeds_text(seeds: Sequence[int]) -> str:
    if len(seeds) == 1:
        return f"one data seed ({seeds[0]})"
    return f"mean [min, max] over data seeds {', '.join(map(str, seeds))}"


def epochs_for(train_size: int, updates: int, batch_size: int, min_epochs: int = 1) -> int:
    """Epochs giving about ``updates`` optimizer steps on ``train_size`` sequences in batches of ``batch_size``."""
    per_epoch = max(1, math.ceil(train_size / batch_size))
    return max(min_epochs, math.ceil(updates / per_epoch))


# ----------------------------------------------------------------------------------------------------
# Plumbing: commands, data, training, scoring
# ----------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        self.args = args
        self.run_dir = os.path.abspath(args.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))  # fmt: skip

    def log(self, text: str) -> None:
        with _log_lock, open(self.args.log, "a") as f:
            f.write(text.rstrip("\n") + "\n")

    def run(self, cmd: List[str], out_path: str) -> float:
        """Runs ``cmd`` (its output to ``out_path``) under /usr/bin/time; returns its CPU seconds."""
        timing = out_path + ".time"
        self.log(" ".join(shlex.quote(c) for c in cmd))
        with open(out_path, "w") as out:
            proc = subprocess.run(["/usr/bin/time", "-f", "%U %S", "-o", timing, *cmd], stdout=out,
                                  stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)  # fmt: skip
        if proc.returncode != 0:
            with open(out_path) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
        with open(timing) as f:
            user, system = f.read().split()[-2:]
        return float(user) + float(system)

    def preprocess(self, raw: str, dest: str, dict_path: str) -> float:
        pref = lambda split: os.path.join(raw, f"{split}.txt")  # noqa: E731
        cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--only-source", "--srcdict", dict_path,
               "--trainpref", pref("train"), "--validpref", pref("valid"), "--testpref", pref("test"),
               "--destdir", dest, "--workers", "1"]  # fmt: skip
        return self.run(cmd, os.path.join(dest + ".preprocess.out"))

    def toy_data(self, generator: str, size: int, seed: int, name: Optional[str] = None) -> Dict:
        """raw + binarised data of one generator / size / seed (cached): {"bin", "true_nll", "cpu"}."""
        base = os.path.join(self.run_dir, "data", name or f"{generator}-{size}-s{seed}")
        done = base + ".json"
        if os.path.exists(done):
            return json.load(open(done))
        raw = base + "-raw"
        cmd = [sys.executable, "-m", "fairseq_ext.data.energy_toys", "--generator", generator, "--out", raw,
               "--train-size", str(size), "--valid-size", str(self.args.valid_size), "--test-size",
               str(self.args.test_size), "--seed", str(seed)]  # fmt: skip
        os.makedirs(os.path.dirname(base), exist_ok=True)
        cpu = self.run(cmd, base + ".make.out")
        dict_path = write_dict(os.path.join(self.run_dir, "data", "dict.toy.txt"), TOY_VOCAB)
        cpu += self.preprocess(raw, base + "-bin", dict_path)
        result = {"bin": base + "-bin", "true_nll": json.load(open(os.path.join(raw, "true_nll.json"))), "cpu": cpu}
        json.dump(result, open(done, "w"), indent=1)
        return result

    def train(self, data_bin: str, save_dir: str, criterion: str, epochs: int, extra: Sequence[str] = (),
              batch_size: Optional[int] = None, validate_interval: int = 1) -> Dict:  # fmt: skip
        """One fairseq-train run (cached: save_dir/train.json): {"checkpoint", "cpu", "epochs"}."""
        done = os.path.join(save_dir, "train.json")
        if os.path.exists(done):
            return json.load(open(done))
        os.makedirs(save_dir, exist_ok=True)
        a = self.args
        cmd = [sys.executable, "-m", "fairseq_cli.train", data_bin, "--user-dir", USER_DIR,
               "--task", "language_modeling", "--sample-break-mode", "eos", "--tokens-per-sample", "16",
               "--arch", a.arch, "--criterion", criterion, "--optimizer", "adam", "--lr", str(a.lr),
               "--batch-size", str(batch_size or a.batch_size), "--max-epoch", str(epochs),
               "--patience", str(a.patience), "--validate-interval", str(validate_interval),
               "--save-interval", str(validate_interval), "--save-dir", save_dir, "--seed", "1", "--cpu",
               "--num-workers", "0", "--no-progress-bar", "--log-format", "simple", "--log-interval", "1000",
               "--required-batch-size-multiple", "1", "--no-epoch-checkpoints", "--no-last-checkpoints",
               *extra]  # fmt: skip
        cpu = self.run(cmd, os.path.join(save_dir, "train.out"))
        result = {"checkpoint": os.path.join(save_dir, "checkpoint_best.pt"), "cpu": cpu, "epochs": epochs}
        json.dump(result, open(done, "w"), indent=1)
        return result

    def score(self, data_bin: str, checkpoint: str, exact: bool = True, split: str = "test") -> Dict:
        """Exact test metrics of a checkpoint (cached beside it): nll (if ``exact``), pll, mlm; nats/sequence."""
        done = checkpoint + f".{split}.json"
        if os.path.exists(done):
            return json.load(open(done))
        start = time.process_time()
        result = score_checkpoint(data_bin, checkpoint, split, exact, self.args.score_batch_rows)
        result["cpu"] = time.process_time() - start  # approximate when scoring threads overlap
        json.dump(result, open(done, "w"), indent=1)
        return result


def write_dict(path: str, symbols: Sequence[str]) -> str:
    """A fixed fairseq dictionary (one shared by every data set of a benchmark), written atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as f:
        f.writelines(f"{s} 1\n" for s in symbols)
    os.replace(tmp, path)
    return path


def load_sequences(data_bin: str, split: str, dictionary):
    """{T: n x T symbol indices} of a binarised language-modeling split (EOS dropped)."""
    import torch
    from fairseq.data import data_utils

    from fairseq_ext.modules import energy_training as et

    ds = data_utils.load_indexed_dataset(os.path.join(data_bin, split), dictionary)
    symbol_ids = et.real_symbols(dictionary)
    by_length: Dict[int, List] = {}
    for i in range(len(ds)):
        tokens = ds[i]
        tokens = tokens[tokens.ne(dictionary.eos())]
        by_length.setdefault(tokens.numel(), []).append(tokens)
    return {t: et.to_symbol_index(torch.stack(rows), symbol_ids) for t, rows in sorted(by_length.items())}


def score_checkpoint(data_bin: str, checkpoint: str, split: str, exact: bool, batch_rows: int) -> Dict:
    """NLL (E_raw + log Z, enumerated), -PLL (true conditionals), -MLM (free conditionals) per sequence."""
    import torch
    from fairseq import checkpoint_utils

    import fairseq_ext  # noqa: F401  (registers the model, installs the weights_only allowlist)
    from fairseq_ext.modules import energy_training as et

    torch.set_num_threads(1)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides={"data": data_bin})
    model = models[0].eval()
    dictionary = task.target_dictionary
    ids = et.real_symbols(dictionary)
    v = ids.numel()
    logits_fn = lambda seqs: model(ids[seqs])[0][..., ids]  # noqa: E731
    totals = {"nll": 0.0, "pll": 0.0, "mlm": 0.0, "n": 0}
    with torch.no_grad():
        for t, seqs in load_sequences(data_bin, split, dictionary).items():
            logits = torch.cat(list(et.chunked_logits(logits_fn, seqs, batch_rows)))  # n x T x V
            totals["mlm"] += float(et.mlm_nll(logits, seqs).double().sum())
            cond = et.exact_conditionals(logits_fn, seqs, v, batch_rows)  # n x T x V
            totals["pll"] += float(et.pseudo_nll(cond, seqs).double().sum())
            if exact:
                log_z = et.log_partition(logits_fn, v, t, batch_rows, et.enumeration_size(v, t), seqs.device)
                totals["nll"] += float(et.exact_nll(logits_fn, seqs, log_z, batch_rows).double().sum())
            totals["n"] += seqs.size(0)
    n = totals.pop("n")
    out = {k: val / n for k, val in totals.items()}
    if not exact:
        out["nll"] = None
    out["n"] = n
    return out


# ----------------------------------------------------------------------------------------------------
# Table 6.1
# ----------------------------------------------------------------------------------------------------


def toy_row_seed(bench: Bench, row: str, seed: int) -> Dict:
    generator, size = TOY_ROWS[row]
    data = bench.toy_data(generator, size, seed)
    epochs = bench.args.epochs_1k if size <= 1000 else bench.args.epochs_10k
    out = {"true": data["true_nll"]["test"], "cpu": data["cpu"]}
    for obj, criterion in OBJECTIVES.items():
        run = bench.train(data["bin"], os.path.join(bench.run_dir, "table", f"{row}-s{seed}", obj), criterion, epochs)
        out[obj] = bench.score(data["bin"], run["checkpoint"])
        out["cpu"] += run["cpu"] + out[obj]["cpu"]
    return out


def phoneme_data(bench: Bench, seed: int, subsample: Optional[int]) -> Dict:
    base = os.path.join(bench.run_dir, "data", f"phoneme-s{seed}")
    full_raw = base + "-raw"
    cpu = 0.0
    if not os.path.exists(os.path.join(full_raw, "stats.json")):
        cpu += bench.run([sys.executable, "-m", "fairseq_ext.data.cmudict_phonemes", "--dict", bench.args.cmudict,
                          "--out", full_raw, "--max-length", "6", "--seed", str(seed)], base + ".make.out")  # fmt: skip
    phonemes = json.load(open(os.path.join(full_raw, "stats.json")))["phonemes"]
    dict_path = write_dict(os.path.join(bench.run_dir, "data", "dict.phoneme.txt"), phonemes)
    name, raw = (f"full", full_raw) if subsample is None else (f"sub{subsample}", base + f"-sub{subsample}-raw")
    done = base + f"-{name}.json"
    if os.path.exists(done):
        return json.load(open(done))
    if subsample is not None:  # the first `subsample` training lines of a seeded shuffle; same valid and test
        import random

        os.makedirs(raw, exist_ok=True)
        lines = open(os.path.join(full_raw, "train.txt")).readlines()
        random.Random(seed).shuffle(lines)
        open(os.path.join(raw, "train.txt"), "w").writelines(lines[:subsample])
        for split in ("valid", "test"):
            open(os.path.join(raw, f"{split}.txt"), "w").writelines(open(os.path.join(full_raw, f"{split}.txt")))
    cpu += bench.preprocess(raw, base + f"-{name}-bin", dict_path)
    stats = json.load(open(os.path.join(full_raw, "stats.json")))
    result = {"bin": base + f"-{name}-bin", "cpu": cpu, "train": sum(1 for _ in open(os.path.join(raw, "train.txt"))),
              "stats": {k: v for k, v in stats.items() if k != "phonemes"}}  # fmt: skip
    json.dump(result, open(done, "w"), indent=1)
    return result


def phoneme_runs(bench: Bench, seed: int) -> Dict:
    """PLL and MLM on a training subsample (PLL costs |V| = 39 full passes per position), MLM on the full set."""
    a = bench.args
    out = {"cpu": 0.0}
    sub = phoneme_data(bench, seed, a.phoneme_subsample)
    full = phoneme_data(bench, seed, None)
    out["cpu"] += sub["cpu"] + full["cpu"]
    out["sizes"] = {"subsample": sub["train"], "full": full["train"], **full["stats"]}
    no_enum = ["--energy-max-enumeration", "1"]  # 39^T: no exact NLL (the validation logs would mix lengths)
    for key, data, criterion, epochs in (
        ("PLL-sub", sub, "energy_pseudolikelihood", a.phoneme_epochs_sub),
        ("MLM-sub", sub, "energy_mlm", a.phoneme_epochs_sub),
        ("MLM-full", full, "energy_mlm", a.phoneme_epochs_full),
    ):
        run = bench.train(data["bin"], os.path.join(bench.run_dir, "table", f"phoneme-s{seed}", key), criterion,
                          epochs, no_enum)  # fmt: skip
        out[key] = bench.score(data["bin"], run["checkpoint"], exact=False)
        out["cpu"] += run["cpu"] + out[key]["cpu"]
    return out


def table(args) -> None:
    bench = Bench(args)
    jobs = [(row, s) for row in args.rows for s in args.seeds]
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        toy = {(row, s): f for (row, s), f in zip(jobs, pool.map(lambda j: toy_row_seed(bench, *j), jobs))}
        phon = list(pool.map(lambda s: phoneme_runs(bench, s), args.phoneme_seeds)) if args.phoneme else []
    wall = time.time() - start
    cpu = sum(r["cpu"] for r in toy.values()) + sum(r["cpu"] for r in phon)
    write_table_md(args, toy, phon, cpu, wall)


def write_table_md(args, toy: Dict, phon: List[Dict], cpu: float, wall: float) -> None:
    cols = ["True", "NLL of LL", "NLL of PLL", "NLL of MLM", "-PLL of PLL", "-MLM of MLM"]
    lines = [
        "# Table 6.1: training objectives of a masked LM as an energy model (E_raw), held-out test data",
        "",
        "Goyal's thesis (CMU 2021), section 6.2.3. Nats per sequence on the test split; ours: "
        f"{seeds_text(args.seeds)}; thesis: mean over 5 seeds (in parentheses).",
        "",
        "| row | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for row in args.rows:
        runs = [toy[(row, s)] for s in args.seeds]
        ours = [
            [r["true"] for r in runs], [r["LL"]["nll"] for r in runs], [r["PLL"]["nll"] for r in runs],
            [r["MLM"]["nll"] for r in runs], [r["PLL"]["pll"] for r in runs], [r["MLM"]["mlm"] for r in runs],
        ]  # fmt: skip
        thesis = THESIS_TABLE[row]
        lines.append(f"| {row} | " + " | ".join(f"{cell(o)} ({t:.2f})" for o, t in zip(ours, thesis)) + " |")
    if phon:
        th = THESIS_TABLE["phoneme"]
        sub = phon[0]["sizes"]["subsample"]
        lines.append(f"| phoneme, {sub} train | - (-) | - (-) | - ({th[2]:.2f}) | - ({th[3]:.2f}) | "
                     f"{cell([p['PLL-sub']['pll'] for p in phon])} ({th[4]:.2f}) | "
                     f"{cell([p['MLM-sub']['mlm'] for p in phon])} ({th[5]:.2f}) |")  # fmt: skip
        lines.append(f"| phoneme, {phon[0]['sizes']['full']} train (MLM only) | - | - | - | - | - | "
                     f"{cell([p['MLM-full']['mlm'] for p in phon])} |")  # fmt: skip
    lines += ["", "Other metrics of the same checkpoints (mean over seeds): -PLL / -MLM of every model", "",
              "| row | -PLL of LL | -MLM of LL | -MLM of PLL | -PLL of MLM |", "|---|---|---|---|---|"]  # fmt: skip
    for row in args.rows:
        runs = [toy[(row, s)] for s in args.seeds]
        lines.append(f"| {row} | {cell([r['LL']['pll'] for r in runs])} | {cell([r['LL']['mlm'] for r in runs])} | "
                     f"{cell([r['PLL']['mlm'] for r in runs])} | {cell([r['MLM']['pll'] for r in runs])} |")  # fmt: skip
    if phon:
        lines.append(f"| phoneme, {phon[0]['sizes']['subsample']} train | - | - | "
                     f"{cell([p['PLL-sub']['mlm'] for p in phon])} | {cell([p['MLM-sub']['pll'] for p in phon])} |")
        lines.append(f"| phoneme, full train (MLM) | - | - | - | {cell([p['MLM-full']['pll'] for p in phon])} |")
    lines += ["", "## Setup", "", setup_text(args, phon), "", f"CPU time (user + system, all runs and scoring "
              f"summed, including resumed ones): {cpu / 60:.1f} min; wall time of this invocation: {wall / 60:.1f} min "
              f"with {args.jobs} parallel jobs.", "", "Reproduce: `" + reproduce(args) + "`", ""]  # fmt: skip
    write(args.md, lines)


def setup_text(args, phon: List[Dict]) -> str:
    text = (
        f"Model `--arch {args.arch}` (bidirectional LSTM masked LM, fairseq_ext/models/energy_mlm.py), Adam lr "
        f"{args.lr}, batch {args.batch_size} sequences, at most {args.epochs_1k} epochs (1k rows) / {args.epochs_10k} "
        f"epochs (10k rows), early stopping with patience {args.patience} on the validation loss (the trained "
        f"objective; `checkpoint_best.pt` is scored). Data: `python -m fairseq_ext.data.energy_toys` (T = 5, |V| = 5), "
        f"{args.valid_size} validation and {args.test_size} test sequences per seed; the HMM parameters are drawn "
        "from the data seed too, so the h rows' True column varies with the seed."
    )
    if phon:
        s = phon[0]["sizes"]
        text += (
            f" Phonemes: `python -m fairseq_ext.data.cmudict_phonemes --max-length 6` (stress removed, 39 phonemes, "
            f"{s['total']} instances with duplicates, {s['distinct']} distinct; 90/10 split by head word, 5% of the "
            f"training words for validation: {s['instances']}); PLL and MLM trained on a {s['subsample']}-line "
            f"seeded subsample of train ({args.phoneme_epochs_sub} epochs at most), MLM also on the full "
            f"{s['full']} lines ({args.phoneme_epochs_full} epochs at most); seeds {args.phoneme_seeds}."
        )
    return text


# ----------------------------------------------------------------------------------------------------
# Figure 6.1
# ----------------------------------------------------------------------------------------------------


def figure_seed(bench: Bench, seed: int) -> Dict:
    a = bench.args
    big = bench.toy_data(a.figure_generator, a.pretrain_size, seed + 1000,
                         f"{a.figure_generator}-pre{a.pretrain_size}-s{seed}")  # fmt: skip
    root = os.path.join(bench.run_dir, "figure", f"s{seed}")
    pre = bench.train(big["bin"], os.path.join(root, "dpll"), "energy_mlm", a.pretrain_epochs)
    out = {"cpu": big["cpu"] + pre["cpu"], "sizes": {}}
    for size in a.sizes:
        data = bench.toy_data(a.figure_generator, size, seed)
        out["cpu"] += data["cpu"]
        res = {"true": data["true_nll"]["test"], "DPLL": bench.score(data["bin"], pre["checkpoint"])}
        epochs = epochs_for(size, a.figure_updates, a.batch_size)
        interval = max(1, epochs // 20)
        for method, (criterion, weight) in FIGURE_METHODS.items():
            extra = [] if weight is None else ["--energy-teacher-path", pre["checkpoint"],
                                              "--energy-pll-weight", str(weight)]  # fmt: skip
            run = bench.train(data["bin"], os.path.join(root, f"{method}-{size}"), criterion, epochs, extra,
                              validate_interval=interval)  # fmt: skip
            res[method] = bench.score(data["bin"], run["checkpoint"])
            out["cpu"] += run["cpu"] + res[method]["cpu"]
        out["cpu"] += res["DPLL"]["cpu"]
        out["sizes"][size] = res
    return out


def figure(args) -> None:
    bench = Bench(args)
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda s: figure_seed(bench, s), args.seeds))
    wall = time.time() - start
    cpu = sum(r["cpu"] for r in runs)
    series = {"TRUE": lambda r: r["true"], f"DPLL ({args.pretrain_size // 1000}k)": lambda r: r["DPLL"]["nll"],
              "KL": lambda r: r["KL"]["nll"], "KL+PL": lambda r: r["KL+PL"]["nll"], "PL": lambda r: r["PL"]["nll"]}  # fmt: skip
    points = {name: [summarize([get(r["sizes"][size]) for r in runs]) for size in args.sizes]
              for name, get in series.items()}  # fmt: skip
    lines = [
        "# Figure 6.1: KL projection of a pretrained masked LM vs pseudolikelihood from scratch",
        "",
        f"Goyal's thesis (CMU 2021), section 6.2.3. Test NLL (nats per sequence, exact by enumeration) against the "
        f"training-set size, `{args.figure_generator}` data; {seeds_text(args.seeds)}. "
        f"Plot: `{os.path.relpath(args.png, ROOT)}`.",
        "",
        "| method | " + " | ".join(str(s) for s in args.sizes) + " |",
        "|---|" + "---|" * len(args.sizes),
    ]
    for name, get in series.items():
        lines.append(f"| {name} | " + " | ".join(cell([get(r["sizes"][s]) for r in runs]) for s in args.sizes) + " |")
    lines += [
        "",
        "## Setup",
        "",
        f"DPLL: `energy_mlm` trained on a separate {args.pretrain_size}-sequence set (data seed + 1000) for at most "
        f"{args.pretrain_epochs} epochs, its best checkpoint the teacher (`--energy-teacher-path`) of `energy_kl_projection` "
        f"with `--energy-pll-weight 0` (KL) and `1` (KL+PL); PL = `energy_pseudolikelihood` from a random initialisation. "
        f"About {args.figure_updates} updates per run (epochs = updates / (size / batch {args.batch_size}), validated "
        f"20 times per run), patience {args.patience} validations, `--arch {args.arch}`, Adam lr {args.lr}; "
        f"{args.valid_size} validation and {args.test_size} test sequences per size and seed. The thesis plots the "
        "same five series (no numbers given).",
        "",
        f"CPU time (user + system, summed, including resumed steps): {cpu / 60:.1f} min; wall time of this "
        f"invocation: {wall / 60:.1f} min with {args.jobs} parallel jobs.",
        "",
        "Reproduce: `" + reproduce(args) + "`",
        "",
    ]
    write(args.md, lines)
    plot(args.sizes, points, args.png, args.figure_generator)


def plot(sizes: Sequence[int], points: Dict[str, List[Dict]], path: str, generator: str) -> None:
    """Figure 6.1 style: NLL against training size (log x); min-max bands over seeds.  Needs matplotlib
    (``pip install .[plot]``)."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's DEBUG root logger would print font scans
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    styles = {"TRUE": dict(color="black", linestyle="--"), "KL": dict(marker="o"), "KL+PL": dict(marker="s"),
              "PL": dict(marker="^")}  # fmt: skip
    for name, pts in points.items():
        mean = [p.get("mean", float("nan")) for p in pts]
        style = styles.get(name, dict(color="gray", linestyle=":", marker="x"))
        ax.plot(sizes, mean, label=name, **style)
        if all(p.get("n", 0) > 1 for p in pts):
            ax.fill_between(sizes, [p["min"] for p in pts], [p["max"] for p in pts], alpha=0.15,
                            color=ax.lines[-1].get_color())  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("training sequences (log scale)")
    ax.set_ylabel("test NLL (nats / sequence)")
    ax.set_title(f"Figure 6.1 ({generator}, T = 5, |V| = 5)")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def reproduce(args) -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *args.argv])


def write(path: str, lines: List[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run-dir", default=os.path.join(ROOT, "bench", "runs", "energy_objectives"),
                        help="runs, data and cached results (finished steps are skipped)")  # fmt: skip
    common.add_argument("--jobs", type=int, default=2, help="steps run side by side (each single-threaded)")
    common.add_argument("--arch", default="energy_mlm_tiny", help="energy_mlm architecture of every model")
    common.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    common.add_argument("--batch-size", type=int, default=100, help="sequences per batch")
    common.add_argument("--patience", type=int, default=5, help="early stopping: validations without improvement")
    common.add_argument("--valid-size", type=int, default=200, help="validation sequences per toy data set")
    common.add_argument("--test-size", type=int, default=1000, help="test sequences per toy data set")
    common.add_argument("--score-batch-rows", type=int, default=8192, help="sequences per pass when scoring")
    t = sub.add_parser("table", parents=[common], help="Table 6.1")
    t.add_argument("--rows", default=",".join(TOY_ROWS), help=f"comma-separated rows of {', '.join(TOY_ROWS)}")
    t.add_argument("--seeds", type=ints, default=[1, 2], help="data seeds (the thesis: 5)")
    t.add_argument("--epochs-1k", type=int, default=20, help="most epochs of the 1k rows")
    t.add_argument("--epochs-10k", type=int, default=4, help="most epochs of the 10k rows")
    t.add_argument("--no-phoneme", dest="phoneme", action="store_false", help="skip the CMUdict phoneme rows")
    t.add_argument("--cmudict", default=CMUDICT, help="path of cmudict.dict")
    t.add_argument("--phoneme-seeds", type=ints, default=[1], help="split seeds of the phoneme rows")
    t.add_argument("--phoneme-subsample", type=int, default=3000, help="training lines of the PLL / MLM phoneme row")
    t.add_argument("--phoneme-epochs-sub", type=int, default=8, help="most epochs on the phoneme subsample")
    t.add_argument("--phoneme-epochs-full", type=int, default=6, help="most epochs of the full-data phoneme MLM")
    t.add_argument("--md", default=os.path.join(RESULTS, "energy_table6_1.md"))
    t.add_argument("--log", default=os.path.join(RESULTS, "energy_table6_1.log"))
    f = sub.add_parser("figure", parents=[common], help="Figure 6.1")
    f.add_argument("--figure-generator", default="palindrome", choices=["palindrome", "hmm_low", "hmm_high"])
    f.add_argument("--sizes", type=ints, default=[100, 300, 1000, 3000], help="training-set sizes")
    f.add_argument("--seeds", type=ints, default=[1, 2], help="data seeds")
    f.add_argument("--pretrain-size", type=int, default=10000,
                   help="sequences of the MLM's separate set (thesis: 100k)")  # fmt: skip
    f.add_argument("--pretrain-epochs", type=int, default=6, help="most epochs of the MLM pretraining")
    f.add_argument("--figure-updates", type=int, default=200, help="about this many updates per run")
    f.add_argument("--md", default=os.path.join(RESULTS, "energy_fig6_1.md"))
    f.add_argument("--log", default=os.path.join(RESULTS, "energy_fig6_1.log"))
    f.add_argument("--png", default=os.path.join(RESULTS, "energy_fig6_1.png"))
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "table":
        args.rows = [r for r in args.rows.split(",") if r]
        unknown = [r for r in args.rows if r not in TOY_ROWS]
        if unknown:
            parser.error(f"unknown rows {unknown}; choose from {', '.join(TOY_ROWS)}")
        if args.phoneme and not os.path.isfile(args.cmudict):
            parser.error(f"--cmudict {args.cmudict} not found (or pass --no-phoneme)")
        table(args)
    else:
        figure(args)


if __name__ == "__main__":
    main()
