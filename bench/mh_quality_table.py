"""Tables of bench/quality_mh_multi30k.sh (Metropolis-Hastings over a conditional masked LM, Goyal's
thesis "Characterizing and Overcoming the Limitations of Neural Autoregressive Models", chapter 6).

select-test: the length-limited test subset (sources of at most N words, the thesis's "De-En (20)"
             restriction of section 6.5), the first --max-lines of them, and a one-line note of what was kept.
table:       per CMLM model, one row per decoding: sacreBLEU (EXP/results.txt), the chain-weighted mean
             E_local, acceptance and novel-transition rates of the sample epochs (the decoding's
             stats file, recipes/common/nar_tools.py), the decoding's CPU time (EXP/timing.txt), and
             the thesis's numbers for the same row (Tables 6.2, 6.4, 6.5, 6.6; WMT'14 De-En) -> --md, --log.
bootstrap:   paired bootstrap of corpus-BLEU differences between decodings of one model (the test subset is
             small: 30 sentences by default), A - B with a 95% interval and the share of resamples <= 0.
"""
import argparse
import glob
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "common"))
import nar_tools  # noqa: E402

# decoding -> (row label, the thesis's row: table and numbers, WMT'14 De-En; "(20)" = sources of at most 20 tokens)
ROWS = {
    "warm": ("warm start (one greedy pass over all masks)", "6.6: BLEU 20.27 (full test)"),
    "gibbs": ("degenerate Gibbs, T = 1.0", "6.2 (20): BLEU 9.03, E_norm 31.12e3, novel 0.36, acceptance 1"),
    "gibbs_t08": ("degenerate Gibbs, T = 0.8", "6.2 (20): BLEU 24.77, novel 0.08; 6.6: 27.88 (full)"),
    "maskpredict": ("mask-predict (length beam 1, 10 iterations)", "6.6: BLEU 29.27 (full)"),
    "mh_raw": ("MH, E_raw", "sec. 6.6 (20): acceptance 0.90, novel 0.11"),
    "mh_local": ("MH, E_local", "6.2 (20): BLEU 24.74, E_norm 11.13e3, novel 0.11; sec. 6.6: acceptance 0.91"),
    "gibbs_block": ("degenerate block Gibbs", "6.4 (20): BLEU 9.03, E_norm 31.18e3, novel 0.77"),
    "mh_raw_block": ("block MH, E_raw (annealed block size)", "6.4 (20): BLEU 27.12, E_norm 8.08e3, novel 0.40"),
    "mh_local_block": ("block MH, E_local (annealed block size)", "6.4 (20): BLEU 26.78, E_norm 8.17e3, novel 0.41"),
    "mh_raw_anneal02_t08": ("MH, E_raw, target T annealed -0.02/epoch, proposal T 0.8",
                            "6.5 (20): BLEU 29.91, acceptance 0.71; 6.6: 30.12 (full)"),
    "mh_local_anneal02_t08": ("MH, E_local, target T annealed -0.02/epoch, proposal T 0.8",
                              "6.5 (20): BLEU 29.16, acceptance 0.52; 6.6: 29.74 (full)"),
    "mh_raw_anneal04_t08": ("MH, E_raw, target T annealed -0.04/epoch, proposal T 0.8", "6.5 (20): BLEU 28.32, acceptance 0.62"),
    "mh_local_anneal04_t08": ("MH, E_local, target T annealed -0.04/epoch, proposal T 0.8", "6.5 (20): BLEU 27.58, acceptance 0.45"),
    "mh_raw_anneal06_t08": ("MH, E_raw, target T annealed -0.06/epoch, proposal T 0.8", "6.5 (20): BLEU 27.21, acceptance 0.58"),
    "mh_local_anneal06_t08": ("MH, E_local, target T annealed -0.06/epoch, proposal T 0.8", "6.5 (20): BLEU 26.95, acceptance 0.41"),
    "gibbs_t20": ("degenerate Gibbs, T = 2.0", "6.2 (20): BLEU 14.53, novel 1.0"),
    "gibbs_t15": ("degenerate Gibbs, T = 1.5", "6.2 (20): BLEU 10.12, novel 0.97"),
    "gibbs_t05": ("degenerate Gibbs, T = 0.5", "6.2 (20): BLEU 26.12, novel 0.04"),
    "mh_local_t20": ("MH, E_local, T = 2.0", "6.2 (20): BLEU 25.91, novel 0.03"),
    "mh_local_t15": ("MH, E_local, T = 1.5", "6.2 (20): BLEU 24.78, novel 0.05"),
    "mh_local_t08": ("MH, E_local, T = 0.8", "6.2 (20): BLEU 25.84, novel 0.06"),
    "mh_local_t05": ("MH, E_local, T = 0.5", "6.2 (20): BLEU 27.23, novel 0.03"),
}
AR_ROWS = {"beam5": ("autoregressive transformer, beam 5", ""),
           "greedy": ("autoregressive transformer, greedy", "")}  # fmt: skip


