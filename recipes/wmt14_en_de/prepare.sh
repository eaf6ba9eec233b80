#!/usr/bin/env bash
# WMT'14 English -> German (or German -> English: --src de --tgt en): Europarl v7 + Common Crawl +
# News Commentary v9 for training, newstest2013 for validation, newstest2014 (full, 3003 sentences)
# for test.
#
# Usage: prepare.sh OUT_DIR [--src en --tgt de] [--local DIR] [--vocab-size N] [--smoke] [--force]
#   --src de --tgt en: the other direction (the de-en test of the Mask-Predict / Metropolis-Hastings
#                experiments; test from newstest2014-deen-src.de.sgm and -ref.en.sgm of the release)
#   without --local: downloads the WMT'14 archives (URLs below, ~1.5 GB) into OUT_DIR/download
#   --local DIR: no download; DIR holds plain text files train/valid/test.{en,de}, used as they are
#                (training pairs are still length-filtered)
# Writes OUT_DIR/{raw,spm,bin,pair.env}.  A joint 32k sentencepiece model on the cased, untokenised
# text; hypotheses decode to plain text and are scored with sacreBLEU against the raw reference.
# --smoke (or SMOKE=1): tiny vocabulary.
set -euo pipefail
source "$(dirname "$0")/../common/lib.sh"

SRC=en
TGT=de
BASE_URL=${WMT14_BASE_URL:-https://www.statmt.org}
URL_EUROPARL=$BASE_URL/wmt13/training-parallel-europarl-v7.tgz
URL_COMMONCRAWL=$BASE_URL/wmt13/training-parallel-commoncrawl.tgz
URL_NEWSCOMM=$BASE_URL/wmt14/training-parallel-nc-v9.tgz
URL_DEV=$BASE_URL/wmt14/dev.tgz
URL_TEST=$BASE_URL/wmt14/test-full.tgz
VOCAB_SIZE=32000
SMOKE_VOCAB_SIZE=200
SPM_SENTENCES=2000000    # sentencepiece trains on a seeded random sample of this many lines
MAX_WORDS=250            # training pairs longer than this (in words), or with a length ratio > 1.5, are dropped
LOCAL=

recipe_option() {  # this recipe's own options (the common ones: parse_prepare_args in common/lib.sh)
  case $1 in
    --local) LOCAL=$2 ;;
    --src) SRC=$2 ;;
    --tgt) TGT=$2 ;;
    *) return 1 ;;
  esac
}
parse_prepare_args "$@"
[ ${#POS[@]} -eq 1 ] || usage
OUT_DIR=${POS[0]}
case "$SRC-$TGT" in en-de|de-en) ;; *) die "--src/--tgt: en-de or de-en, got $SRC-$TGT" ;; esac

if [ -n "$LOCAL" ]; then
  [ -d "$LOCAL" ] || die "--local directory not found: $LOCAL"
  INPUTS+=("$LOCAL")
  phase "checking inputs in $LOCAL"
  for split in train valid test; do require_parallel "$LOCAL/$split.$SRC" "$LOCAL/$split.$TGT"; done
fi

phase "output directory $OUT_DIR"
# download/ is kept on --force: it holds nothing derived, and re-downloading is slow.
guard_outdir "$OUT_DIR" "$FORCE" raw spm bin tmp pair.env preprocess.log
mkdir -p "$OUT_DIR/raw" "$OUT_DIR/tmp"
TMP=$OUT_DIR/tmp

if [ -z "$LOCAL" ]; then
  DL=$OUT_DIR/download
  mkdir -p "$DL"
  phase "downloading into $DL"
  fetch_tarball "$URL_EUROPARL" "$DL/europarl.tgz" training/europarl-v7.de-en.de training/europarl-v7.de-en.en
  fetch_tarball "$URL_COMMONCRAWL" "$DL/commoncrawl.tgz" commoncrawl.de-en.de commoncrawl.de-en.en
  fetch_tarball "$URL_NEWSCOMM" "$DL/nc-v9.tgz" training/news-commentary-v9.de-en.de training/news-commentary-v9.de-en.en
  fetch_tarball "$URL_DEV" "$DL/dev.tgz" dev/newstest2013.de dev/newstest2013.en
  fetch_tarball "$URL_TEST" "$DL/test-full.tgz" "test-full/newstest2014-deen-src.$SRC.sgm" "test-full/newstest2014-deen-ref.$TGT.sgm"

  phase "extracting"
  mkdir -p "$DL/x"
  tar -xzf "$DL/europarl.tgz" -C "$DL/x" training/europarl-v7.de-en.de training/europarl-v7.de-en.en
  tar -xzf "$DL/commoncrawl.tgz" -C "$DL/x" commoncrawl.de-en.de commoncrawl.de-en.en
  tar -xzf "$DL/nc-v9.tgz" -C "$DL/x" training/news-commentary-v9.de-en.de training/news-commentary-v9.de-en.en
  tar -xzf "$DL/dev.tgz" -C "$DL/x" dev/newstest2013.de dev/newstest2013.en
  tar -xzf "$DL/test-full.tgz" -C "$DL/x" "test-full/newstest2014-deen-src.$SRC.sgm" "test-full/newstest2014-deen-ref.$TGT.sgm"
  CORPORA=("$DL/x/training/europarl-v7.de-en" "$DL/x/commoncrawl.de-en" "$DL/x/training/news-commentary-v9.de-en")
  for c in "${CORPORA[@]}"; do require_parallel "$c.$SRC" "$c.$TGT"; done
  require_parallel "$DL/x/dev/newstest2013.$SRC" "$DL/x/dev/newstest2013.$TGT"

  phase "building train/valid/test"
  for lang in $SRC $TGT; do
    cat "${CORPORA[@]/%/.$lang}" > "$TMP/train.$lang"
    cp "$DL/x/dev/newstest2013.$lang" "$TMP/valid.$lang"
  done
  # the test set: the source side's src file, the target side's ref file (the "full" set: both
  # directions' sentences; en->de reads src.en + ref.de, de->en src.de + ref.en)
  "$PY" "$HELPERS/tools.py" strip-xml --segs "$DL/x/test-full/newstest2014-deen-src.$SRC.sgm" "$TMP/test.$SRC"
  "$PY" "$HELPERS/tools.py" strip-xml --segs "$DL/x/test-full/newstest2014-deen-ref.$TGT.sgm" "$TMP/test.$TGT"
  for split in train valid test; do require_parallel "$TMP/$split.$SRC" "$TMP/$split.$TGT"; done
  IN=$TMP
else
  IN=$LOCAL
fi

phase "length-filtering the training pairs"
"$PY" "$HELPERS/tools.py" clean --max-len $MAX_WORDS --ratio 1.5 \
  "$IN/train.$SRC" "$IN/train.$TGT" "$OUT_DIR/raw/train.$SRC" "$OUT_DIR/raw/train.$TGT"
for lang in $SRC $TGT; do
  cp "$IN/valid.$lang" "$OUT_DIR/raw/valid.$lang"
  cp "$IN/test.$lang" "$OUT_DIR/raw/test.$lang"
done
for split in train valid test; do require_parallel "$OUT_DIR/raw/$split.$SRC" "$OUT_DIR/raw/$split.$TGT"; done
rm -rf "$TMP"

spm_and_binarize "$OUT_DIR" "$SRC" "$TGT" "$VOCAB_SIZE" --input-sentence-size "$SPM_SENTENCES"
phase "done: $OUT_DIR/bin ($SRC->$TGT); next: recipes/wmt14_en_de/run.sh $OUT_DIR EXP_DIR"
