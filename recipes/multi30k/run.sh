#!/usr/bin/env bash
# Multi30k en->de: teacher-forced baseline vs parallel scheduled sampling, decoding and sacreBLEU;
# with --methods flowseq: FlowSeq and fairseq's NAT on raw and distilled data (recipes/common/flowseq.sh).
#
# Usage: run.sh DATA_DIR EXP_DIR [--stage N] [--stop-stage M] [--methods a,b] [--smoke]
#   DATA_DIR  output of recipes/multi30k/prepare.sh
#   EXP_DIR   where checkpoints, logs (run.log, */train.log), hypotheses and results.txt go
# Stages: 1 baseline training, 2 parallel_ss training, 3 generate (beam 5, greedy), 4 sacreBLEU.
# Non-autoregressive methods (only with --methods; `flowseq` = all of them): distill (the baseline,
# as teacher, translates the training set with beam DISTILL_BEAM), flowseq_raw, flowseq_kd (FlowSeq
# on raw / distilled data; decoded argmax, iwd15, npd15, npd30 with the baseline rescoring NPD),
# nat_raw, nat_kd (fairseq's nonautoregressive_transformer, one parallel decoding pass).
# CMLM / Metropolis-Hastings block (only with --methods; `mh` = distill, cmlm_raw, cmlm_kd;
# recipes/common/mh.sh): fairseq's cmlm_transformer on raw / distilled data, decoded with the warm
# start, mask-predict (beam 1, 10 iterations), degenerate Gibbs and MH with E_local / E_raw (plain,
# block, annealed target temperature): MH_DECODES, MH_CHAINS, MH_BURN_IN, MH_EPOCHS, CMLM_EPOCHS (200).
# --smoke (or SMOKE=1): a tiny model for one epoch, to check the pipeline in seconds.
# Env: SEED (1), DEVICE=auto|cpu|gpu, FP16=1 (GPU only), SS_PROB, SS_PASSES; FlowSeq/NAT:
#      FLOWSEQ_EPOCHS (200), FLOWSEQ_INIT (4000), FLOWSEQ_KL_WARMUP (4000), NAT_EPOCHS (200), and the
#      knobs of recipes/common/flowseq.sh (DISTILL_BEAM, DISTILL_FORCE, FLOWSEQ_DECODES, FLOWSEQ_TAU, ...).
set -euo pipefail
source "$(dirname "$0")/../common/lib.sh"
source "$(dirname "$0")/../common/stages.sh"
parse_run_args "$@"

# -- model: a small transformer; Multi30k's ~29k short captions overfit anything larger
MODEL=(--arch transformer --share-all-embeddings
       --encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 256 --decoder-embed-dim 256
       --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024
       --encoder-attention-heads 4 --decoder-attention-heads 4)
# -- regularisation: heavy dropout for the small data set
REG=(--dropout 0.3 --attention-dropout 0.1 --weight-decay 0.0001 --label-smoothing 0.1)
# -- optimisation
OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0
       --lr 5e-4 --lr-scheduler inverse_sqrt --warmup-updates 2000 --warmup-init-lr 1e-7)
# -- batching (~130 updates per epoch); on several GPUs divide --max-tokens or add --update-freq
BATCH=(--max-tokens 4096 --num-workers 1)
# -- length of training: fixed, the same for both models; stage 3 decodes checkpoint_last.pt
LENGTH=(--max-epoch 60)
# -- the method: feed the model's own sampled token with probability SS_PROB after a teacher-forced
#    warm-up (the paper's MT protocol); K passes of parallel prediction and mixing
SS=(--ss-prob "${SS_PROB:-0.5}" --ss-num-passes "${SS_PASSES:-1}" --ss-schedule constant
    --ss-warmup-updates 4000 --ss-conditioning sample)
# -- decoding extras (beam size and batch-size rounding are fixed by stage 3)
GEN=(--max-len-a 1.2 --max-len-b 10)

# -- FlowSeq (--methods flowseq...): the paper's IWSLT sizes (encoder 5, posterior and decoder 3
#    layers, 256 wide, 4 heads, prior [48, 48, 16] steps), one embedding matrix; the paper's Adam
#    (0.9, 0.999, eps 1e-6), lr 5e-4 decaying by 0.999995 per update, clipping 1.0, label smoothing
#    0.1; autoencoder pre-training and KL warm-up scaled to Multi30k's ~130 updates per epoch
FLOWSEQ_MODEL=(--arch flowseq_iwslt_de_en --share-all-embeddings)
FLOWSEQ_REG=(--dropout 0.2 --weight-decay 0.0 --label-smoothing 0.1)
FLOWSEQ_OPTIM=(--optimizer adam --adam-betas '(0.9,0.999)' --adam-eps 1e-6 --clip-norm 1.0
               --lr 5e-4 --lr-scheduler step --lr-deacy-period 1 --lr-decay 0.999995)
FLOWSEQ_BATCH=(--max-tokens 4096 --num-workers 1)
FLOWSEQ_LENGTH=(--max-epoch "${FLOWSEQ_EPOCHS:-200}")
FLOWSEQ_INIT=${FLOWSEQ_INIT:-4000}
FLOWSEQ_KL_WARMUP=${FLOWSEQ_KL_WARMUP:-4000}
# -- fairseq's vanilla NAT (Gu et al. 2018 without fertility; fairseq's NAT example flags), the
#    baseline's size
NAT_MODEL=(--arch nonautoregressive_transformer --share-all-embeddings
           --encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 256 --decoder-embed-dim 256
           --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024
           --encoder-attention-heads 4 --decoder-attention-heads 4)
NAT_REG=(--dropout 0.3 --weight-decay 0.01 --label-smoothing 0.1)
NAT_OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0
           --lr 5e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000 --warmup-init-lr 1e-7)
NAT_BATCH=(--max-tokens 4096 --num-workers 1)
NAT_LENGTH=(--max-epoch "${NAT_EPOCHS:-200}")
source "$(dirname "$0")/../common/flowseq.sh"
flowseq_setup
# -- fairseq's cmlm_transformer (--methods mh, recipes/common/mh.sh): the baseline's size, the NAT's
#    optimisation (fairseq's NAT example: Adam (0.9, 0.98), lr 5e-4, inverse sqrt), random_mask noise
CMLM_MODEL=(--arch cmlm_transformer --share-all-embeddings
            --encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 256 --decoder-embed-dim 256
            --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024
            --encoder-attention-heads 4 --decoder-attention-heads 4)
CMLM_REG=(--dropout 0.3 --weight-decay 0.01 --label-smoothing 0.1)
CMLM_OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0
            --lr 5e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000 --warmup-init-lr 1e-7)
CMLM_BATCH=(--max-tokens 4096 --num-workers 1)
CMLM_LENGTH=(--max-epoch "${CMLM_EPOCHS:-200}")
source "$(dirname "$0")/../common/mh.sh"
mh_setup

run_stages