def read(path):
    return open(path, encoding="utf-8").read() if path and os.path.exists(path) else ""


def select_test(args):
    with open(args.src, encoding="utf-8") as f:
        src = f.read().splitlines()
    with open(args.tgt, encoding="utf-8") as f:
        tgt = f.read().splitlines()
    if len(src) != len(tgt):
        sys.exit(f"ERROR: {args.src} has {len(src)} lines, {args.tgt} {len(tgt)}")
    within = [i for i, s in enumerate(src) if len(s.split()) <= args.max_src_words]
    kept = within[: args.max_lines] if args.max_lines > 0 else within
    if not kept:
        sys.exit(f"ERROR: no test sentence of at most {args.max_src_words} source words in {args.src}")
    with open(args.out_src, "w", encoding="utf-8") as fs, open(args.out_tgt, "w", encoding="utf-8") as ft:
        for i in kept:
            fs.write(src[i] + "\n")
            ft.write(tgt[i] + "\n")
    note = (f"test subset: the first {len(kept)} of the {len(within)} (of {len(src)}) sentences of "
            f"{os.path.basename(args.src)} whose source has at most {args.max_src_words} words "
            f"(whitespace-separated, before sentencepiece), in file order")  # fmt: skip
    with open(args.note, "w", encoding="utf-8") as f:
        f.write(note + "\n")


def bleu_scores(results):
    """{(model, decoding): bleu} from a results.txt."""
    return {(m.group(1), m.group(2)): float(m.group(3))
            for m in re.finditer(r"^BLEU (\w+)/(\w+) = ([0-9.]+) ", results, re.M)}  # fmt: skip


