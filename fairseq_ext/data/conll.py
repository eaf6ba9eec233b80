"""CoNLL column files -> aligned text files for fairseq-preprocess and ``--task tagging``.

A CoNLL file has one token per line with whitespace-separated columns (CoNLL-2003:
``TOKEN POS CHUNK NER``), a blank line after each sentence, and ``-DOCSTART-`` lines between
documents.  The converter writes two files with one sentence per line and space-separated fields,
the tokens (column ``--token-column``) and their tags (column ``--tag-column``), skipping the
``-DOCSTART-`` lines; line k of one file is aligned token by token with line k of the other.

    python3 -m fairseq_ext.data.conll INPUT OUTPUT_PREFIX [--tag-column 3] [--token-column 0]
        [--to-scheme keep|bio|iob1] [--source-suffix words] [--target-suffix tags]

writes ``OUTPUT_PREFIX.words`` and ``OUTPUT_PREFIX.tags``.  ``--to-scheme`` rewrites chunk tags
(NER, chunking) as BIO/IOB2 or IOB1, reading the input with conlleval's rules (so either scheme
may come in); it refuses tags other than O, B-TYPE and I-TYPE.  Tokens never contain whitespace:
CoNLL columns are whitespace-separated, so each token stays one fairseq token.

Refused with the file and line named: bytes that are not UTF-8; a carriage return inside a line (Python
and fairseq-preprocess split lines there, ``wc -l`` does not; a CRLF line end is fine); fairseq's
reserved words ``<s> <pad> </s> <unk>`` as tokens or tags (fairseq-preprocess maps them to its special
indices: a ``<pad>`` word would shorten the sentence); an output file that is the input file.
"""
import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from fairseq_ext.data import text_lines
from fairseq_ext.scoring.span_f1 import OUTSIDE, split_tag, start_of_chunk

DOCSTART = "-DOCSTART-"
SCHEMES = ("keep", "bio", "iob1")
# fairseq.data.Dictionary's special symbols: fairseq-preprocess maps these words to its reserved indices
RESERVED_WORDS = ("<s>", "<pad>", "</s>", "<unk>")


class ConllFormatError(ValueError):
    """A CoNLL input file cannot be converted; the message names the file and line."""


class AlignmentError(ValueError):
    """Two text files are not aligned token by token; the message names both files and the line."""


class OverwriteError(ValueError):
    """An output path is the input file (or both outputs are one file); nothing has been written."""


def read_text_lines(path: str):
    """Yields (1-based line number, line) of a UTF-8 text file (see fairseq_ext/data/text_lines.py),
    refusing undecodable bytes and a carriage return inside a line with a ConllFormatError naming the
    file and line."""
    try:
        yield from text_lines.read_text_lines(path)
    except text_lines.TextLineError as err:
        raise ConllFormatError(str(err)) from None


@dataclass
class Sentence:
    tokens: List[str] = field(default_factory=list)
    tags: List[str] = field(default_factory=list)
    lines: List[int] = field(default_factory=list)  # 1-based input line of each token


def read_conll(path: str, tag_column: int, token_column: int = 0) -> List[Sentence]:
    """Sentences of a CoNLL file, without its -DOCSTART- lines.  Raises ConllFormatError."""
    needed = max(tag_column, token_column) + 1
    sentences, current = [], Sentence()
    saw_line = False
    for number, line in read_text_lines(path):
        saw_line = True
        fields = line.split()
        if not fields:
            if current.tokens:
                sentences.append(current)
            current = Sentence()
            continue
        if fields[0] == DOCSTART:
            continue
        if len(fields) < needed:
            raise ConllFormatError(
                f"{path}:{number}: expected at least {needed} whitespace-separated columns (token column "
                f"{token_column}, tag column {tag_column}, counting from 0), found {len(fields)}: {line.strip()!r}"
            )
        for column, what in ((token_column, "token"), (tag_column, "tag")):
            if fields[column] in RESERVED_WORDS:
                raise ConllFormatError(
                    f"{path}:{number}: the {what} {fields[column]!r} is one of fairseq's reserved symbols "
                    f"{' '.join(RESERVED_WORDS)}; fairseq-preprocess would turn it into a special index (a "
                    "<pad> word shortens the sentence, so the tagger emits a label too few): rename it"
                )
        current.tokens.append(fields[token_column])
        current.tags.append(fields[tag_column])
        current.lines.append(number)
    if current.tokens:
        sentences.append(current)
    if not saw_line:
        raise ConllFormatError(
            f"{path} is empty: expected CoNLL lines (token and tag columns, a blank line between sentences)"
        )
    if not sentences:
        raise ConllFormatError(f"{path} contains no sentences (only blank and {DOCSTART} lines)")
    return sentences


