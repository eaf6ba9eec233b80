#!/usr/bin/env bash
# Quality benchmark, CPU-sized: Metropolis-Hastings over a conditional masked LM (Goyal's thesis,
# "Characterizing and Overcoming the Limitations of Neural Autoregressive Models", CMU 2021, chapter 6)
# in miniature on Multi30k en->de.  fairseq's cmlm_transformer is trained here (--task translation_lev
# --noise random_mask --criterion nat_loss) and decodes a length-limited subset of test_2016_flickr
# (sources of at most MAX_SRC_WORDS words, the thesis's "De-En (20)" restriction, section 6.5) with
#   the warm start (one parallel greedy pass), degenerate Gibbs at proposal temperature 1 and 0.8,
#   mask-predict (length beam 1, 10 iterations), MH with E_raw and E_local: plain, block (annealed
#   block size), annealed target temperature (step 0.02, proposal temperature 0.8, 2 forced epochs)
# -> sacreBLEU, mean E_local, acceptance and novel-transition rates (chain-weighted, from the chain
# statistics files), the rows of the thesis's Tables 6.2, 6.4, 6.5 and 6.6, and the curves of its
# Figures 6.2-6.4 (bench/plot_mh_stats.py; matplotlib, the package's optional [plot] extra, is
# installed when missing unless PLOT_INSTALL=0).
#
# Usage: bench/quality_mh_multi30k.sh [--smoke] MULTI30K_DIR [RUN_DIR]   (RUN_DIR default: bench/runs/quality_mh_multi30k)
#   MULTI30K_DIR: the raw release files (train/val/test_2016_flickr.{en,de}); read, never copied whole.
#   --smoke: a pipeline check in a few minutes (300 training pairs, 8 test sentences, a 1+1-layer
#            32-wide CMLM for one epoch, chains of 2 x (1 + 1) epochs); the BLEU is meaningless.
# Env (sizes; the defaults aim at ~40 min of two shared CPU cores, see bench/README.md):
#   TRAIN_LINES (29000 = all), MAX_SRC_WORDS (20), TEST_LINES (30: the first N test sentences within
#   the limit), CMLM_EPOCHS (6), BENCH_METHODS (cmlm_raw; `mh` adds the autoregressive teacher, the
#   distillation and cmlm_kd: Table 6.6's AR row and the thesis's distilled setting), AR_EPOCHS (10,
#   with BENCH_METHODS=mh), MH_CHAINS (2), MH_BURN_IN (2), MH_EPOCHS (3), MH_BLOCK_SIZE (3),
#   MH_DECODES (the rows above; add e.g. mh_local_t05 gibbs_t05 for more of Table 6.2, gibbs_block for
#   Table 6.4's Deg column, mh_raw_anneal04_t08 mh_raw_anneal06_t08 for Table 6.5), SEED (1),
#   OMP_NUM_THREADS (2).
#
# Design (why): every stage is recipes/common/{stages,mh,distill}.sh (this script is a recipe run.sh with
# its own sizes), so the benchmark exercises the recipe code.  The CMLM is the size of
# bench/quality_flowseq_multi30k.sh's NAT (2+2 layers, 256 wide; ~200 CPU s per epoch).  The samplers
# cost O(T^2) decoder passes per sentence and epoch (thesis 6.4), hence the short test subset and
# chains.  Re-running resumes (finished trainings continue from checkpoint_last.pt with nothing left to
# do); the decodings are redone.  Results: bench/results/quality_mh_multi30k.{md,log} (the smoke run
# writes RUN_DIR/table.md only), figures RUN_DIR/figures_<model>/fig6_{2,3,4}.png.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${MKL_NUM_THREADS:-2} PYTHONWARNINGS=ignore
export DEVICE=${DEVICE:-cpu}

SMOKE=0
if [ "${1:-}" = --smoke ]; then SMOKE=1; shift; fi
if [ "$SMOKE" = 1 ]; then
  TRAIN_LINES=${TRAIN_LINES:-300}; TEST_LINES=${TEST_LINES:-8}