def cpu_times(path):
    """{label: CPU seconds (user + system)} from a timing.txt, repeated labels summed."""
    out = {}
    for line in read(path).splitlines():
        m = re.match(r"^(.*\S) ([0-9.]+) ([0-9.]+) ([0-9.]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2)) + float(m.group(3))
    return out


def fmt(x, digits=2):
    return "n/a" if x is None else f"{x:.{digits}f}"


def chain_settings(exp, model):
    """'C chains x (B burn-in + S sample epochs), block size K' from a sampler decoding's .cmd file."""
    for cmd_path in sorted(glob.glob(os.path.join(exp, model, "test.*.cmd"))):
        cmd = read(cmd_path).split()
        if "--mh-chains" in cmd:
            get = lambda flag: cmd[cmd.index(flag) + 1] if flag in cmd else "?"  # noqa: E731
            blocks = [read(p).split() for p in glob.glob(os.path.join(exp, model, "test.*_block*.cmd"))]
            block = next((b[b.index("--mh-block-size") + 1] for b in blocks if "--mh-block-size" in b), None)
            return (f"{get('--mh-chains')} chains per sentence x ({get('--mh-burn-in-epochs')} burn-in + "
                    f"{get('--mh-sample-epochs')} sample epochs after the warm start), {get('--mh-order')} order"
                    + (f", block proposals of {block} positions (annealed to 1)" if block else ""))  # fmt: skip
    return None


def table(args):
    exp = args.exp
    results = read(os.path.join(exp, "results.txt"))
    scores = bleu_scores(results)
    times = cpu_times(os.path.join(exp, "timing.txt"))
    models = sorted({m for m, _ in scores if m.startswith("cmlm")})
    lines = ["# Metropolis-Hastings over a conditional masked LM on Multi30k en→de (bench/quality_mh_multi30k.sh)", ""]
    subset = read(args.subset).strip()
    if subset:
        lines += [subset + " — the analogue of the thesis's \"De-En (20)\" (source sentences of at most 20 tokens).", ""]
    lines += ["sacreBLEU (13a, cased) of the detokenised output against the raw reference, every test sentence "
              "decoded once (hypothesis counts checked).  E_local: the locally normalized energy "
              "-sum_t log p_mlm(y_t | y_\\t) of the output chains, mean per sentence (the thesis reports "
              "sums over its test set, x 1e-3); E_local, acceptance and novel-transition rates are chain-weighted "
              "means over the sample epochs (after burn-in) of the decoding's stats file; the warm-start "
              "E_local is epoch 0 of the same chains.  The thesis column: WMT'14 De-En with the released "
              "Mask-Predict model (distilled data, 6+6 layers 512 wide), so compare trends, not values.", ""]
    for model in models:
        settings = chain_settings(exp, model)
        lines += [f"## {model} ({'distilled' if model.endswith('_kd') else 'raw'} training data)", ""]
        if settings:
            lines += [f"Chains: {settings}.", ""]
        lines.append("| decoding | row | BLEU | E_local | acceptance | novel | CPU s | thesis (WMT'14 De-En) |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---|")
        decodes = [d for (m, d) in scores if m == model]
        order = [d for d in ROWS if d in decodes] + [d for d in decodes if d not in ROWS]
        stats_files = {d: os.path.join(exp, model, f"test.{d}.stats.jsonl") for d in decodes}
        warm_energy = None
        for d in order:
            if os.path.exists(stats_files[d]):
                s = nar_tools.mh_summary(nar_tools.read_mh_stats(stats_files[d]))
                warm_energy = warm_energy if warm_energy is not None else s["warm_energy_local"]
        for d in order:
            label, thesis = ROWS.get(d, (d, ""))
            energy = acc = novel = None
            if os.path.exists(stats_files[d]):
                s = nar_tools.mh_summary(nar_tools.read_mh_stats(stats_files[d]))
                energy, acc, novel = s["energy_local"], s["acceptance_rate"], s["novel_rate"]
            elif d == "warm":
                energy = warm_energy
            cpu = times.get(f"generate {model} {d}")
            lines.append(f"| `{d}` | {label} | {scores[(model, d)]:.2f} | {fmt(energy)} | {fmt(acc, 3)} | "
                         f"{fmt(novel, 3)} | {fmt(cpu, 0)} | {thesis} |")  # fmt: skip
        lines.append("")
    ar = [d for (m, d) in scores if m == "baseline"]
    if ar:
        lines += ["## autoregressive transformer (the distillation's teacher)", "", "| decoding | row | BLEU | CPU s | thesis |",
                  "|---|---|---:|---:|---|"]  # fmt: skip
        for d in ar:
            label, thesis = AR_ROWS.get(d, (d, ""))
            lines.append(f"| `{d}` | {label} | {scores[('baseline', d)]:.2f} | {fmt(times.get(f'generate baseline {d}'), 0)} | {thesis} |")
        lines.append("")
    train = [(label, cpu) for label, cpu in times.items() if label.startswith("train ")]
    if train:
        lines += ["Training CPU time (user + system s): " + ", ".join(f"{label[6:]} {cpu:.0f}" for label, cpu in train) + "."]
    total = read(args.time).split() if args.time else []
    if len(total) == 3:
        lines += [f"Whole run: {float(total[2]) / 60:.1f} min wall, {(float(total[0]) + float(total[1])) / 60:.1f} min CPU."]
    text = "\n".join(lines) + "\n"
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(text)
    if args.log:
        with open(args.log, "a", encoding="utf-8") as f:
            f.write(results)
            for d in sorted(glob.glob(os.path.join(exp, "*", "test.*.stats.jsonl"))):
                f.write(f"== {d}\n")
                for epoch, phase, chains, means in nar_tools.mh_per_epoch(nar_tools.read_mh_stats(d)):
                    f.write(f"{epoch}\t{phase}\t{chains}\t" + "\t".join(fmt(means[k], 4) for k in nar_tools.MH_VALUES) + "\n")
    sys.stdout.write(text)


def paired_bootstrap(hyps_a, hyps_b, refs, resamples=1000, seed=1):
    """(BLEU(a) - BLEU(b), 2.5% and 97.5% quantiles over resampled test sets, share of resamples <= 0)."""
    import random

    import sacrebleu

    def bleu(hyps, idx):
        return sacrebleu.corpus_bleu([hyps[i] for i in idx], [[refs[i] for i in idx]]).score

    rng, n = random.Random(seed), len(refs)
    diffs = sorted(bleu(hyps_a, s) - bleu(hyps_b, s) for s in ([rng.randrange(n) for _ in range(n)] for _ in range(resamples)))
    full = bleu(hyps_a, range(n)) - bleu(hyps_b, range(n))
    return full, diffs[int(0.025 * resamples)], diffs[int(0.975 * resamples) - 1], sum(d <= 0 for d in diffs) / resamples


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def bootstrap(args):
    refs = read_lines(args.ref)
    for pair in args.pairs:
        a, _, b = pair.partition(":")
        hyps = [read_lines(os.path.join(args.exp, args.model, f"test.{name}.hyp")) for name in (a, b)]
        if any(len(h) != len(refs) for h in hyps):
            sys.exit(f"ERROR: {pair}: hypothesis counts {[len(h) for h in hyps]} against {len(refs)} references")
        full, low, high, share = paired_bootstrap(*hyps, refs, args.resamples, args.seed)
        print(f"{a} - {b}: {full:+.2f} BLEU, 95% [{low:+.2f}, {high:+.2f}], share <= 0: {share:.3f}"
              f" ({args.resamples} paired resamples of {len(refs)} sentences, seed {args.seed})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("select-test", help="the length-limited test subset")
    s.add_argument("--src", required=True)
    s.add_argument("--tgt", required=True)
    s.add_argument("--max-src-words", type=int, default=20)
    s.add_argument("--max-lines", type=int, default=0, help="keep the first N within the limit (0: all)")
    s.add_argument("--out-src", required=True)
    s.add_argument("--out-tgt", required=True)
    s.add_argument("--note", required=True, help="writes one line describing the subset")
    s.set_defaults(fn=select_test)
    t = sub.add_parser("table", help="the results table of a run")
    t.add_argument("--exp", required=True, help="the run's EXP_DIR (results.txt, timing.txt, <model>/test.*)")
    t.add_argument("--subset", help="the select-test note")
    t.add_argument("--time", help="/usr/bin/time output of the whole run (user sys wall)")
    t.add_argument("--md")
    t.add_argument("--log")
    t.set_defaults(fn=table)
    b = sub.add_parser("bootstrap", help="paired bootstrap of BLEU differences between decodings")
    b.add_argument("--exp", required=True, help="the run's EXP_DIR")
    b.add_argument("--model", default="cmlm_raw")
    b.add_argument("--ref", required=True, help="the raw test references (DATA/raw/test.de)")
    b.add_argument("--resamples", type=int, default=1000)
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("pairs", nargs="+", metavar="A:B", help="decoding names, e.g. mh_raw:gibbs")
    b.set_defaults(fn=bootstrap)
    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
