#!/usr/bin/env bash
# IWSLT'14 de->en: teacher-forced baseline vs parallel scheduled sampling and differentiable
# scheduled sampling (soft argmax, soft Gumbel sample), and the soft beam search loss with local and
# global normalization on an attentional LSTM (Goyal's thesis, 5.4.3, Table 5.4), decoding and sacreBLEU.
#
# Usage: run.sh DATA_DIR EXP_DIR [--stage N] [--stop-stage M] [--methods a,b] [--smoke]
#   DATA_DIR  output of recipes/iwslt14_de_en/prepare.sh
#   EXP_DIR   where checkpoints, logs (run.log, */train.log), hypotheses and results.txt go
# Stages: 1 baseline training, 2 method training (parallel_ss, dss_greedy, dss_sample by default;
# --methods picks some), 3 generate (beam 5, greedy), 4 sacreBLEU.
# Soft beam search methods (only with --methods; alias: soft_beam = all six), on a 1-layer LSTM with
# attention (bidirectional encoder, 256 units, shared embeddings):
#   lstm_ce      cross-entropy, from scratch (the "Regular" initialiser of Table 5.4)
#   selfnorm     self_normalized_cross_entropy, from scratch (the "Self-normalized" initialiser)
#   sb_local     soft_beam_loss, local normalization, from lstm_ce;   sb_local_sn: from selfnorm
#   sb_global    soft_beam_loss, global normalization, from selfnorm; sb_global_ce: from lstm_ce
# all k = SB_BEAM (3), direct loss (Hamming, free length: the gold length + SB_EXTRA_STEPS, finished
# hypotheses absorbing), decoded with --task search_aware_translation: greedy, beam 3, soft beam 3
# (softbeam3) and, for the locally normalized models, beam 3 on raw scores (beam3raw: Table 5.1's
# remark); the globally normalized ones run every beam search on raw scores.
# --smoke (or SMOKE=1): a tiny model for one epoch, to check the pipeline in seconds.
# FlowSeq block (only with --methods; `flowseq` = all): distill (the baseline translates the training
# set, beam DISTILL_BEAM), flowseq_raw / flowseq_kd (FlowSeq on raw / distilled data; decoded argmax,
# iwd15, npd15, npd30, NPD rescored by the baseline), nat_raw / nat_kd (fairseq's
# nonautoregressive_transformer, one parallel pass); see recipes/common/flowseq.sh.
#   Env: FLOWSEQ_UPDATES, FLOWSEQ_INIT (30000), FLOWSEQ_KL_WARMUP (10000), NAT_UPDATES, NAR_MAX_LEN,
#   DISTILL_BEAM (5), DISTILL_FORCE=1, FLOWSEQ_DECODES, FLOWSEQ_TAU (0.3), FLOWSEQ_GEN_BATCH_SIZE (32).
# MGS / MRT block (only with --methods mgs,mrt; alias mgs_mrt): mgs (--criterion mgs, Welleck and Cho 2021) and
# mrt (--criterion mrt), both warm-started from the baseline, task loss MGS_TASK_LOSS (bleu; edit, chrf, or lm
# with the baseline as the frozen scorer); decoded and scored like the baseline; see recipes/common/mgs.sh.
#   Env: MGS_TASK_LOSS, MRT_TASK_LOSS, MGS_CANDIDATES (4), MGS_ALPHA, MGS_NOISE, MRT_MLE_WEIGHT, MGS_LR (1e-4),
#   MGS_EPOCHS (5), MGS_UPDATES.
# Env: SEED (1), DEVICE=auto|cpu|gpu, FP16=1 (GPU only), SS_PROB, SS_PASSES, DSS_ALPHA (1),
#      DSS_DECODING (parallel), DSS_PASSES (1), DSS_K (inverse sigmoid strength in updates, 3000);
#      soft beam: LSTM_DIM (256), LSTM_EPOCHS (30), LSTM_WARMUP (1000 updates), SB_EPOCHS (10), SB_MAX_UPDATE, SB_BEAM (3), SB_LR (1e-4, constant),
#      SB_ALPHA (1), SB_ALPHA_SCHEDULE (exponential|fixed), SB_ALPHA_GROWTH (1.5), SB_ALPHA_PERIOD
#      (1100 updates, about an epoch), SB_ALPHA_MAX (20), SB_EXTRA_STEPS (5), SB_MAX_TOKENS (2048,
#      with --update-freq keeping 4096 tokens per update), SELF_NORM_LAMBDA (0.1), SB_DECODE_ALPHA;
#      NO_BASELINE=1 skips the transformer baseline (e.g. --methods soft_beam alone); MAX_LEN_A,
#      MAX_LEN_B: decoding length cap A * source length + B.
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
# MAX_LEN_A / MAX_LEN_B: cap the hypothesis length at A * source length + B (fairseq's default is 200
# tokens; soft beam decoding runs to the cap when a hypothesis never emits EOS)
if [ -n "${MAX_LEN_A:-}${MAX_LEN_B:-}" ]; then GEN+=(--max-len-a "${MAX_LEN_A:-0}" --max-len-b "${MAX_LEN_B:-200}"); fi

