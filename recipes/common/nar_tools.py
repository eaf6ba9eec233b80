"""Helpers of the non-autoregressive stages: distillation (recipes/common/distill.sh) and the WMT'16
en-ro text (recipes/wmt16_en_ro/prepare.sh).

Usage: python3 nar_tools.py COMMAND ...   (see --help of each command)

  distill-corpus  fairseq-generate output of a teacher on the TRAINING set -> the distilled parallel
                  text PREFIX.SRC / PREFIX.TGT in sentence-id order: the source (S- line) unchanged,
                  the target = the best hypothesis (first H- line), both in the binarised subword pieces;
                  fails unless every one of --expected sentences got exactly one source and hypothesis
  ro-normalise    Romanian text as Lee et al. (2018) / Sennrich et al. (2016) preprocess WMT'16 en-ro:
                  cedilla s/t -> comma-below, typographic quotes and dashes normalised; with
                  --remove-diacritics also ă â î ș ț (any case) -> a a i s t
  mh-stats        the chain statistics file(s) of a Metropolis-Hastings / degenerate Gibbs decoding
                  (--task translation_mh --mh-stats-path) -> one summary line: chain-weighted means of
                  the acceptance and novel-transition rates and energies over the sample epochs
                  (--per-epoch: one line per epoch instead)
"""
import argparse
import json
import math
import re
import sys
import unicodedata


def read_generate_output(path):
    """{id: source}, {id: reference}, {id: best hypothesis} from S-, T- and the first H- line of each id."""
    sources, refs, hyps = {}, {}, {}
    pattern = re.compile(r"^([STH])-(\d+)\t(.*)$")
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = pattern.match(line.rstrip("\n"))
            if not m:
                continue
            tag, i, rest = m.group(1), int(m.group(2)), m.group(3)
            if tag == "S":
                if i in sources:
                    sys.exit(f"ERROR: {path}: sentence {i} was decoded twice")
                sources[i] = rest.strip()
            elif tag == "T":
                refs[i] = rest.strip()
            elif i not in hyps:  # H-id<TAB>score<TAB>text; the first one is the best (--nbest > 1)
                hyps[i] = rest.split("\t", 1)[1].strip() if "\t" in rest else ""
    return sources, refs, hyps


def distill_corpus(args):
    sources, refs, hyps = read_generate_output(args.generate_output)
    want = set(range(args.expected))
    if set(sources) != want or set(hyps) != want:
        missing = sorted(want - (set(sources) & set(hyps)))
        sys.exit(
            f"ERROR: {args.generate_output}: {len(hyps)} hypotheses for {args.expected} training sentences "
            f"(first missing ids: {missing[:10]}); the teacher must decode every training sentence "
            "(--required-batch-size-multiple 1, no --skip-invalid-size-inputs-valid-test)"
        )
    empty = same = n_ref = n_hyp = 0
    with open(f"{args.prefix}.{args.src}", "w", encoding="utf-8") as fs, open(
        f"{args.prefix}.{args.tgt}", "w", encoding="utf-8"
    ) as ft:
        for i in range(args.expected):
            hyp, ref = hyps[i], refs.get(i, "")
            if not hyp:
                # an empty target is no training pair: the sentence keeps its reference (counted)
                if not ref:
                    sys.exit(f"ERROR: {args.generate_output}: sentence {i} has an empty hypothesis and no T- line")
                empty += 1
                hyp = ref
            same += hyp == ref
            n_ref += len(ref.split())
            n_hyp += len(hyp.split())
            fs.write(sources[i] + "\n")
            ft.write(hyp + "\n")
    n = args.expected
    print(
        f"  distilled: {n} / {n} training sentences got a teacher hypothesis; {same} ({100.0 * same / max(n, 1):.1f}%) "
        f"equal their reference; {empty} empty hypotheses kept the reference; target pieces {n_hyp} "
        f"(reference {n_ref}, ratio {n_hyp / max(n_ref, 1):.3f})"
    )


