"""Criterion mgs: step time and peak memory against their floors, and the spread of the candidate weights.

Welleck and Cho, "MLE-Guided Parameter Search for Task Loss Minimization in Neural Sequence Modeling" (AAAI 2021):
one MGS update costs K + 1 greedy decodes and one MLE forward-backward (Algorithm 1); the authors' code holds
K + 2 model copies, this implementation one parameter snapshot plus the MLE step and the direction (target: at most
2 x the parameters above an MLE step).  Figure 2 reports the standard deviation of the K normalised weights.

Groups (a tiny transformer on the synthetic reverse task, CPU; say so when quoting):

* ``step``: median over interleaved rounds of (a) one mgs training call + backward and (b) its floor: K + 1 greedy
  decodes of the batch (``BatchDecoder.decode_best``) + one label-smoothed CE forward-backward;
* ``memory``: peak resident memory (``resource.getrusage`` max RSS) of separate processes that build the model and
  run 3 mgs steps or 3 MLE steps; (mgs - mle) / parameter bytes;
* ``weights``: mean ``mgs_weight_std`` over --updates SGD updates of mgs fine-tuning under
  ``--mgs-proposal-density unit`` and ``exact`` (alpha 1, edit cost), from the same initial model and batches.

Usage: ``python3 bench/mgs_step.py [--runs N] [--rounds 5]``; results in bench/results/mgs_step.md.
"""
import argparse
import datetime
import os
import resource
import statistics
import subprocess
import sys
import time

import independent_runs  # bench/ is on sys.path when the script runs

import torch

K = 4
PAIRS_SEED = 3


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (1 warm-up round is discarded)")
    p.add_argument("--batch", type=int, default=16, help="sentences per batch")
    p.add_argument("--dim", type=int, default=64, help="model dimension of the tiny transformer")
    p.add_argument("--memory-dim", type=int, default=512,
                   help="model dimension of the memory group (large enough for parameter copies to show in the RSS)")
    p.add_argument("--updates", type=int, default=30, help="updates of the weights group")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--out-name", default="mgs_step")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--memory-child", choices=["mgs", "mle"], help=argparse.SUPPRESS)
    independent_runs.add_arguments(p)
    return p.parse_args(argv)


def setup(cli, *flags):
    from fairseq_ext.testing import tiny
    from fairseq_ext.testing.synthetic import make_pairs

    dims = ["--encoder-embed-dim", str(cli.dim), "--decoder-embed-dim", str(cli.dim),
            "--encoder-ffn-embed-dim", str(2 * cli.dim), "--decoder-ffn-embed-dim", str(2 * cli.dim)]  # fmt: skip
    torch.manual_seed(0)
    task, model, criterion = tiny.build("transformer", ["--criterion", "mgs", "--mgs-task-loss", "edit", *flags],
                                        num_symbols=20, extra=dims)  # fmt: skip
    pairs = make_pairs(cli.batch * 4, "reverse", 20, 4, 12, seed=PAIRS_SEED)
    batches = [tiny.translation_batch(task, pairs[i : i + cli.batch]) for i in range(0, len(pairs), cli.batch)]
    return task, model, criterion, batches


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def step_group(cli):
    task, model, criterion, batches = setup(cli, "--mgs-num-candidates", str(K))
    sample = batches[0]
    params = [p for p in model.parameters() if p.requires_grad]

    def mgs():
        model.train()
        model.zero_grad()
        criterion.set_num_updates(1)
        loss, _, _ = criterion(model, sample)
        loss.backward()

    def floor():
        model.train()
        for _ in range(K + 1):
            criterion.decoder.decode_best(model, sample)
        model.zero_grad()
        loss, _ = criterion.compute_loss(model, model(**sample["net_input"]), sample, reduce=True)
        loss.backward()

    results = {"mgs": [], "floor": []}
    for r in range(cli.rounds + 1):
        for name, fn in (("mgs", mgs), ("floor", floor))[:: 1 if r % 2 == 0 else -1]:
            t = timed(fn)
            if r > 0:
                results[name].append(t)
    med = {n: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for n, v in results.items()}
    return med, sum(p.numel() for p in params)


def memory_child(cli):
    task, model, criterion, batches = setup(cli, "--mgs-num-candidates", str(K))
    model.train()
    for u in range(3):
        model.zero_grad()
        if cli.memory_child == "mgs":
            criterion.set_num_updates(u)
            loss, _, _ = criterion(model, batches[0])
        else:
            loss, _ = criterion.compute_loss(model, model(**batches[0]["net_input"]), batches[0], reduce=True)
        loss.backward()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} {params}")