# -- soft beam search (thesis 5.4.3): an attentional LSTM (Bahdanau-style, fairseq's lstm), two
#    initialisers trained from scratch, four search-aware fine-tunes
SB_BEAM=${SB_BEAM:-3}
SB_ALPHA=${SB_ALPHA:-1}
SB_ALPHA_MAX=${SB_ALPHA_MAX:-20}
SB_MAX_TOKENS=${SB_MAX_TOKENS:-2048}
D=${LSTM_DIM:-256}
LSTM=(--arch lstm --encoder-layers 1 --decoder-layers 1 --encoder-bidirectional
      --encoder-embed-dim "$D" --encoder-hidden-size "$D" --decoder-embed-dim "$D" --decoder-hidden-size "$D"
      --decoder-out-embed-dim "$D" --share-all-embeddings)
LSTM_REG=(--dropout 0.2 --weight-decay 0.0001 --label-smoothing 0.1)
LSTM_REG_SB=(--dropout 0.2 --weight-decay 0.0001)   # soft_beam_loss has no label smoothing
LSTM_OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 1.0
            --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates "${LSTM_WARMUP:-1000}" --warmup-init-lr 1e-7)
SB_OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 1.0 --lr "${SB_LR:-1e-4}" --lr-scheduler fixed)
SB_BATCH=(--max-tokens "$SB_MAX_TOKENS" --update-freq $(( (4096 + SB_MAX_TOKENS - 1) / SB_MAX_TOKENS )) --num-workers 2)
LSTM_EPOCHS=${LSTM_EPOCHS:-30}
SB_EPOCHS=${SB_EPOCHS:-10}
if [ "$SMOKE" = 1 ]; then
  LSTM=(--arch lstm --encoder-embed-dim 16 --encoder-hidden-size 16 --encoder-bidirectional
        --decoder-embed-dim 16 --decoder-hidden-size 16 --decoder-out-embed-dim 16 --share-all-embeddings)
  LSTM_OPTIM=(--optimizer adam --lr 5e-3)
  SB_OPTIM=(--optimizer adam --lr 1e-3)
  SB_BATCH=(--max-tokens 2000 --num-workers 0)
  LSTM_EPOCHS=1; SB_EPOCHS=1; SB_ALPHA_PERIOD=2; SB_EXTRA_STEPS=2
fi
SB=(--criterion soft_beam_loss --soft-beam-size "$SB_BEAM" --soft-beam-objective direct
    --soft-beam-alpha "$SB_ALPHA" --soft-beam-length free --soft-beam-extra-steps "${SB_EXTRA_STEPS:-5}")
if [ "${SB_ALPHA_SCHEDULE:-exponential}" = exponential ]; then
  SB+=(--soft-beam-alpha-schedule exponential --soft-beam-alpha-growth "${SB_ALPHA_GROWTH:-1.5}"
       --soft-beam-alpha-period-updates "${SB_ALPHA_PERIOD:-1100}" --soft-beam-alpha-max "$SB_ALPHA_MAX")
  SB_FINAL_ALPHA=$SB_ALPHA_MAX
else
  SB+=(--soft-beam-alpha-schedule fixed); SB_FINAL_ALPHA=$SB_ALPHA
fi
FLAGS_lstm_ce=(--criterion label_smoothed_cross_entropy)
FLAGS_selfnorm=(--criterion self_normalized_cross_entropy --self-norm-lambda "${SELF_NORM_LAMBDA:-0.1}")
# SB_MAX_UPDATE: stop each fine-tune after that many updates (a CPU-sized run), whatever SB_EPOCHS says
if [ -n "${SB_MAX_UPDATE:-}" ]; then SB+=(--max-update "$SB_MAX_UPDATE"); fi
FLAGS_sb_local=("${SB[@]}" --soft-beam-normalization local)
FLAGS_sb_local_sn=("${FLAGS_sb_local[@]}")
FLAGS_sb_global=("${SB[@]}" --soft-beam-normalization global)
FLAGS_sb_global_ce=("${FLAGS_sb_global[@]}")
METHOD_INIT=([sb_local]=lstm_ce [sb_local_sn]=selfnorm [sb_global]=selfnorm [sb_global_ce]=lstm_ce)
METHOD_GLOBAL=([sb_global]=1 [sb_global_ce]=1)
SB_METHODS=(lstm_ce selfnorm sb_local sb_global sb_local_sn sb_global_ce)
EXTRA_METHODS=("${SB_METHODS[@]}")
for m in "${SB_METHODS[@]}"; do
  declare -a "MODEL_$m=(\"\${LSTM[@]}\")" "GEN_$m=(--task search_aware_translation)"
  case $m in
    lstm_ce|selfnorm)
      declare -a "REG_$m=(\"\${LSTM_REG[@]}\")" "OPTIM_$m=(\"\${LSTM_OPTIM[@]}\")"
      METHOD_EPOCHS[$m]=$LSTM_EPOCHS; METHOD_ALPHA[$m]=$SB_ALPHA ;;
    *)
      declare -a "REG_$m=(\"\${LSTM_REG_SB[@]}\")" "OPTIM_$m=(\"\${SB_OPTIM[@]}\")" "BATCH_$m=(\"\${SB_BATCH[@]}\")"
      METHOD_EPOCHS[$m]=$SB_EPOCHS; METHOD_ALPHA[$m]=$SB_FINAL_ALPHA ;;
  esac
  if [ -n "${METHOD_GLOBAL[$m]:-}" ]; then
    declare -a "DECODES_$m=(greedy beam$SB_BEAM softbeam$SB_BEAM)"
  else
    declare -a "DECODES_$m=(greedy beam$SB_BEAM softbeam$SB_BEAM beam${SB_BEAM}raw)"
  fi
