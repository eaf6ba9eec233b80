#!/usr/bin/env bash
# CCGbank (Hockenmaier and Steedman 2007; LDC2005T13, licensed: bring your own copy) -> aligned
# word / supertag files -> fairseq binaries, for CCG supertagging (Goyal's thesis, 4.5.2 and 5.4.1).
#
# Usage: prepare.sh CCGBANK_DIR OUT_DIR [--lowercase] [--train-sections 02-21] [--valid-sections 00] [--test-sections 23] [--smoke] [--force]
#
# CCGBANK_DIR is the release directory (ccgbank_1_1/), or its data/ or data/AUTO/ folder: what is
# read is AUTO/<section>/wsj_<section>NN.auto, the machine-readable derivations, one "ID=..." line
# followed by one derivation line per sentence, whose leaves
#     (<L CATEGORY MODIFIED_POS ORIGINAL_POS WORD PRED_ARG_CATEGORY>)
# give the words and their supertags (CATEGORY).  Standard splits: sections 02-21 train (39,604
# sentences), 00 dev (1,913), 23 test (2,407).  Sections are given as NN-MM ranges or comma lists.
# The words are kept as they are (--lowercase lowercases them); the label dictionary is built on
# train (the thesis's 1,284 supertags); dev/test supertags unseen in train become <unk> labels in
# the binaries (scoring reads the raw text, so they count as errors).
#
# OUT_DIR gets raw/{train,valid,test}.{words,tags} (one sentence per line, aligned token by token:
# checked), bin/ (fairseq-preprocess, separate word and tag dictionaries) and pair.env.  An existing
# non-empty OUT_DIR is never touched without --force.  --smoke changes nothing (accepted for symmetry).
set -euo pipefail
source "$(dirname "$0")/../common/lib.sh"

TRAIN_SECTIONS=02-21
VALID_SECTIONS=00
TEST_SECTIONS=23
LOWERCASE=0
SMOKE_VOCAB_SIZE=0   # no sentencepiece in this recipe

recipe_option() {
  case $1 in
    --train-sections) TRAIN_SECTIONS=$2 ;;
    --valid-sections) VALID_SECTIONS=$2 ;;
    --test-sections) TEST_SECTIONS=$2 ;;
    *) return 1 ;;
  esac
}
# --lowercase takes no value: handled before the shared parser
ARGS=()
for a in "$@"; do if [ "$a" = --lowercase ]; then LOWERCASE=1; else ARGS+=("$a"); fi; done
VOCAB_SIZE=
parse_prepare_args "${ARGS[@]}"
[ -z "$VOCAB_SIZE" ] || [ "$VOCAB_SIZE" = 0 ] || die "--vocab-size: this recipe keeps whole words (no sentencepiece); drop it"
[ ${#POS[@]} -eq 2 ] || usage
CCG_DIR=${POS[0]}
OUT_DIR=${POS[1]}

# 02-21 -> 02,03,...,21 ; 00 -> 00 ; 02,05 -> 02,05
expand_sections() {
  local part out=() a b i
  IFS=, read -r -a parts <<< "$1"
  for part in "${parts[@]}"; do
    if [[ $part =~ ^([0-9]{2})-([0-9]{2})$ ]]; then
      a=$((10#${BASH_REMATCH[1]})); b=$((10#${BASH_REMATCH[2]}))
      for ((i = a; i <= b; i++)); do out+=("$(printf %02d "$i")"); done
    elif [[ $part =~ ^[0-9]{2}$ ]]; then
      out+=("$part")
    else
      die "sections: expected NN, NN-MM or a comma list of them, got '$1'"
    fi
  done
  (IFS=,; echo "${out[*]}")
}

phase "looking for CCGbank's AUTO files in $CCG_DIR"
[ -d "$CCG_DIR" ] || die "CCGbank directory not found: $CCG_DIR (CCGbank is licensed by the LDC, LDC2005T13: give the path of your copy, the folder holding data/AUTO/00 ... data/AUTO/24)"
AUTO_DIR=
for cand in "$CCG_DIR/data/AUTO" "$CCG_DIR/AUTO" "$CCG_DIR"; do
  if [ -d "$cand/00" ] || [ -d "$cand/02" ] || [ -d "$cand/23" ]; then AUTO_DIR=$cand; break; fi
done
INPUTS+=("$CCG_DIR")
[ -n "$AUTO_DIR" ] || die "no CCGbank AUTO sections under $CCG_DIR: expected $CCG_DIR/data/AUTO/<NN>/wsj_<NN>*.auto (NN = 00 ... 24; the LDC2005T13 release layout), or the AUTO folder itself"
declare -A SECTIONS=()
SECTIONS[train]=$(expand_sections "$TRAIN_SECTIONS") || exit 1   # die() inside $(...) only leaves the subshell
SECTIONS[valid]=$(expand_sections "$VALID_SECTIONS") || exit 1
SECTIONS[test]=$(expand_sections "$TEST_SECTIONS") || exit 1
for split in train valid test; do
  IFS=, read -r -a secs <<< "${SECTIONS[$split]}"
  for sec in "${secs[@]}"; do
    compgen -G "$AUTO_DIR/$sec/*.auto" > /dev/null || die "missing CCGbank section $sec ($split): no *.auto files in $AUTO_DIR/$sec"
  done
  echo "  ok $split: sections ${SECTIONS[$split]}"
done

phase "output directory $OUT_DIR"
guard_outdir "$OUT_DIR" "$FORCE" raw bin pair.env preprocess.log

phase "converting AUTO derivations to word / supertag lines"
mkdir -p "$OUT_DIR/raw"
lower=(); [ "$LOWERCASE" = 1 ] && lower=(--lowercase)
for split in train valid test; do
  "$PY" "$HELPERS/tools.py" ccgbank --auto-dir "$AUTO_DIR" --sections "${SECTIONS[$split]}" "${lower[@]}" "$OUT_DIR/raw/$split" \
    || die "could not convert CCGbank sections ${SECTIONS[$split]} from $AUTO_DIR (see above)"
  "$PY" -c 'import sys; from fairseq_ext.data.conll import check_aligned; check_aligned(sys.argv[1], sys.argv[2])' \
    "$OUT_DIR/raw/$split.words" "$OUT_DIR/raw/$split.tags" || die "$split: words and supertags are not aligned (see above)"
done

binarize_tagging "$OUT_DIR"
echo "  supertags: $(grep -vc '^madeupword' "$OUT_DIR/bin/dict.tags.txt") (+ 4 special symbols); words: $(wc -l < "$OUT_DIR/bin/dict.words.txt")"
phase "done: $OUT_DIR/bin; next: recipes/ccgbank/run.sh $OUT_DIR EXP_DIR"