fi
TRAIN_LINES=${TRAIN_LINES:-29000}
TEST_LINES=${TEST_LINES:-30}
MAX_SRC_WORDS=${MAX_SRC_WORDS:-20}
export CMLM_EPOCHS=${CMLM_EPOCHS:-6} AR_EPOCHS=${AR_EPOCHS:-10}
export MH_DECODES=${MH_DECODES:-warm maskpredict gibbs gibbs_t08 mh_raw mh_local mh_raw_block mh_local_block mh_raw_anneal02_t08 mh_local_anneal02_t08}
if [ "$SMOKE" != 1 ]; then
  export MH_CHAINS=${MH_CHAINS:-2} MH_BURN_IN=${MH_BURN_IN:-2} MH_EPOCHS=${MH_EPOCHS:-3} MH_BLOCK_SIZE=${MH_BLOCK_SIZE:-3}
fi
BENCH_METHODS=${BENCH_METHODS:-cmlm_raw}

# The models (a recipe's flag groups; recipes/common/stages.sh and mh.sh)
define_models() {
  # -- the autoregressive transformer (only with BENCH_METHODS=mh: the teacher and Table 6.6's AR row)
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
  # -- the CMLM: the transformer's size, fairseq's NAT example flags (mh.sh adds learned positions,
  #    the length offset, BERT init), lr 1e-3 with 500 warm-up updates for the short run
  CMLM_MODEL=(--arch cmlm_transformer --share-all-embeddings
              --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 256 --decoder-embed-dim 256
              --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512
              --encoder-attention-heads 4 --decoder-attention-heads 4)
  CMLM_REG=(--dropout 0.3 --weight-decay 0.01 --label-smoothing 0.1)
  CMLM_OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0
              --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 500 --warmup-init-lr 1e-7)
  CMLM_BATCH=(--max-tokens 4096 --num-workers 0 --log-interval 50)
  CMLM_LENGTH=(--max-epoch "$CMLM_EPOCHS")
}

log() { echo "[$(date +%H:%M:%S)] $*"; }

# Every fairseq-train / fairseq-generate runs under /usr/bin/time: "train MODEL" or "generate MODEL
# DECODING" with user, system and wall seconds in $TIMING_LOG.
time_fairseq_commands() {
  local tool bin
  for tool in train generate; do
    if type -P "fairseq-$tool" > /dev/null; then printf -v bin '%q' "$(type -P "fairseq-$tool")"
    else printf -v bin '%q -m fairseq_cli.%s' "$PY" "$tool"; fi
    eval "fairseq-$tool() { /usr/bin/time -f \"\$(timing_label $tool \"\$@\") %U %S %e\" -a -o \"\$TIMING_LOG\" $bin \"\$@\"; }"
  done
}
timing_label() {
  local kind=$1 save= path= dec= iter= beam=5; shift
  while [ $# -gt 0 ]; do
    case $1 in
      --save-dir) save=$2 ;; --path) path=$2 ;; --iter-decode-max-iter) iter=$2 ;; --beam) beam=$2 ;;
      --mh-stats-path) dec=$(basename "$2" .stats.jsonl); dec=${dec#test.} ;;
    esac
    shift
  done
  if [ "$kind" = train ]; then echo "train $(basename "$save")"; return; fi
  if [ -z "$dec" ]; then
    case $iter in 0) dec=warm ;; 9) dec=maskpredict ;; "") dec=beam$beam ;; *) dec=iter$iter ;; esac
  fi
  echo "generate $(basename "$(dirname "$path")") $dec"
}

# --recipe DATA EXP: the stages of the recipes (what a run.sh does)
recipe() {
  source "$REPO_DIR/recipes/common/lib.sh"
  source "$REPO_DIR/recipes/common/stages.sh"
  local smoke=()
  [ "$SMOKE" = 1 ] && smoke=(--smoke)
  parse_run_args "$1" "$2" --methods "$BENCH_METHODS" "${smoke[@]}" "${@:3}"
  TIMING_LOG=$EXP_DIR/timing.txt
  time_fairseq_commands
  define_models
  # only the CMLM: no autoregressive baseline unless the distillation needs its teacher
  case ",$BENCH_METHODS," in *,mh,*|*,distill,*|*,cmlm,*) ;; *) export NO_BASELINE=1 ;; esac
  source "$REPO_DIR/recipes/common/mh.sh"
  mh_setup   # with --smoke: mh.sh's tiny CMLM, and run_stages the recipes' tiny transformer
  run_stages
}

