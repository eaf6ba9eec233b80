"""Training curves of sequence-level fine-tunes from their fairseq-train logs (``--log-format simple``): the
quantities of Welleck and Cho, "MLE-Guided Parameter Search for Task Loss Minimization in Neural Sequence
Modeling" (AAAI 2021): the pooled training task loss of the current parameters (Figure 1, ``mgs_cost``), the
standard deviation of the candidate weights (Figures 2 and 6, ``mgs_weight_std``), the total weight of
MLE-component candidates (Figure 3, ``mgs_mle_weight``) and the share of updates won by an MLE-component
candidate (Figure 7, ``mgs_mle_won``), one panel per quantity, one line per run.

Usage: mgs_plots.py --out FIG.png [--title T] [--keys mgs_cost,mgs_weight_std] [--text] LABEL=TRAIN_LOG ...
  --text: print the series instead of drawing (no matplotlib needed).
matplotlib is imported only to draw (an optional extra of the package: pip install .[plot]).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fairseq_ext from this checkout
from fairseq_ext.testing.cli import train_inner_values  # noqa: E402

# key -> panel title
KEY_TITLES = {
    "mgs_cost": "pooled training task loss C(theta) (Fig. 1)",
    "mgs_best_cost": "pooled task loss of the best candidate",
    "mgs_weight_std": "std of the candidate weights (Fig. 2)",
    "mgs_mle_weight": "total weight of MLE-component candidates (Fig. 3)",
    "mgs_mle_won": "share of updates won by an MLE candidate (Fig. 7)",
    "mgs_nonterm": "non-termination of the training decodes",
    "mrt_cost_mean": "mean task loss of the MRT candidates",
    "mrt_risk": "MRT risk",
}


def train_inner_series(log_path, key):
    """(num_updates, value) of every ``train_inner`` line of a fairseq-train log file that reports ``key``."""
    with open(log_path, encoding="utf-8") as f:
        return train_inner_values(f.read(), key)


def plot(runs, keys, out, title=""):
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's DEBUG root logger would print font scans
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, log in runs:
            series = train_inner_series(log, key)
            if series:
                ax.plot([u for u, _ in series], [v for _, v in series], marker=".", label=label)
        ax.set_title(KEY_TITLES.get(key, key), fontsize=9)
        ax.set_xlabel("updates")
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="the figure (png); required unless --text")
    parser.add_argument("--title", default="")
    parser.add_argument("--keys", default="mgs_cost,mgs_weight_std,mgs_mle_weight")
    parser.add_argument("--text", action="store_true", help="print the series instead of drawing")
    parser.add_argument("runs", nargs="+", metavar="LABEL=TRAIN_LOG")
    args = parser.parse_args()
    runs = []
    for item in args.runs:
        label, sep, log = item.partition("=")
        if not sep or not os.path.isfile(log):
            sys.exit(f"ERROR: {item!r}: expected LABEL=TRAIN_LOG with an existing log file")
        runs.append((label, log))
    keys = [k for k in args.keys.split(",") if k]
    if args.text:
        for label, log in runs:
            for key in keys:
                print(label, key, " ".join(f"{u}:{v:g}" for u, v in train_inner_series(log, key)))
        return
    if not args.out:
        sys.exit("ERROR: --out FIG.png is required to draw (or pass --text)")
    plot(runs, keys, args.out, args.title)


if __name__ == "__main__":
    main()