def chunk_prefix(tag: str) -> Tuple[str, str]:
    """(prefix, type) of an O / B-TYPE / I-TYPE tag; raises ValueError for any other tag."""
    prefix, kind = split_tag(tag)
    if tag == OUTSIDE or (prefix in ("B", "I") and kind):
        return prefix, kind
    raise ValueError(f"tag {tag!r} is not O, B-TYPE or I-TYPE")


def to_bio(tags: Sequence[str]) -> List[str]:
    """IOB1 or BIO tags -> BIO (IOB2): every chunk, as conlleval reads it, begins with B-."""
    out, prev = [], (OUTSIDE, "")
    for tag in tags:
        prefix, kind = chunk_prefix(tag)
        if prefix == OUTSIDE:
            out.append(OUTSIDE)
        else:
            out.append(("B-" if start_of_chunk(prev[0], prefix, prev[1], kind) else "I-") + kind)
        prev = (prefix, kind)
    return out


def to_iob1(tags: Sequence[str]) -> List[str]:
    """IOB1 or BIO tags -> IOB1: chunks begin with I-, except one that directly follows a chunk
    of the same type, which begins with B-."""
    out, prev = [], (OUTSIDE, "")
    for tag in tags:
        prefix, kind = chunk_prefix(tag)
        if prefix == OUTSIDE:
            out.append(OUTSIDE)
        else:
            starts = start_of_chunk(prev[0], prefix, prev[1], kind)
            follows_same_type = prev[0] != OUTSIDE and prev[1] == kind
            out.append(("B-" if starts and follows_same_type else "I-") + kind)
        prev = (prefix, kind)
    return out


def convert_scheme(sentence: Sentence, scheme: str, path: str) -> List[str]:
    """The sentence's tags in ``scheme`` (keep, bio, iob1); errors name the file and line."""
    if scheme == "keep":
        return list(sentence.tags)
    for tag, line in zip(sentence.tags, sentence.lines):
        try:
            chunk_prefix(tag)
        except ValueError as err:
            raise ConllFormatError(
                f"{path}:{line}: {err}; --to-scheme {scheme} converts chunk tags (NER or chunking columns); "
                "use --to-scheme keep for other columns (POS, supertags)"
            ) from None
    return to_bio(sentence.tags) if scheme == "bio" else to_iob1(sentence.tags)


