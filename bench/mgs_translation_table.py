"""The results table and figures of bench/quality_mgs_multi30k.sh, a miniature of Table 4 of Welleck and Cho,
"MLE-Guided Parameter Search for Task Loss Minimization in Neural Sequence Modeling" (AAAI 2021, section 5.2).

Columns (test_2016_flickr, every sentence): BLEU = corpus sacreBLEU (13a, cased) of the beam-5 decodes; SBLEU =
mean sentence BLEU (sacreBLEU 13a, exp smoothing, effective order: the ``bleu`` task loss's metric, x 100) of the
greedy decodes; length ratio = hypothesis / reference words (sacreBLEU's, greedy); EDIT = mean token edit distance / reference length x 100 of the greedy decodes, on the
sentencepiece pieces with EOS appended to both sides (the ``edit`` task loss, re-encoded from the detokenised
hypotheses with the data's sentencepiece model); chrF (greedy, corpus).  The paper computes SBLEU, METEOR and EDIT
with greedy decoding "to match the training conditions" and BLEU with beam 5.  METEOR is left out: sacreBLEU has
none, and its WordNet data cannot be installed from PyPI (the README says so for the task loss).

Figures: the training curves of the fine-tunes (bench/mgs_plots.py): the pooled training task loss (Figure 1's
quantity for MT), the weight standard deviation (Figure 6) and the MLE candidates' total weight (Figure 3) and
share of wins (Figure 7).

Usage: mgs_translation_table.py --base-dir B --run-dir R --methods mle_cont,mgs_sbleu,... --reference REF.de
       --out TABLE.md [--figures PREFIX]   (PREFIX_training.png; drawn only when matplotlib is installed)
"""
import argparse
import importlib.util
import json
import os
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
sys.path.insert(0, os.path.dirname(BENCH_DIR))  # fairseq_ext from this checkout
import mgs_plots  # noqa: E402

# run name -> row label (the base is "MLE")
LABELS = {
    "base": "MLE (the base)",
    "mle_cont": "MLE, continued",
    "mgs_sbleu": "MGS-SBLEU",
    "mgs_edit": "MGS-EDIT",
    "mgs_sbleu_noise01": "MGS-SBLEU, noise 0.1",
    "mrt": "MRT (SBLEU cost, beam candidates)",
}
# the paper's Table 4, IWSLT'14 de-en test: BLEU, SBLEU, METEOR, EDIT
PAPER_TABLE_4_TEST = {
    "MLE": (34.71, 35.67, 62.19, 50.74),
    "MGS-SBLEU": (35.03, 35.89, 62.2, 50.23),
    "MGS-METEOR": (34.98, 35.97, 62.49, 50.29),
    "MGS-EDIT": (34.73, 35.95, 62.04, 49.45),
}


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def sentence_bleu_mean(hyps, refs):
    """Mean sentence BLEU (x 100) with the ``bleu`` task loss's metric."""
    from fairseq_ext.modules.task_losses import _sentence_bleu_metric

    metric = _sentence_bleu_metric("13a")
    return sum(metric.sentence_score(h, [r]).score for h, r in zip(hyps, refs)) / len(refs)


def edit_mean(hyps, refs, spm_model):
    """Mean of the ``edit`` task loss (x 100) on sentencepiece pieces, EOS on both sides."""
    import sentencepiece

    from fairseq_ext.modules.task_losses import normalized_edit_distance

    sp = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    eos = "</s>"
    total = 0.0
    for h, r in zip(hyps, refs):
        total += normalized_edit_distance(sp.encode(h, out_type=str) + [eos], sp.encode(r, out_type=str) + [eos])
    return 100.0 * total / len(refs)


def scores(run_dir, refs, spm_model):
    from sacrebleu.metrics import BLEU, CHRF

    beam, greedy = (read_lines(os.path.join(run_dir, f"test.{d}.hyp")) for d in ("beam5", "greedy"))
    for name, hyps in (("beam5", beam), ("greedy", greedy)):
        if len(hyps) != len(refs):
            sys.exit(f"ERROR: {run_dir}/test.{name}.hyp has {len(hyps)} lines for {len(refs)} references")
    greedy_bleu = BLEU().corpus_score(greedy, [refs])
    return {
        "bleu": BLEU().corpus_score(beam, [refs]).score,
        "sbleu": sentence_bleu_mean(greedy, refs),
        "edit": edit_mean(greedy, refs, spm_model),
        "chrf": CHRF().corpus_score(greedy, [refs]).score,
        "greedy_bleu": greedy_bleu.score,
        "length_ratio": greedy_bleu.sys_len / greedy_bleu.ref_len,
    }


def table(rows, n_sentences):
    out = [f"Test: test_2016_flickr, {n_sentences} sentences, every one with a hypothesis.", "",
           "| model | BLEU (beam 5) | SBLEU | EDIT | chrF | BLEU (greedy) | length ratio (greedy) |",
           "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label, r in rows:
        out.append(f"| {label} | {r['bleu']:.2f} | {r['sbleu']:.2f} | {r['edit']:.2f} | {r['chrf']:.2f} | "
                   f"{r['greedy_bleu']:.2f} | {r['length_ratio']:.3f} |")  # fmt: skip
    out += ["", "The paper's Table 4 (IWSLT'14 de-en test; SBLEU, METEOR and EDIT with greedy decoding):", "",
            "| model | BLEU | SBLEU | METEOR | EDIT |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for label, (bleu, sbleu, meteor, edit) in PAPER_TABLE_4_TEST.items():
        out.append(f"| {label} | {bleu:.2f} | {sbleu:.2f} | {meteor:.2f} | {edit:.2f} |")
    return "\n".join(out) + "\n"


def figures(run_dir, methods, prefix):
    runs = [(LABELS.get(m, m), os.path.join(run_dir, m, "train.log")) for m in methods if m.startswith("mgs")]
    runs = [(label, log) for label, log in runs if os.path.isfile(log)]
    if not runs:
        return
    if importlib.util.find_spec("matplotlib") is None:
        print("no matplotlib: no figures (pip install .[plot])")
        return
    mgs_plots.plot(runs, ["mgs_cost", "mgs_weight_std", "mgs_mle_weight", "mgs_mle_won"], f"{prefix}_training.png",
                   "MGS fine-tuning on Multi30k en-de: training curves (cost: 1 - sentence BLEU / normalised edit)")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-dir", required=True, help="the MLE base (its test.{greedy,beam5}.hyp and data/)")
    parser.add_argument("--run-dir", required=True, help="the fine-tunes, one folder per method")
    parser.add_argument("--methods", required=True, help="comma-separated fine-tune names, in table order")
    parser.add_argument("--reference", required=True, help="the raw test references, one per line")
    parser.add_argument("--out", required=True, help="the table (markdown); a .json with the numbers beside it")
    parser.add_argument("--figures", help="prefix of the figures")
    args = parser.parse_args()
    refs = read_lines(args.reference)
    spm_model = os.path.join(args.base_dir, "data", "spm", "spm.model")
    methods = [m for m in args.methods.split(",") if m]
    rows = [(LABELS["base"], scores(args.base_dir, refs, spm_model))]
    for m in methods:
        if os.path.isfile(os.path.join(args.run_dir, m, "test.beam5.hyp")):
            rows.append((LABELS.get(m, m), scores(os.path.join(args.run_dir, m), refs, spm_model)))
        else:
            print(f"{m}: not decoded, no row")
    text = table(rows, len(refs))
    print(text)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(dict(rows), f, indent=1)
    if args.figures:
        figures(args.run_dir, methods, args.figures)


if __name__ == "__main__":
    main()
