#!/usr/bin/env python3
"""Training-throughput benchmark: teacher forcing vs parallel_ss (K = 1, 2, 3) vs sequential_ss,
and (``--dss-passes``, ``--dss-sequential``) differentiable_ss in its parallel and sequential modes.

Measures target tokens per second of a full training step (criterion forward + backward + optimizer
step, as fairseq's ``FairseqTask.train_step`` followed by ``optimizer.step()``) for every variant on
the SAME model weights, the SAME optimizer state and the SAME batches:

* one model is built once; before every timed step its weights and Adam state are restored from a
  snapshot (outside the timer), and the RNG is re-seeded per batch, so every variant times the very
  same update of the very same model;
* rounds are interleaved: in each round every variant runs all batches, the variant order rotated
  by one each round, so background load on a shared machine affects all variants alike;
* warm-up rounds are discarded; the table reports the median over the timed rounds of each
  variant's tokens/s (total target tokens of its batches / total time of its steps).

The sequential variants (one incremental decoder step per target position) are slow: they run only
in the first ``--seq-rounds`` timed rounds (and the warm-up rounds), still interleaved with the others.

Everything is built through fairseq's own APIs: a synthetic parallel corpus (fairseq_ext.testing)
binarised with fairseq-preprocess, ``options.get_training_parser`` + ``parse_args_and_arch`` with
``--user-dir`` pointing at fairseq_ext, ``tasks.setup_task``, ``task.build_model``,
``task.build_criterion``, ``optim.build_optimizer`` and ``task.get_batch_iterator``.

Usage (defaults: 3-layer 256-wide transformer, 8000 symbols, reverse task with lengths 30-40,
~3000 tokens per batch, one CPU thread):

    OMP_NUM_THREADS=1 python3 bench/throughput.py
    OMP_NUM_THREADS=1 python3 bench/throughput.py --passes 1 --no-sequential --runs 5   # median and range over 5 runs
    OMP_NUM_THREADS=1 python3 bench/throughput.py --passes "" --dss-passes 1,2 --dss-sequential \
        --ss-conditioning argmax --out-name throughput_dss          # differentiable_ss
    python3 bench/throughput.py --device cuda --threads 4 --rounds 10   # on a GPU machine

Writes the markdown table and the command to bench/results/throughput.md and appends the raw
per-round numbers to bench/results/throughput.log (``--no-write`` to skip).
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

import independent_runs

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def parse_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("machine")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--threads", type=int, default=1, help="torch intra-op threads (and OMP_NUM_THREADS)")
    g = p.add_argument_group("data")
    g.add_argument("--synthetic-task", choices=["copy", "reverse", "sort"], default="reverse")
    g.add_argument("--vocab", type=int, default=8000, help="symbols of the synthetic corpus (joined dictionary)")
    g.add_argument("--min-len", type=int, default=30)
    g.add_argument("--max-len", type=int, default=40)
    g.add_argument("--train-sentences", type=int, default=4000,
                   help="corpus size (large enough that every symbol enters the dictionary)")
    g.add_argument("--data-dir", default=os.path.join(REPO, "bench", "runs", "throughput_data"),
                   help="where the corpus is written and binarised (reused when its settings match)")
    g.add_argument("--max-tokens", type=int, default=3000, help="fairseq --max-tokens of a batch")
    g.add_argument("--num-batches", type=int, default=2, help="distinct batches every variant runs each round")
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=int, default=3, help="encoder and decoder layers")
    g.add_argument("--embed-dim", type=int, default=256)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--ffn-dim", type=int, default=1024)
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--lr", type=float, default=5e-4)
    g = p.add_argument_group("variants")
    g.add_argument("--ss-prob", type=float, default=0.5)
    g.add_argument("--ss-conditioning", choices=["sample", "argmax"], default="sample")
    g.add_argument("--passes", default="1,2,3", help="K values of parallel_ss")
    g.add_argument("--no-sequential", action="store_true", help="skip sequential_ss")
    g.add_argument("--dss-passes", default="", help="K values of differentiable_ss --dss-decoding parallel")
    g.add_argument("--dss-sequential", action="store_true", help="add differentiable_ss --dss-decoding sequential")
    g.add_argument("--dss-mode", choices=["greedy", "sample"], default="greedy")
    g.add_argument("--dss-alpha", type=float, default=1.0)
    g.add_argument("--dss-top-k", default="", help="K values of --dss-top-k: adds dss_parallel_k1_topK variants")
    g = p.add_argument_group("measurement")
    g.add_argument("--rounds", type=int, default=7, help="timed rounds")
    g.add_argument("--warmup-rounds", type=int, default=1)
    g.add_argument("--seq-rounds", type=int, default=3, help="timed rounds that include sequential_ss")
    g.add_argument("--seed", type=int, default=1)
    independent_runs.add_arguments(g)
    g.add_argument("--profile", metavar="VARIANT", default=None,
                   help="instead of benchmarking, profile VARIANT (e.g. parallel_ss_k1) with torch.profiler")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    g.add_argument("--out-name", default="throughput", help="writes <out-dir>/<out-name>.md and appends <out-name>.log")
    g.add_argument("--no-write", action="store_true", help="print only; do not write bench/results")
    return p.parse_args(argv)


CLI = parse_cli()
if CLI.device == "cpu":
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(CLI.threads)
os.environ.setdefault("PYTHONWARNINGS", "ignore")

import logging  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402
from fairseq import optim, options, tasks, utils  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402

sys.path.insert(0, REPO)
import fairseq_ext  # noqa: E402
from fairseq_ext.testing import cli as ext_cli  # noqa: E402
from fairseq_ext.testing import synthetic  # noqa: E402

USER_DIR = os.path.dirname(os.path.abspath(fairseq_ext.__file__))


# -- data ----------------------------------------------------------------------------------------
def prepare_data(cli) -> str:
    """Writes and binarises the synthetic corpus once per setting; returns the data-bin directory."""
    tag = f"{cli.synthetic_task}_v{cli.vocab}_l{cli.min_len}-{cli.max_len}_n{cli.train_sentences}_s{cli.seed}"
    root = os.path.join(cli.data_dir, tag)
    data_bin = os.path.join(root, "bin")
    if os.path.exists(os.path.join(data_bin, "train.src-tgt.tgt.idx")):
        return data_bin
    raw = os.path.join(root, "raw")
    synthetic.write_parallel(
        raw, task=cli.synthetic_task, vocab=cli.vocab, min_len=cli.min_len, max_len=cli.max_len,
        sizes={"train": cli.train_sentences, "valid": 20}, seed=cli.seed,
    )
    ext_cli.preprocess(raw, data_bin)
    return data_bin


# -- fairseq objects -----------------------------------------------------------------------------
def fairseq_args(cli, data_bin, criterion_flags):
    d, f = str(cli.embed_dim), str(cli.ffn_dim)
    argv = [
        data_bin, "--task", "translation", "--source-lang", "src", "--target-lang", "tgt",
        "--arch", "transformer",
        "--encoder-layers", str(cli.layers), "--decoder-layers", str(cli.layers),
        "--encoder-embed-dim", d, "--decoder-embed-dim", d,
        "--encoder-ffn-embed-dim", f, "--decoder-ffn-embed-dim", f,
        "--encoder-attention-heads", str(cli.heads), "--decoder-attention-heads", str(cli.heads),
        "--dropout", str(cli.dropout),
        "--optimizer", "adam", "--lr", str(cli.lr),
        "--max-tokens", str(cli.max_tokens), "--seed", str(cli.seed), "--num-workers", "0",
        "--user-dir", USER_DIR,
        "--label-smoothing", str(cli.label_smoothing),
        *criterion_flags,
    ]  # fmt: skip
    if cli.device == "cpu":
        argv.append("--cpu")
    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, argv)


def variant_flags(cli):
    """Ordered {variant name: criterion flags}."""
    ss = ["--ss-prob", str(cli.ss_prob), "--ss-conditioning", cli.ss_conditioning]
    out = {"teacher_forcing": ["--criterion", "label_smoothed_cross_entropy"]}
    for k in [int(x) for x in cli.passes.split(",") if x.strip()]:
        out[f"parallel_ss_k{k}"] = ["--criterion", "parallel_ss", "--ss-num-passes", str(k), *ss]
    if not cli.no_sequential:
        out["sequential_ss"] = ["--criterion", "sequential_ss", *ss]
    dss = ["--criterion", "differentiable_ss", "--ss-prob", str(cli.ss_prob), "--ss-schedule", "constant",
           "--dss-mode", cli.dss_mode, "--dss-alpha", str(cli.dss_alpha)]  # fmt: skip
    for k in [int(x) for x in cli.dss_passes.split(",") if x.strip()]:
        out[f"dss_parallel_k{k}"] = [*dss, "--dss-decoding", "parallel", "--dss-num-passes", str(k)]
    for top in [int(x) for x in cli.dss_top_k.split(",") if x.strip()]:
        out[f"dss_parallel_k1_top{top}"] = [*dss, "--dss-decoding", "parallel", "--dss-top-k", str(top)]
    if cli.dss_sequential:
        out["dss_sequential"] = [*dss, "--dss-decoding", "sequential"]
    return out


class Bench:
    def __init__(self, cli):
        self.cli = cli
        self.device = torch.device(cli.device)
        data_bin = prepare_data(cli)
        self.flags = variant_flags(cli)
        base_args = fairseq_args(cli, data_bin, self.flags["teacher_forcing"])
        cfg = convert_namespace_to_omegaconf(base_args)
        utils.set_torch_seed(cli.seed)
        self.task = tasks.setup_task(cfg.task)
        self.model = self.task.build_model(cfg.model).to(self.device)
        self.criteria = {}
        for name, flags in self.flags.items():
            ccfg = convert_namespace_to_omegaconf(fairseq_args(cli, data_bin, flags))
            crit = self.task.build_criterion(ccfg.criterion).to(self.device)
            if hasattr(crit, "set_num_updates"):
                crit.set_num_updates(0)  # constant schedule, no warm-up: p = --ss-prob
            self.criteria[name] = crit
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = optim.build_optimizer(cfg.optimizer, params)
        self.batches = self._batches(cfg)
        self.num_params = sum(p.numel() for p in params)
        self.vocab_size = len(self.task.target_dictionary)
        # one untimed step so that Adam's state exists, then snapshot weights + optimizer state
        self._step("teacher_forcing", self.batches[0], 0)
        self.model_snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.opt_snapshot = self._clone(self.optimizer.state_dict())

    def _clone(self, obj):
        if torch.is_tensor(obj):
            return obj.detach().clone()
        if isinstance(obj, dict):
            return {k: self._clone(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._clone(v) for v in obj)
        return obj

    def _batches(self, cfg):
        self.task.load_dataset("train")
        itr = self.task.get_batch_iterator(
            dataset=self.task.dataset("train"),
            max_tokens=self.cli.max_tokens,
            max_positions=utils.resolve_max_positions(self.task.max_positions(), self.model.max_positions()),
            seed=self.cli.seed,
        ).next_epoch_itr(shuffle=True)
        batches = []
        for sample in itr:
            batches.append(utils.move_to_cuda(sample) if self.device.type == "cuda" else sample)
            if len(batches) == self.cli.num_batches:
                break
        return batches

    def restore(self):
        self.model.load_state_dict(self.model_snapshot)
        self.optimizer.load_state_dict(self._clone(self.opt_snapshot))

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _step(self, name, sample, batch_idx):
        """One training step; returns its wall and process CPU time in seconds (RNG seeded per batch)."""
        torch.manual_seed(self.cli.seed * 1000 + batch_idx)
        criterion = self.criteria[name]
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad()
        loss, sample_size, logging_output = self.task.train_step(sample, self.model, criterion, self.optimizer, 0)
        self.optimizer.step()
        self.sync()
        return time.perf_counter() - t0, time.process_time() - c0

    def run_variant(self, name):
        """All batches once, each from the snapshot; returns (target tokens, per-step wall s, per-step CPU s)."""
        walls, cpus, tokens = [], [], 0
        for i, sample in enumerate(self.batches):
            self.restore()
            wall, cpu = self._step(name, sample, i)
            walls.append(wall)
            cpus.append(cpu)
            tokens += int(sample["ntokens"])
        return tokens, walls, cpus


# -- reporting -----------------------------------------------------------------------------------
def command_line():
    env = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} " if CLI.device == "cpu" else ""
    return env + "python3 " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])


def machine_description(cli):
    if cli.device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def _ratio_rows(med, names):
    rows = []
    tf = med.get("teacher_forcing")
    for n in names:
        if n.startswith("parallel_ss_k") and tf and n in med:
            rows.append((f"{n} / teacher_forcing", med[n] / tf,
                         ">= 0.85 (paper's tensor2tensor figure: 0.74)" if n.split("+")[0].endswith("_k1") else ""))
    if "parallel_ss_k1" in med and "sequential_ss" in med:
        rows.append(("parallel_ss_k1 / sequential_ss", med["parallel_ss_k1"] / med["sequential_ss"], ">= 50"))
    for n in names:
        if n.startswith("dss_") and tf and n in med:
            rows.append((f"{n} / teacher_forcing", med[n] / tf, ">= 0.7" if n.startswith("dss_parallel_k1") else ""))
    for a, b in (("dss_parallel_k1", "dss_sequential"), ("dss_sequential", "sequential_ss"),
                 ("dss_parallel_k1", "sequential_ss")):
        if a in med and b in med:
            rows.append((f"{a} / {b}", med[a] / med[b], ""))
    return rows


def render(bench, results, cli, wall):
    names = [n for n in bench.flags if results[n]]
    med = {n: statistics.median(r["tps"] for r in results[n]) for n in names}
    cmed = {n: statistics.median(r["cpu_tps"] for r in results[n]) for n in names}
    tf, ctf = med.get("teacher_forcing"), cmed.get("teacher_forcing")
    tok_per_batch = [int(b["ntokens"]) for b in bench.batches]
    sents = [int(b["nsentences"]) for b in bench.batches]
    lines = [
        f"## Training throughput ({datetime.datetime.now().strftime('%Y-%m-%d %H:%M')})",
        "",
        "Command (from the repository root):",
        "",
        "```",
        command_line(),
        "```",
        "",
        f"- machine: {machine_description(cli)}; fairseq {__import__('fairseq').__version__}; "
        f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
        f"- model: transformer, {cli.layers}+{cli.layers} layers, dim {cli.embed_dim}, {cli.heads} heads, ffn {cli.ffn_dim}, "
        f"dropout {cli.dropout}, {bench.num_params / 1e6:.1f}M parameters, target vocabulary {bench.vocab_size}",
        f"- data: synthetic {cli.synthetic_task}, lengths {cli.min_len}-{cli.max_len}; {len(bench.batches)} batches "
        f"(--max-tokens {cli.max_tokens}) of {tok_per_batch} target tokens / {sents} sentences",
        "- step = task.train_step (criterion forward + backward) + optimizer.step (adam); weights and optimizer state "
        f"restored before every step; rounds interleaved with rotated order, {cli.warmup_rounds} warm-up round(s) discarded",
        f"- parallel_ss / sequential_ss: --ss-prob {cli.ss_prob} --ss-conditioning {cli.ss_conditioning} (constant schedule); "
        f"differentiable_ss: --ss-prob {cli.ss_prob} --ss-schedule constant --dss-mode {cli.dss_mode} --dss-alpha {cli.dss_alpha}",
        "- tokens/s = target tokens of a round's batches / their summed step time; medians over rounds. "
        "'wall' is elapsed time; 'CPU' is the process's CPU time (robust to being descheduled on a shared machine)",
        f"- wall time of the benchmark: {wall / 60:.1f} min",
        "",
        "| variant | timed rounds | median tokens/s (wall) | min-max (wall) | median s/step (wall) "
        "| vs teacher forcing (wall) | median tokens/s (CPU) | vs teacher forcing (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in names:
        rs = results[n]
        tps = [r["tps"] for r in rs]
        sps = statistics.median(r["seconds"] / len(r["steps"]) for r in rs)
        rel = f"{med[n] / tf:.3f}" if tf else "-"
        crel = f"{cmed[n] / ctf:.3f}" if ctf else "-"
        lines.append(f"| {n} | {len(rs)} | {med[n]:,.0f} | {min(tps):,.0f}-{max(tps):,.0f} | {sps:.3f} | {rel} "
                     f"| {cmed[n]:,.0f} | {crel} |")
    crows = dict((k, v) for k, v, _ in _ratio_rows(cmed, names))
    lines += ["", "| ratio of median tokens/s | wall | CPU | target |", "|---|---:|---:|---|"]
    for k, v, target in _ratio_rows(med, names):
        fmt = "{:.1f}" if k.endswith("/ sequential_ss") and k.startswith("parallel") else "{:.3f}"
        lines.append(f"| {k} | {fmt.format(v)} | {fmt.format(crows[k])} | {target} |")
    return "\n".join(lines) + "\n"


def profile(bench, name, steps=3):
    from torch.profiler import ProfilerActivity, profile as tprofile, record_function

    bench.restore()
    bench._step(name, bench.batches[0], 0)  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for i in range(steps):
            bench.restore()
            with record_function("train_step"):
                bench._step(name, bench.batches[i % len(bench.batches)], i)
    key = "self_cuda_time_total" if bench.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30))


def main(cli):
    if independent_runs.repeat(cli, "bench/throughput.py"):
        return
    torch.set_num_threads(cli.threads)
    start = time.perf_counter()
    bench = Bench(cli)
    if cli.profile:
        profile(bench, cli.profile)
        return
    names = list(bench.flags)
    results = {n: [] for n in names}
    raw = []
    total_rounds = cli.warmup_rounds + cli.rounds
    for r in range(total_rounds):
        warm = r < cli.warmup_rounds
        timed_idx = r - cli.warmup_rounds
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            if "sequential" in n and not warm and timed_idx >= cli.seq_rounds:
                continue
            tokens, walls, cpus = bench.run_variant(n)
            rec = {"round": r, "warmup": warm, "variant": n, "tokens": tokens,
                   "seconds": sum(walls), "cpu_seconds": sum(cpus),
                   "tps": tokens / sum(walls), "cpu_tps": tokens / sum(cpus),
                   "steps": [round(x, 4) for x in walls], "cpu_steps": [round(x, 4) for x in cpus]}
            raw.append(rec)
            if not warm:
                results[n].append(rec)
            print(f"round {r}{' (warm-up)' if warm else ''} {n:>16}: {rec['tps']:8,.0f} tokens/s wall "
                  f"({rec['seconds']:.2f} s), {rec['cpu_tps']:8,.0f} tokens/s CPU ({rec['cpu_seconds']:.2f} s), "
                  f"{len(walls)} steps", flush=True)
    table = render(bench, results, cli, time.perf_counter() - start)
    print()
    print(table)
    if not cli.no_write:
        write_results(cli, "bench/throughput.py", table, raw)


def write_results(cli, script: str, table: str, raw) -> None:
    """The markdown table to OUT_DIR/OUT_NAME.md (rewritten) and the run's records to OUT_NAME.log (appended)."""
    os.makedirs(cli.out_dir, exist_ok=True)
    with open(os.path.join(cli.out_dir, cli.out_name + ".md"), "w") as f:
        f.write(f"# {script} results\n\n" + table)
    with open(os.path.join(cli.out_dir, cli.out_name + ".log"), "a") as f:
        f.write(json.dumps({"run": datetime.datetime.now().isoformat(timespec="seconds"),
                            "command": command_line(), "machine": machine_description(cli)}) + "\n")
        for rec in raw:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main(CLI)
