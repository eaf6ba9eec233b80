"""Small command-line helpers the recipes call: sentencepiece, corpus cleaning, hypotheses, BLEU.

Usage: python3 tools.py COMMAND ...   (see --help of each command)

  spm-train   trains a joint sentencepiece model on the given files (deterministic)
  spm-encode  encodes a text file into space-separated pieces
  clean       drops training pairs that are empty, too long or too unbalanced (training data only)
  strip-xml   IWSLT/WMT XML/SGML -> plain text (the <seg> contents, or untagged lines and
              the text of --keep-tags elements)
  hyps        fairseq-generate output -> one detokenised hypothesis per line, in input order;
              fails unless every input sentence got exactly one
  bleu        sacreBLEU of a hypothesis file against a raw reference file
"""
import argparse
import re
import sys


def spm_train(args):
    import sentencepiece as spm

    # A fixed seed and no input sampling for small corpora make the model byte-identical across runs.
    spm.set_random_generator_seed(args.seed)
    opts = dict(
        input=",".join(args.inputs),
        model_prefix=args.model_prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        # fairseq adds its own <s> <pad> </s> <unk>; the sentencepiece ids are never used directly.
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        # Lets the smoke data (a few dozen sentences) ask for more pieces than it supports.
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    if args.input_sentence_size > 0:
        # Large corpora (WMT): a seeded random subset.
        opts.update(input_sentence_size=args.input_sentence_size, shuffle_input_sentence=True)
    spm.SentencePieceTrainer.train(**opts)


def spm_encode(args):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=args.model)
    with open(args.input, encoding="utf-8") as fin, open(args.output, "w", encoding="utf-8") as fout:
        for n, line in enumerate(fin, 1):
            pieces = sp.encode(line.rstrip("\n"), out_type=str)
            # An empty line would vanish from fairseq's binarised data and shift the alignment.
            if not pieces:
                sys.exit(f"ERROR: {args.input} line {n} encodes to nothing (empty sentence)")
            fout.write(" ".join(pieces) + "\n")


def clean(args):
    kept = dropped = 0
    with open(args.src, encoding="utf-8") as fs, open(args.tgt, encoding="utf-8") as ft, open(
        args.out_src, "w", encoding="utf-8"
    ) as os_, open(args.out_tgt, "w", encoding="utf-8") as ot:
        for s, t in zip(fs, ft):
            s, t = s.strip(), t.strip()
            ls, lt = len(s.split()), len(t.split())
            if not (1 <= ls <= args.max_len and 1 <= lt <= args.max_len) or max(ls, lt) > args.ratio * min(ls, lt):
                dropped += 1
                continue
            os_.write(s + "\n")
            ot.write(t + "\n")
            kept += 1
    print(f"  clean: kept {kept} pairs, dropped {dropped} (empty, > {args.max_len} words or ratio > {args.ratio})")


def strip_xml(args):
    seg = re.compile(r"<seg[^>]*>(.*)</seg>", re.IGNORECASE)
    # metadata elements whose text is a sentence pair too (IWSLT talk titles and descriptions)
    tags = "|".join(re.escape(t) for t in args.keep_tags.split(",") if t)
    keep = re.compile(rf"^<({tags})>(.*)</\1>$") if tags else None
    with open(args.input, encoding="utf-8") as fin, open(args.output, "w", encoding="utf-8") as fout:
        for line in fin:
            if args.segs:
                m = seg.search(line)
                if m:
                    fout.write(m.group(1).strip() + "\n")
            else:
                m = keep.match(line.strip()) if keep else None
                if m:
                    fout.write(m.group(2).strip() + "\n")
                elif not line.lstrip().startswith("<"):
                    fout.write(line.strip() + "\n")


def hyps(args):
    found = {}
    pattern = re.compile(r"^D-(\d+)\t[^\t]*\t?(.*)$")
    with open(args.generate_output, encoding="utf-8") as f:
        for line in f:
            m = pattern.match(line.rstrip("\n"))
            if m:
                i = int(m.group(1))
                if i in found:
                    sys.exit(f"ERROR: {args.generate_output}: sentence {i} has two hypotheses")
                found[i] = m.group(2)
    if len(found) != args.expected or sorted(found) != list(range(args.expected)):
        missing = sorted(set(range(args.expected)) - set(found))[:10]
        sys.exit(
            f"ERROR: {args.generate_output}: {len(found)} hypotheses for {args.expected} test sentences"
            f" (first missing ids: {missing})"
        )
    with open(args.output, "w", encoding="utf-8") as f:
        for i in range(args.expected):
            f.write(found[i] + "\n")
    print(f"  hypotheses: {len(found)} / {args.expected} test sentences -> {args.output}")