# Romanian: s and t with cedilla (the legacy code points) are the same letters as with comma below.
RO_MAP = {
    "\u015e": "\u0218", "\u015f": "\u0219",  # Ş ş -> Ș ș
    "\u0162": "\u021a", "\u0163": "\u021b",  # Ţ ţ -> Ț ț
    "\u201e": '"', "\u201d": '"', "\u201c": '"', "\u00ab": '"', "\u00bb": '"',  # „ ” “ « »
    "\u2019": "'", "\u2018": "'", "\u201a": "'",  # ’ ‘ ‚
    "\u2013": "-", "\u2014": "-",  # – —
    "\u00a0": " ",  # no-break space
}  # fmt: skip
RO_DIACRITICS = {
    "\u0218": "S", "\u0219": "s", "\u021a": "T", "\u021b": "t",
    "\u0102": "A", "\u0103": "a", "\u00c2": "A", "\u00e2": "a", "\u00ce": "I", "\u00ee": "i",
}  # fmt: skip


def ro_normalise_line(line, remove_diacritics=False):
    line = unicodedata.normalize("NFC", line)
    line = "".join(RO_MAP.get(c, c) for c in line)
    if remove_diacritics:
        line = "".join(RO_DIACRITICS.get(c, c) for c in line)
    return re.sub(r" {2,}", " ", line).strip()


def ro_normalise(args):
    n = 0
    with open(args.input, encoding="utf-8") as fin, open(args.output, "w", encoding="utf-8") as fout:
        for line in fin:
            fout.write(ro_normalise_line(line.rstrip("\n"), args.remove_diacritics) + "\n")
            n += 1
    print(f"  ro-normalise{' + remove-diacritics' if args.remove_diacritics else ''}: {n} lines -> {args.output}")


# -- chain statistics of the Metropolis-Hastings decodings --------------------------------------
# One JSON object per line and per (decoded batch, epoch): epoch (0 = the warm start), phase
# (warm_start | burn_in | sample), chains (the chains of that batch: the weight of its rates and
# energies), acceptance_rate, novel_rate, energy_local, energy_raw, target_temperature, block_size
# (a value may be null where it does not apply, e.g. the warm start's acceptance rate).
MH_PHASES = ("warm_start", "burn_in", "sample")
MH_VALUES = ("acceptance_rate", "novel_rate", "energy_local", "energy_raw", "target_temperature", "block_size")


def read_mh_stats(paths):
    """The records of one or more stats files, checked; a malformed line fails with its file and line."""
    records = []
    for path in [paths] if isinstance(paths, str) else paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{where}: not a JSON line ({e})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{where}: not a JSON object")
                missing = [k for k in ("epoch", "phase", "chains") + MH_VALUES if k not in rec]
                if missing:
                    raise ValueError(f"{where}: missing keys {missing}")
                if not isinstance(rec["epoch"], int) or isinstance(rec["epoch"], bool) or rec["epoch"] < 0:
                    raise ValueError(f"{where}: epoch must be an integer >= 0, got {rec['epoch']!r}")
                if rec["phase"] not in MH_PHASES:
                    raise ValueError(f"{where}: phase must be one of {MH_PHASES}, got {rec['phase']!r}")
                if not isinstance(rec["chains"], int) or isinstance(rec["chains"], bool) or rec["chains"] < 1:
                    raise ValueError(f"{where}: chains must be a positive integer, got {rec['chains']!r}")
                for k in MH_VALUES:
                    v = rec[k]
                    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                        raise ValueError(f"{where}: {k} must be a number or null, got {v!r}")
                records.append(rec)
    return records


def _value(rec, key):
    v = rec[key]
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def mh_weighted_means(records):
    """Chain-weighted means of MH_VALUES over RECORDS ({key: mean or None}) and the chain total.

    Each record weighs as many as its chains: a batch of 40 chains counts four times one of 10, so
    the mean is the mean over chains (and over epochs, each chain-epoch once)."""
    out = {}
    for key in MH_VALUES:
        num = den = 0.0
        for rec in records:
            v = _value(rec, key)
            if v is not None:
                num += v * rec["chains"]
                den += rec["chains"]
        out[key] = num / den if den else None
    return out, sum(rec["chains"] for rec in records)