main() {
  if [ "${1:-}" = --recipe ]; then shift; recipe "$@"; return; fi
  [ $# -ge 1 ] || { sed -n 14,18p "$0"; exit 2; }
  source "$REPO_DIR/recipes/common/lib.sh"
  local src_dir=$1 run_dir default=$REPO_DIR/bench/runs/quality_mh_multi30k
  [ "$SMOKE" = 1 ] && default=$REPO_DIR/bench/runs/quality_mh_multi30k_smoke
  run_dir=$(mkdir -p "${2:-$default}" && cd "${2:-$default}" && pwd)
  log "run dir $run_dir: train $TRAIN_LINES pairs, test: the first $TEST_LINES test sentences of <= $MAX_SRC_WORDS source words; $( [ "$SMOKE" = 1 ] && echo "smoke: tiny models, 1 epoch" || echo "CMLM $CMLM_EPOCHS epochs, chains ${MH_CHAINS} x (${MH_BURN_IN} + ${MH_EPOCHS}) epochs"); methods $BENCH_METHODS; decodings: $MH_DECODES"
  if [ ! -s "$run_dir/raw/train.en" ]; then
    mkdir -p "$run_dir/raw"
    local lang
    for lang in en de; do
      head -n "$TRAIN_LINES" "$src_dir/train.$lang" > "$run_dir/raw/train.$lang"
      cp "$src_dir/val.$lang" "$run_dir/raw/val.$lang"
    done
    "$PY" "$BENCH_DIR/mh_quality_table.py" select-test --src "$src_dir/test_2016_flickr.en" --tgt "$src_dir/test_2016_flickr.de" \
      --max-src-words "$MAX_SRC_WORDS" --max-lines "$TEST_LINES" \
      --out-src "$run_dir/raw/test_2016_flickr.en" --out-tgt "$run_dir/raw/test_2016_flickr.de" --note "$run_dir/raw/SUBSET"
  fi
  cat "$run_dir/raw/SUBSET"
  if [ ! -s "$run_dir/data/pair.env" ]; then
    log "prepare en-de"
    local smoke=()
    [ "$SMOKE" = 1 ] && smoke=(--smoke)
    bash "$REPO_DIR/recipes/multi30k/prepare.sh" "$run_dir/raw" "$run_dir/data" "${smoke[@]}" > "$run_dir/prepare.log" 2>&1 \
      || { tail -20 "$run_dir/prepare.log"; die "prepare failed: $run_dir/prepare.log"; }
  fi
  log "training and decoding (log: $run_dir/run.log)"
  /usr/bin/time -f "%U %S %e" -o "$run_dir/time.txt" bash "$0" $( [ "$SMOKE" = 1 ] && echo --smoke ) --recipe "$run_dir/data" "$run_dir/exp" \
    > "$run_dir/run.log" 2>&1 || { tail -30 "$run_dir/run.log"; die "the benchmark run failed: $run_dir/run.log"; }
  local md=$REPO_DIR/bench/results/quality_mh_multi30k.md out_log=$REPO_DIR/bench/results/quality_mh_multi30k.log
  if [ "$SMOKE" = 1 ]; then md=$run_dir/table.md; out_log=$run_dir/table.log; else mkdir -p "$REPO_DIR/bench/results"; fi
  "$PY" "$BENCH_DIR/mh_quality_table.py" table --exp "$run_dir/exp" --subset "$run_dir/raw/SUBSET" \
    --time "$run_dir/time.txt" --md "$md" --log "$out_log"
  log "table: $md"
  # the figures (matplotlib: installed when missing unless PLOT_INSTALL=0, lib.sh's have_plot_extra)
  if ! ls "$run_dir"/exp/cmlm_*/test.*.stats.jsonl > /dev/null 2>&1; then
    log "no chain statistics (no sampler decoding): no figures"; return
  fi
  if have_plot_extra; then
    local model
    for model in "$run_dir"/exp/cmlm_*/; do
      model=$(basename "$model")
      ls "$run_dir/exp/$model"/test.*.stats.jsonl > /dev/null 2>&1 || continue
      "$PY" "$BENCH_DIR/plot_mh_stats.py" --exp "$run_dir/exp" --model "$model" --out "$run_dir/figures_$model" \
        || log "plotting $model failed (the table is written)"
    done
  else
    log "no matplotlib: no figures (pip install .[plot]; then bench/plot_mh_stats.py --exp $run_dir/exp --out $run_dir)"
  fi
}

# The whole body is one function, so bash has read all of it before it runs: editing this file
# while a long run is under way cannot change what that run does.
main "$@"; exit
