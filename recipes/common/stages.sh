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
#   3  generate: beam 5 and greedy (DECODES) on the test set, one hypothesis per test sentence checked
#   4  score:    sacreBLEU of the decoded hypotheses against the raw reference -> EXP_DIR/results.txt
# --methods a,b (run.sh option) restricts stages 2-4 to those methods (and the baseline; env
# NO_BASELINE=1 drops the baseline from all stages).  Per-model tables and arrays (see train_model,
# train_method, generate_all): MODEL_/REG_/OPTIM_/BATCH_<m> replace a flag group, GEN_<m> adds
# decoding flags, DECODES_<m> replaces DECODES; METHOD_INIT (warm starts), METHOD_EPOCHS, METHOD_LR,
# METHOD_GLOBAL (raw-score search), METHOD_ALPHA (soft beam decoding alpha); EXTRA_METHODS are known
# to --methods but not trained by default.  Decodings: greedy, beamN, beamNraw, softbeamN.

STAGE=1
STOP_STAGE=4
SMOKE=${SMOKE:-0}
SEED=${SEED:-1}
METHODS=(parallel_ss)
DSS_MIX=()
EXTRA_METHODS=()
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
  local data_env=${RUN_DATA_ENV:-pair.env}   # what prepare.sh wrote (pair.env: SRC, TGT; wikitext: lm.env)
  [ -s "$DATA_DIR/$data_env" ] || die "$DATA_DIR/$data_env not found: run this recipe's prepare.sh into $DATA_DIR first"
  # shellcheck disable=SC1090
  source "$DATA_DIR/$data_env"
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

# METHOD_DATA / METHOD_DATA_HINT: see train_model; METHOD_FUNC[method] = a shell function that stage 2
# runs for that method instead of training a model (e.g. building a distilled corpus): such a
# method is no model, so stages 3-4 skip it.
declare -A METHOD_DATA=() METHOD_DATA_HINT=() METHOD_FUNC=()
train_model() {
  local name=$1; shift
  local dir=$EXP_DIR/$name
  mkdir -p "$dir"
  # fairseq-train resumes from $dir/checkpoint_last.pt when it exists: rerunning a stage continues it.
  # --required-batch-size-multiple 1: with fairseq's default of 8 the validation set loses sentences
  # (a 7-sentence set becomes empty), as generation does (fairseq issue 5036).
  # a model may replace a flag group with its own array MODEL_<name>, REG_<name>, OPTIM_<name>,
  # BATCH_<name> (e.g. an LSTM next to the transformer baseline)
  local group; local -A use=()
  for group in MODEL REG OPTIM BATCH; do
    use[$group]=$group; if declare -p "${group}_$name" > /dev/null 2>&1; then use[$group]=${group}_$name; fi
  done
  local -n model_g=${use[MODEL]} reg_g=${use[REG]} optim_g=${use[OPTIM]} batch_g=${use[BATCH]}
  # METHOD_DATA[name]: a model's own binarised training data (e.g. a distilled corpus binarised with
  # the same dictionaries), default DATA_DIR/bin
  local bin=${METHOD_DATA[$name]:-$DATA_DIR/bin}
  [ -s "$bin/dict.$SRC.txt" ] || die "no binarised training data for $name: $bin (${METHOD_DATA_HINT[$name]:-run prepare.sh first})"
  run_logged "$dir/train.log" fairseq-train "$bin" --user-dir "$USER_DIR" \
    --source-lang "$SRC" --target-lang "$TGT" --save-dir "$dir" --seed "$SEED" \
    "${DEVICE_FLAGS[@]}" "${model_g[@]}" "${reg_g[@]}" "${optim_g[@]}" "${batch_g[@]}" "${LENGTH[@]}" \
    --required-batch-size-multiple 1 --no-epoch-checkpoints --log-format simple --no-progress-bar "$@"
  [ -s "$dir/checkpoint_last.pt" ] || die "training wrote no checkpoint: $dir/checkpoint_last.pt"
}

# The decodings of one model: DECODES_<model> when the recipe defines it, else DECODES.
model_decodes() {
  if declare -p "DECODES_$1" > /dev/null 2>&1; then local -n ref="DECODES_$1"; echo "${ref[*]}"; else echo "${DECODES[*]}"; fi
}

