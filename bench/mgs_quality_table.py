"""Data preparation and the results table of bench/quality_mgs_wikitext2.sh, a miniature of Table 1 of Welleck
and Cho, "MLE-Guided Parameter Search for Task Loss Minimization in Neural Sequence Modeling" (AAAI 2021,
section 5.1: text completion on WikiText-103 with GPT-2).

``prepare``: WikiText-2 (tokenised v1) -> one sentence per line.  The paper splits WikiText-103 at its newlines
(paragraphs, about 108 tokens on average) into prefix -> continuation pairs; on one CPU thread such long
continuations cost too much to decode, so each paragraph is cut into sentences after every `` . `` token that
is followed by another token; headings (`` = Title = ``) and blank lines are dropped, and only sentences of more
than k (the prefix) and at most ``--max-tokens`` tokens (EOS included) are kept, so every kept line is one
text_completion example and example i is line i.

``table``: per model, fairseq-generate's greedy continuations (``--task text_completion --beam 1``) ->
the paper's columns: LM (sum of -log p of the continuation, EOS included when emitted, under the frozen MLE
model), Edit (token edit distance / reference length, EOS included on both sides: the ``edit`` task loss),
Nonterm (share of continuations without EOS within ceil(1.3 x reference length)), Repetition (1 - unique
4-grams / 4-grams, over continuations with a 4-gram), Avg. len. (tokens before EOS) and Perplexity (of the
reference continuations given their prefixes, EOS included).
"""
import argparse
import json
import math
import os
import sys

# Table 1 of the paper (GPT-2 117M, WikiText-103 test set): LM, Edit, Nonterm, Repetition, Avg. len., Perplexity
PAPER_TABLE_1 = {
    "MLE": (147.5, 0.945, 0.387, 0.538, 238.4, 21.03),
    "MGS-LM": (59.1, 0.940, 0.012, 0.035, 18.5, 22.30),
    "MGS-edit": (72.9, 0.928, 0.038, 0.083, 40.3, 21.75),
    "Human": (None, None, 0.000, 0.011, 107.9, None),
}
# run directory name -> row label, in table order
MODELS = [
    ("mle", "MLE (the starting point)"),
    ("mle_cont", "MLE, continued"),
    ("mgs_edit", "MGS-edit"),
    ("mgs_lm", "MGS-LM"),
    ("mrt", "MRT (edit)"),
    ("pg", "PG (edit)"),
    ("mgs_lm_zero", "MGS-LM, q_zero only"),
    ("mgs_lm_mle", "MGS-LM, q_MLE only"),
]
# Table 7 of the paper (WikiText-103 validation set): the proposal ablation of MGS-LM, (Cost, Nonterm, PPL)
PAPER_TABLE_7 = {"q_MGS": (59.2, 0.013, 22.1), "q_zero": (143.0, 0.348, 20.9), "q_MLE": (141.6, 0.351, 20.9)}
TABLE_7_RUNS = [("mgs_lm", "q_MGS"), ("mgs_lm_zero", "q_zero"), ("mgs_lm_mle", "q_MLE")]


