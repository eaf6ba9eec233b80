#!/usr/bin/env bash
# Quality benchmark, CPU-sized: the trends of FlowSeq's Tables 1 and 2 (Ma et al. 2019) in miniature
# on Multi30k en->de and de->en.  Per direction: an autoregressive transformer (the baseline and the
# teacher), its distillation of the training set, FlowSeq and fairseq's vanilla
# nonautoregressive_transformer each on raw and on distilled data; FlowSeq decoded argmax, IWD and
# NPD (rescored by the autoregressive model), the NAT in one parallel pass, the transformer with
# beam 5 and greedy; sacreBLEU on test_2016_flickr.
#
# Usage: bench/quality_flowseq_multi30k.sh MULTI30K_DIR [RUN_DIR]   (RUN_DIR default: bench/runs/quality_flowseq_multi30k)
#        bench/quality_flowseq_multi30k.sh --measure MULTI30K_DIR [RUN_DIR]
#   MULTI30K_DIR: the raw release files (train/val/test_2016_flickr.{en,de}); read, never copied whole.
#   --measure: one epoch of each model on a MEASURE_LINES-sentence slice (default 2000), CPU time
#              (user + system) per epoch scaled to TRAIN_LINES, and the decoding CPU time per test
#              sentence -> RUN_DIR/measure/measure.txt; trains nothing else.
# Env (sizes and lengths; the defaults are what bench/README.md costs):
#   DIRECTIONS ("en-de de-en"), TRAIN_LINES (29000 = all), TEST_LINES (1000 = all),
#   AR_EPOCHS (10), FLOWSEQ_EPOCHS (30), NAT_EPOCHS (30), FLOWSEQ_INIT (1500 updates of autoencoder
#   pre-training), FLOWSEQ_KL_WARMUP (750), DISTILL_BEAM (5), FLOWSEQ_DECODES ("argmax iwd15 npd15"),
#   FLOWSEQ_LENGTHS (3), FLOWSEQ_TAU (0.3), SEED (1), JOBS (2: the two directions side by side),
#   BENCH_METHODS (flowseq = all five: distill flowseq_raw flowseq_kd nat_raw nat_kd; e.g.
#   flowseq_raw,nat_raw skips the distillation).
#
# Design (why): two shared CPU cores.  Every model is small (2-3 layers, 256 wide; FlowSeq's prior has
# [4, 4, 2] flow steps instead of [48, 48, 16]) and trains a fixed number of epochs; the
# autoregressive model is trained first, because it is the teacher of the distillation and the NPD
# rescorer.  All stages are those of recipes/common/{stages,flowseq,distill}.sh (this script is a
# recipe run.sh with its own sizes), so the benchmark also exercises the recipe code.
# Re-running resumes: finished trainings continue from checkpoint_last.pt (no further epochs) and
# the distillation is reused.  Results: bench/results/quality_flowseq_multi30k.{md,log}
# (bench/flowseq_quality_table.py).
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} PYTHONWARNINGS=ignore
export DEVICE=${DEVICE:-cpu}

TRAIN_LINES=${TRAIN_LINES:-29000}
TEST_LINES=${TEST_LINES:-1000}
export AR_EPOCHS=${AR_EPOCHS:-10} FLOWSEQ_EPOCHS=${FLOWSEQ_EPOCHS:-30} NAT_EPOCHS=${NAT_EPOCHS:-30}
export FLOWSEQ_INIT=${FLOWSEQ_INIT:-1500} FLOWSEQ_KL_WARMUP=${FLOWSEQ_KL_WARMUP:-750}
export DISTILL_BEAM=${DISTILL_BEAM:-5} FLOWSEQ_DECODES=${FLOWSEQ_DECODES:-argmax iwd15 npd15}
export FLOWSEQ_LENGTHS=${FLOWSEQ_LENGTHS:-3} FLOWSEQ_TAU=${FLOWSEQ_TAU:-0.3}
DIRECTIONS=${DIRECTIONS:-en-de de-en}
JOBS=${JOBS:-2}
MEASURE_LINES=${MEASURE_LINES:-2000}

