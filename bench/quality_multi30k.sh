#!/usr/bin/env bash
# Quality benchmark on Multi30k en->de (CPU-sized): teacher forcing vs parallel scheduled sampling
# (Duckworth et al.), and vs hard and differentiable scheduled sampling, the rows of Table 1 of Goyal et al.
# 2017 (DSS=1).
#
# Usage: bench/quality_multi30k.sh MULTI30K_DIR [RUN_DIR]      (RUN_DIR default: bench/runs/quality_multi30k)
#   MULTI30K_DIR: the raw release files (train/val/test_2016_flickr.{en,de}); read, never copied here.
#   Env: SEED (1), PARALLEL (2 fine-tunes at once), EXTRA_K2=1 adds p=0.25 and p=1.0 with K=2,
#        DSS=1: the Table 1 grid instead (hard SS greedy/sample, DSS greedy/sample x alpha fixed/annealed,
#        all at p = 0.25; the tf control is shared) -> bench/results/quality_multi30k_dss.{md,log},
#        BASE_EPOCHS (3), FT_EPOCHS (1),
#        FT_SEED (default SEED): another seed for the fine-tunes only (same base; their data order and
#        sampling change), run into <config>_ftseedN directories; JOBS="tf pss_p0.5_k1 ..." picks configs.
#
# Design (why): two shared CPU cores allow no full training per configuration.  Like the paper's MT
# protocol (teacher-forced warm-up, then parallel SS), ONE teacher-forced base model is trained,
# and every configuration -- teacher forcing itself included, as the control -- is fine-tuned from
# its last checkpoint for the same number of epochs with the same data order (same seed), the same
# fresh Adam state and the same constant learning rate (the base's final one).  So the configurations
# differ only in the criterion.  Each fine-tuned model's LAST checkpoint is decoded (greedy and beam 5)
# on test_2016_flickr and scored with sacreBLEU (13a, cased) against the raw reference.
#
# Steps: prepare (recipes/multi30k/prepare.sh, reused if RUN_DIR/data exists) -> base -> fine-tunes
# PARALLEL at a time, each followed by its decoding and scoring -> bench/results/quality_multi30k.{md,log}.
# Re-running skips every finished step (a job is finished when its bleu files exist).
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
source "$REPO_DIR/recipes/common/lib.sh"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONWARNINGS=ignore

SEED=${SEED:-1}
FT_SEED=${FT_SEED:-$SEED}
PARALLEL=${PARALLEL:-2}
BASE_EPOCHS=${BASE_EPOCHS:-3}
FT_EPOCHS=${FT_EPOCHS:-1}
RESULTS=$REPO_DIR/bench/results

# -- model: 2-layer, 256-wide transformer, one embedding matrix for encoder, decoder and output
MODEL=(--arch transformer --share-all-embeddings
       --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 256 --decoder-embed-dim 256
       --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512
       --encoder-attention-heads 4 --decoder-attention-heads 4)
# -- regularisation
REG=(--dropout 0.3 --weight-decay 0.0001 --label-smoothing 0.1)
# -- base optimisation: a short warm-up and lr 1e-3 because the base only gets ~400 updates
BASE_OPT=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0
          --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 250 --warmup-init-lr 1e-7)
# -- batching: ~130 updates per epoch on the 29k training pairs
BATCH=(--max-tokens 4096 --required-batch-size-multiple 8)
# -- bookkeeping: CPU, one process, deterministic data order
COMMON=(--cpu --seed "$SEED" --num-workers 0 --no-progress-bar --log-format simple --log-interval 20
        --no-epoch-checkpoints --user-dir "$USER_DIR")
# -- decoding: every test sentence, no batch rounding (fairseq issue 5036), sentencepiece decoded
GEN=(--cpu --gen-subset test --batch-size 128 --required-batch-size-multiple 1 --num-workers 0
     --post-process sentencepiece --user-dir "$USER_DIR")