# -- prepare -------------------------------------------------------------------------------------------------
def sentences(paragraph):
    """Token lists of the sentences of one tokenised WikiText paragraph (cut after a ``.`` token)."""
    out, current = [], []
    for token in paragraph.split():
        current.append(token)
        if token == ".":
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def prepare(args):
    kept_counts = {}
    for split, limit in (("train", args.train_lines), ("valid", args.valid_lines), ("test", args.test_lines)):
        kept = too_short = too_long = paragraphs = 0
        with open(os.path.join(args.data, f"wiki.{split}.tokens"), encoding="utf-8") as src, open(
            os.path.join(args.out, f"{split}.txt"), "w", encoding="utf-8"
        ) as dst:
            for line in src:
                text = line.strip()
                if not text or text.startswith("= ") and text.endswith(" ="):
                    continue  # blank separator or heading
                paragraphs += 1
                for sent in sentences(text):
                    if len(sent) <= args.prefix_length:
                        too_short += 1
                    elif len(sent) + 1 > args.max_tokens:  # + EOS
                        too_long += 1
                    else:
                        dst.write(" ".join(sent) + "\n")
                        kept += 1
                        if limit and kept >= limit:
                            break
                if limit and kept >= limit:
                    break
        kept_counts[split] = kept
        print(f"{split}: {kept} sentences kept from the first {paragraphs} paragraphs ({too_short} of <= "
              f"{args.prefix_length} tokens and {too_long} of > {args.max_tokens - 1} tokens dropped)")  # fmt: skip
    with open(os.path.join(args.out, "SIZES.json"), "w") as f:
        json.dump(kept_counts, f)


# -- table ---------------------------------------------------------------------------------------------------
def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def perplexity(checkpoint, dictionary, prefixes, refs):
    """exp(mean NLL per token) of the reference continuations (EOS included) given their prefixes.

    Computed here rather than by fairseq-validate, which takes the task from the checkpoint: for the
    MLE model (a --task language_modeling checkpoint) it would score whole sentences, prefixes included.
    """
    from fairseq import checkpoint_utils

    from fairseq_ext.modules.task_losses import LanguageModelScorer

    models, _ = checkpoint_utils.load_model_ensemble([checkpoint])
    model = LanguageModelScorer(models[0], dictionary, flag=checkpoint)
    nll = model.nll(refs, [True] * len(refs), prefixes)
    return math.exp(math.fsum(nll) / sum(len(r) + 1 for r in refs))