# The models (a recipe's flag groups, recipes/common/stages.sh and flowseq.sh); also used by --measure.
define_models() {
  # -- the autoregressive transformer: 2+2 layers, 256 wide (bench/quality_multi30k.sh's model)
  MODEL=(--arch transformer --share-all-embeddings
         --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 256 --decoder-embed-dim 256
         --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512
         --encoder-attention-heads 4 --decoder-attention-heads 4)
  REG=(--dropout 0.3 --weight-decay 0.0001 --label-smoothing 0.1)
  OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0
         --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 250 --warmup-init-lr 1e-7)
  BATCH=(--max-tokens 4096 --num-workers 0 --log-interval 50)
  LENGTH=(--max-epoch "$AR_EPOCHS")
  GEN=(--max-len-a 1.2 --max-len-b 10)
  # -- FlowSeq: encoder 3, posterior and decoder 2 layers, 256 wide, latent 256, 4 heads; a 3-scale
  #    prior of [4, 4, 2] steps with 256-wide coupling layers; the paper's optimiser
  FLOWSEQ_MODEL=(--arch flowseq --share-all-embeddings --encoder-layers 3 --decoder-layers 2 --flowseq-posterior-layers 2
                 --encoder-embed-dim 256 --flowseq-latent-dim 256 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512
                 --encoder-attention-heads 4 --decoder-attention-heads 4 --flowseq-prior-heads 4
                 --flowseq-prior-steps 4,4,2 --flowseq-prior-hidden 256 --flowseq-length-range 16)
  FLOWSEQ_REG=(--dropout 0.2 --weight-decay 0.0 --label-smoothing 0.1)
  FLOWSEQ_OPTIM=(--optimizer adam --adam-betas '(0.9,0.999)' --adam-eps 1e-6 --clip-norm 1.0
                 --lr 5e-4 --lr-scheduler step --lr-deacy-period 1 --lr-decay 0.99995)
  FLOWSEQ_BATCH=(--max-tokens 4096 --num-workers 0 --log-interval 50)
  FLOWSEQ_LENGTH=(--max-epoch "$FLOWSEQ_EPOCHS")
  # -- fairseq's NAT: the transformer's size, fairseq's NAT example flags
  NAT_MODEL=(--arch nonautoregressive_transformer --share-all-embeddings
             --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 256 --decoder-embed-dim 256
             --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512
             --encoder-attention-heads 4 --decoder-attention-heads 4)
  NAT_REG=(--dropout 0.3 --weight-decay 0.01 --label-smoothing 0.1)
  NAT_OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0
             --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 500 --warmup-init-lr 1e-7)
  NAT_BATCH=(--max-tokens 4096 --num-workers 0 --log-interval 50)
  NAT_LENGTH=(--max-epoch "$NAT_EPOCHS")
}

log() { echo "[$(date +%H:%M:%S)] $*"; }

# RUN_DIR/raw_SRC_TGT: the first TRAIN_LINES training pairs, the validation set, TEST_LINES test pairs
slice_data() {
  local src_dir=$1 out=$2 n_train=$3 n_test=$4 n_val=${5:-100000} lang
  mkdir -p "$out"
  for lang in en de; do
    head -n "$n_train" "$src_dir/train.$lang" > "$out/train.$lang"
    head -n "$n_val" "$src_dir/val.$lang" > "$out/val.$lang"
    head -n "$n_test" "$src_dir/test_2016_flickr.$lang" > "$out/test_2016_flickr.$lang"
  done
}

# A label for one fairseq command's line in EXP/timing.txt: "train MODEL" or "generate MODEL SUBSET DECODING".
timing_label() {
  local kind=$1 save= path= subset=test dec= beam=5 iter= l=1 r=1; shift
  while [ $# -gt 0 ]; do
    case $1 in
      --save-dir) save=$2 ;; --path) path=$2 ;; --gen-subset) subset=$2 ;; --flowseq-decoding) dec=$2 ;;
      --beam) beam=$2 ;; --iter-decode-max-iter) iter=$2 ;; --flowseq-length-candidates) l=$2 ;; --flowseq-samples) r=$2 ;;
    esac
    shift
  done
  if [ "$kind" = train ]; then echo "train $(basename "$save")"; return; fi
  if [ -n "$dec" ] && [ "$dec" != argmax ]; then dec=$dec$((l * r)); elif [ -n "$iter" ]; then dec=nat; elif [ -z "$dec" ]; then dec=beam$beam; fi
  echo "generate $(basename "$(dirname "$path")") $subset $dec"
}

# Every fairseq-train / fairseq-generate of the stages runs under /usr/bin/time: "LABEL user sys wall"
# lines in $TIMING_LOG (CPU seconds: what two shared cores make scarce).
time_fairseq_commands() {
  local tool bin
  for tool in train generate; do
    if type -P "fairseq-$tool" > /dev/null; then printf -v bin '%q' "$(type -P "fairseq-$tool")"
    else printf -v bin '%q -m fairseq_cli.%s' "$PY" "$tool"; fi
    eval "fairseq-$tool() { /usr/bin/time -f \"\$(timing_label $tool \"\$@\") %U %S %e\" -a -o \"\$TIMING_LOG\" $bin \"\$@\"; }"
  done
}

# --recipe DATA EXP: one direction, the stages of the recipes (what a run.sh does)
recipe() {
  source "$REPO_DIR/recipes/common/lib.sh"
  source "$REPO_DIR/recipes/common/stages.sh"
  parse_run_args "$1" "$2" --methods "${BENCH_METHODS:-flowseq}" "${@:3}"
  TIMING_LOG=$EXP_DIR/timing.txt
  time_fairseq_commands
  define_models
  source "$REPO_DIR/recipes/common/flowseq.sh"
  flowseq_setup
  run_stages
}

