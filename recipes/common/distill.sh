#!/usr/bin/env bash
# Sequence-level knowledge distillation (Kim & Rush 2016; the training data of FlowSeq's "Knowledge
# Distillation" rows, Ma et al. 2019 section 4.1): an autoregressive teacher decodes the TRAINING set
# with beam search, and its best hypotheses replace the training targets.
#
# Usage: distill.sh DATA_BIN TEACHER_CHECKPOINT OUT [--beam N] [--max-len N] [--force] [--reuse]
#                   [-- extra fairseq-generate flags]
#   DATA_BIN  a fairseq-preprocess output directory (dict.SRC.txt, dict.TGT.txt, train/valid/test)
#   OUT       becomes a fairseq data directory like DATA_BIN: the distilled training set
#             (train.SRC-TGT.*: source unchanged, target = the teacher's best hypothesis, both in the
#             binarised subword pieces), binarised with fairseq-preprocess --srcdict/--tgtdict =
#             DATA_BIN's dictionaries; valid, test and the dictionaries copied unchanged from DATA_BIN.
#             OUT/distill/ keeps the teacher's output (train.generate.{out,err,cmd}), the distilled
#             text train.{SRC,TGT} and DONE (the teacher checkpoint's path, size and time, the beam,
#             the length filter, the extra fairseq-generate flags).
#   --beam N     beam size (default DISTILL_BEAM or 5)
#   --max-len N  also drop distilled pairs with more than N pieces on either side (FlowSeq trains on
#                sentences of at most 80 pieces for WMT, 60 for IWSLT); 0 (default): no filter
#   --force      replace an existing OUT (only what this script writes there)
#   --reuse      an OUT finished from the same teacher checkpoint and settings is kept as it is
#                (what a recipe's rerun wants); without it any non-empty OUT is refused
# Env: DISTILL_MAX_TOKENS (8192) per batch, DEVICE=auto|cpu|gpu, FP16=1.
# Every training sentence must get a hypothesis (checked; no --skip-invalid-size-inputs-valid-test);
# an empty hypothesis keeps its reference (counted; recipes/common/nar_tools.py distill-corpus).
# When sourced it only defines distill_data and binarize_train_like.

