#!/usr/bin/env bash
# CCG supertagging on CCGbank with the seq2seq tagger (Goyal's thesis, 4.5.2 and 5.4): cross-entropy
# vs the soft beam search loss (direct loss and hinge, alpha fixed and annealed: Table 4.1), locally
# vs globally normalized search-aware models warm-started from the cross-entropy or the
# self-normalized model, with a bidirectional or unidirectional encoder (Tables 5.1-5.3), decoded
# greedily, with hard beam search and with soft beam search (beam 5), scored by tag accuracy.
#
# Usage: run.sh DATA_DIR EXP_DIR [--stage N] [--stop-stage M] [--methods a,b] [--smoke]
#   DATA_DIR  output of recipes/ccgbank/prepare.sh
#   EXP_DIR   where checkpoints, logs (run.log, */train.log), hypotheses and results.txt go
# Stages: 1 baseline (cross-entropy), 2 methods (default: sb_direct_fixed sb_direct_annealed
# sb_hinge_fixed sb_hinge_annealed, warm-started from the baseline; --methods also takes selfnorm,
# sb_global_*, the _ce/_sn suffixes and the aliases soft_beam and global: recipes/common/tagging.sh),
# 3 generate greedy, beam 5, softbeam 5 and beam 5 on raw scores on valid and test (one supertag per
# word checked) and log Z of the models (EXP_DIR/logz.txt), 4 tag accuracy -> EXP_DIR/results.txt.
# --smoke (or SMOKE=1): a tiny tagger for one epoch, to check the pipeline in seconds.
# Env: SEED (1), DEVICE=auto|cpu|gpu, ARCH (seq2seq_tagger_supertag: 512-unit LSTMs, 512-dim
#      supertag embeddings), ENCODER_BIDIRECTIONAL (true; false: the unidirectional encoder of section
#      5.4.2, Tables 5.2/5.3), EPOCHS (30), and tagging.sh's SB_BEAM (5), SB_EPOCHS (50), SB_ALPHA,
#      SB_ALPHA_GROWTH, SB_ALPHA_PERIOD (250 updates, about an epoch), SB_ALPHA_MAX, SB_LR,
#      SELF_NORM_LAMBDA, SB_DECODE_ALPHA, TAG_DECODES, TAG_SPLITS, WARM_START.  The cost is the
#      uniform Hamming loss (the supertags are no chunk tags).
set -euo pipefail
source "$(dirname "$0")/../common/lib.sh"
source "$(dirname "$0")/../common/stages.sh"
# the thesis's supertagging beam (5.4.1), an annealing period of about one epoch (~250 updates)
SB_BEAM=${SB_BEAM:-5}
SB_ALPHA_PERIOD=${SB_ALPHA_PERIOD:-250}
source "$(dirname "$0")/../common/tagging.sh"
parse_run_args "$@"

# -- model: 1-layer LSTM encoder (bidirectional) and decoder of 512 units, 512-dim supertag
#    embeddings, the decoder attending to the i-th source position only, zero initial state
MODEL=(--task tagging --arch "${ARCH:-seq2seq_tagger_supertag}" --encoder-bidirectional "${ENCODER_BIDIRECTIONAL:-true}")
REG=(--dropout 0.2 --label-smoothing 0.0)
OPTIM=(--optimizer adam --lr 1e-3 --clip-norm 5.0)
# ~39.6k training sentences (~930k words): ~250 updates of 4000 tokens per epoch
BATCH=(--max-tokens 4000 --num-workers 0)
LENGTH=(--max-epoch "${EPOCHS:-30}")
METHODS=(sb_direct_fixed sb_direct_annealed sb_hinge_fixed sb_hinge_annealed)
DECODES=(greedy "beam$SB_BEAM")

if [ "$SMOKE" = 1 ]; then
  MODEL=(--task tagging --arch seq2seq_tagger_supertag --encoder-hidden-size 16 --decoder-hidden-size 16
         --encoder-embed-dim 16 --decoder-embed-dim 16 --encoder-bidirectional "${ENCODER_BIDIRECTIONAL:-true}")
  LENGTH=(--max-epoch 1)
  BATCH=(--max-tokens 2000 --num-workers 0)
  SB_EPOCHS=1
  SB_ALPHA_PERIOD=2
fi
define_soft_beam_methods
run_tagging_stages
