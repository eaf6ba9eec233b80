#!/usr/bin/env bash
# CoNLL-2003 English NER (or its POS column): CoNLL column files -> aligned word / tag files -> fairseq binaries.
#
# Usage: prepare.sh DATA_DIR OUT_DIR [--tag-column 3] [--to-scheme keep|bio|iob1] [--smoke] [--force]
#
# DATA_DIR holds train.txt, valid.txt (eng.testa) and test.txt (eng.testb): one token per line,
# columns TOKEN POS CHUNK NER, blank lines between sentences, -DOCSTART- lines between documents.
# --tag-column picks the label column (3: NER, the default; 1: POS).  --to-scheme rewrites chunk
# tags as BIO (IOB2) or IOB1 (default: keep them as they come; the scorer reads either).  No
# preprocessing of the words (the papers: "We perform no preprocessing on the data").
#
# OUT_DIR gets raw/{train,valid,test}.{words,tags} (one sentence per line, aligned token by token:
# checked), bin/ (fairseq-preprocess: separate word and tag dictionaries built on train) and
# pair.env.  An existing non-empty OUT_DIR is never touched without --force.  --smoke changes nothing
# here (the data is small); it is accepted for symmetry with the other recipes.
set -euo pipefail
source "$(dirname "$0")/../common/lib.sh"

TAG_COLUMN=3
TO_SCHEME=keep
SMOKE_VOCAB_SIZE=0   # no sentencepiece in this recipe

recipe_option() {
  case $1 in
    --tag-column) TAG_COLUMN=$2 ;;
    --to-scheme) TO_SCHEME=$2 ;;
    *) return 1 ;;
  esac
}
VOCAB_SIZE=
parse_prepare_args "$@"
[ -z "$VOCAB_SIZE" ] || [ "$VOCAB_SIZE" = 0 ] || die "--vocab-size: this recipe keeps whole words (no sentencepiece); drop it"
[ ${#POS[@]} -eq 2 ] || usage
DATA_DIR=${POS[0]}
OUT_DIR=${POS[1]}
[ -d "$DATA_DIR" ] || die "data directory not found: $DATA_DIR"
INPUTS+=("$DATA_DIR")
[[ $TAG_COLUMN =~ ^[0-9]+$ ]] || die "--tag-column takes a 0-based column number, got '$TAG_COLUMN'"

phase "checking inputs in $DATA_DIR"
# UTF-8, no stray carriage return: checked before anything is written
require_text "$DATA_DIR/train.txt" "$DATA_DIR/valid.txt" "$DATA_DIR/test.txt"

phase "output directory $OUT_DIR"
guard_outdir "$OUT_DIR" "$FORCE" raw bin pair.env preprocess.log

phase "converting CoNLL columns (tags: column $TAG_COLUMN, scheme: $TO_SCHEME)"
mkdir -p "$OUT_DIR/raw"
for split in train valid test; do
  "$PY" -m fairseq_ext.data.conll "$DATA_DIR/$split.txt" "$OUT_DIR/raw/$split" \
    --tag-column "$TAG_COLUMN" --to-scheme "$TO_SCHEME" || die "could not convert $DATA_DIR/$split.txt (see above)"
  "$PY" -c 'import sys; from fairseq_ext.data.conll import check_aligned; check_aligned(sys.argv[1], sys.argv[2])' \
    "$OUT_DIR/raw/$split.words" "$OUT_DIR/raw/$split.tags" || die "$split: words and tags are not aligned (see above)"
  echo "  ok $split: $(wc -l < "$OUT_DIR/raw/$split.words") sentences, $(wc -w < "$OUT_DIR/raw/$split.words") tokens"
done

binarize_tagging "$OUT_DIR"
echo "  labels: $(wc -l < "$OUT_DIR/bin/dict.tags.txt") (+ 4 special symbols); words: $(wc -l < "$OUT_DIR/bin/dict.words.txt")"
phase "done: $OUT_DIR/bin; next: recipes/conll2003/run.sh $OUT_DIR EXP_DIR"
