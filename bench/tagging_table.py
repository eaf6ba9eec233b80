"""Collects recipes/conll2003 results of several seeds (RUN_DIR/seedN/results.txt) into a markdown
table in the layout of Table 1 of Goyal et al. 2017: span F1 on dev and test, mean and spread over
seeds, and, as the paper reports, the test F1 of the seed with the best dev F1."""
import argparse
import glob
import os
import re
import statistics

ROWS = [
    ("baseline", "Baseline CE"),
    ("hss_greedy", "Bengio et al. (2015), greedy (sequential_ss argmax)"),
    ("hss_sample", "Bengio et al. (2015), sample (sequential_ss sample)"),
    ("dss_greedy_fixed", "alpha-soft fixed, greedy (soft argmax)"),
    ("dss_sample_fixed", "alpha-soft fixed, sample (soft Gumbel)"),
    ("dss_greedy_annealed", "alpha-soft annealed, greedy"),
    ("dss_sample_annealed", "alpha-soft annealed, sample"),
]
LINE = re.compile(r"^F1 (\w+)/(valid|test)/(greedy|beam5) = ([0-9.]+) .*tag accuracy ([0-9.]+)", re.M)


def collect(run_dir):
    scores = {}  # (model, split, decode) -> {seed: (f1, accuracy)}
    for path in sorted(glob.glob(os.path.join(run_dir, "seed*", "results.txt"))):
        seed = int(re.search(r"seed(\d+)", path).group(1))
        for m in LINE.finditer(open(path, encoding="utf-8").read()):
            scores.setdefault(m.groups()[:3], {})[seed] = (float(m.group(4)), float(m.group(5)))
    return scores


def summary(values):
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--md", required=True)
    ap.add_argument("--command", default="")
    args = ap.parse_args()
    scores = collect(args.run_dir)
    seeds = sorted({s for v in scores.values() for s in v})
    lines = [
        "# NER quality: Table 1 rows of Goyal et al. 2017 on CoNLL-2003 English",
        "",
        f"Command: `{args.command}`" if args.command else "",
        "",
        f"Seeds: {seeds}. Span F1 (conlleval rules) of the LAST checkpoint, mean ± sample std over seeds; "
        "'best-dev seed' is the test F1 of the seed with the highest dev F1 for that row (the paper's protocol).",
        "",
        "| training | dev F1 greedy | test F1 greedy | test F1 greedy minus CE, paired by seed | test F1, best-dev seed "
        "| test F1 beam 5 | test tag accuracy greedy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ce_test = scores.get(("baseline", "test", "greedy"), {})
    for model, label in ROWS:
        dev = scores.get((model, "valid", "greedy"), {})
        test = scores.get((model, "test", "greedy"), {})
        beam = scores.get((model, "test", "beam5"), {})
        if not dev and not test:
            continue
        best = max(dev, key=lambda s: dev[s][0]) if dev else None
        best_test = f"{test[best][0]:.2f} (seed {best})" if best in test else "n/a"
        paired = [test[s][0] - ce_test[s][0] for s in test if s in ce_test]
        paired_text = "-" if model == "baseline" else summary(paired)
        lines.append(
            f"| {label} | {summary([v[0] for v in dev.values()])} | {summary([v[0] for v in test.values()])} "
            f"| {paired_text} | {best_test} | {summary([v[0] for v in beam.values()])} "
            f"| {summary([v[1] for v in test.values()])} |"
        )
    per_seed = ["", "Per seed, test F1 greedy:", "", "| training | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                "|---|" + "---:|" * len(seeds)]
    for model, label in ROWS:
        test = scores.get((model, "test", "greedy"), {})
        if test:
            per_seed.append(f"| {label} | " + " | ".join(f"{test[s][0]:.2f}" if s in test else "n/a" for s in seeds) + " |")
    lines += per_seed
    os.makedirs(os.path.dirname(args.md), exist_ok=True)
    with open(args.md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