def memory_group(cli):
    out = {}
    for kind in ("mle", "mgs"):
        argv = [sys.executable, os.path.abspath(__file__), "--memory-child", kind, "--dim", str(cli.memory_dim),
                "--batch", str(cli.batch)]  # fmt: skip
        rss, params = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()[-2:]
        out[kind] = int(rss) * 1024  # kB on Linux
        out["params"] = int(params)
    return out


def weights_group(cli):
    stds = {}
    for density in ("unit", "exact"):
        task, model, criterion, batches = setup(cli, "--mgs-num-candidates", str(K), "--mgs-alpha", "1",
                                                "--mgs-proposal-density", density)  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        values = []
        for u in range(cli.updates):
            model.train()
            opt.zero_grad()
            criterion.set_num_updates(u)
            loss, _, log = criterion(model, batches[u % len(batches)])
            loss.backward()
            opt.step()
            values.append(log["mgs_weight_std"])
        stds[density] = values
    return stds


def main(cli):
    if cli.memory_child:
        return memory_child(cli)
    if independent_runs.repeat(cli, "bench/mgs_step.py"):
        return
    torch.set_num_threads(cli.threads)
    start = time.perf_counter()
    med, n_params = step_group(cli)
    mem = memory_group(cli)
    stds = weights_group(cli)
    extra = (mem["mgs"] - mem["mle"]) / mem["params"]
    lines = [
        f"## Criterion mgs: step time, memory, weight spread ({datetime.datetime.now().strftime('%Y-%m-%d %H:%M')})",
        "", "Command (from the repository root):", "", "```", "python3 " + " ".join(sys.argv), "```", "",
        f"- tiny transformer (dim {cli.dim}, {n_params / 1e3:.1f}k parameters) on the synthetic reverse task, "
        f"batches of {cli.batch} sentences, K = {K}, CPU, {cli.threads} thread(s); load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; wall time {time.perf_counter() - start:.0f} s",
        "- this is a synthetic miniature, not the paper's GPT-2 / IWSLT setting", "",
        "### step", "",
        "| ratio of median step time | wall | CPU | target |", "|---|---:|---:|---|",
        f"| mgs / (K+1 greedy decodes + 1 MLE fwd-bwd) | {med['mgs'][0] / med['floor'][0]:.3f} "
        f"| {med['mgs'][1] / med['floor'][1]:.3f} | <= 1.2 |",
        "", f"medians: mgs {med['mgs'][0]:.4f} s wall / {med['mgs'][1]:.4f} s CPU; floor {med['floor'][0]:.4f} s / "
        f"{med['floor'][1]:.4f} s", "",
        "### memory", "",
        f"model dim {cli.memory_dim}; peak RSS, separate processes: MLE {mem['mle'] / 2**20:.1f} MiB, mgs {mem['mgs'] / 2**20:.1f} MiB; parameters "
        f"{mem['params'] / 2**20:.3f} MiB; (mgs - MLE) / parameter bytes = {extra:.2f} (target <= 2; the authors' code: "
        f"K + 2 = {K + 2} copies).", "",
        "| ratio | wall | CPU | target |", "|---|---:|---:|---|",
        f"| (mgs - MLE) peak RSS / parameter bytes | {extra:.2f} | {extra:.2f} | <= 2 |", "",
        "### weights", "",
        f"mean (min-max) of mgs_weight_std over {cli.updates} SGD updates (lr 0.5, alpha 1, edit cost, K = {K}; "
        "uniform weights give 0, one-hot weights "
        f"{statistics.pstdev([1.0] + [0.0] * (K - 1)):.3f}):", "",
        "| --mgs-proposal-density | mean | min | max |", "|---|---:|---:|---:|",
    ]
    for density, v in stds.items():
        lines.append(f"| {density} | {statistics.mean(v):.3f} | {min(v):.3f} | {max(v):.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if not cli.no_write:
        os.makedirs(cli.out_dir, exist_ok=True)
        with open(os.path.join(cli.out_dir, cli.out_name + ".md"), "w") as f:
            f.write("# bench/mgs_step.py results\n\n" + table)


if __name__ == "__main__":
    main(parse())
