#!/usr/bin/env bash
# Multi30k Task 1 (Flickr image captions), English -> German by default.
#
# Usage: prepare.sh DATA_DIR OUT_DIR [--src en --tgt de] [--vocab-size N] [--smoke] [--force]
#
# DATA_DIR holds the raw (cased, untokenised) release files, as in multi30k/dataset data/task1/raw
# after gunzip: train.{en,de}, val.{en,de}, test_2016_flickr.{en,de}.  The official tok/ copies
# (lowercased, Moses-tokenised) are not used: a joint sentencepiece model on the raw text means
# hypotheses decode back to raw text and are scored by sacreBLEU against the raw reference.
#
# OUT_DIR gets raw/ (the splits renamed train/valid/test), spm/ (model + encoded text), bin/
# (fairseq-preprocess output) and pair.env.  An existing non-empty OUT_DIR is never touched
# without --force.  --smoke (or SMOKE=1) only shrinks the vocabulary, for tiny test data.
set -euo pipefail
source "$(dirname "$0")/../common/lib.sh"

SRC=en
TGT=de
VOCAB_SIZE=8000          # joint en+de pieces; ~29k training sentences support about this many
SMOKE_VOCAB_SIZE=200

recipe_option() {  # this recipe's own options (the common ones: parse_prepare_args in common/lib.sh)
  case $1 in
    --src) SRC=$2 ;;
    --tgt) TGT=$2 ;;
    *) return 1 ;;
  esac
}
parse_prepare_args "$@"
[ ${#POS[@]} -eq 2 ] || usage
DATA_DIR=${POS[0]}
OUT_DIR=${POS[1]}
[ -d "$DATA_DIR" ] || die "data directory not found: $DATA_DIR"
INPUTS+=("$DATA_DIR")   # never replaced, also when it is OUT_DIR/raw (the release keeps its files in data/task1/raw)

phase "checking inputs in $DATA_DIR"
# release name -> our split name
declare -A SPLITS=([train]=train [val]=valid [test_2016_flickr]=test)
for name in train val test_2016_flickr; do
  require_parallel "$DATA_DIR/$name.$SRC" "$DATA_DIR/$name.$TGT"
done

phase "output directory $OUT_DIR"
guard_outdir "$OUT_DIR" "$FORCE" raw spm bin pair.env preprocess.log

phase "copying the raw splits to $OUT_DIR/raw"
mkdir -p "$OUT_DIR/raw"
for name in train val test_2016_flickr; do
  for lang in "$SRC" "$TGT"; do
    cp "$DATA_DIR/$name.$lang" "$OUT_DIR/raw/${SPLITS[$name]}.$lang"
  done
done

spm_and_binarize "$OUT_DIR" "$SRC" "$TGT" "$VOCAB_SIZE"
phase "done: $OUT_DIR/bin ($SRC->$TGT); next: recipes/multi30k/run.sh $OUT_DIR EXP_DIR"
