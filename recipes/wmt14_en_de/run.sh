#!/usr/bin/env bash
# WMT'14 en->de: teacher-forced baseline vs parallel scheduled sampling, decoding and sacreBLEU.
#
# Usage: run.sh DATA_DIR EXP_DIR [--stage N] [--stop-stage M] [--smoke]
#   DATA_DIR  output of recipes/wmt14_en_de/prepare.sh
#   EXP_DIR   where checkpoints, logs (run.log, */train.log), hypotheses and results.txt go
# Stages: 1 baseline training, 2 parallel_ss training, 3 generate (beam 5, greedy), 4 sacreBLEU.
# --smoke (or SMOKE=1): a tiny model for one epoch, to check the pipeline in seconds.
# Env: SEED (1), DEVICE=auto|cpu|gpu, FP16=1 (GPU only; recommended), UPDATE_FREQ (8), SS_PROB, SS_PASSES.
# A real run needs a GPU: about 4.5M training pairs; the transformer-base setting below takes days
# on one GPU (set UPDATE_FREQ=1 on 8 GPUs for the usual ~32k-token batches).
set -euo pipefail
source "$(dirname "$0")/../common/lib.sh"
source "$(dirname "$0")/../common/stages.sh"
parse_run_args "$@"

# -- model: transformer base (6+6 layers, 512 wide, 2048 FFN, 8 heads), shared embeddings
MODEL=(--arch transformer_wmt_en_de --share-all-embeddings)
# -- regularisation
REG=(--dropout 0.1 --weight-decay 0.0 --label-smoothing 0.1)
# -- optimisation
OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0
       --lr 7e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000 --warmup-init-lr 1e-7)
# -- batching: 4096 tokens x UPDATE_FREQ per GPU and update
BATCH=(--max-tokens 4096 --update-freq "${UPDATE_FREQ:-8}" --num-workers 2)
# -- length of training: fixed, the same for both models; stage 3 decodes checkpoint_last.pt
LENGTH=(--max-update 100000 --save-interval-updates 5000 --keep-interval-updates 2)
# -- the method: the model's own sampled token replaces gold with probability SS_PROB after a
#    teacher-forced warm-up of 50k updates (the paper's MT protocol); K parallel passes
SS=(--ss-prob "${SS_PROB:-0.5}" --ss-num-passes "${SS_PASSES:-1}" --ss-schedule constant
    --ss-warmup-updates 50000 --ss-conditioning sample)
# -- decoding extras (beam size and batch-size rounding are fixed by stage 3)
GEN=(--lenpen 0.6)

run_stages
