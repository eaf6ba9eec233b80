#!/usr/bin/env bash
# Quality benchmark: Table 5.4 of Goyal's thesis (and the MT rows of Table 5.1) in
# miniature on Multi30k en->de: an attentional LSTM trained with cross-entropy ("Regular") and
# self-normalized, each fine-tuned with the soft beam search loss under local and under global
# normalization, decoded greedy, beam 3, soft beam 3 and beam 3 on raw scores, sacreBLEU.
#
# Usage: bench/quality_soft_beam_multi30k.sh MULTI30K_DIR [RUN_DIR]   (RUN_DIR default: bench/runs/soft_beam_multi30k)
#   MULTI30K_DIR: the raw release files (train/val/test_2016_flickr.{en,de}); read, never copied here.
#   Env: BASE_EPOCHS (lstm_ce and selfnorm, 8), LSTM_WARMUP (150 updates of lr warm-up), FT_UPDATES
#        (40: each soft beam fine-tune stops after that many updates, ~1/3 of an epoch; FT_UPDATES= (empty)
#        runs FT_EPOCHS whole epochs, 1 by default), LSTM_DIM (256), SB_ALPHA_PERIOD (10 updates per
#        x1.5 of the annealed alpha: 1 -> ~5 over 40 updates), MAX_LEN_A / MAX_LEN_B (1.2 / 10: the
#        decoding length cap, as recipes/multi30k), SB_MAX_TOKENS (2048),
#        SEED (1), LOGZ_MAX_BATCHES (50: the log Z pass over train is capped at 50 batches of 4000
#        tokens), DATA (default bench/runs/quality_multi30k/data, the data directory of
#        bench/quality_multi30k.sh, prepared the same way -- recipes/multi30k/prepare.sh -- when absent),
#        plus recipes/iwslt14_de_en/run.sh's SB_* knobs.
#
# The models are those of recipes/iwslt14_de_en/run.sh --methods soft_beam (lstm_ce, selfnorm,
# sb_local, sb_global, sb_local_sn, sb_global_ce: the Table 5.4 grid), run on the Multi30k data with
# NO_BASELINE=1 (no transformer).  Re-running resumes.  The table goes to
# bench/results/quality_soft_beam_multi30k.md (bench/soft_beam_table.py --mt), the commands to
# RUN_DIR/exp/*/*.cmd, the output to RUN_DIR/run.out.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
source "$REPO_DIR/recipes/common/lib.sh"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONWARNINGS=ignore DEVICE=${DEVICE:-cpu}

main() {
[ $# -ge 1 ] || { sed -n 2,20p "$0"; exit 2; }
local src=$1 run_dir=${2:-$REPO_DIR/bench/runs/soft_beam_multi30k}
local data=${DATA:-$REPO_DIR/bench/runs/quality_multi30k/data}
FT_UPDATES=${FT_UPDATES-40}
export LSTM_EPOCHS=${BASE_EPOCHS:-8} SB_EPOCHS=${FT_EPOCHS:-1} SB_ALPHA_PERIOD=${SB_ALPHA_PERIOD:-10}
export LSTM_WARMUP=${LSTM_WARMUP:-150} MAX_LEN_A=${MAX_LEN_A:-1.2} MAX_LEN_B=${MAX_LEN_B:-10}
if [ -n "$FT_UPDATES" ]; then export SB_MAX_UPDATE=$FT_UPDATES; fi
export LSTM_DIM=${LSTM_DIM:-256} NO_BASELINE=1 SEED=${SEED:-1}
mkdir -p "$run_dir"
run_dir=$(cd "$run_dir" && pwd)
if [ ! -s "$data/pair.env" ]; then
  echo "[$(date +%H:%M:%S)] prepare: recipes/multi30k/prepare.sh $src $data"
  bash "$REPO_DIR/recipes/multi30k/prepare.sh" "$src" "$data"
fi
echo "[$(date +%H:%M:%S)] recipes/iwslt14_de_en/run.sh $data $run_dir/exp --methods soft_beam (LSTM_EPOCHS=$LSTM_EPOCHS SB_EPOCHS=$SB_EPOCHS LSTM_DIM=$LSTM_DIM)"
bash "$REPO_DIR/recipes/iwslt14_de_en/run.sh" "$data" "$run_dir/exp" --methods soft_beam > "$run_dir/run.out" 2>&1 \
  || { tail -30 "$run_dir/run.out"; die "the recipe failed (log: $run_dir/run.out)"; }
echo "[$(date +%H:%M:%S)] log Z of the initialisers (teacher-forced)"
local specs=() m
for m in lstm_ce selfnorm sb_local sb_global sb_local_sn sb_global_ce; do
  specs+=(--model "$m=$run_dir/exp/$m/checkpoint_last.pt")
done
"$PY" "$HELPERS/tools.py" logz --user-dir "$USER_DIR" --data "$data/bin" --splits train,valid "${specs[@]}" \
  --max-batches "${LOGZ_MAX_BATCHES:-50}" > "$run_dir/exp/logz.txt"
"$PY" "$BENCH_DIR/soft_beam_table.py" --mt --run-dir "$run_dir/exp" --md "${RESULTS_MD:-$REPO_DIR/bench/results/quality_soft_beam_multi30k.md}" \
  --command "BASE_EPOCHS=$LSTM_EPOCHS FT_UPDATES=$FT_UPDATES FT_EPOCHS=$SB_EPOCHS LSTM_DIM=$LSTM_DIM SEED=$SEED bash bench/quality_soft_beam_multi30k.sh $src"
}

# The whole body is one function, so bash has read all of it before it runs: editing this file
# while a long run is under way cannot change what that run does.
main "$@"; exit