# name -> criterion flags; tf is the control
declare -A CONFIGS=(
  [tf]="--criterion label_smoothed_cross_entropy"
  [pss_p0.25_k1]="--criterion parallel_ss --ss-prob 0.25 --ss-num-passes 1"
  [pss_p0.5_k1]="--criterion parallel_ss --ss-prob 0.5 --ss-num-passes 1"
  [pss_p1.0_k1]="--criterion parallel_ss --ss-prob 1.0 --ss-num-passes 1"
  [pss_p0.5_k2]="--criterion parallel_ss --ss-prob 0.5 --ss-num-passes 2"
  [pss_p0.25_k2]="--criterion parallel_ss --ss-prob 0.25 --ss-num-passes 2"
  [pss_p1.0_k2]="--criterion parallel_ss --ss-prob 1.0 --ss-num-passes 2"
  # Table 1 of Goyal et al. 2017: p = 0.25 throughout (the best parallel_ss p of the grid above);
  # differentiable_ss in its exact sequential mode; annealed alpha doubles every 30 updates (~1 -> 20
  # over the ~130-update fine-tune).
  [hss_greedy]="--criterion sequential_ss --ss-prob 0.25 --ss-conditioning argmax"
  [hss_sample]="--criterion sequential_ss --ss-prob 0.25 --ss-conditioning sample"
  [dss_greedy_fixed]="--criterion differentiable_ss --ss-schedule constant --ss-prob 0.25 --dss-mode greedy --dss-alpha 1"
  [dss_sample_fixed]="--criterion differentiable_ss --ss-schedule constant --ss-prob 0.25 --dss-mode sample --dss-alpha 1"
  [dss_greedy_annealed]="--criterion differentiable_ss --ss-schedule constant --ss-prob 0.25 --dss-mode greedy --dss-alpha 1 --dss-alpha-schedule exponential --dss-alpha-growth 2 --dss-alpha-period-updates 30"
  [dss_sample_annealed]="--criterion differentiable_ss --ss-schedule constant --ss-prob 0.25 --dss-mode sample --dss-alpha 1 --dss-alpha-schedule exponential --dss-alpha-growth 2 --dss-alpha-period-updates 30"
)
RESULTS_NAME=quality_multi30k
TABLE_CONFIGS=
if [ "${DSS:-0}" = 1 ]; then
  ORDER=(base tf hss_greedy hss_sample dss_greedy_fixed dss_sample_fixed dss_greedy_annealed dss_sample_annealed)
  RESULTS_NAME=quality_multi30k_dss
  TABLE_CONFIGS=$(IFS=,; echo "${ORDER[*]}")
else
  ORDER=(base tf pss_p0.5_k1 pss_p0.25_k1 pss_p1.0_k1 pss_p0.5_k2)
  [ "${EXTRA_K2:-0}" = 1 ] && ORDER+=(pss_p0.25_k2 pss_p1.0_k2)
  TABLE_CONFIGS=$(IFS=,; echo "base,tf,pss_p0.25_k1,pss_p0.5_k1,pss_p1.0_k1,pss_p0.25_k2,pss_p0.5_k2,pss_p1.0_k2")
fi
if [ -n "${JOBS:-}" ]; then read -r -a ORDER <<< "$JOBS"; fi
# a fine-tune seed other than the base's gets its own directories (base is evaluated once)
if [ "$FT_SEED" != "$SEED" ]; then
  for i in "${!ORDER[@]}"; do [ "${ORDER[$i]}" = base ] || ORDER[$i]=${ORDER[$i]}_ftseed$FT_SEED; done
fi

log() { echo "[$(date +%H:%M:%S)] $*"; }
# Runs a command, keeping its exact text (shell-quoted) next to its log.
run_logged() {
  local logfile=$1; shift
  printf '%q ' "$@" >> "${logfile%.log}.cmd"; echo >> "${logfile%.log}.cmd"
  "$@" > "$logfile" 2>&1 || { tail -30 "$logfile" >&2; die "failed: $* (log: $logfile)"; }
}

# Decodes one checkpoint greedy and beam 5, checks the hypothesis count, scores with sacreBLEU.
evaluate() {
  local dir=$1 ckpt=$2 name=$3 n beam decode
  n=$(wc -l < "$DATA/raw/test.de")
  for decode in greedy beam5; do
    [ -s "$dir/bleu_$decode.txt" ] && continue
    beam=1; [ $decode = beam5 ] && beam=5
    run_logged "$dir/generate_$decode.log" fairseq-generate "$DATA/bin" --path "$ckpt" --beam $beam "${GEN[@]}"
    "$PY" "$HELPERS/tools.py" hyps --expected "$n" "$dir/generate_$decode.log" "$dir/test.$decode.hyp"
    "$PY" "$HELPERS/tools.py" bleu --name "$name/$decode" "$dir/test.$decode.hyp" "$DATA/raw/test.de" > "$dir/bleu_$decode.txt.tmp"
    mv "$dir/bleu_$decode.txt.tmp" "$dir/bleu_$decode.txt"
    log "$(cat "$dir/bleu_$decode.txt")"
  done
}

