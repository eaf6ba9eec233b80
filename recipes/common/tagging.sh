# The stages of the tagging recipes (conll2003, ccgbank), sourced after lib.sh and stages.sh, once
# parse_run_args has run.  The recipe sets MODEL REG OPTIM BATCH LENGTH (the cross-entropy baseline),
# METHODS (its default stage-2 methods) with their FLAGS_<m>, optionally a function
# method_mix_flags NAME (extra flags for a method, e.g. a mixing schedule), then calls
# define_soft_beam_methods and run_tagging_stages.
#
# Soft beam search methods (Goyal's thesis, chapters 4 and 5), selectable with --methods:
#   sb_{direct,hinge}_{fixed,annealed}          soft_beam_loss, local normalization, warm-started from
#                                               the cross-entropy baseline (stage 1)
#   selfnorm                                    self_normalized_cross_entropy from scratch (section 5.3.1)
#   sb_global_{direct,hinge}_{fixed,annealed}   soft_beam_loss, global normalization (raw scores),
#                                               warm-started from selfnorm
#   ..._ce / ..._sn suffix                      the other initialisation (sb_direct_annealed_sn: local,
#                                               from selfnorm; sb_global_direct_annealed_ce: global, from CE)
# Aliases for --methods: soft_beam (the four local ones, Tables 4.1/4.2), global (selfnorm and the
# 2x2 of local/global x CE/selfnorm initialisation with the direct loss and annealed alpha, Tables 5.2/5.3).
#
# Env (defaults in brackets): SB_BEAM (the recipe's: 3 NER, 5 CCG) = k of training and of the hard and
# soft beam decodings; SB_EPOCHS [50] epochs of each warm-started fine-tune; SB_LR [the baseline's];
# SB_ALPHA [1]; SB_ALPHA_GROWTH [1.2], SB_ALPHA_PERIOD [50 updates], SB_ALPHA_MAX [100]: the annealed
# alpha = SB_ALPHA * GROWTH ** (updates / PERIOD), capped; SB_COST_WEIGHTS [O:2 for a chunk tag set
# with an O label, else uniform Hamming; set it empty for uniform]; SELF_NORM_LAMBDA [0.1];
# SB_DECODE_ALPHA [the model's final training alpha: SB_ALPHA_MAX for annealed models, else SB_ALPHA];
# WARM_START [checkpoint_last.pt]; TAG_DECODES (space-separated, overrides the decodings of stage 3);
# LOGZ_MAX_BATCHES (limits the log Z pass over each split); TAG_SPLITS ["valid test"]: the splits decoded.

SB_BEAM=${SB_BEAM:-3}
SB_EPOCHS=${SB_EPOCHS:-50}
SB_ALPHA=${SB_ALPHA:-1}
SB_ALPHA_GROWTH=${SB_ALPHA_GROWTH:-1.2}
SB_ALPHA_PERIOD=${SB_ALPHA_PERIOD:-50}
SB_ALPHA_MAX=${SB_ALPHA_MAX:-100}
SELF_NORM_LAMBDA=${SELF_NORM_LAMBDA:-0.1}
WARM_START=${WARM_START:-checkpoint_last.pt}
TAG_SPLITS=${TAG_SPLITS:-valid test}
# Per-method tables (stages.sh): METHOD_INIT (the model a method is warm-started from), METHOD_GLOBAL
# (1 when globally normalized: decoded on raw scores), METHOD_ALPHA (its final training alpha, the
# default soft-beam decoding alpha), METHOD_EPOCHS, METHOD_LR.
EXTRA_METHODS=()               # known to --methods, not trained by default (stages.sh select_methods)

# chunk (every label O or X-TYPE with X in B I E S: span F1 applies) or atomic (POS, supertags)
tag_kind() { "$PY" "$HELPERS/tools.py" tagset "$DATA_DIR/bin/dict.$TGT.txt"; }

