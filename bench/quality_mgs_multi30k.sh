#!/usr/bin/env bash
# Quality benchmark, CPU-sized: a miniature of Table 4 of Welleck and Cho, "MLE-Guided Parameter Search for
# Task Loss Minimization in Neural Sequence Modeling" (AAAI 2021, section 5.2: fine-tuning a converged MLE
# translation model with MGS) on Multi30k en->de instead of IWSLT'14 de->en:
#   1. recipes/multi30k/prepare.sh (joint sentencepiece, 8000 pieces) into BASE_DIR/data;
#   2. the MLE base: a 3+3-layer, 256-wide transformer (recipes/multi30k/run.sh's size), BASE_EPOCHS epochs,
#      label-smoothed cross-entropy; trained once into BASE_DIR and reused (by later benchmarks too);
#   3. FT_UPDATES updates from the base's last checkpoint with each of: MLE continued (the same criterion),
#      MGS-SBLEU (--mgs-task-loss bleu), MGS-EDIT (--mgs-task-loss edit), MRT (bleu cost, beam candidates);
#      the same optimizer, learning rate and data order for every method;
#   4. every model decoded on test_2016_flickr (all 1000 sentences, --required-batch-size-multiple 1, every
#      sentence checked for a hypothesis) with beam 5 (corpus BLEU) and greedily (SBLEU, EDIT, as the paper:
#      "computed with greedy decoding to match the training conditions");
#   5. bench/mgs_translation_table.py: the table (RUN_DIR/table.md) and the plots (RUN_DIR/fig_training.png) of the
#      training task loss (Figure 1's quantity) and of the weight statistics (Figures 2, 3 and 7).
#
# Usage: bench/quality_mgs_multi30k.sh [--base-only] MULTI30K_DIR [RUN_DIR]
#   MULTI30K_DIR: the raw release files (train/val/test_2016_flickr.{en,de}); RUN_DIR default:
#   bench/runs/quality_mgs_multi30k (git-ignored).  --base-only: steps 1-2 and the base's evaluation.
# Env: BASE_DIR (bench/runs/multi30k_mle_base), BASE_EPOCHS (10), FT_UPDATES (100), FT_MAX_TOKENS (2048),
#   FT_LR (the base's final learning rate), MGS_ALPHA (100, the paper's for MT fine-tuning), MGS_NOISE (1.0),
#   FT_METHODS ("mle_cont mgs_sbleu mgs_edit mrt"; also mgs_sbleu_noise01: MGS_NOISE 0.1), PARALLEL (2 fine-tunes at once), SEED (1).
# Re-running skips finished steps (a base trained for at least BASE_EPOCHS epochs: BASE_DIR/epochs_trained; a
# larger BASE_EPOCHS resumes its training and redoes its decodings; a fine-tune whose log says "done training";
# a decoding whose hypotheses exist).  Logs are appended to, never replaced; a fine-tune of an older base is
# refused (use another RUN_DIR).
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
source "$REPO_DIR/recipes/common/lib.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} PYTHONWARNINGS=ignore

SEED=${SEED:-1}
BASE_EPOCHS=${BASE_EPOCHS:-10}
FT_UPDATES=${FT_UPDATES:-100}
FT_MAX_TOKENS=${FT_MAX_TOKENS:-2048}
MGS_ALPHA=${MGS_ALPHA:-100}
MGS_NOISE=${MGS_NOISE:-1.0}
PARALLEL=${PARALLEL:-2}
read -r -a FT_METHODS <<< "${FT_METHODS:-mle_cont mgs_sbleu mgs_edit mrt}"
HELPERS=$REPO_DIR/recipes/common

# -- the model: recipes/multi30k/run.sh's transformer
MODEL=(--arch transformer --share-all-embeddings
       --encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 256 --decoder-embed-dim 256
       --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024
       --encoder-attention-heads 4 --decoder-attention-heads 4)
REG=(--dropout 0.3 --attention-dropout 0.1 --weight-decay 0.0001)
# -- the base: lr 1e-3 with a short warm-up, because 10 epochs are only ~1300 updates
BASE_OPT=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0
          --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 500 --warmup-init-lr 1e-7)
COMMON=(--cpu --seed "$SEED" --num-workers 0 --no-progress-bar --log-format simple
        --no-epoch-checkpoints --user-dir "$USER_DIR")
GEN=(--cpu --gen-subset test --batch-size 128 --required-batch-size-multiple 1 --num-workers 0
     --max-len-a 1.2 --max-len-b 10 --post-process sentencepiece --user-dir "$USER_DIR")
