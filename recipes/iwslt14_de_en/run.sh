#!/usr/bin/env bash
# IWSLT'14 de->en: teacher-forced baseline vs parallel scheduled sampling and differentiable
# scheduled sampling (soft argmax, soft Gumbel sample), decoding and sacreBLEU.
#
# Usage: run.sh DATA_DIR EXP_DIR [--stage N] [--stop-stage M] [--methods a,b] [--smoke]
#   DATA_DIR  output of recipes/iwslt14_de_en/prepare.sh
#   EXP_DIR   where checkpoints, logs (run.log, */train.log), hypotheses and results.txt go
# Stages: 1 baseline training, 2 method training (parallel_ss, dss_greedy, dss_sample; --methods
# picks some), 3 generate (beam 5, greedy), 4 sacreBLEU.
# --smoke (or SMOKE=1): a tiny model for one epoch, to check the pipeline in seconds.
# Env: SEED (1), DEVICE=auto|cpu|gpu, FP16=1 (GPU only), SS_PROB, SS_PASSES, DSS_ALPHA (1),
#      DSS_DECODING (parallel), DSS_PASSES (1), DSS_K (inverse sigmoid strength in updates, 3000).
set -euo pipefail
source "$(dirname "$0")/../common/lib.sh"
source "$(dirname "$0")/../common/stages.sh"
parse_run_args "$@"

# -- model: the usual IWSLT'14 transformer (6+6 layers, 512 wide, 1024 FFN, 4 heads), one shared
#    embedding matrix since the dictionary is joined
MODEL=(--arch transformer_iwslt_de_en --share-all-embeddings)
# -- regularisation
REG=(--dropout 0.3 --weight-decay 0.0001 --label-smoothing 0.1)
# -- optimisation
OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0
       --lr 5e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000 --warmup-init-lr 1e-7)
# -- batching: 4096 tokens per GPU (~1100 updates per epoch on one GPU)
BATCH=(--max-tokens 4096 --num-workers 2)
# -- length of training: fixed, the same for both models; stage 3 decodes checkpoint_last.pt
LENGTH=(--max-epoch 50)
# -- the method: the model's own sampled token replaces gold with probability SS_PROB after a
#    teacher-forced warm-up of 10k updates (the paper's MT protocol); K parallel passes
SS=(--ss-prob "${SS_PROB:-0.5}" --ss-num-passes "${SS_PASSES:-1}" --ss-schedule constant
    --ss-warmup-updates 10000 --ss-conditioning sample)
# -- differentiable scheduled sampling (Goyal et al. 2017, the paper's IWSLT'14 experiment): after
#    one teacher-forced epoch (~1100 updates) the relaxed prediction replaces gold with Bengio's
#    inverse-sigmoid probability; alpha fixed (DSS_ALPHA).  The transformer runs the parallel mode
#    (K passes with the soft embeddings in the graph); DSS_DECODING=sequential is the paper's exact,
#    step-by-step decoder.
DSS_MIX=(--ss-schedule inverse_sigmoid --ss-inverse-sigmoid-k "${DSS_K:-3000}" --ss-prob 1.0
         --ss-warmup-updates 1100)
DSS_COMMON=(--criterion differentiable_ss --dss-alpha "${DSS_ALPHA:-1}" --dss-decoding "${DSS_DECODING:-parallel}")
if [ "${DSS_DECODING:-parallel}" = parallel ]; then DSS_COMMON+=(--dss-num-passes "${DSS_PASSES:-1}"); fi
FLAGS_dss_greedy=("${DSS_COMMON[@]}" --dss-mode greedy)
FLAGS_dss_sample=("${DSS_COMMON[@]}" --dss-mode sample)
METHODS=(parallel_ss dss_greedy dss_sample)
# -- decoding extras (beam size and batch-size rounding are fixed by stage 3)
GEN=(--lenpen 1.0)

run_stages
