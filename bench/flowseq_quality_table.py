"""Tables of bench/quality_flowseq_multi30k.sh.

--run-dir: the BLEU table (Tables 1 and 2 of Ma et al. 2019 in miniature) and the CPU time of every
training and decoding, from RUN_DIR/<direction>/exp/{results.txt,timing.txt} -> --md and --log.
--measure: per-epoch CPU time of each model from a measuring run (RUN_DIR/measure), scaled to the
full training set, and the CPU cost of the script's default settings.
"""
import argparse
import os
import re
import sys

# (model directory, decoding) -> (row label, training data); in the order of the paper's tables
ROWS = [
    ("baseline", "beam5", "Transformer (autoregressive), beam 5", "raw"),
    ("baseline", "greedy", "Transformer (autoregressive), greedy", "raw"),
    ("nat_raw", "nat", "NAT (fairseq nonautoregressive_transformer), 1 pass", "raw"),
    ("flowseq_raw", "argmax", "FlowSeq argmax", "raw"),
    ("flowseq_raw", "iwd15", "FlowSeq IWD n = 15", "raw"),
    ("flowseq_raw", "npd15", "FlowSeq NPD n = 15", "raw"),
    ("flowseq_raw", "npd30", "FlowSeq NPD n = 30", "raw"),
    ("nat_kd", "nat", "NAT (fairseq nonautoregressive_transformer), 1 pass", "distilled"),
    ("flowseq_kd", "argmax", "FlowSeq argmax", "distilled"),
    ("flowseq_kd", "iwd15", "FlowSeq IWD n = 15", "distilled"),
    ("flowseq_kd", "npd15", "FlowSeq NPD n = 15", "distilled"),
    ("flowseq_kd", "npd30", "FlowSeq NPD n = 30", "distilled"),
]
ARROW = {"en-de": "en→de", "de-en": "de→en"}


def read(path):
    return open(path, encoding="utf-8").read() if os.path.exists(path) else ""


def bleu_scores(results):
    """{(model, decoding): (bleu, ratio)} from a results.txt."""
    out = {}
    for m in re.finditer(r"^BLEU (\w+)/(\w+) = ([0-9.]+) .*?ratio = ([0-9.]+)", results, re.M):
        out[(m.group(1), m.group(2))] = (float(m.group(3)), float(m.group(4)))
    return out


def timings(path):
    """[(label, cpu seconds = user + sys, wall)] from a timing.txt written by /usr/bin/time."""
    rows = []
    for line in read(path).splitlines():
        m = re.match(r"^(.*\S) ([0-9.]+) ([0-9.]+) ([0-9.]+)$", line)
        if m:
            rows.append((m.group(1), float(m.group(2)) + float(m.group(3)), float(m.group(4))))
    return rows


def fmt(x, digits=2):
    return "n/a" if x is None else f"{x:.{digits}f}"


def run_tables(args):
    directions = args.directions.split()
    scores = {d: bleu_scores(read(os.path.join(args.run_dir, d, "exp", "results.txt"))) for d in directions}
    lines = ["# FlowSeq vs NAT vs the autoregressive transformer on Multi30k (bench/quality_flowseq_multi30k.sh)", ""]
    lines.append("sacreBLEU (13a, cased) on test_2016_flickr, detokenised hypotheses vs the raw reference; "
                 "the last checkpoint of each model. Length ratio (hyp/ref) in brackets.")
    lines.append("")
    lines.append("| model | training data | " + " | ".join(f"{ARROW.get(d, d)} BLEU" for d in directions) + " |")
    lines.append("|---|---|" + "---:|" * len(directions))
    for model, decode, label, data in ROWS:
        cells = [scores[d].get((model, decode)) for d in directions]
        if all(c is None for c in cells):
            continue
        lines.append(f"| {label} | {data} | " + " | ".join(
            "n/a" if c is None else f"{c[0]:.2f} ({c[1]:.2f})" for c in cells) + " |")
    lines += ["", "Trends (BLEU differences; the paper's: distillation helps the NAT much more than FlowSeq, "
              "NPD > IWD > argmax, FlowSeq > NAT):", ""]

    def diff(d, a, b):
        x, y = scores[d].get(a), scores[d].get(b)
        return None if x is None or y is None else x[0] - y[0]

    trends = [
        ("distillation gain, NAT", ("nat_kd", "nat"), ("nat_raw", "nat")),
        ("distillation gain, FlowSeq argmax", ("flowseq_kd", "argmax"), ("flowseq_raw", "argmax")),
        ("FlowSeq argmax - NAT, raw", ("flowseq_raw", "argmax"), ("nat_raw", "nat")),
        ("FlowSeq argmax - NAT, distilled", ("flowseq_kd", "argmax"), ("nat_kd", "nat")),
        ("IWD 15 - argmax, raw", ("flowseq_raw", "iwd15"), ("flowseq_raw", "argmax")),
        ("NPD 15 - argmax, raw", ("flowseq_raw", "npd15"), ("flowseq_raw", "argmax")),
        ("NPD 15 - argmax, distilled", ("flowseq_kd", "npd15"), ("flowseq_kd", "argmax")),
        ("Transformer beam 5 - FlowSeq NPD 15, distilled", ("baseline", "beam5"), ("flowseq_kd", "npd15")),
    ]
    lines.append("| difference | " + " | ".join(ARROW.get(d, d) for d in directions) + " |")
    lines.append("|---|" + "---:|" * len(directions))
    for name, a, b in trends:
        vals = [diff(d, a, b) for d in directions]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {name} | " + " | ".join("n/a" if v is None else f"{v:+.2f}" for v in vals) + " |")
    lines += ["", "CPU time (user + system seconds, one thread) of each fairseq command:", ""]
    lines.append("| command | " + " | ".join(ARROW.get(d, d) for d in directions) + " |")
    lines.append("|---|" + "---:|" * len(directions))
    per = {d: {} for d in directions}
    order = []
    for d in directions:
        for label, cpu, _wall in timings(os.path.join(args.run_dir, d, "exp", "timing.txt")):
            per[d][label] = per[d].get(label, 0.0) + cpu
            if label not in order:
                order.append(label)
    for label in order:
        lines.append(f"| {label} | " + " | ".join(fmt(per[d].get(label), 0) for d in directions) + " |")
    total = [sum(per[d].values()) for d in directions]
    lines.append("| **total** | " + " | ".join(f"{t:.0f}" for t in total) + " |")
    text = "\n".join(lines) + "\n"
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(text)
    if args.log:
        with open(args.log, "a", encoding="utf-8") as f:
            for d in directions:
                f.write(f"== {d}\n" + read(os.path.join(args.run_dir, d, "exp", "results.txt")))
    sys.stdout.write(text)