# -- fine-tuning: a constant learning rate (the base's last), fresh Adam, the same batches for every method.
#    Sequence-level criteria decode with the training batch's model in eval mode (dropout off) and score
#    detokenised text (--*-post-process sentencepiece), as the evaluation does.
declare -A METHOD
METHOD[mle_cont]="--criterion label_smoothed_cross_entropy --label-smoothing 0.1"
METHOD[mgs_sbleu]="--criterion mgs --mgs-task-loss bleu --mgs-num-candidates 4 --mgs-alpha $MGS_ALPHA --mgs-noise $MGS_NOISE --mgs-post-process sentencepiece --mgs-sacrebleu-tokenize 13a"
METHOD[mgs_edit]="--criterion mgs --mgs-task-loss edit --mgs-num-candidates 4 --mgs-alpha $MGS_ALPHA --mgs-noise $MGS_NOISE --mgs-post-process sentencepiece --mgs-sacrebleu-tokenize 13a"
# the paper's noise grid is {0.01, 0.1, 1.0}: a smaller noise level for SBLEU (FT_METHODS="... mgs_sbleu_noise01")
METHOD[mgs_sbleu_noise01]="--criterion mgs --mgs-task-loss bleu --mgs-num-candidates 4 --mgs-alpha $MGS_ALPHA --mgs-noise 0.1 --mgs-post-process sentencepiece --mgs-sacrebleu-tokenize 13a"
METHOD[mrt]="--criterion mrt --mrt-task-loss bleu --mrt-candidates beam --mrt-num-candidates 4 --mrt-mle-weight 0.1 --mrt-post-process sentencepiece --mrt-sacrebleu-tokenize 13a"

log() { echo "[$(date +%H:%M:%S)] $*"; }
# timed LOG CMD...: runs CMD, appending its output to LOG and its shell-quoted text to LOG's .cmd, and
# "<dir name> user_s system_s wall_s" of CMD to the run's timing.txt
timed() {
  local logfile=$1; shift
  { printf '%q ' "$@"; echo; } >> "${logfile%.log}.cmd"
  /usr/bin/time -f "$(basename "$(dirname "$logfile")")/$(basename "$logfile" .log) %U %S %e" -a -o "$TIMING" \
    "$@" >> "$logfile" 2>&1 || { tail -30 "$logfile" >&2; die "failed: $* (log: $logfile)"; }
}

# decode DIR CKPT: DIR/test.{greedy,beam5}.hyp, every test sentence accounted for
decode() {
  local dir=$1 ckpt=$2 n beam decoding
  n=$(wc -l < "$DATA/raw/test.de")
  for decoding in greedy beam5; do
    [ -s "$dir/test.$decoding.hyp" ] && continue
    beam=1; [ $decoding = beam5 ] && beam=5
    rm -f "$dir/generate_$decoding.log"  # a fresh decoding: an interrupted one's lines would count twice
    timed "$dir/generate_$decoding.log" fairseq-generate "$DATA/bin" --path "$ckpt" --beam $beam "${GEN[@]}"
    "$PY" "$HELPERS/tools.py" hyps --expected "$n" "$dir/generate_$decoding.log" "$dir/test.$decoding.hyp.partial"
    mv "$dir/test.$decoding.hyp.partial" "$dir/test.$decoding.hyp"
  done
}

# fine_tune NAME: FT_UPDATES updates from the base with METHOD[NAME], then its decodings
fine_tune() {
  local name=$1 dir=$RUN_DIR/$1 base_epochs
  base_epochs=$(cat "$BASE_DIR/epochs_trained")
  mkdir -p "$dir"
  if [ -s "$dir/base_epochs" ] && [ "$(cat "$dir/base_epochs")" != "$base_epochs" ]; then
    die "$dir was fine-tuned from the base at $(cat "$dir/base_epochs") epochs, the base now has $base_epochs: give another RUN_DIR"
  fi
  if ! grep -q "done training" "$dir/train.log" 2>/dev/null; then
    log "fine-tune $name: $FT_UPDATES updates at lr $FT_LR"
    # shellcheck disable=SC2206
    local crit=(${METHOD[$name]})
    timed "$dir/train.log" fairseq-train "$DATA/bin" --save-dir "$dir" "${MODEL[@]}" "${REG[@]}" "${COMMON[@]}" \
      "${crit[@]}" --max-tokens "$FT_MAX_TOKENS" --required-batch-size-multiple 8 --log-interval 5 \
      --restore-file "$BASE_DIR/checkpoint_last.pt" --reset-optimizer --reset-dataloader --reset-meters \
      --reset-lr-scheduler --optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0 --lr "$FT_LR" \
      --lr-scheduler fixed --max-update "$FT_UPDATES" --disable-validation
    grep -q "Loaded checkpoint $BASE_DIR/checkpoint_last.pt" "$dir/train.log" \
      || die "$name did not start from $BASE_DIR/checkpoint_last.pt"
    echo "$base_epochs" > "$dir/base_epochs"
  fi
  decode "$dir" "$dir/checkpoint_last.pt"
  log "$name decoded"
}