# fairseq-generate flags of one decoding of one model: greedy | beamN | beamNraw | softbeamN.
#   beamNraw:  beam search on the raw, unnormalized scores (--search-scores raw);
#   softbeamN: soft beam search decoding (thesis 4.3.4) with alpha SB_DECODE_ALPHA, default the
#              model's final training alpha (METHOD_ALPHA) or 1.
# A globally normalized model (METHOD_GLOBAL) runs its beam searches on raw scores, as it was trained.
declare -A METHOD_GLOBAL=() METHOD_ALPHA=()
DECODE_HOOKS=()
decode_flags() {
  local decode=$1 model=$2 alpha raw=
  [ -z "${METHOD_GLOBAL[$model]:-}" ] || raw=" --search-scores raw"
  case $decode in
    greedy) echo "--beam 1" ;;
    beam[0-9]*raw) echo "--beam ${decode//[a-z]/} --search-scores raw" ;;
    softbeam[0-9]*)
      alpha=${SB_DECODE_ALPHA:-${METHOD_ALPHA[$model]:-1}}
      echo "--beam ${decode#softbeam} --soft-beam-decoding --soft-beam-decoding-alpha $alpha$raw" ;;
    beam[0-9]*) echo "--beam ${decode#beam}$raw" ;;
    *)
      # a block's own decodings: each function of DECODE_HOOKS prints the flags of the names it knows
      # and returns 0 (e.g. the CMLM / Metropolis-Hastings block's mh_decode_flags), else returns 1;
      # then the recipe's recipe_decode_flags (e.g. FlowSeq's argmax / iwdN / npdN)
      local hook
      for hook in "${DECODE_HOOKS[@]}"; do "$hook" "$decode" "$model" && return 0; done
      if declare -F recipe_decode_flags > /dev/null; then recipe_decode_flags "$decode" "$model"
      else die "unknown decoding '$decode' (greedy, beamN, beamNraw, softbeamN)"; fi ;;
  esac
}

# Extra training flags of a method besides FLAGS_<method>: the dss_* methods get DSS_MIX, the
# gold-mixing schedule of differentiable_ss (a recipe may redefine this function).
method_mix_flags() {
  case $1 in dss_*) echo "${DSS_MIX[*]}" ;; esac
}

# Stage 2 for one method.  A warm-started method (METHOD_INIT[method] = the model it starts from)
# loads that model's WARM_START checkpoint (default checkpoint_last.pt) with a fresh optimizer, data
# loader, meters and lr schedule on its first run, and resumes its own checkpoint_last.pt when
# rerun; METHOD_EPOCHS / METHOD_LR override --max-epoch / --lr.
declare -A METHOD_INIT=() METHOD_EPOCHS=() METHOD_LR=()
train_method() {
  local method=$1
  if [ -n "${METHOD_FUNC[$method]:-}" ]; then
    phase "stage 2: $method (${METHOD_FUNC[$method]})"
    "${METHOD_FUNC[$method]}"
    return
  fi
  local -n method_flags="FLAGS_$method"
  local extra=() init=${METHOD_INIT[$method]:-} ckpt=
  read -r -a extra <<< "$(method_mix_flags "$method")"
  if [ -n "$init" ] && [ ! -s "$EXP_DIR/$method/checkpoint_last.pt" ]; then
    ckpt=$EXP_DIR/$init/${WARM_START:-checkpoint_last.pt}
    [ -s "$ckpt" ] || die "$method is warm-started from $ckpt, which does not exist: train $init first ($( [ "$init" = baseline ] && echo "stage 1" || echo "--methods $init,$method"))"
    extra+=(--restore-file "$ckpt" --reset-optimizer --reset-dataloader --reset-meters --reset-lr-scheduler)
  fi
  [ -z "${METHOD_EPOCHS[$method]:-}" ] || extra+=(--max-epoch "${METHOD_EPOCHS[$method]}")
  [ -z "${METHOD_LR[$method]:-}" ] || extra+=(--lr "${METHOD_LR[$method]}")
  phase "stage 2: $method (${method_flags[*]} ${extra[*]})"
  train_model "$method" "${method_flags[@]}" "${extra[@]}"
  unset -n method_flags
  # fairseq trains from scratch, logging only "No existing checkpoint found", when it cannot load
  # --restore-file; its "Loaded checkpoint PATH" line is the proof that the warm start happened.
  if [ -n "${ckpt:-}" ] && ! grep -qF "Loaded checkpoint $ckpt " "$EXP_DIR/$method/train.log"; then
    die "$method did not load its warm-start checkpoint $ckpt (no 'Loaded checkpoint' line in $EXP_DIR/$method/train.log): it trained from scratch; remove $EXP_DIR/$method and rerun"
  fi
}

# Every method of METHODS, the initialisers (no warm start) first, so that e.g. a self-normalized
# model exists before the globally normalized models warm-started from it.
train_methods() {
  local method
  for method in "${METHODS[@]}"; do [ -n "${METHOD_INIT[$method]:-}" ] || train_method "$method"; done
  for method in "${METHODS[@]}"; do [ -z "${METHOD_INIT[$method]:-}" ] || train_method "$method"; done
}

