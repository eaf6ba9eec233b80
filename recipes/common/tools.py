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
  tagscore    conlleval span F1 and tag accuracy of tag lines (--accuracy-only: tag accuracy alone)
  tagset      "chunk" when a label dictionary holds chunk tags only (O, B-X, I-X, E-X, S-X), else "atomic"
  logz        mean and variance of the local log-normalizer log Z of a checkpoint on a split
              (teacher-forced; Table 5.1 of Goyal's thesis)
  ccgbank     CCGbank AUTO files -> aligned word / supertag files (one sentence per line)
  check-text  input text files are UTF-8 with no carriage return inside a line (file and line named)
  check-parallel  two such files have the same number of lines, counted as the tools count them
  check-outputs   no path a prepare.sh replaces is, contains or lies inside one of its inputs
"""
import argparse
import os
import re
import sys

# fairseq_ext from this checkout when it is not installed (tagscore, logz)
sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _load_text_lines():
    """fairseq_ext/data/text_lines.py, loaded by path: importing the package would import fairseq (seconds
    per call of this script)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(
        "fairseq_ext_text_lines", os.path.join(root, "fairseq_ext", "data", "text_lines.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_text_lines = _load_text_lines()
TextError = _text_lines.TextLineError
text_lines = _text_lines.read_text_lines  # (line number, line): UTF-8, no carriage return inside a line


def count_lines(path):
    count = 0
    for count, _ in text_lines(path):
        pass
    return count


def check_text(args):
    try:
        for path in args.files:
            count_lines(path)
    except TextError as err:
        sys.exit(f"ERROR: {err}")


def check_parallel(args):
    try:
        na, nb = count_lines(args.a), count_lines(args.b)
    except TextError as err:
        sys.exit(f"ERROR: {err}")
    if na != nb:
        sys.exit(f"ERROR: line counts differ: {args.a} has {na} lines, {args.b} has {nb} lines")
    print(f"  ok {os.path.basename(args.a)} / {os.path.basename(args.b)}: {na} lines")


def overlap(target, source):
    """How the path ``target`` (to be replaced) meets the input ``source``, or None; both resolved."""
    t, s = os.path.realpath(target), os.path.realpath(source)
    if t == s:
        return "is"
    if s.startswith(t.rstrip(os.sep) + os.sep):
        return "contains"
    if t.startswith(s.rstrip(os.sep) + os.sep):
        return "lies inside"
    return None


def check_outputs(args):
    """Refuses (exit 1) when a path the recipe deletes or writes is, contains or lies inside an input."""
    for sub in args.subpaths:
        target = os.path.join(args.out, sub)
        for source in args.inputs:
            how = overlap(target, source)
            if how:
                sys.exit(
                    f"ERROR: {target} {how} the input {source} (resolved: {os.path.realpath(target)} and "
                    f"{os.path.realpath(source)}); this recipe replaces {target}, which would destroy its own input. "
                    "Choose an output directory outside the input files and directories."
                )


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
    if args.accuracy_only:
        correct = total = 0
        for n, (r, h) in enumerate(zip(ref, hyp), 1):
            if len(r) != len(h):
                sys.exit(f"ERROR: {args.hyp} line {n} has {len(h)} tags but the reference has {len(r)}")
            correct += sum(a == b for a, b in zip(r, h))
            total += len(r)
        print(f"ACC {args.name} = {100.0 * correct / max(total, 1):.2f}  (tag accuracy: {correct} of {total} tokens)")
        return
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


CHUNK_TAG = re.compile(r"^(O|[BIES]-\S+)$")
FILLER = "madeupword"  # fairseq-preprocess pads dictionaries with madeupwordNNNN symbols


def tagset(args):
    """Prints chunk or atomic: whether every label of a fairseq dictionary file is a chunk tag."""
    labels = []
    with open(args.dictionary, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if fields and not fields[0].startswith(FILLER):
                labels.append(fields[0])
    if not labels:
        sys.exit(f"ERROR: no labels in {args.dictionary}")
    chunk = all(CHUNK_TAG.match(t) for t in labels) and any(t != "O" for t in labels)
    print("chunk" if chunk else "atomic")


def logz(args):
    """Teacher-forced local log-normalizers log Z_i = logsumexp_y s_i(y) of checkpoints over splits:
    count, mean and population variance over the target positions (Table 5.1).  One process for
    every model and split (loading fairseq once)."""
    from argparse import Namespace

    import torch
    from fairseq import checkpoint_utils, utils

    utils.import_user_module(Namespace(user_dir=args.user_dir))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep:
            sys.exit(f"ERROR: --model takes NAME=CHECKPOINT, got {spec!r}")
        models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": args.data})
        model = models[0].eval()
        pad = task.target_dictionary.pad()
        for split in args.splits.split(","):
            task.load_dataset(split)
            itr = task.get_batch_iterator(
                dataset=task.dataset(split), max_tokens=args.max_tokens, max_sentences=None,
                max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
                ignore_invalid_inputs=True, required_batch_size_multiple=1, seed=1, num_workers=0,
            ).next_epoch_itr(shuffle=False)
            count, total, total_sq = 0, 0.0, 0.0
            with torch.no_grad():
                for i, sample in enumerate(itr):
                    if args.max_batches and i >= args.max_batches:
                        break
                    log_z = torch.logsumexp(model(**sample["net_input"])[0].float(), dim=-1).double()
                    values = log_z[sample["target"].ne(pad)]
                    count += values.numel()
                    total += values.sum().item()
                    total_sq += values.pow(2).sum().item()
            if count == 0:
                sys.exit(f"ERROR: no target positions in split {split} of {args.data}")
            mean = total / count
            var = max(total_sq / count - mean * mean, 0.0)
            print(f"LOGZ {name}/{split} mean = {mean:.4f} var = {var:.4f}  ({count} target positions, {path})", flush=True)


# CCGbank AUTO leaves: (<L CATEGORY MODIFIED_POS ORIGINAL_POS WORD PRED_ARG_CATEGORY>)
CCG_LEAF = re.compile(r"\(<L (\S+) (\S+) (\S+) (\S+) (\S+)>\)")


def read_auto(path):
    """Sentences [(words, supertags)] of one CCGbank AUTO file (ID= lines, each followed by a tree)."""
    sentences = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("ID="):
            continue
        leaves = CCG_LEAF.findall(line)
        if not leaves:
            sys.exit(f"ERROR: {path} line {n}: a parse line without any (<L ...>) leaf: {line[:80]!r}")
        sentences.append(([leaf[3] for leaf in leaves], [leaf[0] for leaf in leaves]))
    return sentences


def ccgbank(args):
    """The AUTO files of the given sections (in order, files sorted) -> PREFIX.words / PREFIX.tags."""
    import glob

    files = []
    for section in args.sections.split(","):
        section_dir = os.path.join(args.auto_dir, section)
        found = sorted(glob.glob(os.path.join(section_dir, "*.auto")))
        if not found:
            sys.exit(f"ERROR: no *.auto files in {section_dir} (expected CCGbank's data/AUTO/{section}/wsj_{section}NN.auto)")
        files += found
    n_sent = n_tok = 0
    with open(args.prefix + "." + args.source_suffix, "w", encoding="utf-8") as fw, open(
        args.prefix + "." + args.target_suffix, "w", encoding="utf-8"
    ) as ft:
        for path in files:
            for words, tags in read_auto(path):
                if args.lowercase:
                    words = [w.lower() for w in words]
                fw.write(" ".join(words) + "\n")
                ft.write(" ".join(tags) + "\n")
                n_sent += 1
                n_tok += len(words)
    print(f"  ccgbank sections {args.sections}: {len(files)} files, {n_sent} sentences, {n_tok} tokens -> {args.prefix}.*")


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
    s.add_argument("--accuracy-only", action="store_true",
                   help="labels that are not chunk tags (POS, supertags): print tag accuracy alone (an ACC line)")
    s.add_argument("hyp")
    s.add_argument("ref")
    s.set_defaults(fn=tagscore)

    s = sub.add_parser("tagset", help="chunk or atomic: the kind of labels in a fairseq dictionary file")
    s.add_argument("dictionary")
    s.set_defaults(fn=tagset)

    s = sub.add_parser("logz", help="mean and variance of log Z of checkpoints on splits (teacher-forced)")
    s.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT", help="repeatable")
    s.add_argument("--data", required=True, help="fairseq data-bin directory")
    s.add_argument("--splits", default="train,valid")
    s.add_argument("--user-dir", required=True)
    s.add_argument("--max-tokens", type=int, default=4000)
    s.add_argument("--max-batches", type=int, default=0, help="0 = the whole split")
    s.set_defaults(fn=logz)

    s = sub.add_parser("ccgbank", help="CCGbank AUTO sections -> aligned word / supertag files")
    s.add_argument("--auto-dir", required=True, help="the directory holding the section folders 00 .. 24")
    s.add_argument("--sections", required=True, help="comma-separated, e.g. 02,03,...,21")
    s.add_argument("--lowercase", action="store_true")
    s.add_argument("--source-suffix", default="words")
    s.add_argument("--target-suffix", default="tags")
    s.add_argument("prefix")
    s.set_defaults(fn=ccgbank)

    s = sub.add_parser("check-text", help="UTF-8, no carriage return inside a line")
    s.add_argument("files", nargs="+")
    s.set_defaults(fn=check_text)

    s = sub.add_parser("check-parallel", help="check-text, and the same number of lines")
    s.add_argument("a")
    s.add_argument("b")
    s.set_defaults(fn=check_parallel)

    s = sub.add_parser("check-outputs", help="no replaced path is, contains or lies inside an input")
    s.add_argument("--out", required=True, help="the output directory")
    s.add_argument("--input", dest="inputs", action="append", default=[], help="an input file or directory (repeatable)")
    s.add_argument("subpaths", nargs="+", help="the entries of --out the recipe replaces")
    s.set_defaults(fn=check_outputs)
    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
