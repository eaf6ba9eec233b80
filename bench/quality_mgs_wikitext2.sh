#!/usr/bin/env bash
# Quality benchmark, CPU-sized: a miniature of Table 1 of Welleck and Cho, "MLE-Guided Parameter Search for
# Task Loss Minimization in Neural Sequence Modeling" (AAAI 2021, section 5.1: text completion, GPT-2 on
# WikiText-103) on WikiText-2 with a small transformer_lm trained here:
#   1. WikiText-2 paragraphs -> one sentence per line (bench/mgs_quality_table.py prepare: the paper uses whole
#      paragraphs; sentences keep the greedy decodes short enough for one CPU thread), a vocabulary of the
#      VOCAB most frequent training words (fairseq-preprocess --only-source --nwordssrc; the rest is <unk>);
#   2. MLE: --task language_modeling --sample-break-mode eos (one sentence per sample), MLE_UPDATES updates;
#      its checkpoint is the starting point of every fine-tuning and the frozen scorer of the LM cost;
#   3. FT_UPDATES updates of --task text_completion (prefix k = 10 tokens, the paper's) from it with each of:
#      MLE continued (cross_entropy on the continuations), MGS-edit, MGS-LM (the lm cost under the frozen MLE
#      model, the paper's MGS-LM), MRT (edit, beam candidates), PG (edit, 4 samples);
#   4. fairseq-generate --task text_completion --beam 1 (greedy, as the paper) on the first TEST_LINES test
#      sentences;
#   5. the table: LM, Edit, Nonterm, Repetition, Avg. len., Perplexity of the reference continuations
#      (bench/mgs_quality_table.py table; the perplexity is computed there: fairseq-validate would take the
#      MLE checkpoint's language_modeling task and score the prefixes too).
#
# Usage: bench/quality_mgs_wikitext2.sh [--smoke] WIKITEXT2_DIR [RUN_DIR]
#   WIKITEXT2_DIR: wiki.{train,valid,test}.tokens (tokenised WikiText-2 v1); RUN_DIR default:
#   bench/runs/quality_mgs_wikitext2 (git-ignored).  --smoke: a pipeline check in a few minutes.
# Env: TRAIN_LINES (0 = all sentences), VALID_LINES (300), TEST_LINES (300), VOCAB (8000), MLE_UPDATES (500),
#   FT_UPDATES (60), FT_LR (3e-4), SEED (1), OMP_NUM_THREADS (1).
# Re-running skips finished steps (a training whose checkpoint_last.pt exists, an evaluation whose output
# exists).  Results: RUN_DIR/table.md and timing.txt; bench/results/quality_mgs_wikitext2.{md,log} are written
# by hand from them (the command, sizes and CPU time).
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
source "$REPO_DIR/recipes/common/lib.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} PYTHONWARNINGS=ignore

