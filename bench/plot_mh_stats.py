"""Figures 6.2-6.4 of Goyal's thesis ("Characterizing and Overcoming the Limitations of Neural
Autoregressive Models", CMU 2021, chapter 6) from the chain statistics of Metropolis-Hastings / degenerate
Gibbs decodings (--task translation_mh --mh-stats-path; one JSON line per decoded batch and epoch).

  Figure 6.2: -E_local (the thesis's -E_norm) per epoch of the plain samplers: MH with E_raw, MH with
              E_local and degenerate Gibbs (decodings mh_raw, mh_local, gibbs), burn-in marked; the
              thesis's right panel (BLEU per epoch) when --bleu gives per-epoch BLEU files;
  Figure 6.3: the acceptance rate per epoch of the block variants (mh_raw_block, mh_local_block, and
              gibbs_block if run), with the annealed block size;
  Figure 6.4: the annealed target temperature (mh_raw_anneal*, mh_local_anneal*): acceptance rates and
              -E_local per epoch (left), the target temperature, and BLEU per epoch with --bleu (right).

Every point is the chain-weighted mean of that epoch over the batches of a file (and over the files
given for one label: several runs pool), recipes/common/nar_tools.py's mh_per_epoch.

Usage:
  plot_mh_stats.py --exp EXP_DIR [--model cmlm_raw] --out DIR          the three figures of a recipe run
  plot_mh_stats.py --figure 6.3 --out fig.png LABEL=STATS[,STATS...] ...   one figure from given files
  ... --text        print the series (epoch, phase, chains, means) instead of drawing (no matplotlib)
  ... --bleu LABEL=FILE   per-epoch BLEU of a label's samples, lines "EPOCH BLEU"
matplotlib is imported only to draw (an optional extra: pip install .[plot]).
"""
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "common"))
import nar_tools  # noqa: E402

# figure -> the decodings of a recipe run it draws, in legend order (the thesis's labels: raw, norm, deg)
FIGURE_DECODES = {
    "6.2": [("mh_raw", "raw"), ("mh_local", "norm (E_local)"), ("gibbs", "deg")],
    "6.3": [("mh_raw_block", "raw, block"), ("mh_local_block", "norm, block"), ("gibbs_block", "deg, block")],
    "6.4": [("mh_raw_anneal", "raw, annealed"), ("mh_local_anneal", "norm, annealed")],
}
FIGURE_TITLES = {
    "6.2": "Fig. 6.2: -E_local per epoch, plain MH (raw, norm) and degenerate Gibbs",
    "6.3": "Fig. 6.3: acceptance rate per epoch, block variants",
    "6.4": "Fig. 6.4: annealed target temperature: acceptance and -E_local per epoch",
}


def load_series(paths):
    """Per-epoch rows [(epoch, phase, chains, {key: chain-weighted mean})] of one or more stats files, pooled."""
    return nar_tools.mh_per_epoch(nar_tools.read_mh_stats(list(paths)))


def column(rows, key, negate=False):
    """(epochs, values) of one key, epochs without a value left out (e.g. the warm start's acceptance)."""
    xs, ys = [], []
    for epoch, _phase, _chains, means in rows:
        v = means.get(key)
        if v is not None:
            xs.append(epoch)
            ys.append(-v if negate else v)
    return xs, ys


def burn_in_end(rows):
    """The last burn-in epoch (None without burn-in): the thesis's figures mark it."""
    burn = [epoch for epoch, phase, _c, _m in rows if phase == "burn_in"]
    return max(burn) if burn else None


def find_run_series(exp, model, figure):
    """[(label, [stats files])] of a recipe run's decodings drawn in FIGURE (names matched by prefix
    for the annealed ones: mh_raw_anneal02_t08 is 'raw, annealed'; one file per decoding)."""
    out = []
    for decode, label in FIGURE_DECODES[figure]:
        if figure == "6.4":
            files = sorted(glob.glob(os.path.join(exp, model, f"test.{decode}*.stats.jsonl")))
            for f in files:
                name = os.path.basename(f)[len("test."): -len(".stats.jsonl")]
                out.append((f"{label} ({name})" if len(files) > 1 else label, [f]))
        else:
            f = os.path.join(exp, model, f"test.{decode}.stats.jsonl")
            if os.path.exists(f):
                out.append((label, [f]))
    return out


def read_bleu(path):
    """(epochs, BLEU) from lines 'EPOCH BLEU' (whitespace-separated; '#' comments)."""
    xs, ys = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            try:
                xs.append(int(parts[0]))
                ys.append(float(parts[1]))
            except (ValueError, IndexError):
                raise ValueError(f"{path}:{n}: expected 'EPOCH BLEU', got {line!r}") from None
    return xs, ys


