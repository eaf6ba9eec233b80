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
"""
import argparse
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
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