SMOKE=0
if [ "${1:-}" = --smoke ]; then SMOKE=1; shift; fi
[ $# -ge 1 ] || { sed -n 19,23p "$0"; exit 2; }
SRC_DIR=$1
if [ "$SMOKE" = 1 ]; then
  TRAIN_LINES=${TRAIN_LINES:-2000} VALID_LINES=${VALID_LINES:-50} TEST_LINES=${TEST_LINES:-30}
  VOCAB=${VOCAB:-2000} MLE_UPDATES=${MLE_UPDATES:-20} FT_UPDATES=${FT_UPDATES:-2}
  DEFAULT_RUN=$REPO_DIR/bench/runs/quality_mgs_wikitext2_smoke
fi
TRAIN_LINES=${TRAIN_LINES:-0}
VALID_LINES=${VALID_LINES:-300}
TEST_LINES=${TEST_LINES:-300}
VOCAB=${VOCAB:-8000}
MLE_UPDATES=${MLE_UPDATES:-500}
FT_UPDATES=${FT_UPDATES:-60}
FT_LR=${FT_LR:-3e-4}
SEED=${SEED:-1}
K=10            # prefix tokens (the paper's)
MAX_TOKENS=64   # longest sentence kept, EOS included = the model's positions
RUN_DIR=${2:-${DEFAULT_RUN:-$REPO_DIR/bench/runs/quality_mgs_wikitext2}}
mkdir -p "$RUN_DIR" && RUN_DIR=$(cd "$RUN_DIR" && pwd)
TIMING=$RUN_DIR/timing.txt

log() { echo "[$(date +%H:%M:%S)] $*"; }
# timed LABEL CMD...: runs CMD, appending "LABEL user_s system_s wall_s" to $TIMING
timed() { local label=$1; shift; /usr/bin/time -f "$label %U %S %e" -a -o "$TIMING" "$@"; }

# -- the model and the shared flags ------------------------------------------------------------------------
MODEL=(--arch transformer_lm --decoder-layers 2 --decoder-embed-dim 128 --decoder-ffn-embed-dim 512
       --decoder-attention-heads 4 --share-decoder-input-output-embed --tokens-per-sample $MAX_TOKENS
       --dropout 0.1)
COMMON=(--user-dir "$USER_DIR" --cpu --seed "$SEED" --num-workers 0 --no-progress-bar --log-format simple
        --required-batch-size-multiple 1 --no-epoch-checkpoints --ddp-backend legacy_ddp)
MLE_FLAGS=(--task language_modeling --sample-break-mode eos --criterion cross_entropy
           --optimizer adam --adam-betas '(0.9,0.98)' --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 100
           --clip-norm 1.0 --max-tokens 2048 --max-update "$MLE_UPDATES" --log-interval 50)
TC=(--task text_completion --completion-prefix-length $K)
# fine-tuning: the same optimizer and data for every method; fresh optimizer, data loader and meters
FT_FLAGS=("${TC[@]}" --optimizer adam --adam-betas '(0.9,0.98)' --lr "$FT_LR" --clip-norm 1.0
          --max-tokens 1024 --max-update "$FT_UPDATES" --log-interval 2 --disable-validation
          --reset-optimizer --reset-dataloader --reset-meters --reset-lr-scheduler)
# per method (sequence-level criteria: dropout off in their decodes; the paper's K = 4 candidates)
declare -A METHOD
METHOD[mle_cont]="--criterion cross_entropy"
# alpha: the pooled edit cost differs by ~0.01 between candidates, the LM cost (nats) by ~1: 100 and 1 (the
# paper's alpha for its MGS-LM runs)
METHOD[mgs_edit]="--criterion mgs --mgs-task-loss edit --mgs-num-candidates 4 --mgs-alpha 100 --mgs-noise 1.0"
METHOD[mgs_lm]="--criterion mgs --mgs-task-loss lm --mgs-num-candidates 4 --mgs-alpha 1 --mgs-noise 1.0"
# the proposal ablation of Table 7 (and Figure 1): MGS-LM with only one component of q_MGS
METHOD[mgs_lm_zero]="${METHOD[mgs_lm]} --mgs-zero-only"
METHOD[mgs_lm_mle]="${METHOD[mgs_lm]} --mgs-mle-only"
METHOD[mrt]="--criterion mrt --mrt-task-loss edit --mrt-candidates beam --mrt-num-candidates 4 --mrt-mle-weight 0.1"
METHOD[pg]="--criterion policy_gradient --pg-task-loss edit --pg-num-samples 4 --pg-mle-weight 0.1"
FT_ORDER=(mle_cont mgs_edit mgs_lm mrt pg mgs_lm_zero mgs_lm_mle)

log "run dir $RUN_DIR: train ${TRAIN_LINES/#0/all} sentences, valid $VALID_LINES, test $TEST_LINES; vocab $VOCAB;" \
  "MLE $MLE_UPDATES updates, fine-tuning $FT_UPDATES updates (lr $FT_LR)"

# -- 1. data ---------------------------------------------------------------------------------------------------
if [ ! -s "$RUN_DIR/text/SIZES.json" ]; then
  log "1. sentences"
  mkdir -p "$RUN_DIR/text"
  "$PY" "$BENCH_DIR/mgs_quality_table.py" prepare --data "$SRC_DIR" --out "$RUN_DIR/text" --prefix-length $K \
    --max-tokens $MAX_TOKENS --train-lines "$TRAIN_LINES" --valid-lines "$VALID_LINES" --test-lines "$TEST_LINES" \
    | tee "$RUN_DIR/text/PREPARE.txt"
fi
if [ ! -s "$RUN_DIR/bin/test.idx" ]; then
  log "1. binarise (vocabulary: the $VOCAB most frequent training words)"
  timed "preprocess" fairseq-preprocess --only-source --trainpref "$RUN_DIR/text/train.txt" \
    --validpref "$RUN_DIR/text/valid.txt" --testpref "$RUN_DIR/text/test.txt" --destdir "$RUN_DIR/bin" \
    --nwordssrc "$VOCAB" --workers 1 > "$RUN_DIR/preprocess.log" 2>&1
fi
BIN=$RUN_DIR/bin

# -- 2. MLE ------------------------------------------------------------------------------------------------------
if [ ! -s "$RUN_DIR/mle/checkpoint_last.pt" ]; then
  log "2. MLE: $MLE_UPDATES updates"
  mkdir -p "$RUN_DIR/mle"
  timed "train mle" fairseq-train "$BIN" --save-dir "$RUN_DIR/mle" "${COMMON[@]}" "${MODEL[@]}" "${MLE_FLAGS[@]}" \
    > "$RUN_DIR/mle/train.log" 2>&1
fi
MLE=$RUN_DIR/mle/checkpoint_last.pt

# -- 3. fine-tuning ----------------------------------------------------------------------------------------------
for name in "${FT_ORDER[@]}"; do
  save=$RUN_DIR/$name
  [ -s "$save/checkpoint_last.pt" ] && continue
  log "3. $name: $FT_UPDATES updates from the MLE model"
  mkdir -p "$save"
  extra=()
  case $name in mgs_lm*) extra=(--mgs-lm-scorer-path "$MLE") ;; esac
  # shellcheck disable=SC2086
  timed "train $name" fairseq-train "$BIN" --save-dir "$save" "${COMMON[@]}" "${MODEL[@]}" "${FT_FLAGS[@]}" \
    ${METHOD[$name]} "${extra[@]}" --restore-file "$MLE" > "$save/train.log.partial" 2>&1
  grep -q "Loaded checkpoint .*mle/checkpoint_last.pt" "$save/train.log.partial" \
    || { echo "$name did not start from the MLE checkpoint" >&2; exit 1; }
  mv "$save/train.log.partial" "$save/train.log"