def print_series(figure, series):
    print(f"== {FIGURE_TITLES[figure]}")
    for label, rows in series:
        print(f"-- {label} (burn-in ends at epoch {burn_in_end(rows)})")
        print("epoch\tphase\tchains\t" + "\t".join(nar_tools.MH_VALUES))
        for epoch, phase, chains, means in rows:
            print(f"{epoch}\t{phase}\t{chains}\t" + "\t".join(
                "n/a" if means[k] is None else f"{means[k]:.4f}" for k in nar_tools.MH_VALUES))


def draw(figure, series, bleu, out_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = (2 if figure == "6.4" else 1) + (1 if bleu else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
    axes = list(axes[0])
    left = axes[0]
    for label, rows in series:
        if figure == "6.2":
            left.plot(*column(rows, "energy_local", negate=True), marker="o", ms=3, label=label)
        else:
            left.plot(*column(rows, "acceptance_rate"), marker="o", ms=3, label=label)
    left.set_ylabel("-E_local (mean per sentence)" if figure == "6.2" else "acceptance rate")
    left.legend(fontsize=7)
    if figure == "6.3" and series:
        xs, ys = column(series[0][1], "block_size")
        if xs:
            twin = left.twinx()
            twin.step(xs, ys, where="mid", color="grey", alpha=0.5)
            twin.set_ylabel("block size (grey)")
    if figure == "6.4":
        right = axes[1]
        for label, rows in series:
            right.plot(*column(rows, "energy_local", negate=True), marker="s", ms=3, label=f"{label}: -E_local")
        right.set_ylabel("-E_local (mean per sentence)")
        right.legend(fontsize=7)
        if series:
            twin = right.twinx()
            twin.plot(*column(series[0][1], "target_temperature"), color="green", alpha=0.6)
            twin.set_ylabel("target temperature (green)")
    if bleu:
        ax = axes[-1]
        for label, path in bleu:
            ax.plot(*read_bleu(path), marker="o", ms=3, label=label)
        ax.set_ylabel("BLEU")
        ax.legend(fontsize=7)
    burn = next((burn_in_end(rows) for _label, rows in series if burn_in_end(rows) is not None), None)
    for ax in axes:
        if burn is not None:
            ax.axvline(burn + 0.5, color="black", linestyle=":", linewidth=1)
        ax.set_xlabel("epoch" + ("  (dotted: end of burn-in)" if burn is not None else ""))
    fig.suptitle(FIGURE_TITLES[figure], fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    print(f"  figure {figure} -> {out_path}")


def parse_labelled(items):
    """LABEL=PATH[,PATH...] (or a bare PATH: its file name is the label) -> [(label, [paths])]."""
    out = []
    for item in items:
        label, sep, paths = item.partition("=")
        if not sep:
            paths, label = item, os.path.basename(item).replace(".stats.jsonl", "").replace("test.", "", 1)
        out.append((label, [p for p in paths.split(",") if p]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exp", help="a recipe run's EXP_DIR: draws Figures 6.2-6.4 from its stats files")
    p.add_argument("--model", default="cmlm_raw", help="the model directory under --exp (default cmlm_raw)")
    p.add_argument("--figure", choices=sorted(FIGURE_TITLES), help="with stats files: which figure")
    p.add_argument("--out", help="--exp: a directory (fig6_2.png, ...); --figure: the image file")
    p.add_argument("--bleu", action="append", default=[], help="LABEL=FILE: per-epoch BLEU ('EPOCH BLEU' lines)")
    p.add_argument("--text", action="store_true", help="print the series instead of drawing")
    p.add_argument("stats", nargs="*", help="LABEL=STATS[,STATS...] or STATS")
    args = p.parse_args(argv)
    bleu = [(label, paths[0]) for label, paths in parse_labelled(args.bleu)]
    jobs = []
    if args.exp:
        for figure in sorted(FIGURE_TITLES):
            found = find_run_series(args.exp, args.model, figure)
            if found:
                jobs.append((figure, found, os.path.join(args.out or args.exp, f"fig{figure.replace('.', '_')}.png")))
        if not jobs:
            p.error(f"no stats files of the figures' decodings in {os.path.join(args.exp, args.model)}")
    else:
        if not args.figure or not args.stats:
            p.error("--exp EXP_DIR, or --figure N with stats files")
        jobs.append((args.figure, parse_labelled(args.stats), args.out or f"fig{args.figure.replace('.', '_')}.png"))
    for figure, labelled, out_path in jobs:
        try:
            series = [(label, load_series(paths)) for label, paths in labelled]
        except (OSError, ValueError) as e:
            sys.exit(f"ERROR: {e}")
        if args.text:
            print_series(figure, series)
        else:
            if args.exp and os.path.dirname(out_path):
                os.makedirs(os.path.dirname(out_path), exist_ok=True)
            fig_bleu = [(label, path) for label, path in bleu if any(label == lab for lab, _ in labelled)] if args.exp else bleu
            draw(figure, series, fig_bleu, out_path)


if __name__ == "__main__":
    main()
