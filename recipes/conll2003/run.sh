#!/usr/bin/env bash
# CoNLL-2003 NER with the seq2seq tagger: cross-entropy vs hard scheduled sampling vs differentiable
# scheduled sampling (Goyal et al. 2017, Table 1: greedy and sample; alpha fixed and annealed),
# greedy decoding and conlleval span F1.
#
# Usage: run.sh DATA_DIR EXP_DIR [--stage N] [--stop-stage M] [--methods a,b] [--smoke]
#   DATA_DIR  output of recipes/conll2003/prepare.sh
#   EXP_DIR   where checkpoints, logs (run.log, */train.log), hypotheses and results.txt go
# Stages: 1 baseline (cross-entropy), 2 methods (hss_greedy hss_sample dss_greedy_fixed
# dss_sample_fixed dss_greedy_annealed dss_sample_annealed; --methods picks some), 3 generate
# (greedy, and beam 5) on valid and test, one hypothesis of the source's length per sentence
# checked, 4 span F1 and tag accuracy (conlleval's rules) -> EXP_DIR/results.txt.
# --smoke (or SMOKE=1): a tiny tagger for one epoch, to check the pipeline in seconds.
# Env: SEED (1), DEVICE=auto|cpu|gpu, ARCH (seq2seq_tagger_ner; seq2seq_tagger_supertag for the
#      512-wide model), EPOCHS (30), DSS_ALPHA (1), DSS_K (inverse sigmoid strength in updates, 1000),
#      DSS_DECODING (sequential), DSS_ALPHA_MAX (100, the cap of the annealed alpha).
set -euo pipefail
source "$(dirname "$0")/../common/lib.sh"
source "$(dirname "$0")/../common/stages.sh"
parse_run_args "$@"

# -- model: the paper's NER tagger: 1-layer LSTM encoder and decoder of 64 units, 8-dim label
#    embeddings, the decoder attending to the i-th source position only, zero initial state
MODEL=(--task tagging --arch "${ARCH:-seq2seq_tagger_ner}")
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

if [ "$SMOKE" = 1 ]; then
  MODEL=(--task tagging --arch seq2seq_tagger_ner --encoder-hidden-size 16 --decoder-hidden-size 16
         --encoder-embed-dim 16)
  LENGTH=(--max-epoch 1)
  BATCH=(--max-tokens 2000 --num-workers 0)
  DSS_MIX=(--ss-schedule constant --ss-prob 0.5)
  HSS_MIX=("${DSS_MIX[@]}")
fi
select_methods

generate_tagging() {
  local model split decode beam dir n
  for model in "${MODELS[@]}"; do
    dir=$EXP_DIR/$model
    [ -s "$dir/checkpoint_last.pt" ] || die "no checkpoint to decode: $dir/checkpoint_last.pt (run stage 1/2 first)"
    for split in valid test; do
      n=$(wc -l < "$DATA_DIR/raw/$split.words")
      for decode in "${DECODES[@]}"; do
        beam=1; [ "$decode" = beam5 ] && beam=5
        # the tagging task's generator emits exactly one label per word;
        # --required-batch-size-multiple 1: otherwise fairseq may drop sentences (issue 5036)
        local cmd=(fairseq-generate "$DATA_DIR/bin" --user-dir "$USER_DIR" --task tagging
          --source-lang "$SRC" --target-lang "$TGT" --path "$dir/checkpoint_last.pt" --gen-subset "$split"
          "${DEVICE_FLAGS[@]}" --beam "$beam" --batch-size 128 --required-batch-size-multiple 1
          --num-workers 0 --scoring span_f1)
        printf '%q ' "${cmd[@]}" > "$dir/$split.$decode.cmd"; echo >> "$dir/$split.$decode.cmd"
        "${cmd[@]}" > "$dir/$split.$decode.out" 2> "$dir/$split.$decode.err" \
          || { tail -20 "$dir/$split.$decode.err" >&2; die "fairseq-generate failed: $dir/$split.$decode.err"; }
        "$PY" "$HELPERS/tools.py" hyps --expected "$n" "$dir/$split.$decode.out" "$dir/$split.$decode.hyp"
      done
    done
  done
}

score_tagging() {
  local model split decode
  : > "$EXP_DIR/results.txt.tmp"
  for model in "${MODELS[@]}"; do
    for split in valid test; do
      for decode in "${DECODES[@]}"; do
        "$PY" "$HELPERS/tools.py" tagscore --name "$model/$split/$decode" \
          --report "$EXP_DIR/$model/$split.$decode.conlleval" \
          "$EXP_DIR/$model/$split.$decode.hyp" "$DATA_DIR/raw/$split.$TGT" | tee -a "$EXP_DIR/results.txt.tmp"
      done
    done
  done
  mv "$EXP_DIR/results.txt.tmp" "$EXP_DIR/results.txt"
  echo "(span F1: conlleval's chunk rules on the decoded tags vs $DATA_DIR/raw/<split>.$TGT)"
}

if stage_on 1; then
  phase "stage 1: baseline, cross-entropy"
  train_model baseline --criterion label_smoothed_cross_entropy
fi
if stage_on 2; then
  for method in "${METHODS[@]}"; do
    declare -n method_flags="FLAGS_$method"
    mix=("${DSS_MIX[@]}"); case $method in hss_*) mix=("${HSS_MIX[@]}") ;; esac
    phase "stage 2: $method (${method_flags[*]} ${mix[*]})"
    train_model "$method" "${method_flags[@]}" "${mix[@]}"
    unset -n method_flags
  done
fi
if stage_on 3; then
  phase "stage 3: generate (${DECODES[*]}) on valid and test"
  generate_tagging
fi
if stage_on 4; then
  phase "stage 4: span F1 (conlleval)"
  score_tagging
fi
phase "done: $EXP_DIR (log: $EXP_DIR/run.log)"