done

# -- 4. evaluation -----------------------------------------------------------------------------------------------
mkdir -p "$RUN_DIR/eval"
for name in mle "${FT_ORDER[@]}"; do
  ckpt=$RUN_DIR/$name/checkpoint_last.pt
  gen=$RUN_DIR/eval/$name.generate.txt
  if [ ! -s "$gen" ]; then
    log "4. $name: greedy continuations of $TEST_LINES test prefixes"
    timed "generate $name" fairseq-generate "$BIN" --path "$ckpt" --user-dir "$USER_DIR" --cpu --num-workers 0 \
      "${TC[@]}" --gen-subset test --beam 1 --batch-size 64 --required-batch-size-multiple 1 > "$gen.partial" 2>&1
    mv "$gen.partial" "$gen"
  fi
done

# -- 5. the table ------------------------------------------------------------------------------------------------
log "5. table"
"$PY" "$BENCH_DIR/mgs_quality_table.py" table --run-dir "$RUN_DIR" --data-bin "$BIN" \
  --test-text "$RUN_DIR/text/test.txt" --scorer "$MLE" --prefix-length $K --out "$RUN_DIR/table.md"
# Figure 1 (training task loss per proposal) and the weight statistics (Figures 2, 3) of MGS-LM
if have_plot_extra; then
  runs=()
  for name in mgs_lm mgs_lm_zero mgs_lm_mle; do
    [ -s "$RUN_DIR/$name/train.log" ] && runs+=("$name=$RUN_DIR/$name/train.log")
  done
  "$PY" "$BENCH_DIR/mgs_plots.py" --out "$RUN_DIR/fig1_training.png" --keys mgs_cost,mgs_weight_std,mgs_mle_weight \
    --title "MGS-LM on WikiText-2 by proposal (Figure 1, Table 7): q_MGS (mgs_lm), q_zero only, q_MLE only; cost in nats" "${runs[@]}"
else
  log "no matplotlib: no figure (pip install .[plot])"
fi
awk '{u += $(NF-2); s += $(NF-1)} END {printf "CPU time of the fairseq commands: %.0f s user + %.0f s system\n", u, s}' \
  "$TIMING"
log "done"
