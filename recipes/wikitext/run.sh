#!/usr/bin/env bash
# Text completion on WikiText (Welleck and Cho, "MLE-Guided Parameter Search for Task Loss Minimization in Neural
# Sequence Modeling", AAAI 2021, section 5.1 and Table 1): an MLE transformer language model, fine-tuned from it
# with MLE-guided parameter search (mgs) and minimum risk training (mrt), greedy continuations of the test
# prefixes and the paper's metrics.
#
# Usage: run.sh DATA_DIR EXP_DIR [--stage N] [--stop-stage M] [--methods a,b] [--smoke]
#   DATA_DIR  output of recipes/wikitext/prepare.sh
#   EXP_DIR   where checkpoints, logs (run.log, */train.log), continuations and results.txt go
# Stages:
#   1  MLE: transformer_lm, --task language_modeling --sample-break-mode eos (one example a sample), MLE_UPDATES
#      updates -> EXP_DIR/mle (the starting point of every fine-tune and the frozen scorer of the lm cost)
#   2  fine-tuning from EXP_DIR/mle/checkpoint_last.pt (fresh optimizer, data loader, meters) with
#      --task text_completion (prefix = the first K tokens of an example), FT_UPDATES updates each:
#        mgs  --criterion mgs, task loss MGS_TASK_LOSS (edit; lm = the NLL under the frozen MLE model, the
#             paper's MGS-LM; any registered task loss)
#        mrt  --criterion mrt, task loss MRT_TASK_LOSS (default MGS_TASK_LOSS), beam candidates
#      --methods a,b picks some of them (default: mgs,mrt)
#   3  generate: greedy (--beam 1, as the paper) continuations of every test prefix, by the MLE model and each
#      fine-tuned one (--task text_completion, --required-batch-size-multiple 1, one hypothesis per example checked)
#   4  score: one `COMPLETION model: edit .. nonterm .. repetition .. length .. lm ..` line per model in
#      EXP_DIR/results.txt (fairseq_ext/modules/completion_metrics.py; lm under the frozen MLE model)
# --smoke (or SMOKE=1): a 1-layer 32-wide model, 20 MLE updates, 2 fine-tuning updates.
# Env: model size LM_LAYERS (6), LM_DIM (512), LM_FFN (2048), LM_HEADS (8), LM_DROPOUT (0.1); MLE_UPDATES (20000),
#      MLE_LR (5e-4), MLE_WARMUP (4000), MAX_TOKENS_PER_BATCH (4096), FT_UPDATES (1500), MGS_LR (1e-4), FT_MAX_TOKENS
#      (1024), the mgs / mrt flags of recipes/common/mgs.sh (MGS_CANDIDATES, MGS_ALPHA, MGS_NOISE, MRT_CANDIDATES,
#      MRT_MLE_WEIGHT), SEED (1), DEVICE=auto|cpu|gpu, FP16=1, GEN_BATCH_SIZE (64).
set -euo pipefail
source "$(dirname "$0")/../common/lib.sh"
source "$(dirname "$0")/../common/mgs.sh"
source "$(dirname "$0")/../common/stages.sh"

STAGE=1
STOP_STAGE=4
SEED=${SEED:-1}
ONLY_METHODS=
RUN_DATA_ENV=lm.env parse_run_args "$@"   # sources DATA_DIR/lm.env: UNIT, PREFIX_LENGTH, MAX_TOKENS
METHODS=(mgs mrt)
if [ -n "$ONLY_METHODS" ]; then
  IFS=, read -r -a METHODS <<< "$ONLY_METHODS"
  for m in "${METHODS[@]}"; do
    case $m in mgs|mrt) ;; *) die "--methods: unknown method '$m'; this recipe has: mgs mrt" ;; esac
  done
fi
MGS_TASK_LOSS=${MGS_TASK_LOSS:-edit}
mkdir -p "$EXP_DIR"
DATA_DIR=$(cd "$DATA_DIR" && pwd)
EXP_DIR=$(cd "$EXP_DIR" && pwd)
BIN=$DATA_DIR/bin
TEST_TEXT=$DATA_DIR/text/test.txt
MLE=$EXP_DIR/mle/checkpoint_last.pt
flags=$(device_flags) || exit 1
read -r -a DEVICE_FLAGS <<< "$flags"
exec > >(tee -a "$EXP_DIR/run.log") 2>&1
echo "=== $(date '+%F %T') $0 $DATA_DIR $EXP_DIR --stage $STAGE --stop-stage $STOP_STAGE (smoke=$SMOKE, $UNIT, prefix $PREFIX_LENGTH, device flags: ${DEVICE_FLAGS[*]:-none}) ==="
stage_on() { [ "$STAGE" -le "$1" ] && [ "$1" -le "$STOP_STAGE" ]; }

# -- model: a decoder-only transformer over the whole example (positions = prepare.sh's --max-tokens)
if [ "$SMOKE" = 1 ]; then
  LM_LAYERS=1 LM_DIM=32 LM_FFN=64 LM_HEADS=2 MLE_UPDATES=${MLE_UPDATES:-20} FT_UPDATES=${FT_UPDATES:-2}
  MLE_WARMUP=${MLE_WARMUP:-5} MLE_LR=${MLE_LR:-5e-3}