generate_all() {
  local n model decode dir decodes flags
  n=$(wc -l < "$DATA_DIR/raw/test.$SRC")
  for model in "${MODELS[@]}"; do
    dir=$EXP_DIR/$model
    # The LAST checkpoint, not the best: validation is teacher-forced, so "best" would favour the
    # teacher-forced warm-up over the scheduled-sampling phase and compare unlike things.
    [ -s "$dir/checkpoint_last.pt" ] || die "no checkpoint to decode: $dir/checkpoint_last.pt (run stage 1/2 first)"
    # GEN_<model>: a model's own decoding flags after GEN's (e.g. --task search_aware_translation)
    local gen_extra=("${GEN[@]}")
    if declare -p "GEN_$model" > /dev/null 2>&1; then local -n gen_own="GEN_$model"; gen_extra+=("${gen_own[@]}"); unset -n gen_own; fi
    read -r -a decodes <<< "$(model_decodes "$model")"
    for decode in "${decodes[@]}"; do
      read -r -a flags <<< "$(decode_flags "$decode" "$model")"
      echo "--- $model, $decode (${flags[*]}) ---"
      # --required-batch-size-multiple 1: otherwise fairseq may drop the last batch's tail (fairseq issue 5036).
      # --post-process sentencepiece: D- lines are decoded text, ready for sacreBLEU.
      local cmd=(fairseq-generate "$DATA_DIR/bin" --user-dir "$USER_DIR" --source-lang "$SRC" --target-lang "$TGT"
        --path "$dir/checkpoint_last.pt" --gen-subset test "${DEVICE_FLAGS[@]}"
        "${flags[@]}" --batch-size "${GEN_BATCH_SIZE:-128}" --required-batch-size-multiple 1
        --post-process sentencepiece --num-workers 0 "${gen_extra[@]}")
      printf '%q ' "${cmd[@]}" > "$dir/test.$decode.cmd"; echo >> "$dir/test.$decode.cmd"
      "${cmd[@]}" > "$dir/test.$decode.out" 2> "$dir/test.$decode.err" \
        || { tail -20 "$dir/test.$decode.err" >&2; die "fairseq-generate failed: $dir/test.$decode.err"; }
      grep -E '^\| Generate|Translated' "$dir/test.$decode.out" "$dir/test.$decode.err" | sed 's/^[^:]*://' | tail -1 || true
      "$PY" "$HELPERS/tools.py" hyps --expected "$n" "$dir/test.$decode.out" "$dir/test.$decode.hyp"
    done
  done
}

score_all() {
  local model decode decodes ref=$DATA_DIR/raw/test.$TGT
  require_file "$ref"
  : > "$EXP_DIR/results.txt.tmp"
  for model in "${MODELS[@]}"; do
    read -r -a decodes <<< "$(model_decodes "$model")"
    for decode in "${decodes[@]}"; do
      require_file "$EXP_DIR/$model/test.$decode.hyp"
      "$PY" "$HELPERS/tools.py" bleu --name "$model/$decode" "$EXP_DIR/$model/test.$decode.hyp" "$ref" \
        | tee -a "$EXP_DIR/results.txt.tmp"
      # a sampler's chain statistics (the Metropolis-Hastings block, recipes/common/mh.sh): one MH line
      if [ -e "$EXP_DIR/$model/test.$decode.stats.jsonl" ]; then
        "$PY" "$HELPERS/nar_tools.py" mh-stats --name "$model/$decode" "$EXP_DIR/$model/test.$decode.stats.jsonl" \
          | tee -a "$EXP_DIR/results.txt.tmp"
        [ "${PIPESTATUS[0]}" = 0 ] || die "unreadable chain statistics: $EXP_DIR/$model/test.$decode.stats.jsonl"
      fi
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
    # EXTRA_METHODS: methods a recipe knows but does not train unless --methods names them
    local all=("${METHODS[@]}" "${EXTRA_METHODS[@]}")
    IFS=, read -r -a wanted <<< "$ONLY_METHODS"
    for m in "${wanted[@]}"; do
      known=0; for k in "${all[@]}"; do [ "$k" = "$m" ] && known=1; done
      [ "$known" = 1 ] || die "--methods: unknown method '$m'; this recipe has: ${all[*]}"
    done
    METHODS=("${wanted[@]}")
  fi
  local name models=()
  for name in "${METHODS[@]}"; do
    if [ -n "${METHOD_FUNC[$name]:-}" ]; then continue; fi   # a data step (METHOD_FUNC), no model
    declare -p "FLAGS_$name" > /dev/null 2>&1 || die "recipe error: method $name has no FLAGS_$name array"
    models+=("$name")
  done
  # NO_BASELINE=1: no stage-1 model (e.g. only the LSTM methods of the soft beam search block)
  if [ "${NO_BASELINE:-0}" = 1 ]; then MODELS=("${models[@]}"); else MODELS=(baseline "${models[@]}"); fi
}

run_stages() {
  if [ "$SMOKE" = 1 ]; then
    use_smoke_settings
  fi
  select_methods
  if stage_on 1 && [ "${NO_BASELINE:-0}" != 1 ]; then
    phase "stage 1: baseline, teacher forcing"
    train_model baseline --criterion label_smoothed_cross_entropy
  fi
  if stage_on 2; then
    train_methods
  fi
  if stage_on 3; then
    phase "stage 3: generate (${DECODES[*]}, or a model's own DECODES_<model>) on test"
    generate_all
  fi
  if stage_on 4; then
    phase "stage 4: sacreBLEU"
    score_all
  fi
  phase "done: $EXP_DIR (log: $EXP_DIR/run.log)"
}