def check_aligned(source_path: str, target_path: str) -> int:
    """Checks that two text files are aligned token by token; returns their number of lines.

    Lines and tokens are read as fairseq-preprocess reads them (universal newlines, whitespace-
    separated tokens).  Raises AlignmentError naming both files for an empty file, different
    numbers of lines, an empty line, or the first (1-based) line whose token counts differ.
    """
    with open(source_path, encoding="utf-8") as fs, open(target_path, encoding="utf-8") as ft:
        source, target = fs.readlines(), ft.readlines()
    for path, lines, other in ((source_path, source, target_path), (target_path, target, source_path)):
        if not lines:
            raise AlignmentError(f"{path} is empty (aligned with {other})")
    if len(source) != len(target):
        raise AlignmentError(
            f"{source_path} has {len(source)} lines but {target_path} has {len(target)}: "
            "they must hold the same sentences, one per line"
        )
    for number, (s, t) in enumerate(zip(source, target), start=1):
        n_source, n_target = len(s.split()), len(t.split())
        if n_source == 0 or n_target == 0:
            empty = source_path if n_source == 0 else target_path
            raise AlignmentError(f"line {number} of {empty} is empty (aligned files {source_path}, {target_path})")
        if n_source != n_target:
            raise AlignmentError(
                f"line {number}: {source_path} has {n_source} tokens but {target_path} has {n_target}; "
                "every token needs exactly one tag"
            )
    return len(source)


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (symbolic and hard links included); a missing path names none."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(input_path: str, output_paths: Sequence[str]) -> None:
    """Raises OverwriteError, before anything is read or written, when an output would replace the input
    or the outputs are one file."""
    for out in output_paths:
        if same_file(out, input_path):
            raise OverwriteError(
                f"output {out} is the input file {input_path}; writing it would destroy the input: "
                "choose another output prefix"
            )
    if len(output_paths) == 2 and same_file(*output_paths):
        raise OverwriteError(
            f"both outputs are {output_paths[0]}: give --source-suffix and --target-suffix different values"
        )


def convert(input_path: str, output_prefix: str, tag_column: int, token_column: int = 0, to_scheme: str = "keep",
            source_suffix: str = "words", target_suffix: str = "tags") -> Tuple[int, int]:  # fmt: skip
    """Writes ``output_prefix.{source_suffix,target_suffix}``; returns (sentences, tokens)."""
    if to_scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {to_scheme!r}; choose one of {SCHEMES}")
    source_path, target_path = f"{output_prefix}.{source_suffix}", f"{output_prefix}.{target_suffix}"
    check_outputs(input_path, (source_path, target_path))
    sentences = read_conll(input_path, tag_column, token_column)
    tag_lines = [convert_scheme(s, to_scheme, input_path) for s in sentences]
    directory = os.path.dirname(output_prefix)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(source_path, "w", encoding="utf-8") as fs, open(target_path, "w", encoding="utf-8") as ft:
        for sentence, tags in zip(sentences, tag_lines):
            fs.write(" ".join(sentence.tokens) + "\n")
            ft.write(" ".join(tags) + "\n")
    check_aligned(source_path, target_path)
    return len(sentences), sum(len(s.tokens) for s in sentences)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m fairseq_ext.data.conll",
        description="Convert a CoNLL column file into aligned token and tag files (one sentence per line).",
    )
    parser.add_argument("input", help="CoNLL file: one token per line, columns separated by whitespace")
    parser.add_argument("output_prefix", help="writes OUTPUT_PREFIX.<source-suffix> and OUTPUT_PREFIX.<target-suffix>")
    parser.add_argument("--tag-column", type=int, default=3,
                        help="0-based column of the tags (CoNLL-2003: 1 POS, 2 chunk, 3 NER); default 3")  # fmt: skip
    parser.add_argument("--token-column", type=int, default=0, help="0-based column of the tokens; default 0")
    parser.add_argument("--to-scheme", choices=SCHEMES, default="keep",
                        help="rewrite chunk tags as BIO (IOB2) or IOB1, reading either; keep: copy them")  # fmt: skip
    parser.add_argument("--source-suffix", default="words", help="suffix of the token file (fairseq --source-lang)")
    parser.add_argument("--target-suffix", default="tags", help="suffix of the tag file (fairseq --target-lang)")
    args = parser.parse_args(argv)
    try:
        n_sentences, n_tokens = convert(args.input, args.output_prefix, args.tag_column, args.token_column,
                                        args.to_scheme, args.source_suffix, args.target_suffix)  # fmt: skip
    except (ConllFormatError, AlignmentError, OverwriteError, OSError) as err:
        print(f"conll: error: {err}", file=sys.stderr)
        return 1
    print(
        f"conll: {args.input}: {n_sentences} sentences, {n_tokens} tokens -> "
        f"{args.output_prefix}.{args.source_suffix}, {args.output_prefix}.{args.target_suffix} "
        f"(tag column {args.tag_column}, scheme {args.to_scheme})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
