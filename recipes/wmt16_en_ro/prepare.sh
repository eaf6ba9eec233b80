#!/usr/bin/env bash
# WMT'16 English <-> Romanian as the non-autoregressive MT papers use it (Lee et al. 2018, whose data
# FlowSeq takes, Ma et al. 2019 section 4.1; fairseq's NAT examples): Europarl v8 + SETimes2 for
# training (~610k pairs), newsdev2016 for validation, newstest2016 for test (1999 sentences each).
#
# Usage: prepare.sh OUT_DIR [--src en --tgt ro] [--local DIR] [--keep-diacritics] [--vocab-size N]
#                   [--smoke] [--force]
#   without --local: downloads four archives (URLs below, ~100 MB; WMT16_BASE_URL and
#                WMT16_SETIMES_URL override the hosts) into OUT_DIR/download
#   --local DIR: no download; DIR holds plain text files train/valid/test.{en,ro}
#   --src ro --tgt en: the other direction (dev/test from the ro-en files of the release)
#   --keep-diacritics: only normalise the Romanian text (default: also remove its diacritics)
# Preprocessing (the choices, README "WMT'16 en-ro"): the Romanian side of every split is
# normalised as in Sennrich et al.'s WMT16 scripts that Lee et al. apply (s/t with cedilla ->
# comma below, typographic quotes and dashes, no-break spaces) and its diacritics removed (ă â î ș ț
# -> a a i s t); text stays cased and untokenised; training pairs over 250 words or with a length
# ratio above 1.5 are dropped; one joint sentencepiece model of 40k pieces (Lee et al.'s joint BPE
# has 40k merges) replaces Moses tokenisation + BPE.  Writes OUT_DIR/{raw,spm,bin,pair.env};
# raw/test.TGT (normalised, diacritics removed when TGT is ro) is the sacreBLEU reference.
# --smoke (or SMOKE=1): tiny vocabulary.
set -euo pipefail
source "$(dirname "$0")/../common/lib.sh"

SRC=en
TGT=ro
BASE_URL=${WMT16_BASE_URL:-http://data.statmt.org/wmt16/translation-task}
URL_EUROPARL=$BASE_URL/training-parallel-ep-v8.tgz
URL_SETIMES=${WMT16_SETIMES_URL:-https://object.pouta.csc.fi/OPUS-SETIMES/v2/moses/en-ro.txt.zip}
URL_DEV=$BASE_URL/dev-romanian-updated.tgz
URL_TEST=$BASE_URL/test.tgz
VOCAB_SIZE=40000
SMOKE_VOCAB_SIZE=200
SPM_SENTENCES=2000000    # sentencepiece trains on a seeded random sample of this many lines
MAX_WORDS=250            # training pairs longer than this (in words), or with a length ratio > 1.5, are dropped
REMOVE_DIACRITICS=1
LOCAL=

recipe_option() {  # this recipe's own options (the common ones: parse_prepare_args in common/lib.sh)
  case $1 in
    --local) LOCAL=$2 ;;
    --src) SRC=$2 ;;
    --tgt) TGT=$2 ;;
    *) return 1 ;;
  esac
}
ARGS=()
for a in "$@"; do
  if [ "$a" = --keep-diacritics ]; then REMOVE_DIACRITICS=0; else ARGS+=("$a"); fi
done
parse_prepare_args "${ARGS[@]}"
[ ${#POS[@]} -eq 1 ] || usage
OUT_DIR=${POS[0]}
case "$SRC-$TGT" in en-ro|ro-en) ;; *) die "--src/--tgt: en-ro or ro-en, got $SRC-$TGT" ;; esac

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

# download URL FILE: unless FILE is there already (a .part file is never mistaken for it)
download() {
  local url=$1 file=$2
  if [ -s "$file" ]; then echo "  reusing $file"; return; fi
  echo "  downloading $url"
  if command -v curl > /dev/null; then
    curl -fL --retry 3 -o "$file.part" "$url" || die "download failed: $url"
  elif command -v wget > /dev/null; then
    wget -q -O "$file.part" "$url" || die "download failed: $url"
  else
    die "neither curl nor wget is installed: cannot download $url"
  fi
  mv "$file.part" "$file"
  [ -s "$file" ] || die "empty download: $file (from $url)"
}

# member ARCHIVE_LISTING SUFFIX: the one member whose path ends in SUFFIX (the releases have moved
# their files between folders over the years; the file names are stable)
member() {
  local listing=$1 suffix=$2 archive=$3 found
  found=$(grep -E "(^|/)${suffix//./\\.}$" <<< "$listing" | head -1) || true
  [ -n "$found" ] || die "$archive does not contain a file named *$suffix (unexpected archive)"
  echo "$found"
}