fi
MODEL=(--arch transformer_lm --decoder-layers "${LM_LAYERS:-6}" --decoder-embed-dim "${LM_DIM:-512}"
       --decoder-ffn-embed-dim "${LM_FFN:-2048}" --decoder-attention-heads "${LM_HEADS:-8}"
       --share-decoder-input-output-embed --tokens-per-sample "$MAX_TOKENS" --dropout "${LM_DROPOUT:-0.1}")
COMMON=(--user-dir "$USER_DIR" "${DEVICE_FLAGS[@]}" --seed "$SEED" --num-workers 0 --no-progress-bar
        --log-format simple --log-interval 50 --required-batch-size-multiple 1 --no-epoch-checkpoints)
MLE_FLAGS=(--task language_modeling --sample-break-mode eos --criterion cross_entropy
           --optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 1.0 --lr "${MLE_LR:-5e-4}"
           --lr-scheduler inverse_sqrt --warmup-updates "${MLE_WARMUP:-4000}" --warmup-init-lr 1e-7
           --max-tokens "${MAX_TOKENS_PER_BATCH:-4096}" --max-update "${MLE_UPDATES:-20000}")
# text completion: the first K tokens are the prefix, the rest the continuation (the paper's K = 10)
TC=(--task text_completion --completion-prefix-length "$PREFIX_LENGTH")
mgs_optim
FT_FLAGS=("${TC[@]}" "${MGS_OPTIM[@]}" --max-tokens "${FT_MAX_TOKENS:-1024}" --max-update "${FT_UPDATES:-1500}"
          --disable-validation)
# the first run of a fine-tune starts from the MLE model with everything but the weights reset
WARM=(--restore-file "$MLE" --reset-optimizer --reset-dataloader --reset-meters --reset-lr-scheduler)

train() {  # train NAME FLAGS...: fairseq-train into EXP_DIR/NAME, its log in NAME/train.log (resumes a rerun)
  local name=$1; shift
  mkdir -p "$EXP_DIR/$name"
  printf '%q ' fairseq-train "$BIN" --save-dir "$EXP_DIR/$name" "${COMMON[@]}" "${MODEL[@]}" "$@" > "$EXP_DIR/$name/train.cmd"
  fairseq-train "$BIN" --save-dir "$EXP_DIR/$name" "${COMMON[@]}" "${MODEL[@]}" "$@" 2>&1 | tee "$EXP_DIR/$name/train.log"
  [ -s "$EXP_DIR/$name/checkpoint_last.pt" ] || die "training wrote no checkpoint: $EXP_DIR/$name/checkpoint_last.pt"
}

[ -s "$BIN/dict.txt" ] || die "no binarised data: $BIN/dict.txt (run recipes/wikitext/prepare.sh first)"
if stage_on 1; then
  phase "stage 1: MLE language model"
  train mle "${MLE_FLAGS[@]}"
fi
if stage_on 2; then
  [ -s "$MLE" ] || die "the fine-tunes start from $MLE, which does not exist: run stage 1 first"
  for m in "${METHODS[@]}"; do
    mapfile -t crit < <(mgs_criterion_flags "$m" "$MLE")
    [ ${#crit[@]} -gt 0 ] || exit 1
    phase "stage 2: $m (${crit[*]})"
    if [ -s "$EXP_DIR/$m/checkpoint_last.pt" ]; then
      # a rerun resumes the method's own checkpoint, not the MLE model
      train "$m" "${FT_FLAGS[@]}" "${crit[@]}"
    else
      train "$m" "${FT_FLAGS[@]}" "${crit[@]}" "${WARM[@]}"
      grep -qF "Loaded checkpoint $MLE " "$EXP_DIR/$m/train.log" \
        || die "$m did not load the MLE checkpoint $MLE (no 'Loaded checkpoint' line in $EXP_DIR/$m/train.log): remove $EXP_DIR/$m and rerun"
    fi
  done
fi
MODELS=(mle "${METHODS[@]}")
N_TEST=$(wc -l < "$TEST_TEXT")
if stage_on 3; then
  phase "stage 3: greedy continuations of the $N_TEST test prefixes"
  for m in "${MODELS[@]}"; do
    echo "--- $m ---"
    completion_generate "$EXP_DIR/$m/checkpoint_last.pt" "$BIN" "$EXP_DIR/$m/test.greedy" "$N_TEST"
  done
fi
if stage_on 4; then
  phase "stage 4: edit, non-termination, repetition, length, LM (under the MLE model)"
  [ -s "$MLE" ] || die "the LM column needs the MLE model $MLE: run stage 1 first"
  : > "$EXP_DIR/results.txt.tmp"
  for m in "${MODELS[@]}"; do
    require_file "$EXP_DIR/$m/test.greedy.out"
    completion_score "$m/greedy" "$EXP_DIR/$m/test.greedy.out" "$TEST_TEXT" "$BIN/dict.txt" "$MLE" \
      | tee -a "$EXP_DIR/results.txt.tmp"
  done
  mv "$EXP_DIR/results.txt.tmp" "$EXP_DIR/results.txt"
fi
phase "done: $EXP_DIR (log: $EXP_DIR/run.log)"