define_soft_beam_methods() {
  TAG_KIND=$(tag_kind) || die "could not read the label dictionary $DATA_DIR/bin/dict.$TGT.txt"
  if [ -z "${SB_COST_WEIGHTS+x}" ]; then
    SB_COST_WEIGHTS=
    if [ "$TAG_KIND" = chunk ] && grep -q '^O ' "$DATA_DIR/bin/dict.$TGT.txt"; then SB_COST_WEIGHTS=O:2; fi
  fi
  local cost=()
  [ -z "$SB_COST_WEIGHTS" ] || cost=(--soft-beam-cost-weights "$SB_COST_WEIGHTS")
  local objective schedule norm init name alpha reg_sb=() i
  for ((i = 0; i < ${#REG[@]}; i++)); do
    if [ "${REG[$i]}" = --label-smoothing ]; then i=$((i + 1)); else reg_sb+=("${REG[$i]}"); fi
  done
  for norm in local global; do
    for objective in direct hinge; do
      for schedule in fixed annealed; do
        for init in "" _ce _sn; do
          name=sb_${objective}_${schedule}${init}
          [ "$norm" = global ] && name=sb_global_${objective}_${schedule}${init}
          local flags=(--criterion soft_beam_loss --soft-beam-size "$SB_BEAM" --soft-beam-objective "$objective"
                       --soft-beam-normalization "$norm" --soft-beam-alpha "$SB_ALPHA" "${cost[@]}")
          alpha=$SB_ALPHA
          if [ "$schedule" = annealed ]; then
            flags+=(--soft-beam-alpha-schedule exponential --soft-beam-alpha-growth "$SB_ALPHA_GROWTH"
                    --soft-beam-alpha-period-updates "$SB_ALPHA_PERIOD" --soft-beam-alpha-max "$SB_ALPHA_MAX")
            alpha=$SB_ALPHA_MAX
          else
            flags+=(--soft-beam-alpha-schedule fixed)
          fi
          declare -g -a "FLAGS_$name" "REG_$name"
          local -n ref="FLAGS_$name"; ref=("${flags[@]}"); unset -n ref
          # soft_beam_loss has no label smoothing: the baseline's REG without --label-smoothing
          local -n ref="REG_$name"; ref=("${reg_sb[@]}"); unset -n ref
          case $init in
            _ce) METHOD_INIT[$name]=baseline ;;
            _sn) METHOD_INIT[$name]=selfnorm ;;
            *) if [ "$norm" = global ]; then METHOD_INIT[$name]=selfnorm; else METHOD_INIT[$name]=baseline; fi ;;
          esac
          [ "$norm" = global ] && METHOD_GLOBAL[$name]=1
          METHOD_ALPHA[$name]=$alpha
          METHOD_EPOCHS[$name]=$SB_EPOCHS
          [ -z "${SB_LR:-}" ] || METHOD_LR[$name]=$SB_LR
          # the _ce suffix of a local method and the _sn suffix of a global one name the default: skip them
          if { [ "$norm" = local ] && [ "$init" = _ce ]; } || { [ "$norm" = global ] && [ "$init" = _sn ]; }; then continue; fi
          EXTRA_METHODS+=("$name")
        done
      done
    done
  done
  FLAGS_selfnorm=(--criterion self_normalized_cross_entropy --self-norm-lambda "$SELF_NORM_LAMBDA")
  METHOD_ALPHA[baseline]=$SB_ALPHA; METHOD_ALPHA[selfnorm]=$SB_ALPHA
  EXTRA_METHODS=(selfnorm "${EXTRA_METHODS[@]}")
  # --methods aliases
  local expanded=() m
  if [ -n "$ONLY_METHODS" ]; then
    IFS=, read -r -a wanted <<< "$ONLY_METHODS"
    for m in "${wanted[@]}"; do
      case $m in
        soft_beam) expanded+=(sb_direct_fixed sb_direct_annealed sb_hinge_fixed sb_hinge_annealed) ;;
        global) expanded+=(selfnorm sb_direct_annealed sb_global_direct_annealed_ce sb_direct_annealed_sn sb_global_direct_annealed) ;;
        *) expanded+=("$m") ;;
      esac
    done
    # drop repeats, keep the first occurrence
    local seen=" " out=()
    for m in "${expanded[@]}"; do [[ $seen == *" $m "* ]] || { out+=("$m"); seen+="$m "; }; done
    ONLY_METHODS=$(IFS=,; echo "${out[*]}")
  fi
}

is_soft_beam_run() {
  local m
  for m in "${METHODS[@]}"; do case $m in sb_*|selfnorm) return 0 ;; esac; done
  return 1
}

# The decodings of stage 3: greedy and beam 5 (Table 1 of the DSS paper) unless soft beam methods are
# in the run; then greedy, hard beam k, soft beam k and hard beam k on raw scores (Tables 4.x, 5.x).
tagging_decodes() {
  if [ -n "${TAG_DECODES:-}" ]; then read -r -a DECODES <<< "$TAG_DECODES"; return; fi
  if is_soft_beam_run; then
    DECODES=(greedy "beam$SB_BEAM" "softbeam$SB_BEAM" "beam${SB_BEAM}raw")
  fi
}