done
if [ "$ONLY_METHODS" = soft_beam ]; then ONLY_METHODS=$(IFS=,; echo "${SB_METHODS[*]}"); fi

# -- FlowSeq (--methods flowseq, or some of distill,flowseq_raw,flowseq_kd,nat_raw,nat_kd;
#    recipes/common/flowseq.sh): the paper's IWSLT model (encoder 5, posterior and decoder 3 layers,
#    256 / 512, 4 heads, prior [48, 48, 16] steps; separate input embeddings, tied output), Adam
#    (0.9, 0.999, eps 1e-6), lr 5e-4 decaying by 0.999995 per update, clipping 1.0, label smoothing
#    0.1, KL weight 0 for the first 30k updates (autoencoder pre-training) then linear to 1 over 10k;
#    training sentences of at most 60 pieces (NAR_MAX_LEN); ~8k tokens x FLOWSEQ_UPDATE_FREQ per update
FLOWSEQ_MODEL=(--arch flowseq_iwslt_de_en --share-decoder-input-output-embed)
FLOWSEQ_REG=(--dropout 0.2 --weight-decay 0.0 --label-smoothing 0.1)
FLOWSEQ_OPTIM=(--optimizer adam --adam-betas '(0.9,0.999)' --adam-eps 1e-6 --clip-norm 1.0
               --lr 5e-4 --lr-scheduler step --lr-deacy-period 1 --lr-decay 0.999995)
FLOWSEQ_BATCH=(--max-tokens 8192 --update-freq "${FLOWSEQ_UPDATE_FREQ:-4}" --num-workers 2)
FLOWSEQ_LENGTH=(--max-epoch 0 --max-update "${FLOWSEQ_UPDATES:-150000}")
FLOWSEQ_INIT=${FLOWSEQ_INIT:-30000}
FLOWSEQ_KL_WARMUP=${FLOWSEQ_KL_WARMUP:-10000}
NAR_MAX_LEN=${NAR_MAX_LEN:-60}
# -- fairseq's vanilla NAT, transformer_iwslt_de_en's sizes, fairseq's NAT example optimisation
NAT_MODEL=(--arch nonautoregressive_transformer --share-all-embeddings
           --encoder-embed-dim 512 --encoder-ffn-embed-dim 1024 --encoder-attention-heads 4 --encoder-layers 6
           --decoder-embed-dim 512 --decoder-ffn-embed-dim 1024 --decoder-attention-heads 4 --decoder-layers 6)
NAT_REG=(--dropout 0.3 --weight-decay 0.01 --label-smoothing 0.1)
NAT_OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0 --lr 5e-4 --lr-scheduler inverse_sqrt
           --warmup-updates 10000 --warmup-init-lr 1e-7 --stop-min-lr 1e-9)
NAT_BATCH=(--max-tokens 8192 --num-workers 2)
NAT_LENGTH=(--max-epoch 0 --max-update "${NAT_UPDATES:-100000}")
source "$(dirname "$0")/../common/flowseq.sh"
flowseq_setup

# -- MLE-guided parameter search and minimum risk training (--methods mgs,mrt, or mgs_mrt;
#    recipes/common/mgs.sh): each fine-tunes the stage-1 baseline with its sequence-level criterion, task loss
#    MGS_TASK_LOSS (bleu: 1 - sentence BLEU of the decoded pieces), Adam at a constant MGS_LR for MGS_EPOCHS
MGS_TASK_LOSS=${MGS_TASK_LOSS:-bleu}
source "$(dirname "$0")/../common/mgs.sh"
mgs_setup

run_stages