def count_lines(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def measure_table(args):
    m = args.measure
    n_train = count_lines(os.path.join(m, "data", "raw", "train.en"))
    n_test = count_lines(os.path.join(m, "data", "raw", "test.en"))
    rows = timings(os.path.join(m, "exp", "timing.txt"))
    seen, first, again = {}, {}, {}
    for label, cpu, _wall in rows:
        seen[label] = seen.get(label, 0) + 1
        (first if seen[label] == 1 else again)[label] = cpu
    out = [f"measured on {n_train} training / {n_test} test sentences (CPU seconds, user + system, one thread); "
           f"scaled to {args.scale_to} training and {args.test_lines} test sentences", ""]
    out.append("| command | CPU s measured | start-up (rerun, nothing to do) | per full epoch / full decoding |")
    out.append("|---|---:|---:|---:|")
    est = {}
    for label, cpu in first.items():
        start = again.get(label)
        if label.startswith("train "):
            work = max(cpu - (start or 0.0), 0.0)
            est[label] = (start or 0.0) / 1.0, work * args.scale_to / n_train
            out.append(f"| {label} (1 epoch) | {cpu:.1f} | {fmt(start, 1)} | {est[label][1]:.0f} |")
        else:
            scale = (args.scale_to if " train " in label else args.test_lines) / (n_train if " train " in label else n_test)
            start = min((c for lab, c in first.items() if lab.startswith("generate ")), default=0.0) * 0.8
            est[label] = start, (cpu - start) * scale + start
            out.append(f"| {label} | {cpu:.1f} | ~{start:.1f} | {est[label][1]:.0f} |")
    epochs = dict(kv.split("=") for kv in args.epochs.split(","))
    total = 0.0
    for label, (start, value) in est.items():
        if label.startswith("train "):
            model = label.split()[1]
            n = int(epochs["AR" if model == "baseline" else "FLOWSEQ" if model.startswith("flowseq") else "NAT"])
            total += start + n * value
        elif label.split()[-1] in args.decodes.split() + ["beam5", "beam1", "nat"] or " train " in label:
            total += value
    out += ["", f"expected CPU time of one direction with epochs {args.epochs} and decodings '{args.decodes}': "
            f"{total / 3600:.1f} CPU hours ({total:.0f} s); both directions: {2 * total / 3600:.1f} CPU hours"]
    print("\n".join(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir")
    p.add_argument("--directions", default="en-de de-en")
    p.add_argument("--md")
    p.add_argument("--log")
    p.add_argument("--measure", help="a measuring run's directory (RUN_DIR/measure)")
    p.add_argument("--scale-to", type=int, default=29000, help="training sentences of the full run")
    p.add_argument("--test-lines", type=int, default=1000)
    p.add_argument("--epochs", default="AR=10,FLOWSEQ=30,NAT=30")
    p.add_argument("--decodes", default="argmax iwd15 npd15")
    args = p.parse_args(argv)
    if args.measure:
        measure_table(args)
    elif args.run_dir:
        run_tables(args)
    else:
        p.error("--run-dir or --measure")


if __name__ == "__main__":
    main()
