#!/usr/bin/env bash
# IWSLT'14 German -> English (TED talks), the usual split: valid = every 23rd training pair,
# test = dev2010 + dev2012 + tst2010 + tst2011 + tst2012 (6750 sentences).
#
# Usage: prepare.sh OUT_DIR [--local DIR] [--vocab-size N] [--smoke] [--force]
#   without --local: downloads the IWSLT'14 de-en release (de-en.tgz; URL below) into OUT_DIR/download
#   --local DIR: no download; DIR is either the extracted release (train.tags.de-en.de, the
#                IWSLT14.*.xml files) or plain text files train/valid/test.{de,en}, used as they are
# Writes OUT_DIR/{raw,spm,bin,pair.env}.  Text is kept cased and untokenised (a joint sentencepiece
# model replaces the Moses + lowercase + BPE of older setups), so hypotheses decode to plain text
# and are scored with sacreBLEU against the raw references.  --smoke (or SMOKE=1): tiny vocabulary.
set -euo pipefail
source "$(dirname "$0")/../common/lib.sh"

SRC=de
TGT=en
# The original WIT3 archive (wit3.fbk.eu/archive/2014-01/texts/de/en/de-en.tgz) is offline; this is
# the byte-identical copy most toolkits point at.  Override with IWSLT14_URL.
URL=${IWSLT14_URL:-https://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz}
VOCAB_SIZE=10000
SMOKE_VOCAB_SIZE=200
MAX_WORDS=175            # training pairs longer than this (in words), or with a length ratio > 1.5, are dropped
VALID_EVERY=23           # every 23rd training pair becomes validation data
TEST_SETS="IWSLT14.TED.dev2010 IWSLT14.TED.tst2010 IWSLT14.TED.tst2011 IWSLT14.TED.tst2012 IWSLT14.TEDX.dev2012"
LOCAL=

recipe_option() {  # this recipe's own options (the common ones: parse_prepare_args in common/lib.sh)
  case $1 in
    --local) LOCAL=$2 ;;
    *) return 1 ;;
  esac
}
parse_prepare_args "$@"
[ ${#POS[@]} -eq 1 ] || usage
OUT_DIR=${POS[0]}

# The release: train.tags.de-en.{de,en} (one sentence a line between XML metadata lines, of which
# the talks' <title> and <description> are translated text too and kept) and
# one XML file per dev/test set with the sentences in <seg> elements.
release_to_raw() {
  local rel=$1 out=$2 lang set
  phase "extracting plain text from the release in $rel"
  for lang in $SRC $TGT; do
    require_file "$rel/train.tags.de-en.$lang"
    "$PY" "$HELPERS/tools.py" strip-xml --keep-tags title,description "$rel/train.tags.de-en.$lang" "$out/tmp/train.tags.$lang"
    : > "$out/raw/test.$lang"
    for set in $TEST_SETS; do
      require_file "$rel/$set.de-en.$lang.xml"
      "$PY" "$HELPERS/tools.py" strip-xml --segs "$rel/$set.de-en.$lang.xml" "$out/tmp/$set.$lang"
      cat "$out/tmp/$set.$lang" >> "$out/raw/test.$lang"
    done
  done
  for set in $TEST_SETS; do require_parallel "$out/tmp/$set.$SRC" "$out/tmp/$set.$TGT"; done
  require_parallel "$out/tmp/train.tags.$SRC" "$out/tmp/train.tags.$TGT"
  "$PY" "$HELPERS/tools.py" clean --max-len $MAX_WORDS --ratio 1.5 \
    "$out/tmp/train.tags.$SRC" "$out/tmp/train.tags.$TGT" "$out/tmp/train.clean.$SRC" "$out/tmp/train.clean.$TGT"
  for lang in $SRC $TGT; do
    awk -v k=$VALID_EVERY 'NR % k == 0' "$out/tmp/train.clean.$lang" > "$out/raw/valid.$lang"
    awk -v k=$VALID_EVERY 'NR % k != 0' "$out/tmp/train.clean.$lang" > "$out/raw/train.$lang"
  done
  for split in train valid test; do require_parallel "$out/raw/$split.$SRC" "$out/raw/$split.$TGT"; done
  rm -rf "$out/tmp"
}

if [ -n "$LOCAL" ]; then
  [ -d "$LOCAL" ] || die "--local directory not found: $LOCAL"
  phase "checking inputs in $LOCAL"
  INPUTS+=("$LOCAL")
  if [ -e "$LOCAL/train.tags.de-en.$SRC" ]; then
    # UTF-8, no stray carriage return: checked before anything is written
    for lang in $SRC $TGT; do
      require_text "$LOCAL/train.tags.de-en.$lang"
      for set in $TEST_SETS; do require_text "$LOCAL/$set.de-en.$lang.xml"; done
    done
    LAYOUT=release
  else
    for split in train valid test; do require_parallel "$LOCAL/$split.$SRC" "$LOCAL/$split.$TGT"; done
    LAYOUT=plain
  fi
fi

phase "output directory $OUT_DIR"
# download/ is kept on --force: it holds nothing derived, and re-downloading is slow.
guard_outdir "$OUT_DIR" "$FORCE" raw spm bin tmp pair.env preprocess.log
mkdir -p "$OUT_DIR/raw" "$OUT_DIR/tmp"

if [ -z "$LOCAL" ]; then
  phase "downloading $URL"
  mkdir -p "$OUT_DIR/download"
  fetch_tarball "$URL" "$OUT_DIR/download/de-en.tgz" de-en/train.tags.de-en.de de-en/train.tags.de-en.en \
    de-en/IWSLT14.TED.tst2012.de-en.de.xml de-en/IWSLT14.TED.tst2012.de-en.en.xml
  tar -xzf "$OUT_DIR/download/de-en.tgz" -C "$OUT_DIR/download"
  release_to_raw "$OUT_DIR/download/de-en" "$OUT_DIR"
elif [ "$LAYOUT" = release ]; then
  release_to_raw "$LOCAL" "$OUT_DIR"
else
  phase "copying the plain splits from $LOCAL"
  copy_plain_splits "$LOCAL" "$OUT_DIR" "$SRC" "$TGT"
  rm -rf "$OUT_DIR/tmp"
fi

spm_and_binarize "$OUT_DIR" "$SRC" "$TGT" "$VOCAB_SIZE"
phase "done: $OUT_DIR/bin ($SRC->$TGT); next: recipes/iwslt14_de_en/run.sh $OUT_DIR EXP_DIR"