def mh_per_epoch(records):
    """[(epoch, phase, chains, {key: chain-weighted mean})] in epoch order: the curves of the thesis's
    Figures 6.2-6.4 (one point per epoch, the batches and runs of that epoch pooled)."""
    by_epoch = {}
    for rec in records:
        by_epoch.setdefault(rec["epoch"], []).append(rec)
    rows = []
    for epoch in sorted(by_epoch):
        recs = by_epoch[epoch]
        phases = {r["phase"] for r in recs}
        if len(phases) > 1:
            raise ValueError(f"epoch {epoch} has records of several phases: {sorted(phases)}")
        means, chains = mh_weighted_means(recs)
        rows.append((epoch, phases.pop(), chains, means))
    return rows


def mh_summary(records, phases=("sample",)):
    """{key: chain-weighted mean over the records of PHASES}, plus 'epochs' (first, last), 'chain_epochs',
    'warm_energy_local' and the last epoch's 'final_energy_local' / 'final_target_temperature'."""
    chosen = [r for r in records if r["phase"] in phases]
    means, chain_epochs = mh_weighted_means(chosen)
    epochs = sorted({r["epoch"] for r in chosen})
    out = dict(means)
    out["epochs"] = (epochs[0], epochs[-1]) if epochs else None
    out["chain_epochs"] = chain_epochs
    warm = [r for r in records if r["phase"] == "warm_start"]
    out["warm_energy_local"] = mh_weighted_means(warm)[0]["energy_local"] if warm else None
    last_epoch = max((r["epoch"] for r in records), default=None)
    last = [r for r in records if r["epoch"] == last_epoch]
    lm = mh_weighted_means(last)[0] if last else {}
    out["final_energy_local"] = lm.get("energy_local")
    out["final_target_temperature"] = lm.get("target_temperature")
    return out


def _fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


def mh_stats(args):
    try:
        records = read_mh_stats(args.stats)
    except (OSError, ValueError) as e:
        sys.exit(f"ERROR: {e}")
    if not records:
        sys.exit(f"ERROR: no chain statistics in {' '.join(args.stats)}")
    if args.per_epoch:
        print("epoch\tphase\tchains\t" + "\t".join(MH_VALUES))
        for epoch, phase, chains, means in mh_per_epoch(records):
            print(f"{epoch}\t{phase}\t{chains}\t" + "\t".join(_fmt(means[k], 4) for k in MH_VALUES))
        return
    phases = tuple(args.phases.split(","))
    s = mh_summary(records, phases)
    span = "no epochs" if s["epochs"] is None else f"epochs {s['epochs'][0]}-{s['epochs'][1]}"
    print(
        f"MH {args.name}: acceptance {_fmt(s['acceptance_rate'])} novel {_fmt(s['novel_rate'])} "
        f"E_local {_fmt(s['energy_local'], 2)} E_raw {_fmt(s['energy_raw'], 2)} "
        f"({'+'.join(phases)} {span}, chain-weighted over {s['chain_epochs']} chain-epochs); "
        f"warm start E_local {_fmt(s['warm_energy_local'], 2)}; last epoch E_local {_fmt(s['final_energy_local'], 2)}, "
        f"target temperature {_fmt(s['final_target_temperature'], 2)}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("distill-corpus", help="teacher output on the training set -> distilled parallel text")
    p.add_argument("generate_output", help="fairseq-generate stdout with --gen-subset train, no --post-process")
    p.add_argument("prefix", help="writes PREFIX.SRC and PREFIX.TGT")
    p.add_argument("src")
    p.add_argument("tgt")
    p.add_argument("--expected", type=int, required=True, help="sentences in the decoded split")
    p.set_defaults(func=distill_corpus)
    p = sub.add_parser("ro-normalise", help="WMT'16 Romanian normalisation (and diacritics removal)")
    p.add_argument("--remove-diacritics", action="store_true")
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=ro_normalise)
    p = sub.add_parser("mh-stats", help="chain statistics of a Metropolis-Hastings decoding -> a summary line")
    p.add_argument("stats", nargs="+", help="--mh-stats-path file(s) (JSON lines); several are pooled")
    p.add_argument("--name", default="", help="the label of the line, e.g. MODEL/DECODING")
    p.add_argument("--phases", default="sample", help="comma-separated phases averaged (default: sample)")
    p.add_argument("--per-epoch", action="store_true", help="one tab-separated line per epoch instead")
    p.set_defaults(func=mh_stats)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