def table(args):
    import editdistance

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fairseq.data import Dictionary

    from fairseq_ext.modules.completion_metrics import parse_generate
    from fairseq_ext.modules.task_losses import LanguageModelScorer, ngram_repetition

    d = Dictionary.load(os.path.join(args.data_bin, "dict.txt"))
    scorer = LanguageModelScorer.from_checkpoint(args.scorer, d, flag="--scorer")
    with open(args.test_text, encoding="utf-8") as f:
        lines = [line.split() for line in f]
    k = args.prefix_length
    prefixes = [[d.index(w) for w in line[:k]] for line in lines]
    refs = [[d.index(w) for w in line[k:]] for line in lines]
    eos = d.eos()
    rows = []

    def metrics_of(label, outputs):
        if len(outputs) != len(lines):
            raise SystemExit(f"{label}: {len(outputs)} hypotheses for {len(lines)} test prefixes")
        ids = sorted(outputs)
        toks = [[d.index(w) for w in outputs[i][0]] for i in ids]
        done = [outputs[i][1] for i in ids]
        for t, fin, i in zip(toks, done, ids):  # the task's rule: cut at ceil(1.3 x reference length incl. EOS)
            limit = math.ceil(args.max_len_ratio * (len(refs[i]) + 1))
            if (len(t) < limit) != fin and label != "Human":
                raise SystemExit(f"{label}, sentence {i}: {len(t)} tokens, limit {limit}, terminated {fin}")
        lm = scorer.nll(toks, done, [prefixes[i] for i in ids])
        edit = [
            editdistance.eval(t + ([eos] if fin else []), refs[i] + [eos]) / (len(refs[i]) + 1)
            for t, fin, i in zip(toks, done, ids)
        ]
        return {
            "lm": mean(lm), "edit": mean(edit), "nonterm": mean([0.0 if x else 1.0 for x in done]),
            "repetition": mean([ngram_repetition(t) for t in toks]), "length": mean([len(t) for t in toks]),
        }  # fmt: skip

    by_name = {}
    for name, label in MODELS:
        gen = os.path.join(args.run_dir, "eval", f"{name}.generate.txt")
        if not os.path.exists(gen):
            continue
        row = metrics_of(label, parse_generate(gen))
        row["ppl"] = perplexity(os.path.join(args.run_dir, name, "checkpoint_last.pt"), d, prefixes, refs)
        rows.append((label, row))
        by_name[name] = row
    human = {i: (line[k:], True) for i, line in enumerate(lines)}
    h = metrics_of("Human", human)
    h["edit"] = h["lm"] = None  # the references themselves: 0 by definition / not the paper's column
    h["ppl"] = None
    rows.append(("Human (the references)", h))

    def fmt(v, digits):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

    out = ["| model | LM | Edit | Nonterm | Repetition | Avg. len. | Perplexity |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows:
        out.append(f"| {label} | {fmt(r['lm'], 1)} | {fmt(r['edit'], 3)} | {fmt(r['nonterm'], 3)} | "
                   f"{fmt(r['repetition'], 3)} | {fmt(r['length'], 1)} | {fmt(r['ppl'], 2)} |")  # fmt: skip
    out += ["", "The paper's Table 1 (GPT-2 117M fine-tuned on WikiText-103, 2,162 test pairs, evaluation decodes up to "
            "500 tokens):", "", "| model | LM | Edit | Nonterm | Repetition | Avg. len. | Perplexity |",
            "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label, vals in PAPER_TABLE_1.items():
        lm, edit, nonterm, rep, length, ppl = vals
        out.append(f"| {label} | {fmt(lm, 1)} | {fmt(edit, 3)} | {fmt(nonterm, 3)} | {fmt(rep, 3)} | "
                   f"{fmt(length, 1)} | {fmt(ppl, 2)} |")  # fmt: skip
    out += table_7(by_name, fmt)
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        with open(args.out + ".json", "w") as f:
            json.dump({label: r for label, r in rows}, f, indent=1)


def table_7(by_name, fmt):
    """The proposal ablation (the paper's Table 7: Cost = the LM column, Nonterm, PPL), when all three ran."""
    if not all(name in by_name for name, _ in TABLE_7_RUNS):
        return []
    out = ["", "Proposal ablation of MGS-LM (the paper's Table 7; here on the same test prefixes as above):", "",
           "| proposal | Cost (LM) | Nonterm | PPL | paper: Cost | Nonterm | PPL |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, label in TABLE_7_RUNS:
        r, (p_cost, p_nonterm, p_ppl) = by_name[name], PAPER_TABLE_7[label]
        out.append(f"| {label} | {fmt(r['lm'], 1)} | {fmt(r['nonterm'], 3)} | {fmt(r['ppl'], 2)} | "
                   f"{p_cost:.1f} | {p_nonterm:.3f} | {p_ppl:.1f} |")  # fmt: skip
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="WikiText-2 paragraphs -> one sentence per line")
    p.add_argument("--data", required=True, help="folder with wiki.{train,valid,test}.tokens")
    p.add_argument("--out", required=True)
    p.add_argument("--prefix-length", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=64, help="longest sentence kept, EOS included")
    p.add_argument("--train-lines", type=int, default=0, help="sentences kept per split (0: all)")
    p.add_argument("--valid-lines", type=int, default=0)
    p.add_argument("--test-lines", type=int, default=0)
    t = sub.add_parser("table", help="the metrics of every evaluated model")
    t.add_argument("--run-dir", required=True)
    t.add_argument("--data-bin", required=True)
    t.add_argument("--test-text", required=True, help="the test sentences, one per line (prepare's test.txt)")
    t.add_argument("--scorer", required=True, help="the frozen MLE language model (a --task language_modeling checkpoint)")
    t.add_argument("--prefix-length", type=int, default=10)
    t.add_argument("--max-len-ratio", type=float, default=1.3, help="fairseq-generate's --completion-max-len-ratio")
    t.add_argument("--out", default=None)
    args = parser.parse_args()
    prepare(args) if args.command == "prepare" else table(args)


if __name__ == "__main__":
    main()
