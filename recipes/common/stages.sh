# The four stages every recipe's run.sh shares (sourced after lib.sh).
#
# run.sh parses its arguments with parse_run_args, defines its flag groups, then calls run_stages.
# Flag groups a run.sh defines (bash arrays): MODEL, REG, OPTIM, BATCH, LENGTH (when to stop),
# GEN (extra decoding flags), METHODS (the methods of stage 2, default: parallel_ss) and, for each
# method M, FLAGS_M: its criterion flags (FLAGS_parallel_ss defaults to --criterion parallel_ss SS);
# methods named dss_* also get DSS_MIX, the gold-mixing schedule of differentiable_ss.
# Stages:
#   1  baseline: teacher-forced training (label_smoothed_cross_entropy)   -> EXP_DIR/baseline
#   2  methods:  each of METHODS (parallel_ss, dss_greedy, ...)            -> EXP_DIR/<method>
#   3  generate: beam 5 and greedy on the test set, one hypothesis per test sentence checked
#   4  score:    sacreBLEU of the decoded hypotheses against the raw reference -> EXP_DIR/results.txt
# --methods a,b (run.sh option) restricts stages 2-4 to those methods (and the baseline).

STAGE=1
STOP_STAGE=4
SMOKE=${SMOKE:-0}
SEED=${SEED:-1}
METHODS=(parallel_ss)
DSS_MIX=()
ONLY_METHODS=
DECODES=(beam5 greedy)

