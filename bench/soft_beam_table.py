"""Collects bench/quality_soft_beam_conll2003.sh's runs (RUN_DIR/<part>/seedN/{results.txt,logz.txt},
written by recipes/conll2003/run.sh) into markdown tables in the layout of Goyal's thesis:

* Table 4.2 (NER, span F1) and its Table 4.1 stand-in (the POS column, tag accuracy): cross-entropy
  and the soft beam search loss (direct loss, hinge; alpha fixed, annealed) decoded greedy, with
  hard beam search and with soft beam search, dev and test;
* Table 5.1: log Z (mean, variance; train and dev) of the cross-entropy vs the self-normalized model;
* Tables 5.2 / 5.3: pretrain-greedy, pretrain-beam, locally and globally normalized search-aware
  models, initialised from cross-entropy (5.2) or from the self-normalized model (5.3), with a
  unidirectional and a bidirectional encoder.

Values are means ± sample standard deviations over the seeds found (one seed: the value).

``--mt``: bench/quality_soft_beam_multi30k.sh's run (one EXP_DIR of recipes/iwslt14_de_en/run.sh
--methods soft_beam: results.txt BLEU lines, logz.txt) as Table 5.4 and the MT rows of Table 5.1.
"""
import argparse
import glob
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tagging_table import summary  # noqa: E402  (mean ± std, or the value, or n/a)

SCORE = re.compile(r"^(F1|ACC) (\w+)/(valid|test)/(\w+) = ([0-9.]+)", re.M)
LOGZ = re.compile(r"^LOGZ (\w+)/(train|valid) mean = (-?[0-9.]+) var = ([0-9.]+)", re.M)

TABLE4_ROWS = [
    ("baseline", "Baseline CE"),
    ("sb_hinge_annealed", "G~hinge, annealed alpha"),
    ("sb_hinge_fixed", "G~hinge, alpha = 1.0"),
    ("sb_direct_fixed", "G~DL, alpha = 1.0"),
    ("sb_direct_annealed", "G~DL, annealed alpha"),
]
# Tables 5.2 / 5.3: init -> (pretrained model, locally normalized, globally normalized)
TABLE5_MODELS = {
    "ce": ("baseline", "sb_direct_annealed", "sb_global_direct_annealed_ce"),
    "sn": ("selfnorm", "sb_direct_annealed_sn", "sb_global_direct_annealed"),
}


def collect(part_dir):
    """scores[(model, split, decode)] = {seed: value}; logz[(model, split)] = {seed: (mean, var)}; metric."""
    scores, logz, metric = {}, {}, None
    for path in sorted(glob.glob(os.path.join(part_dir, "seed*", "results.txt"))):
        seed = int(re.search(r"seed(\d+)", path).group(1))
        for m in SCORE.finditer(open(path, encoding="utf-8").read()):
            metric = m.group(1)
            scores.setdefault((m.group(2), m.group(3), m.group(4)), {})[seed] = float(m.group(5))
        lz = os.path.join(os.path.dirname(path), "logz.txt")
        if os.path.exists(lz):
            for m in LOGZ.finditer(open(lz, encoding="utf-8").read()):
                logz.setdefault((m.group(1), m.group(2)), {})[seed] = (float(m.group(3)), float(m.group(4)))
    return scores, logz, metric


def beam_size(scores):
    sizes = sorted({int(d[8:]) for (_, _, d) in scores if re.fullmatch(r"softbeam\d+", d)})
    return sizes[0] if sizes else None


def cell(scores, model, split, decode):
    return summary(list(scores.get((model, split, decode), {}).values()))