if [ -z "$LOCAL" ]; then
  DL=$OUT_DIR/download
  mkdir -p "$DL" "$DL/x"
  phase "downloading into $DL"
  download "$URL_EUROPARL" "$DL/ep-v8.tgz"
  download "$URL_SETIMES" "$DL/setimes2.zip"
  download "$URL_DEV" "$DL/dev.tgz"
  download "$URL_TEST" "$DL/test.tgz"

  phase "checking and extracting the archives"
  declare -A FILES=()
  for name in ep-v8 dev test; do
    listing=$(tar -tzf "$DL/$name.tgz" 2>/dev/null) || die "not a readable .tgz (broken or partial download? delete it and retry): $DL/$name.tgz"
    case $name in
      ep-v8) wanted=("europarl-v8.ro-en.$SRC" "europarl-v8.ro-en.$TGT") ;;
      dev) if [ "$SRC" = en ]; then wanted=(newsdev2016-enro-src.en.sgm newsdev2016-enro-ref.ro.sgm)
           else wanted=(newsdev2016-roen-src.ro.sgm newsdev2016-roen-ref.en.sgm); fi ;;
      test) if [ "$SRC" = en ]; then wanted=(newstest2016-enro-src.en.sgm newstest2016-enro-ref.ro.sgm)
            else wanted=(newstest2016-roen-src.ro.sgm newstest2016-roen-ref.en.sgm); fi ;;
    esac
    for w in "${wanted[@]}"; do
      m=$(member "$listing" "$w" "$DL/$name.tgz")
      tar -xzf "$DL/$name.tgz" -C "$DL/x" "$m"
      FILES[$w]=$DL/x/$m
    done
  done
  # SETimes2 comes as a zip (OPUS moses format: SETIMES.en-ro.{en,ro}, SETIMES2.en-ro.* in older copies)
  for lang in $SRC $TGT; do
    "$PY" - "$DL/setimes2.zip" "$lang" "$DL/x/setimes2.$lang" <<'EOF' || die "$DL/setimes2.zip: not a readable zip holding SETIMES*.en-ro.$lang (broken download? delete it and retry)"
import re, shutil, sys, zipfile
archive, lang, out = sys.argv[1:]
with zipfile.ZipFile(archive) as z:
    names = [n for n in z.namelist() if re.search(r"(^|/)SETIMES2?\.en-ro\." + lang + "$", n)]
    if not names:
        sys.exit(1)
    with z.open(names[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
  done
  require_parallel "${FILES[europarl-v8.ro-en.$SRC]}" "${FILES[europarl-v8.ro-en.$TGT]}"
  require_parallel "$DL/x/setimes2.$SRC" "$DL/x/setimes2.$TGT"

  phase "building train/valid/test"
  for lang in $SRC $TGT; do
    cat "${FILES[europarl-v8.ro-en.$lang]}" "$DL/x/setimes2.$lang" > "$TMP/train.$lang"
  done
  for w in "${!FILES[@]}"; do
    case $w in
      newsdev2016-*-src.$SRC.sgm) "$PY" "$HELPERS/tools.py" strip-xml --segs "${FILES[$w]}" "$TMP/valid.$SRC" ;;
      newsdev2016-*-ref.$TGT.sgm) "$PY" "$HELPERS/tools.py" strip-xml --segs "${FILES[$w]}" "$TMP/valid.$TGT" ;;
      newstest2016-*-src.$SRC.sgm) "$PY" "$HELPERS/tools.py" strip-xml --segs "${FILES[$w]}" "$TMP/test.$SRC" ;;
      newstest2016-*-ref.$TGT.sgm) "$PY" "$HELPERS/tools.py" strip-xml --segs "${FILES[$w]}" "$TMP/test.$TGT" ;;
    esac
  done
  for split in train valid test; do require_parallel "$TMP/$split.$SRC" "$TMP/$split.$TGT"; done
  IN=$TMP
else
  IN=$LOCAL
fi

phase "normalising the Romanian text$( [ "$REMOVE_DIACRITICS" = 1 ] && echo ", removing its diacritics")"
mkdir -p "$TMP/norm"
DIA=(); [ "$REMOVE_DIACRITICS" = 1 ] && DIA=(--remove-diacritics)
for split in train valid test; do
  "$PY" "$HELPERS/nar_tools.py" ro-normalise "${DIA[@]}" "$IN/$split.ro" "$TMP/norm/$split.ro"
  cp "$IN/$split.en" "$TMP/norm/$split.en"
done

phase "length-filtering the training pairs"
"$PY" "$HELPERS/tools.py" clean --max-len $MAX_WORDS --ratio 1.5 \
  "$TMP/norm/train.$SRC" "$TMP/norm/train.$TGT" "$OUT_DIR/raw/train.$SRC" "$OUT_DIR/raw/train.$TGT"
for lang in $SRC $TGT; do
  cp "$TMP/norm/valid.$lang" "$OUT_DIR/raw/valid.$lang"
  cp "$TMP/norm/test.$lang" "$OUT_DIR/raw/test.$lang"
done
for split in train valid test; do require_parallel "$OUT_DIR/raw/$split.$SRC" "$OUT_DIR/raw/$split.$TGT"; done
rm -rf "$TMP"

spm_and_binarize "$OUT_DIR" "$SRC" "$TGT" "$VOCAB_SIZE" --input-sentence-size "$SPM_SENTENCES"
phase "done: $OUT_DIR/bin ($SRC->$TGT); next: recipes/wmt16_en_ro/run.sh $OUT_DIR EXP_DIR"
