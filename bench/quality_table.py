"""Collects bench/quality_multi30k.sh's results into a markdown table and a log of key lines.

Reads RUN_DIR/<job>/{bleu_greedy,bleu_beam5}.txt, train.log and *.cmd for each job named.
"""
import argparse
import os
import re
import subprocess


def read(path):
    return open(path, encoding="utf-8").read() if os.path.exists(path) else ""


def bleu(text):
    m = re.search(r"^BLEU \S* = ([0-9.]+)", text, re.M)
    return m.group(1) if m else "n/a"


def ratio(text):
    m = re.search(r"ratio = ([0-9.]+)", text)
    return m.group(1) if m else "n/a"


def last_epoch_line(train_log, kind):
    lines = [ln for ln in train_log.splitlines() if re.search(rf"\| {kind} \| epoch", ln)]
    return lines[-1] if lines else ""


def field(line, name):
    m = re.search(rf"\| {name} ([0-9.e+-]+)", line)
    return m.group(1) if m else "n/a"


def describe(name):
    seed = re.search(r"_ftseed(\d+)$", name)
    name = re.sub(r"_ftseed\d+$", "", name)
    method, p, k = describe_config(name)
    return (f"{method}, fine-tune seed {seed.group(1)}" if seed else method), p, k


def describe_config(name):
    if name == "base":
        return "base (teacher forcing, no fine-tune)", "-", "-"
    if name == "tf":
        return "teacher forcing (control)", "0", "-"
    m = re.match(r"hss_(greedy|sample)$", name)
    if m:
        return f"sequential_ss ({'argmax' if m.group(1) == 'greedy' else 'sample'}; Bengio et al.)", "0.25", "-"
    m = re.match(r"dss_(greedy|sample)_(fixed|annealed)$", name)
    if m:
        alpha = "alpha 1" if m.group(2) == "fixed" else "alpha 1 x2 per 30 updates"
        return f"differentiable_ss {m.group(1)}, {alpha}", "0.25", "-"
    m = re.match(r"pss_p([0-9.]+)_k(\d+)", name)
    return "parallel_ss", m.group(1), m.group(2)


CANONICAL = ["base", "tf", "pss_p0.25_k1", "pss_p0.5_k1", "pss_p1.0_k1", "pss_p0.25_k2", "pss_p0.5_k2", "pss_p1.0_k2",
             "hss_greedy", "hss_sample", "dss_greedy_fixed", "dss_sample_fixed", "dss_greedy_annealed",
             "dss_sample_annealed"]


def discover(run_dir, configs=None):
    """Run directories in a fixed order: seed 1 configurations, then each further fine-tune seed;
    only ``configs`` (names without the seed suffix) when given."""
    present = {d for d in os.listdir(run_dir) if os.path.exists(os.path.join(run_dir, d, "train.log"))}
    seeds = sorted({int(m.group(1)) for d in present for m in [re.search(r"_ftseed(\d+)$", d)] if m})
    canonical = [c for c in CANONICAL if not configs or c in configs]
    jobs = [c for c in canonical if c in present]
    for seed in seeds:
        jobs += [f"{c}_ftseed{seed}" for c in canonical if c != "base" and f"{c}_ftseed{seed}" in present]
    return jobs


def means(rows_by_job):
    """Mean BLEU per configuration over the fine-tune seeds that finished, when there are several."""
    groups = {}
    for job, (greedy, beam) in rows_by_job.items():
        if greedy == "n/a" or beam == "n/a" or job == "base":
            continue
        groups.setdefault(re.sub(r"_ftseed\d+$", "", job), []).append((float(greedy), float(beam)))
    if not any(len(v) > 1 for v in groups.values()):
        return []
    out = [
        "",
        "Mean (and spread) over the fine-tune seeds that finished (same base model):",
        "",
        "| config | seeds | BLEU greedy mean | greedy min-max | BLEU beam 5 mean | beam 5 min-max |",
        "|---|---|---|---|---|---|",
    ]
    for config in CANONICAL[1:]:
        v = groups.get(config)
        if not v:
            continue
        g, b = [x[0] for x in v], [x[1] for x in v]
        out.append(
            f"| {config} | {len(v)} | {sum(g) / len(g):.2f} | {min(g):.2f}-{max(g):.2f} "
            f"| {sum(b) / len(b):.2f} | {min(b):.2f}-{max(b):.2f} |"
        )
    return out