def table4(title, scores, metric_name):
    k = beam_size(scores)
    if k is None:
        return []
    lines = [f"### {title}", "",
             f"{metric_name}; hard beam = beam search with k = {k}, soft beam = soft beam search decoding (section 4.3.4) "
             f"with k = {k}; every search-aware model is warm-started from Baseline CE.", "",
             "| training | greedy dev | greedy test | hard beam dev | hard beam test | soft beam dev | soft beam test |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for model, label in TABLE4_ROWS:
        if not any(key[0] == model for key in scores):
            continue
        cells = [cell(scores, model, s, d) for d in ("greedy", f"beam{k}", f"softbeam{k}") for s in ("valid", "test")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def table51(parts):
    lines = ["### Table 5.1: log Z of cross-entropy (CE) vs self-normalized (L2) models", "",
             "Teacher-forced local log-normalizers log Z_i = logsumexp_y s_i(y) over the target positions "
             "(`recipes/common/tools.py logz`); the metric is the test score of beam search (k as in the runs).", "",
             "| task | model | train log Z mean | train var | dev log Z mean | dev var | test metric (hard beam) | test, beam on raw scores |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    any_row = False
    for part, (scores, logz, metric) in parts.items():
        k = beam_size(scores)
        for model, label in (("baseline", "CE"), ("selfnorm", "L2 (self-normalized)")):
            if (model, "train") not in logz:
                continue
            any_row = True
            tm = summary([v[0] for v in logz[(model, "train")].values()])
            tv = summary([v[1] for v in logz[(model, "train")].values()])
            dm = summary([v[0] for v in logz.get((model, "valid"), {}).values()])
            dv = summary([v[1] for v in logz.get((model, "valid"), {}).values()])
            lines.append(f"| {part} ({'span F1' if metric == 'F1' else 'accuracy'}) | {label} | {tm} | {tv} | {dm} | {dv} "
                         f"| {cell(scores, model, 'test', f'beam{k}')} | {cell(scores, model, 'test', f'beam{k}raw')} |")
    return lines + [""] if any_row else []


def table52_53(uni, bi):
    out = []
    for init, number, name in (("ce", "5.2", "a regular teacher-forcing (CE) model"), ("sn", "5.3", "a self-normalized model")):
        pre, local, glob_ = TABLE5_MODELS[init]
        have = [p for p in (uni, bi) if p and any(key[0] == local or key[0] == glob_ for key in p[0])]
        if not have:
            continue
        cols = [("Unidirectional", uni), ("Bidirectional", bi)]
        lines = [f"### Table {number}: accuracy when initialized with {name}", "",
                 "Test tag accuracy (POS column). pretrain-greedy / pretrain-beam: the initializer decoded greedily / "
                 "with hard beam search; locally / globally normalized: the search-aware soft beam models (direct loss, "
                 "annealed alpha) decoded with soft beam search (hard beam search in brackets; globally normalized "
                 "models search their raw scores).", "",
                 "| | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---:|" * len(cols)]  # fmt: skip
        rows = [("pretrain-greedy", pre, "greedy", None), ("pretrain-beam", pre, "beam", None),
                ("locally normalized", local, "softbeam", "beam"), ("globally normalized", glob_, "softbeam", "beam")]
        for label, model, decode, alt in rows:
            cells = []
            for _, p in cols:
                if not p:
                    cells.append("n/a")
                    continue
                scores, k = p[0], beam_size(p[0])
                d = decode if decode == "greedy" else f"{decode}{k}"
                text = cell(scores, model, "test", d)
                if alt:
                    text += f" ({cell(scores, model, 'test', f'{alt}{k}')})"
                cells.append(text)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        out += lines + [""]
    return out


BLEU = re.compile(r"^BLEU (\w+)/(\w+) = ([0-9.]+)", re.M)


def mt_tables(exp_dir, command):
    bleu = {}
    results = os.path.join(exp_dir, "results.txt")
    if os.path.exists(results):
        bleu = {(m.group(1), m.group(2)): m.group(3) for m in BLEU.finditer(open(results, encoding="utf-8").read())}
    logz = {}
    lz = os.path.join(exp_dir, "logz.txt")
    if os.path.exists(lz):
        logz = {(m.group(1), m.group(2)): (m.group(3), m.group(4)) for m in LOGZ.finditer(open(lz, encoding="utf-8").read())}
    k = sorted({int(d[8:]) for (_, d) in bleu if re.fullmatch(r"softbeam\d+", d)} or {3})[0]
    b = lambda model, decode: bleu.get((model, decode), "n/a")  # noqa: E731
    lines = ["# Soft beam search on Multi30k en-de: Table 5.4 (and Table 5.1's MT rows) of Goyal's thesis in miniature", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"sacreBLEU (13a, cased) on test_2016_flickr, the LAST checkpoint of each model; k = {k}.", "",
              "### Table 5.4: BLEU", "",
              "Regular / Self-normalized: the initialisation of the soft beam fine-tunes (cross-entropy `lstm_ce` / "
              "`selfnorm`). pretrain-greedy / -beam: the initialiser decoded greedily / with beam search; locally / "
              "globally normalized: the search-aware models decoded with soft beam search (hard beam search in "
              "brackets; the globally normalized ones search their raw scores).", "",
              "| Init-scheme | Regular | Self-normalized |", "|---|---:|---:|",
              f"| pretrain-greedy | {b('lstm_ce', 'greedy')} | {b('selfnorm', 'greedy')} |",
              f"| pretrain-beam | {b('lstm_ce', f'beam{k}')} | {b('selfnorm', f'beam{k}')} |",
              f"| locally-normalized | {b('sb_local', f'softbeam{k}')} ({b('sb_local', f'beam{k}')}) "
              f"| {b('sb_local_sn', f'softbeam{k}')} ({b('sb_local_sn', f'beam{k}')}) |",
              f"| globally-normalized | {b('sb_global_ce', f'softbeam{k}')} ({b('sb_global_ce', f'beam{k}')}) "
              f"| {b('sb_global', f'softbeam{k}')} ({b('sb_global', f'beam{k}')}) |", "",
              "### Table 5.1, MT rows: log Z and BLEU of the initialisers", "",
              "Teacher-forced log Z over the target positions (train: the first LOGZ_MAX_BATCHES batches). "
              f"'beam on raw scores': beam {k} over the unnormalized scores (Table 5.1's remark: a CE model falls "
              "from 27.62 to 4.30 BLEU).", "",
              "| model | train log Z mean | train var | dev log Z mean | dev var | BLEU beam | BLEU beam on raw scores |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for model, label in (("lstm_ce", "CE"), ("selfnorm", "L2 (self-normalized)"), ("sb_local", "sb_local"),
                         ("sb_global", "sb_global (globally normalized)")):  # fmt: skip
        tm, tv = logz.get((model, "train"), ("n/a", "n/a"))
        dm, dv = logz.get((model, "valid"), ("n/a", "n/a"))
        raw = b(model, f"beam{k}raw") if model != "sb_global" else b(model, f"beam{k}")
        lines.append(f"| {label} | {tm} | {tv} | {dm} | {dv} | {b(model, f'beam{k}')} | {raw} |")
    lines += ["", "All decodings:", "", "| model | " + " | ".join(sorted({d for _, d in bleu})) + " |",
              "|---|" + "---:|" * len({d for _, d in bleu})]
    for model in sorted({m for m, _ in bleu}):
        lines.append(f"| {model} | " + " | ".join(b(model, d) for d in sorted({d for _, d in bleu})) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--md", required=True)
    ap.add_argument("--command", default="")
    ap.add_argument("--mt", action="store_true", help="--run-dir is one translation EXP_DIR (Table 5.4)")
    args = ap.parse_args()
    if args.mt:
        lines = mt_tables(args.run_dir, args.command)
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    parts = {}
    for part in ("ner", "pos", "pos_uni"):
        d = os.path.join(args.run_dir, part)
        if os.path.isdir(d):
            parts[part] = collect(d)
    seeds = sorted({s for sc, _, _ in parts.values() for v in sc.values() for s in v})
    lines = ["# Soft beam search on CoNLL-2003: the rows of Tables 4.1/4.2 and 5.1-5.3 of Goyal's thesis", ""]
    if args.command:
        lines += [f"Command: `{args.command}`", ""]
    lines += [f"Seeds: {seeds}. Scores of each model's LAST checkpoint; mean ± sample std over seeds.", ""]
    if "ner" in parts:
        lines += table4("Table 4.2 rows: NER (CoNLL-2003 English), span F1", parts["ner"][0], "conlleval span F1")
    if "pos" in parts:
        lines += table4("Table 4.1 stand-in: the POS column (~45 Penn Treebank tags), tag accuracy", parts["pos"][0], "tag accuracy")
    lines += table51({p: v for p, v in parts.items() if p in ("ner", "pos", "pos_uni")})
    lines += table52_53(parts.get("pos_uni"), parts.get("pos"))
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