# --measure: CPU seconds of one epoch of each model on a slice, and of decoding its test sentences
measure() {
  local src_dir=$1 run_dir=$2
  source "$REPO_DIR/recipes/common/lib.sh"
  local m=$run_dir/measure
  mkdir -p "$m"
  if [ ! -s "$m/data/pair.env" ]; then
    slice_data "$src_dir" "$m/raw" "$MEASURE_LINES" 200 200
    bash "$REPO_DIR/recipes/multi30k/prepare.sh" "$m/raw" "$m/data" > "$m/prepare.log" 2>&1 \
      || { tail -20 "$m/prepare.log"; die "prepare failed: $m/prepare.log"; }
  fi
  rm -rf "$m/exp"
  log "measuring: one epoch of each model on $MEASURE_LINES sentences, then every decoding of 200 test sentences (log: $m/run.log)"
  # the schedule starts the prior after 8 updates, so that the epoch runs the full ELBO most of the time
  AR_EPOCHS=1 FLOWSEQ_EPOCHS=1 NAT_EPOCHS=1 FLOWSEQ_INIT=8 FLOWSEQ_KL_WARMUP=8 \
    bash "$0" --recipe "$m/data" "$m/exp" > "$m/run.log" 2>&1 || { tail -30 "$m/run.log"; die "the measuring run failed: $m/run.log"; }
  # the same trainings again: each resumes its finished checkpoint and stops, i.e. its start-up cost
  AR_EPOCHS=1 FLOWSEQ_EPOCHS=1 NAT_EPOCHS=1 FLOWSEQ_INIT=8 FLOWSEQ_KL_WARMUP=8 \
    bash "$0" --recipe "$m/data" "$m/exp" --stage 1 --stop-stage 2 >> "$m/run.log" 2>&1 || die "the start-up run failed: $m/run.log"
  "$PY" "$BENCH_DIR/flowseq_quality_table.py" --measure "$m" --scale-to "$TRAIN_LINES" --test-lines "$TEST_LINES" \
    --epochs "AR=$AR_EPOCHS,FLOWSEQ=$FLOWSEQ_EPOCHS,NAT=$NAT_EPOCHS" --decodes "$FLOWSEQ_DECODES" | tee "$m/measure.txt"
}

main() {
  if [ "${1:-}" = --recipe ]; then shift; recipe "$@"; return; fi
  if [ "${1:-}" = --measure ]; then
    shift; [ $# -ge 1 ] || { sed -n 9,14p "$0"; exit 2; }
    measure "$1" "$(mkdir -p "${2:-$REPO_DIR/bench/runs/quality_flowseq_multi30k}" && cd "${2:-$REPO_DIR/bench/runs/quality_flowseq_multi30k}" && pwd)"
    return
  fi
  [ $# -ge 1 ] || { sed -n 9,14p "$0"; exit 2; }
  source "$REPO_DIR/recipes/common/lib.sh"
  local src_dir=$1 run_dir
  run_dir=$(mkdir -p "${2:-$REPO_DIR/bench/runs/quality_flowseq_multi30k}" && cd "${2:-$REPO_DIR/bench/runs/quality_flowseq_multi30k}" && pwd)
  log "run dir $run_dir: $DIRECTIONS; train $TRAIN_LINES pairs, test $TEST_LINES; epochs AR $AR_EPOCHS, FlowSeq $FLOWSEQ_EPOCHS (pre-training $FLOWSEQ_INIT updates, KL warm-up $FLOWSEQ_KL_WARMUP), NAT $NAT_EPOCHS"
  local d
  [ -s "$run_dir/raw/train.en" ] || slice_data "$src_dir" "$run_dir/raw" "$TRAIN_LINES" "$TEST_LINES"
  for d in $DIRECTIONS; do
    local src=${d%-*} tgt=${d#*-}
    if [ ! -s "$run_dir/$d/data/pair.env" ]; then
      log "prepare $d"
      bash "$REPO_DIR/recipes/multi30k/prepare.sh" "$run_dir/raw" "$run_dir/$d/data" --src "$src" --tgt "$tgt" > "$run_dir/$d.prepare.log" 2>&1 \
        || { tail -20 "$run_dir/$d.prepare.log"; die "prepare $d failed"; }
    fi
  done
  log "training and decoding, $JOBS direction(s) at a time (logs: $run_dir/<direction>/exp/run.log)"
  # shellcheck disable=SC2086
  printf '%s\n' $DIRECTIONS | xargs -P "$JOBS" -I{} bash -c \
    '/usr/bin/time -f "%U %S %e" -o "$1/$2/time.txt" bash "$0" --recipe "$1/$2/data" "$1/$2/exp" > "$1/$2.run.log" 2>&1 || echo "FAILED: $2 (log: $1/$2.run.log)"' \
    "$0" "$run_dir" {}
  mkdir -p "$REPO_DIR/bench/results"
  "$PY" "$BENCH_DIR/flowseq_quality_table.py" --run-dir "$run_dir" --directions "$DIRECTIONS" \
    --md "$REPO_DIR/bench/results/quality_flowseq_multi30k.md" --log "$REPO_DIR/bench/results/quality_flowseq_multi30k.log"
  log "table: bench/results/quality_flowseq_multi30k.md"
}

# The whole body is one function, so bash has read all of it before it runs: editing this file
# while a long run is under way cannot change what that run does.
main "$@"; exit