def code_version():
    """The commit of the checkout (and whether fairseq_ext/ differs from it) when the table is made."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "fairseq_ext"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head or 'no commit'}{' (fairseq_ext/ modified)' if dirty else ''}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--seed", default="1")
    ap.add_argument("--md", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--configs", default="", help="comma-separated configurations to include (default: all)")
    ap.add_argument("jobs", nargs="*", help="default: every finished or started run in --run-dir")
    args = ap.parse_args()
    if not args.jobs:
        args.jobs = discover(args.run_dir, [c for c in args.configs.split(",") if c])

    rows, cmds, keylines, scores = [], [], [], {}
    sig = ""
    for job in args.jobs:
        d = os.path.join(args.run_dir, job)
        train_log = read(os.path.join(d, "train.log"))
        greedy, beam = read(os.path.join(d, "bleu_greedy.txt")), read(os.path.join(d, "bleu_beam5.txt"))
        sig = sig or (re.search(r"signature (\S+)\)", beam or greedy) or [None, ""])[1]
        valid = last_epoch_line(train_log, "valid")
        train = last_epoch_line(train_log, "train")
        method, p, k = describe(job)
        scores[job] = (bleu(greedy), bleu(beam))
        wall = field(train, "wall")
        rows.append(
            f"| {job} | {method} | {p} | {k} | {bleu(greedy)} | {bleu(beam)} | {ratio(greedy)} | {ratio(beam)} "
            f"| {field(valid, 'nll_loss')} "
            f"| {field(train, 'ss_replaced')} | {wall} |"
        )
        for cmd_file in ("train.cmd", "generate_greedy.cmd", "generate_beam5.cmd"):
            cmd = read(os.path.join(d, cmd_file)).strip()
            if cmd:
                cmds.append(f"# {job}: {cmd_file[:-4]}\n{cmd}")
        keylines.append(f"## {job}")
        keylines += [ln for ln in (train, valid) if ln]
        keylines += [ln for ln in train_log.splitlines() if "done training" in ln]
        keylines += [t.strip() for t in (greedy, beam) if t.strip()]

    table = [
        "| run | method | p | K | BLEU greedy | BLEU beam 5 | hyp/ref length greedy | hyp/ref length beam 5 "
        "| valid nll (teacher-forced, last epoch) | fraction of inputs replaced (train, last epoch) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    table += means(scores)
    dss = any(job.startswith(("dss_", "hss_")) for job in args.jobs)
    method_text = (
        [
            "criterion differs: `label_smoothed_cross_entropy`, `sequential_ss` (hard scheduled sampling, argmax",
            "or sampled tokens) or `differentiable_ss` (sequential mode; soft argmax or soft Gumbel sample; alpha",
            "fixed at 1 or annealed x2 every 30 updates), all at a constant mixing probability p = 0.25 and label",
            "smoothing 0.1: the MT rows of Table 1 of Goyal et al. 2017 in miniature.  The last checkpoint of",
        ]
        if dss
        else [
            "criterion differs: `label_smoothed_cross_entropy` or `parallel_ss` (constant p, K passes,",
            "sampled conditioning tokens, label smoothing 0.1).  This is the paper's MT protocol in",
            "miniature: teacher-forced warm-up, then parallel scheduled sampling.  The last checkpoint of",
        ]
    )
    how = (
        [
            "DSS=1 bash bench/quality_multi30k.sh /work/shared/data/multi30k             # Table 1 rows, seed 1",
            "DSS=1 FT_SEED=2 bash bench/quality_multi30k.sh /work/shared/data/multi30k   # fine-tune seed 2",
        ]
        if dss
        else [
            "bash bench/quality_multi30k.sh /work/shared/data/multi30k                       # base + 5 configs",
            "EXTRA_K2=1 bash bench/quality_multi30k.sh /work/shared/data/multi30k            # + p=0.25, 1.0 with K=2",
            "EXTRA_K2=1 FT_SEED=2 bash bench/quality_multi30k.sh /work/shared/data/multi30k  # fine-tune seed 2",
        ]
    )
    md = [
        "# Multi30k en->de: teacher forcing vs " + ("hard and differentiable scheduled sampling" if dss else "parallel scheduled sampling"),
        "",
        f"Produced by `bench/quality_multi30k.sh` (seed {args.seed}); the exact commands are below.",
        f"Code: commit {code_version()} when this table was written.",
        "",
        "Design (CPU budget: two shared cores).  One teacher-forced base model (2+2-layer transformer,",
        "256 wide, FFN 512, 4 heads, shared embeddings, dropout 0.3, label smoothing 0.1, Adam, lr 1e-3",
        "inverse_sqrt with 250 warm-up updates, 4096 tokens per batch, ~132 updates per epoch) is trained",
        "for a few epochs on the 29k Multi30k training pairs (joint 8k sentencepiece, cased raw text).",
        "Every configuration, teacher forcing included as the control, is then fine-tuned from the base's",
        "last checkpoint for the same number of epochs with the same seed (same batches), a fresh Adam",
        "state and the same constant lr (the base's final lr, after 20 warm-up updates); only the",
        *method_text,
        "each run is decoded greedy and with beam 5 (`--required-batch-size-multiple 1`, every one of the",
        "1000 test sentences checked to have a hypothesis) and scored with sacreBLEU against the raw,",
        f"cased reference of test_2016_flickr; signature `{sig}`.",
        "'hyp/ref length' is sacreBLEU's length ratio: values far above 1 mean some hypotheses run on",
        "(repeated tokens up to fairseq's 200-token limit), which small, briefly trained models do.",
        "'wall s' is the training time of that run alone (the base: all its epochs), two runs sharing",
        "two CPU cores with other work, so only roughly comparable.",
        "",
        "How it was run (each call skips what is finished; data prepared by recipes/multi30k/prepare.sh",
        "into RUN_DIR/data, sentencepiece 8k, from the raw release files given as the argument):",
        "",
        "```",
        *how,
        "```",
        "",
        *table,
        "",
        "## Exact commands",
        "",
        "```",
        *cmds,
        "```",
        "",
    ]
    with open(args.md, "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    with open(args.log, "w", encoding="utf-8") as f:
        f.write("\n".join(keylines) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