# One job of the grid: base = its evaluation; otherwise fine-tune from the base, then evaluate.
job() {
  local name=$1
  local dir=$RUN_DIR/$name
  mkdir -p "$dir"
  if [ "$name" = base ]; then
    evaluate "$RUN_DIR/base" "$RUN_DIR/base/checkpoint_last.pt" base
    return
  fi
  if [ ! -s "$dir/checkpoint_last.pt" ] || ! grep -q "done training" "$dir/train.log" 2>/dev/null; then
    log "fine-tune $name (${CONFIGS[${name%_ftseed*}]}, seed $FT_SEED), $FT_EPOCHS epochs at lr $(cat "$RUN_DIR/base/final_lr")"
    rm -f "$dir/train.cmd"
    # shellcheck disable=SC2206
    local crit=(${CONFIGS[${name%_ftseed*}]})
    run_logged "$dir/train.log" fairseq-train "$DATA/bin" --save-dir "$dir" "${MODEL[@]}" "${REG[@]}" "${BATCH[@]}" "${COMMON[@]}" \
      "${crit[@]}" \
      --restore-file "$RUN_DIR/base/checkpoint_last.pt" --reset-optimizer --reset-dataloader --reset-meters --reset-lr-scheduler \
      --optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0 \
      --lr "$(cat "$RUN_DIR/base/final_lr")" --lr-scheduler fixed --warmup-updates 20 \
      --max-epoch "$FT_EPOCHS" --seed "$FT_SEED"
  fi
  evaluate "$dir" "$dir/checkpoint_last.pt" "$name"
}

main() {
if [ "${1:-}" = --job ]; then
  RUN_DIR=$2; DATA=$RUN_DIR/data
  job "$3"
  return
fi

[ $# -ge 1 ] || { sed -n 4,8p "$0"; exit 2; }
DATA_SRC=$1
RUN_DIR=$(mkdir -p "${2:-$REPO_DIR/bench/runs/quality_multi30k}" && cd "${2:-$REPO_DIR/bench/runs/quality_multi30k}" && pwd)
DATA=$RUN_DIR/data
log "run dir $RUN_DIR (seed $SEED, base $BASE_EPOCHS epochs, fine-tunes $FT_EPOCHS epochs, $PARALLEL at a time)"

if [ ! -s "$DATA/pair.env" ]; then
  log "prepare: recipes/multi30k/prepare.sh $DATA_SRC $DATA"
  bash "$REPO_DIR/recipes/multi30k/prepare.sh" "$DATA_SRC" "$DATA"
fi

mkdir -p "$RUN_DIR/base"
if ! grep -q "done training" "$RUN_DIR/base/train.log" 2>/dev/null; then
  log "base: teacher-forced, $BASE_EPOCHS epochs"
  rm -f "$RUN_DIR/base/train.cmd"
  run_logged "$RUN_DIR/base/train.log" fairseq-train "$DATA/bin" --save-dir "$RUN_DIR/base" \
    "${MODEL[@]}" "${REG[@]}" "${BATCH[@]}" "${COMMON[@]}" "${BASE_OPT[@]}" \
    --criterion label_smoothed_cross_entropy --max-epoch "$BASE_EPOCHS"
fi
# The fine-tunes continue at the learning rate the base ended with.
grep -E '\| train \| epoch' "$RUN_DIR/base/train.log" | tail -1 | sed -E 's/.*\| lr ([0-9.e-]+) .*/\1/' > "$RUN_DIR/base/final_lr"
[ -s "$RUN_DIR/base/final_lr" ] || die "could not read the base's final lr from $RUN_DIR/base/train.log"
log "base done; final lr $(cat "$RUN_DIR/base/final_lr")"

log "grid: ${ORDER[*]}"
# A failed job leaves its row empty; the table is still written from what finished.
printf '%s\n' "${ORDER[@]}" | xargs -P "$PARALLEL" -I{} bash "$0" --job "$RUN_DIR" {} || log "some jobs failed: see their logs under $RUN_DIR"

mkdir -p "$RESULTS"
"$PY" "$BENCH_DIR/quality_table.py" --run-dir "$RUN_DIR" --seed "$SEED" --configs "$TABLE_CONFIGS" \
  --md "$RESULTS/$RESULTS_NAME.md" --log "$RESULTS/$RESULTS_NAME.log"
log "table: $RESULTS/$RESULTS_NAME.md"
}

# The whole body is one function, so bash has read all of it before it runs: editing this file
# while a long run is under way cannot change what that run does.
main "$@"; exit