# The language pair of a fairseq data directory, "SRC TGT", from its train.SRC-TGT.SRC.idx file.
bin_pair() {
  local f
  f=$(ls "$1"/train.*-*.*.idx 2>/dev/null | head -1)
  [ -n "$f" ] || die "no training data in $1 (train.SRC-TGT.SRC.idx): not a fairseq-preprocess directory"
  f=$(basename "$f"); f=${f#train.}; f=${f%%.*}
  echo "${f%-*} ${f#*-}"
}

# binarize_train_like DATA_BIN TRAINPREF OUT: TRAINPREF.{SRC,TGT} (text in DATA_BIN's pieces) as the
# training set of OUT, binarised with DATA_BIN's dictionaries; valid*/test* and the dictionaries are
# copied from DATA_BIN, so OUT differs from DATA_BIN in its training set only.
binarize_train_like() {
  local data=$1 trainpref=$2 out=$3 src tgt f
  read -r src tgt <<< "$(bin_pair "$data")"
  mkdir -p "$out"
  rm -rf "$out/.preprocess"
  fairseq-preprocess --source-lang "$src" --target-lang "$tgt" --trainpref "$trainpref" \
    --destdir "$out/.preprocess" --srcdict "$data/dict.$src.txt" --tgtdict "$data/dict.$tgt.txt" \
    --workers 1 > "$out/preprocess.log" 2>&1 \
    || { tail -20 "$out/preprocess.log" >&2; die "fairseq-preprocess failed (log: $out/preprocess.log)"; }
  for f in "$out/.preprocess"/train.*; do mv -f "$f" "$out/"; done
  rm -rf "$out/.preprocess"
  for f in "$data"/dict.*.txt "$data"/valid*.bin "$data"/valid*.idx "$data"/test*.bin "$data"/test*.idx; do
    [ -e "$f" ] && cp -f "$f" "$out/"
  done
  [ -s "$out/train.$src-$tgt.$tgt.bin" ] || die "fairseq-preprocess wrote no training data: $out/train.$src-$tgt.$tgt.bin"
  echo "  binarised $(wc -l < "$trainpref.$src") training pairs into $out (dictionaries, valid and test of $data)"
}

# Sentences in a binarised split (its .idx file), without loading the data.
bin_size() {
  "$PY" -c 'import sys; from fairseq.data import data_utils; print(len(data_utils.load_indexed_dataset(sys.argv[1], None)))' "$1" 2>/dev/null \
    || die "cannot read the binarised data $1"
}

# distill_data DATA_BIN TEACHER OUT FORCE REUSE BEAM MAX_LEN [extra fairseq-generate flags...]
distill_data() {
  local data=$1 teacher=$2 out=$3 force=$4 reuse=$5 beam=$6 max_len=$7; shift 7
  local src tgt stamp n
  [ -s "$teacher" ] || die "no teacher checkpoint: $teacher (train the autoregressive model first, e.g. run.sh stage 1)"
  read -r src tgt <<< "$(bin_pair "$data")"
  require_file "$data/dict.$src.txt"; require_file "$data/dict.$tgt.txt"
  stamp="teacher=$(cd "$(dirname "$teacher")" && pwd)/$(basename "$teacher") size=$(stat -c %s "$teacher") mtime=$(stat -c %Y "$teacher") beam=$beam max_len=$max_len data=$(cd "$data" && pwd) generate_flags=$*"
  if [ -d "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ] && [ "$force" != 1 ]; then
    if [ "$reuse" = 1 ] && [ -s "$out/distill/DONE" ] && [ "$(cat "$out/distill/DONE")" = "$stamp" ]; then
      echo "  reusing the distilled data in $out ($(cut -d' ' -f1 "$out/distill/DONE"))"
      return 0
    fi
    if [ -s "$out/distill/DONE" ]; then
      die "$out already holds distilled data ($(cat "$out/distill/DONE")); refusing to overwrite it (pass --force, in run.sh DISTILL_FORCE=1, or choose another directory)"
    fi
    die "$out already holds distilled data or other files; refusing to overwrite it (pass --force, in run.sh DISTILL_FORCE=1, or choose another directory)"
  fi
  if [ "$force" = 1 ] && [ -d "$out" ]; then
    echo "  --force: replacing the distilled data in $out"
    rm -rf "${out:?}/distill" "${out:?}/.preprocess" "$out"/train.* "$out"/valid* "$out"/test* "$out"/dict.*.txt "$out/preprocess.log"
  fi
  mkdir -p "$out/distill"
  n=$(bin_size "$data/train.$src-$tgt.$src")
  echo "  teacher $teacher decodes the $n training sentences of $data (beam $beam)"
  local dev_flags=()
  if [ -n "${DEVICE_FLAGS+x}" ]; then dev_flags=("${DEVICE_FLAGS[@]}"); else read -r -a dev_flags <<< "$(device_flags)"; fi
  local gen="$out/distill/train.generate"
  local cmd=(fairseq-generate "$data" --user-dir "$USER_DIR" --source-lang "$src" --target-lang "$tgt"
    --path "$teacher" --gen-subset train "${dev_flags[@]}" --beam "$beam" --nbest 1
    --max-tokens "${DISTILL_MAX_TOKENS:-8192}" --required-batch-size-multiple 1 --num-workers 0 "$@")
  printf '%q ' "${cmd[@]}" > "$gen.cmd"; echo >> "$gen.cmd"
  # no --post-process: S- and H- lines are in the binarised data's subword pieces
  "${cmd[@]}" > "$gen.out" 2> "$gen.err" \
    || { tail -20 "$gen.err" >&2; die "fairseq-generate on the training set failed: $gen.err"; }
  "$PY" "$HELPERS/nar_tools.py" distill-corpus "$gen.out" "$out/distill/train" "$src" "$tgt" --expected "$n"
  local trainpref=$out/distill/train
  if [ "${max_len:-0}" -gt 0 ]; then
    "$PY" "$HELPERS/tools.py" clean --max-len "$max_len" --ratio 1000000 \
      "$trainpref.$src" "$trainpref.$tgt" "$out/distill/train.max$max_len.$src" "$out/distill/train.max$max_len.$tgt"
    trainpref=$out/distill/train.max$max_len
  fi
  binarize_train_like "$data" "$trainpref" "$out"
  echo "$stamp" > "$out/distill/DONE"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  source "$(dirname "$0")/lib.sh"
  BEAM=${DISTILL_BEAM:-5}
  MAX_LEN=0
  REUSE=0
  POS=(); EXTRA=()
  while [ $# -gt 0 ]; do
    case $1 in
      --beam) BEAM=$2; shift 2 ;;
      --max-len) MAX_LEN=$2; shift 2 ;;
      --force) FORCE=1; shift ;;
      --reuse) REUSE=1; shift ;;
      -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
      -*) die "unknown option $1 (fairseq-generate flags go after --)" ;;
      *) POS+=("$1"); shift ;;
    esac
  done
  [ ${#POS[@]} -eq 3 ] || die "usage: $0 DATA_BIN TEACHER_CHECKPOINT OUT [--beam N] [--max-len N] [--force] [--reuse] [-- fairseq-generate flags]"
  [[ $BEAM =~ ^[1-9][0-9]*$ ]] || die "--beam takes a positive integer, got '$BEAM'"
  [[ $MAX_LEN =~ ^[0-9]+$ ]] || die "--max-len takes an integer >= 0, got '$MAX_LEN'"
  phase "distilling ${POS[0]} with ${POS[1]} into ${POS[2]}"
  distill_data "${POS[0]}" "${POS[1]}" "${POS[2]}" "$FORCE" "$REUSE" "$BEAM" "$MAX_LEN" "${EXTRA[@]}"
  phase "done: ${POS[2]}"
fi