generate_tagging() {
  local model split decode dir n scoring=span_f1
  [ "$TAG_KIND" = chunk ] || scoring=tag_accuracy
  for model in "${MODELS[@]}"; do
    dir=$EXP_DIR/$model
    [ -s "$dir/checkpoint_last.pt" ] || die "no checkpoint to decode: $dir/checkpoint_last.pt (run stage 1/2 first)"
    for split in $TAG_SPLITS; do
      n=$(wc -l < "$DATA_DIR/raw/$split.$SRC")
      for decode in "${DECODES[@]}"; do
        local flags
        read -r -a flags <<< "$(decode_flags "$decode" "$model")"
        # the tagging task's generator emits exactly one label per word;
        # --required-batch-size-multiple 1: otherwise fairseq may drop sentences (fairseq issue 5036)
        local cmd=(fairseq-generate "$DATA_DIR/bin" --user-dir "$USER_DIR" --task tagging
          --source-lang "$SRC" --target-lang "$TGT" --path "$dir/checkpoint_last.pt" --gen-subset "$split"
          "${DEVICE_FLAGS[@]}" "${flags[@]}" --batch-size "${GEN_BATCH_SIZE:-128}" --required-batch-size-multiple 1
          --num-workers 0 --scoring "$scoring")
        printf '%q ' "${cmd[@]}" > "$dir/$split.$decode.cmd"; echo >> "$dir/$split.$decode.cmd"
        "${cmd[@]}" > "$dir/$split.$decode.out" 2> "$dir/$split.$decode.err" \
          || { tail -20 "$dir/$split.$decode.err" >&2; die "fairseq-generate failed: $dir/$split.$decode.err"; }
        "$PY" "$HELPERS/tools.py" hyps --expected "$n" "$dir/$split.$decode.out" "$dir/$split.$decode.hyp"
      done
    done
  done
}

# log Z (mean, variance over the target positions, teacher-forced) of every model on train and
# valid, one line each in EXP_DIR/logz.txt: Table 5.1 (CE vs self-normalized).
log_normalizers() {
  local model specs=()
  for model in "${MODELS[@]}"; do specs+=(--model "$model=$EXP_DIR/$model/checkpoint_last.pt"); done
  "$PY" "$HELPERS/tools.py" logz --user-dir "$USER_DIR" --data "$DATA_DIR/bin" --splits train,valid "${specs[@]}" \
    ${LOGZ_MAX_BATCHES:+--max-batches "$LOGZ_MAX_BATCHES"} | tee "$EXP_DIR/logz.txt.tmp" \
    || die "the log Z pass failed (see above)"
  mv "$EXP_DIR/logz.txt.tmp" "$EXP_DIR/logz.txt"
}

score_tagging() {
  local model split decode
  : > "$EXP_DIR/results.txt.tmp"
  for model in "${MODELS[@]}"; do
    for split in $TAG_SPLITS; do
      for decode in "${DECODES[@]}"; do
        if [ "$TAG_KIND" = chunk ]; then
          "$PY" "$HELPERS/tools.py" tagscore --name "$model/$split/$decode" \
            --report "$EXP_DIR/$model/$split.$decode.conlleval" \
            "$EXP_DIR/$model/$split.$decode.hyp" "$DATA_DIR/raw/$split.$TGT" | tee -a "$EXP_DIR/results.txt.tmp"
        else
          "$PY" "$HELPERS/tools.py" tagscore --accuracy-only --name "$model/$split/$decode" \
            "$EXP_DIR/$model/$split.$decode.hyp" "$DATA_DIR/raw/$split.$TGT" | tee -a "$EXP_DIR/results.txt.tmp"
        fi
      done
    done
  done
  mv "$EXP_DIR/results.txt.tmp" "$EXP_DIR/results.txt"
  if [ "$TAG_KIND" = chunk ]; then
    echo "(span F1: conlleval's chunk rules on the decoded tags vs $DATA_DIR/raw/<split>.$TGT)"
  else
    echo "(tag accuracy: the labels are not chunk tags ($DATA_DIR/bin/dict.$TGT.txt), so no span F1)"
  fi
}

run_tagging_stages() {
  select_methods
  tagging_decodes
  if stage_on 1; then
    phase "stage 1: baseline, cross-entropy"
    train_model baseline --criterion label_smoothed_cross_entropy
  fi
  if stage_on 2; then
    train_methods
  fi
  if stage_on 3; then
    phase "stage 3: generate (${DECODES[*]}) on $TAG_SPLITS"
    generate_tagging
    if is_soft_beam_run; then
      phase "stage 3: log Z of the models (teacher-forced, train and valid)"
      log_normalizers
    fi
  fi
  if stage_on 4; then
    if [ "$TAG_KIND" = chunk ]; then phase "stage 4: span F1 (conlleval)"; else phase "stage 4: tag accuracy"; fi
    score_tagging
  fi
  phase "done: $EXP_DIR (log: $EXP_DIR/run.log)"
}
