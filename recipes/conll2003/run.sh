#!/usr/bin/env bash
# CoNLL-2003 NER (or its POS column) with the seq2seq tagger: cross-entropy vs hard scheduled
# sampling vs differentiable scheduled sampling (Goyal et al. 2017, Table 1: greedy and sample; alpha
# fixed and annealed), and vs the soft beam search loss (Goyal's thesis, chapters 4-5: direct loss
# and hinge, alpha fixed and annealed, local and global normalization, warm-started from the
# cross-entropy or the self-normalized model), decoded greedily, with hard and with soft beam search.
#
# Usage: run.sh DATA_DIR EXP_DIR [--stage N] [--stop-stage M] [--methods a,b] [--smoke]
#   DATA_DIR  output of recipes/conll2003/prepare.sh (NER, or POS with prepare.sh --tag-column 1)
#   EXP_DIR   where checkpoints, logs (run.log, */train.log), hypotheses and results.txt go
# Stages: 1 baseline (cross-entropy), 2 methods, 3 generate on valid and test, one hypothesis of the
# source's length per sentence checked, 4 span F1 and tag accuracy (conlleval's rules; tag accuracy
# only when the labels are not chunk tags, e.g. POS) -> EXP_DIR/results.txt.
# Methods: by default hss_greedy hss_sample dss_greedy_fixed dss_sample_fixed dss_greedy_annealed
# dss_sample_annealed (decoded greedy and beam 5); --methods also takes the soft beam search methods
# of recipes/common/tagging.sh: sb_{direct,hinge}_{fixed,annealed} (from the baseline), selfnorm,
# sb_global_{direct,hinge}_{fixed,annealed} (from selfnorm), the _ce/_sn suffixes for the other
# initialisation, and the aliases soft_beam (Table 4.2) and global (Table 5.2/5.3 layout).  A run
# with soft beam methods decodes greedy, beam SB_BEAM, softbeam SB_BEAM and beam SB_BEAM on raw
# scores, and writes the models' log Z (Table 5.1) to EXP_DIR/logz.txt.
# --smoke (or SMOKE=1): a tiny tagger for one epoch, to check the pipeline in seconds.
# Env: SEED (1), DEVICE=auto|cpu|gpu, ARCH (seq2seq_tagger_ner; seq2seq_tagger_supertag for the
#      512-wide model), ENCODER_BIDIRECTIONAL (true; false: the unidirectional ablation of section
#      5.4.2), EPOCHS (30), DSS_ALPHA (1), DSS_K (inverse sigmoid strength in updates, 1000),
#      DSS_DECODING (sequential), DSS_ALPHA_MAX (100, the cap of the annealed alpha); soft beam:
#      SB_BEAM (3), SB_EPOCHS (50), SB_ALPHA, SB_ALPHA_GROWTH, SB_ALPHA_PERIOD, SB_ALPHA_MAX,
#      SB_COST_WEIGHTS (O:2 for NER: a wrong O costs twice; uniform for POS), SB_LR, SELF_NORM_LAMBDA,
#      SB_DECODE_ALPHA, TAG_DECODES, TAG_SPLITS, WARM_START (see recipes/common/tagging.sh).
set -euo pipefail
source "$(dirname "$0")/../common/lib.sh"
source "$(dirname "$0")/../common/stages.sh"
source "$(dirname "$0")/../common/tagging.sh"
parse_run_args "$@"

# -- model: the paper's NER tagger: 1-layer LSTM encoder and decoder of 64 units, 8-dim label
#    embeddings, the decoder attending to the i-th source position only, zero initial state
MODEL=(--task tagging --arch "${ARCH:-seq2seq_tagger_ner}" --encoder-bidirectional "${ENCODER_BIDIRECTIONAL:-true}")
REG=(--dropout 0.2 --label-smoothing 0.0)
OPTIM=(--optimizer adam --lr 1e-3 --clip-norm 5.0)
BATCH=(--max-tokens 4000 --num-workers 0)
LENGTH=(--max-epoch "${EPOCHS:-30}")
# -- the mixing schedule of every method (the paper: teacher forcing for the first epoch, ~50
#    updates here, then Bengio's inverse sigmoid decay of the gold probability)
DSS_MIX=(--ss-schedule inverse_sigmoid --ss-inverse-sigmoid-k "${DSS_K:-1000}" --ss-prob 1.0 --ss-warmup-updates 50)
HSS_MIX=("${DSS_MIX[@]}")
ALPHA=(--dss-alpha "${DSS_ALPHA:-1}")
ANNEAL=(--dss-alpha-schedule exponential --dss-alpha-growth 1.2 --dss-alpha-period-updates 50 --dss-alpha-max "${DSS_ALPHA_MAX:-100}")
DSS=(--criterion differentiable_ss --dss-decoding "${DSS_DECODING:-sequential}")
METHODS=(hss_greedy hss_sample dss_greedy_fixed dss_sample_fixed dss_greedy_annealed dss_sample_annealed)
FLAGS_hss_greedy=(--criterion sequential_ss --ss-conditioning argmax)
FLAGS_hss_sample=(--criterion sequential_ss --ss-conditioning sample)
FLAGS_dss_greedy_fixed=("${DSS[@]}" --dss-mode greedy "${ALPHA[@]}")
FLAGS_dss_sample_fixed=("${DSS[@]}" --dss-mode sample "${ALPHA[@]}")
FLAGS_dss_greedy_annealed=("${DSS[@]}" --dss-mode greedy "${ALPHA[@]}" "${ANNEAL[@]}")
FLAGS_dss_sample_annealed=("${DSS[@]}" --dss-mode sample "${ALPHA[@]}" "${ANNEAL[@]}")
DECODES=(greedy beam5)
# -- soft beam search (thesis 4.5.1): beam 3, a wrong O costs twice (set by define_soft_beam_methods
#    when the labels are chunk tags with an O; the POS column gets the uniform Hamming cost)
SB_BEAM=${SB_BEAM:-3}

if [ "$SMOKE" = 1 ]; then
  MODEL=(--task tagging --arch seq2seq_tagger_ner --encoder-hidden-size 16 --decoder-hidden-size 16
         --encoder-embed-dim 16 --encoder-bidirectional "${ENCODER_BIDIRECTIONAL:-true}")
  LENGTH=(--max-epoch 1)
  BATCH=(--max-tokens 2000 --num-workers 0)
  DSS_MIX=(--ss-schedule constant --ss-prob 0.5)
  HSS_MIX=("${DSS_MIX[@]}")
  SB_EPOCHS=1
  SB_ALPHA_PERIOD=2   # the annealed alpha moves within the smoke epoch
fi

# the mixing schedule of the scheduled sampling methods
method_mix_flags() {
  case $1 in
    hss_*) echo "${HSS_MIX[*]}" ;;
    dss_*) echo "${DSS_MIX[*]}" ;;
  esac
}
define_soft_beam_methods
run_tagging_stages