main() {
  local base_only=0
  if [ "${1:-}" = --job ]; then  # one fine-tune (PARALLEL of them run at once)
    RUN_DIR=$2 BASE_DIR=$3 DATA=$3/data FT_LR=$4 TIMING=$2/timing.txt
    fine_tune "$5"
    return
  fi
  if [ "${1:-}" = --base-only ]; then base_only=1; shift; fi
  [ $# -ge 1 ] || { sed -n 18,24p "$0"; exit 2; }
  local src=$1
  RUN_DIR=$(mkdir -p "${2:-$REPO_DIR/bench/runs/quality_mgs_multi30k}" && cd "${2:-$REPO_DIR/bench/runs/quality_mgs_multi30k}" && pwd)
  BASE_DIR=$(mkdir -p "${BASE_DIR:-$REPO_DIR/bench/runs/multi30k_mle_base}" && cd "${BASE_DIR:-$REPO_DIR/bench/runs/multi30k_mle_base}" && pwd)
  DATA=$BASE_DIR/data
  log "run dir $RUN_DIR, base $BASE_DIR ($BASE_EPOCHS epochs); fine-tunes: ${FT_METHODS[*]}, $FT_UPDATES updates of" \
    "$FT_MAX_TOKENS tokens; MGS alpha $MGS_ALPHA, noise $MGS_NOISE"

  # -- 1-2. data and the MLE base (cached)
  if [ ! -s "$DATA/pair.env" ]; then
    log "1. prepare: recipes/multi30k/prepare.sh $src $DATA"
    bash "$REPO_DIR/recipes/multi30k/prepare.sh" "$src" "$DATA" > "$BASE_DIR/prepare.log" 2>&1
  fi
  TIMING=$BASE_DIR/timing.txt
  if [ "$(cat "$BASE_DIR/epochs_trained" 2> /dev/null || echo 0)" -lt "$BASE_EPOCHS" ]; then
    log "2. MLE base: $BASE_EPOCHS epochs (resumes BASE_DIR/checkpoint_last.pt when there is one)"
    timed "$BASE_DIR/train.log" fairseq-train "$DATA/bin" --save-dir "$BASE_DIR" "${MODEL[@]}" "${REG[@]}" \
      "${COMMON[@]}" "${BASE_OPT[@]}" --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
      --max-tokens 4096 --log-interval 50 --max-epoch "$BASE_EPOCHS"
    echo "$BASE_EPOCHS" > "$BASE_DIR/epochs_trained"
    rm -f "$BASE_DIR"/test.*.hyp  # the decodings of the shorter-trained base
  fi
  decode "$BASE_DIR" "$BASE_DIR/checkpoint_last.pt"
  [ "$base_only" = 1 ] && { log "base decoded: $BASE_DIR/test.{greedy,beam5}.hyp"; return; }

  # -- 3-4. fine-tunes at the base's last learning rate
  local lr
  lr=${FT_LR:-$(grep -E '\| train \| epoch' "$BASE_DIR/train.log" | tail -1 | sed -E 's/.*\| lr ([0-9.e-]+) .*/\1/')}
  [ -n "$lr" ] || die "could not read the base's final lr from $BASE_DIR/train.log"
  printf '%s\n' "${FT_METHODS[@]}" | xargs -P "$PARALLEL" -I{} bash "$0" --job "$RUN_DIR" "$BASE_DIR" "$lr" {}

  # -- 5. the table and the plots
  "$PY" "$BENCH_DIR/mgs_translation_table.py" --base-dir "$BASE_DIR" --run-dir "$RUN_DIR" \
    --methods "$(IFS=,; echo "${FT_METHODS[*]}")" --reference "$DATA/raw/test.de" \
    --out "$RUN_DIR/table.md" --figures "$RUN_DIR/fig"
  log "done: $RUN_DIR/table.md, $RUN_DIR/fig_training.png"
}

# The whole body is one function, so bash has read all of it before it runs: editing this file while a
# long run is under way cannot change what that run does.
main "$@"; exit
