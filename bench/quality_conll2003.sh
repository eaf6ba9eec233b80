#!/usr/bin/env bash
# Quality benchmark: the NER rows of Table 1 of Goyal et al. 2017 on CoNLL-2003 English with the
# paper's seq2seq tagger: cross-entropy, hard scheduled sampling (greedy = argmax, sample) and
# differentiable scheduled sampling (greedy = soft argmax, sample = soft Gumbel; alpha fixed and
# annealed), several seeds, span F1 (conlleval) of greedy decoding on dev (valid) and test.
#
# Usage: bench/quality_conll2003.sh CONLL2003_DIR [RUN_DIR]    (RUN_DIR default: bench/runs/conll2003)
#   CONLL2003_DIR: train.txt valid.txt test.txt in CoNLL column format; read, never copied here.
#   Env: SEEDS ("1 2 3"), EPOCHS (20), DSS_K (150), DSS_ALPHA (1), plus recipes/conll2003/run.sh's.
#
# Each seed is one run of recipes/conll2003/run.sh (all stages, all methods) into RUN_DIR/seedN;
# re-running resumes (fairseq-train continues from checkpoint_last.pt).  The table goes to
# bench/results/quality_conll2003.md with every command in the run directories' *.cmd files.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONWARNINGS=ignore DEVICE=${DEVICE:-cpu}
export EPOCHS=${EPOCHS:-20} DSS_K=${DSS_K:-150} DSS_ALPHA=${DSS_ALPHA:-1}
SEEDS=${SEEDS:-"1 2 3"}
[ $# -ge 1 ] || { sed -n 2,12p "$0"; exit 2; }
RUN_DIR=${2:-$REPO_DIR/bench/runs/conll2003}
mkdir -p "$RUN_DIR"
if [ ! -s "$RUN_DIR/data/pair.env" ]; then
  bash "$REPO_DIR/recipes/conll2003/prepare.sh" "$1" "$RUN_DIR/data"
fi
for seed in $SEEDS; do
  echo "[$(date +%H:%M:%S)] seed $seed (EPOCHS=$EPOCHS DSS_K=$DSS_K DSS_ALPHA=$DSS_ALPHA)"
  SEED=$seed bash "$REPO_DIR/recipes/conll2003/run.sh" "$RUN_DIR/data" "$RUN_DIR/seed$seed" > "$RUN_DIR/seed$seed.out" 2>&1 \
    || { tail -20 "$RUN_DIR/seed$seed.out"; echo "seed $seed failed (log: $RUN_DIR/seed$seed.out)"; }
done
python3 "$BENCH_DIR/tagging_table.py" --run-dir "$RUN_DIR" --md "$REPO_DIR/bench/results/quality_conll2003.md" \
  --command "EPOCHS=$EPOCHS DSS_K=$DSS_K DSS_ALPHA=$DSS_ALPHA SEEDS=\"$SEEDS\" bash bench/quality_conll2003.sh $1"
