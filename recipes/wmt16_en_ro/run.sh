#!/usr/bin/env bash
# WMT'16 en<->ro: the autoregressive transformer baseline (FlowSeq's teacher), parallel scheduled
# sampling, and with --methods flowseq: FlowSeq and fairseq's NAT on raw and distilled data
# (Ma et al. 2019, Tables 1 and 2), decoding and sacreBLEU.
#
# Usage: run.sh DATA_DIR EXP_DIR [--stage N] [--stop-stage M] [--methods a,b] [--smoke]
#   DATA_DIR  output of recipes/wmt16_en_ro/prepare.sh (either direction)
#   EXP_DIR   where checkpoints, logs (run.log, */train.log), hypotheses and results.txt go
# Stages: 1 baseline training, 2 method training, 3 generate, 4 sacreBLEU.
# Methods: parallel_ss (default); the FlowSeq block (only with --methods; `flowseq` = all):
#   distill (the baseline translates the training set, beam DISTILL_BEAM), flowseq_raw / flowseq_kd
#   (FlowSeq on raw / distilled data; decoded argmax, iwd15, npd15, npd30, NPD rescored by the
#   baseline), nat_raw / nat_kd (fairseq's nonautoregressive_transformer, one parallel pass);
#   see recipes/common/flowseq.sh.
# --smoke (or SMOKE=1): a tiny model for one epoch, to check the pipeline in seconds.
# Env: SEED (1), DEVICE=auto|cpu|gpu, FP16=1 (GPU only; recommended), UPDATE_FREQ (8), SS_PROB, SS_PASSES;
#      FLOWSEQ_ARCH (flowseq_base | flowseq_large), FLOWSEQ_UPDATES (200000), FLOWSEQ_INIT (30000),
#      FLOWSEQ_KL_WARMUP (10000), NAT_UPDATES (200000), NAR_MAX_LEN (80), DISTILL_BEAM (5),
#      DISTILL_FORCE=1, FLOWSEQ_DECODES, FLOWSEQ_TAU (0.3), FLOWSEQ_GEN_BATCH_SIZE (32).
# CMLM / Metropolis-Hastings block (only with --methods; `mh` = distill, cmlm_raw, cmlm_kd; Goyal's
# thesis chapter 6 on ro->en: prepare.sh --src ro --tgt en): fairseq's cmlm_transformer on raw /
# distilled data, decoded with the warm start, mask-predict (beam 1, 10 iterations), degenerate Gibbs,
# MH with E_local / E_raw (plain, block, annealed); see recipes/common/mh.sh.
#   Env: CMLM_UPDATES (200000), MH_DECODES, MH_CHAINS (5), MH_BURN_IN (7), MH_EPOCHS (26), MH_BLOCK_SIZE.
# A real run needs a GPU: ~610k training pairs; transformer base for 100k updates of ~32k tokens.
set -euo pipefail
source "$(dirname "$0")/../common/lib.sh"
source "$(dirname "$0")/../common/stages.sh"
parse_run_args "$@"

# -- model: transformer base (6+6 layers, 512 wide, 2048 FFN, 8 heads), shared embeddings
MODEL=(--arch transformer_wmt_en_de --share-all-embeddings)
# -- regularisation (dropout 0.3 as fairseq's and Lee et al.'s en-ro transformers)
REG=(--dropout 0.3 --weight-decay 0.0 --label-smoothing 0.1)
# -- optimisation
OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0
       --lr 7e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000 --warmup-init-lr 1e-7)
# -- batching: 4096 tokens x UPDATE_FREQ per GPU and update
BATCH=(--max-tokens 4096 --update-freq "${UPDATE_FREQ:-8}" --num-workers 2)
# -- length of training: fixed; stage 3 decodes checkpoint_last.pt
LENGTH=(--max-update 100000 --save-interval-updates 5000 --keep-interval-updates 2)
# -- parallel scheduled sampling after a 50k-update teacher-forced warm-up
SS=(--ss-prob "${SS_PROB:-0.5}" --ss-num-passes "${SS_PASSES:-1}" --ss-schedule constant
    --ss-warmup-updates 50000 --ss-conditioning sample)
# -- decoding extras (beam size and batch-size rounding are fixed by stage 3)
GEN=(--lenpen 1.0)

# -- FlowSeq (recipes/common/flowseq.sh): as in recipes/wmt14_en_de (FlowSeq-base, the paper's
#    optimisation and KL schedule, sentences of at most 80 pieces), fewer updates for the smaller corpus
FLOWSEQ_MODEL=(--arch "${FLOWSEQ_ARCH:-flowseq_base}" --share-all-embeddings)
FLOWSEQ_REG=(--dropout 0.1 --weight-decay 0.0 --label-smoothing 0.1)
FLOWSEQ_OPTIM=(--optimizer adam --adam-betas '(0.9,0.999)' --adam-eps 1e-6 --clip-norm 1.0
               --lr 5e-4 --lr-scheduler step --lr-deacy-period 1 --lr-decay 0.999995)
FLOWSEQ_BATCH=(--max-tokens 8192 --update-freq "${UPDATE_FREQ:-8}" --num-workers 2)
FLOWSEQ_LENGTH=(--max-update "${FLOWSEQ_UPDATES:-200000}")
FLOWSEQ_INIT=${FLOWSEQ_INIT:-30000}
FLOWSEQ_KL_WARMUP=${FLOWSEQ_KL_WARMUP:-10000}
NAR_MAX_LEN=${NAR_MAX_LEN:-80}
# -- fairseq's vanilla NAT as in fairseq's NAT example (transformer-base sizes)
NAT_MODEL=(--arch nonautoregressive_transformer --share-all-embeddings)
NAT_REG=(--dropout 0.3 --weight-decay 0.01 --label-smoothing 0.1)
NAT_OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0 --lr 5e-4 --lr-scheduler inverse_sqrt
           --warmup-updates 10000 --warmup-init-lr 1e-7 --stop-min-lr 1e-9)
NAT_BATCH=(--max-tokens 8192 --update-freq "${UPDATE_FREQ:-8}" --num-workers 2)
NAT_LENGTH=(--max-update "${NAT_UPDATES:-200000}")
source "$(dirname "$0")/../common/flowseq.sh"
flowseq_setup
# -- fairseq's cmlm_transformer (--methods mh, recipes/common/mh.sh) as in fairseq's NAT example
#    (transformer-base sizes, random_mask noise, 200k updates; Mask-Predict trained 300k), then
#    the warm start, mask-predict, degenerate Gibbs and Metropolis-Hastings decodings
CMLM_MODEL=(--arch cmlm_transformer --share-all-embeddings)
CMLM_REG=(--dropout 0.3 --weight-decay 0.01 --label-smoothing 0.1)
CMLM_OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0 --lr 5e-4 --lr-scheduler inverse_sqrt
            --warmup-updates 10000 --warmup-init-lr 1e-7 --stop-min-lr 1e-9)
CMLM_BATCH=(--max-tokens 8192 --update-freq "${UPDATE_FREQ:-8}" --num-workers 2)
CMLM_LENGTH=(--max-update "${CMLM_UPDATES:-200000}")
source "$(dirname "$0")/../common/mh.sh"
mh_setup

run_stages