def bleu(args):
    from sacrebleu.metrics import BLEU

    with open(args.hyp, encoding="utf-8") as f:
        hyp = [line.rstrip("\n") for line in f]
    with open(args.ref, encoding="utf-8") as f:
        ref = [line.rstrip("\n") for line in f]
    if len(hyp) != len(ref):
        sys.exit(f"ERROR: {args.hyp} has {len(hyp)} lines but the reference {args.ref} has {len(ref)}")
    metric = BLEU(lowercase=args.lowercase)
    score = metric.corpus_score(hyp, [ref])
    print(f"BLEU {args.name} = {score.score:.2f}  ({score}; sacreBLEU signature {metric.get_signature()})")


def tagscore(args):
    """conlleval's span F1 (and tag accuracy) of hypothesis tag lines against reference tag lines."""
    from fairseq_ext.scoring.span_f1 import conlleval_report, evaluate, precision_recall_f1

    with open(args.hyp, encoding="utf-8") as f:
        hyp = [line.split() for line in f]
    with open(args.ref, encoding="utf-8") as f:
        ref = [line.split() for line in f]
    if len(hyp) != len(ref):
        sys.exit(f"ERROR: {args.hyp} has {len(hyp)} lines but the reference {args.ref} has {len(ref)}")
    try:
        counts = evaluate(ref, hyp)
    except ValueError as e:
        sys.exit(f"ERROR: {args.hyp} vs {args.ref}: {e}")
    p, r, f1 = precision_recall_f1(counts.correct_chunks, counts.gold_chunks, counts.guessed_chunks)
    accuracy = 100.0 * counts.correct_tags / max(counts.tokens, 1)
    print(f"F1 {args.name} = {f1:.2f}  (precision {p:.2f}, recall {r:.2f}, tag accuracy {accuracy:.2f}; "
          f"conlleval chunks over {counts.tokens} tokens)")
    if args.report:
        with open(args.report, "w", encoding="utf-8") as out:
            out.write(conlleval_report(counts) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("spm-train")
    s.add_argument("--model-prefix", required=True)
    s.add_argument("--vocab-size", type=int, required=True)
    s.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    s.add_argument("--character-coverage", type=float, default=1.0)
    s.add_argument("--input-sentence-size", type=int, default=0, help="0 = use every sentence")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("inputs", nargs="+")
    s.set_defaults(fn=spm_train)

    s = sub.add_parser("spm-encode")
    s.add_argument("--model", required=True)
    s.add_argument("input")
    s.add_argument("output")
    s.set_defaults(fn=spm_encode)

    s = sub.add_parser("clean")
    s.add_argument("--max-len", type=int, default=250)
    s.add_argument("--ratio", type=float, default=1.5)
    s.add_argument("src")
    s.add_argument("tgt")
    s.add_argument("out_src")
    s.add_argument("out_tgt")
    s.set_defaults(fn=clean)

    s = sub.add_parser("strip-xml")
    s.add_argument("--segs", action="store_true", help="keep only <seg> contents (dev/test XML and SGML)")
    s.add_argument("--keep-tags", default="", help="comma-separated one-line elements whose text is kept")
    s.add_argument("input")
    s.add_argument("output")
    s.set_defaults(fn=strip_xml)

    s = sub.add_parser("hyps")
    s.add_argument("--expected", type=int, required=True)
    s.add_argument("generate_output")
    s.add_argument("output")
    s.set_defaults(fn=hyps)

    s = sub.add_parser("bleu")
    s.add_argument("--name", default="")
    s.add_argument("--lowercase", action="store_true")
    s.add_argument("hyp")
    s.add_argument("ref")
    s.set_defaults(fn=bleu)

    s = sub.add_parser("tagscore", help="conlleval span F1 and tag accuracy of tag lines")
    s.add_argument("--name", required=True)
    s.add_argument("--report", help="also write conlleval's per-type report here")
    s.add_argument("hyp")
    s.add_argument("ref")
    s.set_defaults(fn=tagscore)
    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