parse_run_args() {
  local pos=()
  while [ $# -gt 0 ]; do
    case $1 in
      --stage) STAGE=$2; shift 2 ;;
      --stop-stage) STOP_STAGE=$2; shift 2 ;;
      --smoke) SMOKE=1; shift ;;
      --methods) ONLY_METHODS=$2; shift 2 ;;
      -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
      -*) die "unknown option $1" ;;
      *) pos+=("$1"); shift ;;
    esac
  done
  [ ${#pos[@]} -eq 2 ] || die "usage: $0 DATA_DIR EXP_DIR [--stage N] [--stop-stage M] [--methods a,b] [--smoke]"
  [[ $STAGE =~ ^[1-4]$ && $STOP_STAGE =~ ^[1-4]$ ]] || die "--stage and --stop-stage take 1..4"
  [ "$STAGE" -le "$STOP_STAGE" ] || die "--stage $STAGE is after --stop-stage $STOP_STAGE"
  DATA_DIR=${pos[0]}
  EXP_DIR=${pos[1]}
  [ -s "$DATA_DIR/pair.env" ] || die "$DATA_DIR/pair.env not found: run this recipe's prepare.sh into $DATA_DIR first"
  # shellcheck disable=SC1091
  source "$DATA_DIR/pair.env"   # SRC, TGT
  mkdir -p "$EXP_DIR"
  DATA_DIR=$(cd "$DATA_DIR" && pwd)
  EXP_DIR=$(cd "$EXP_DIR" && pwd)
  local flags
  flags=$(device_flags) || exit 1   # die() inside $(...) only leaves the subshell
  read -r -a DEVICE_FLAGS <<< "$flags"
  # Everything this script prints also lands in the experiment directory.
  exec > >(tee -a "$EXP_DIR/run.log") 2>&1
  echo "=== $(date '+%F %T') $0 $DATA_DIR $EXP_DIR --stage $STAGE --stop-stage $STOP_STAGE (smoke=$SMOKE, device flags: ${DEVICE_FLAGS[*]:-none}) ==="
}

stage_on() { [ "$STAGE" -le "$1" ] && [ "$1" -le "$STOP_STAGE" ]; }

# Runs a command with its output shown and kept in LOG, and its exact text in LOG's .cmd file.
run_logged() {
  local log=$1; shift
  printf '%q ' "$@" > "${log%.log}.cmd"; echo >> "${log%.log}.cmd"
  "$@" 2>&1 | tee "$log"
}

train_model() {
  local name=$1; shift
  local dir=$EXP_DIR/$name
  mkdir -p "$dir"
  # fairseq-train resumes from $dir/checkpoint_last.pt when it exists: rerunning a stage continues it.
  # --required-batch-size-multiple 1: with fairseq's default of 8 the validation set loses sentences
  # (a 7-sentence set becomes empty), as generation does (issue 5036).
  run_logged "$dir/train.log" fairseq-train "$DATA_DIR/bin" --user-dir "$USER_DIR" \
    --source-lang "$SRC" --target-lang "$TGT" --save-dir "$dir" --seed "$SEED" \
    "${DEVICE_FLAGS[@]}" "${MODEL[@]}" "${REG[@]}" "${OPTIM[@]}" "${BATCH[@]}" "${LENGTH[@]}" \
    --required-batch-size-multiple 1 --no-epoch-checkpoints --log-format simple --no-progress-bar "$@"
  [ -s "$dir/checkpoint_last.pt" ] || die "training wrote no checkpoint: $dir/checkpoint_last.pt"
}

generate_all() {
  local n model decode beam dir
  n=$(wc -l < "$DATA_DIR/raw/test.$SRC")
  for model in "${MODELS[@]}"; do
    dir=$EXP_DIR/$model
    # The LAST checkpoint, not the best: validation is teacher-forced, so "best" would favour the
    # teacher-forced warm-up over the scheduled-sampling phase and compare unlike things.
    [ -s "$dir/checkpoint_last.pt" ] || die "no checkpoint to decode: $dir/checkpoint_last.pt (run stage 1/2 first)"
    for decode in "${DECODES[@]}"; do
      beam=5; [ "$decode" = greedy ] && beam=1
      echo "--- $model, $decode (beam $beam) ---"
      # --required-batch-size-multiple 1: otherwise fairseq may drop the last batch's tail (issue 5036).
      # --post-process sentencepiece: D- lines are decoded text, ready for sacreBLEU.
      local cmd=(fairseq-generate "$DATA_DIR/bin" --user-dir "$USER_DIR" --source-lang "$SRC" --target-lang "$TGT"
        --path "$dir/checkpoint_last.pt" --gen-subset test "${DEVICE_FLAGS[@]}"
        --beam "$beam" --batch-size "${GEN_BATCH_SIZE:-128}" --required-batch-size-multiple 1
        --post-process sentencepiece --num-workers 0 "${GEN[@]}")
      printf '%q ' "${cmd[@]}" > "$dir/test.$decode.cmd"; echo >> "$dir/test.$decode.cmd"
      "${cmd[@]}" > "$dir/test.$decode.out" 2> "$dir/test.$decode.err" \
        || { tail -20 "$dir/test.$decode.err" >&2; die "fairseq-generate failed: $dir/test.$decode.err"; }
      grep -E '^\| Generate|Translated' "$dir/test.$decode.out" "$dir/test.$decode.err" | sed 's/^[^:]*://' | tail -1 || true
      "$PY" "$HELPERS/tools.py" hyps --expected "$n" "$dir/test.$decode.out" "$dir/test.$decode.hyp"
    done
  done
}

score_all() {
  local model decode ref=$DATA_DIR/raw/test.$TGT
  require_file "$ref"
  : > "$EXP_DIR/results.txt.tmp"
  for model in "${MODELS[@]}"; do
    for decode in "${DECODES[@]}"; do
      require_file "$EXP_DIR/$model/test.$decode.hyp"
      "$PY" "$HELPERS/tools.py" bleu --name "$model/$decode" "$EXP_DIR/$model/test.$decode.hyp" "$ref" \
        | tee -a "$EXP_DIR/results.txt.tmp"
    done
  done
  mv "$EXP_DIR/results.txt.tmp" "$EXP_DIR/results.txt"
  echo "(sacreBLEU, default 13a tokenisation, cased, on the decoded output vs the raw reference $ref)"
}

# --smoke: the same tiny model for one epoch in every recipe, to check a pipeline in seconds
use_smoke_settings() {
  MODEL=(--arch transformer --share-all-embeddings --encoder-layers 1 --decoder-layers 1
         --encoder-embed-dim 32 --decoder-embed-dim 32 --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64
         --encoder-attention-heads 2 --decoder-attention-heads 2)
  OPTIM=(--optimizer adam --lr 5e-3 --lr-scheduler inverse_sqrt --warmup-updates 5)
  BATCH=(--max-tokens 2000 --num-workers 0)
  LENGTH=(--max-epoch 1)
  SS=(--ss-prob 0.5 --ss-num-passes 2)
  FLAGS_parallel_ss=(--criterion parallel_ss "${SS[@]}")
  DSS_MIX=(--ss-schedule constant --ss-prob 0.5)   # the dss_* methods mix from the first update
  GEN=(--max-len-a 1.2 --max-len-b 10)
}

# METHODS, narrowed to --methods; every name must have its FLAGS_<name> array.
select_methods() {
  if [ -z "${FLAGS_parallel_ss+x}" ]; then FLAGS_parallel_ss=(--criterion parallel_ss "${SS[@]}"); fi
  if [ -n "$ONLY_METHODS" ]; then
    local wanted m known
    IFS=, read -r -a wanted <<< "$ONLY_METHODS"
    for m in "${wanted[@]}"; do
      known=0; for k in "${METHODS[@]}"; do [ "$k" = "$m" ] && known=1; done
      [ "$known" = 1 ] || die "--methods: unknown method '$m'; this recipe has: ${METHODS[*]}"
    done
    METHODS=("${wanted[@]}")
  fi
  local name
  for name in "${METHODS[@]}"; do
    declare -p "FLAGS_$name" > /dev/null 2>&1 || die "recipe error: method $name has no FLAGS_$name array"
  done
  MODELS=(baseline "${METHODS[@]}")
}

run_stages() {
  if [ "$SMOKE" = 1 ]; then
    use_smoke_settings
  fi
  select_methods
  if stage_on 1; then
    phase "stage 1: baseline, teacher forcing"
    train_model baseline --criterion label_smoothed_cross_entropy
  fi
  if stage_on 2; then
    local method
    for method in "${METHODS[@]}"; do
      local -n method_flags="FLAGS_$method"
      local extra=()
      case $method in dss_*) extra=("${DSS_MIX[@]}") ;; esac
      phase "stage 2: $method (${method_flags[*]} ${extra[*]})"
      train_model "$method" "${method_flags[@]}" "${extra[@]}"
      unset -n method_flags
    done
  fi
  if stage_on 3; then
    phase "stage 3: generate (beam 5 and greedy) on test"
    generate_all
  fi
  if stage_on 4; then
    phase "stage 4: sacreBLEU"
    score_all
  fi
  phase "done: $EXP_DIR (log: $EXP_DIR/run.log)"
}
