# Sequence-level fine-tuning from an MLE checkpoint: MLE-guided parameter search (Welleck and Cho, "MLE-Guided
# Parameter Search for Task Loss Minimization in Neural Sequence Modeling", AAAI 2021; --criterion mgs) and
# minimum risk training (Shen et al. 2016, "Minimum Risk Training for Neural Machine Translation"; --criterion
# mrt), sourced after lib.sh (and, in a translation recipe, stages.sh).
#
# Two users:
#   * a translation recipe (iwslt14_de_en/run.sh) calls mgs_setup after its flag groups: `mgs` and `mrt` become
#     methods of stage 2 (only with --methods mgs,mrt, or the alias `--methods mgs_mrt`), warm-started from the
#     stage-1 baseline, decoded (beam 5, greedy) and scored with sacreBLEU by the usual stages 3-4;
#   * the text-completion recipe (wikitext/run.sh) calls mgs_criterion_flags, completion_generate and
#     completion_score directly.
# Env: MGS_TASK_LOSS (the recipe's default: bleu for translation, edit for text completion; lm = the NLL under
#      the frozen MLE checkpoint), MRT_TASK_LOSS (default MGS_TASK_LOSS), MGS_CANDIDATES (4, the paper's K),
#      MGS_ALPHA (100 for edit / bleu costs, 1 for lm), MGS_NOISE (1.0), MRT_CANDIDATES (beam), MRT_MLE_WEIGHT
#      (0.1), MGS_LR (1e-4, constant), MGS_EPOCHS (translation: 5), MGS_UPDATES (stop each fine-tune after N
#      updates).

# mgs_criterion_flags METHOD SCORER: the criterion flags of METHOD (mgs | mrt), one per line.  SCORER is the
# frozen MLE checkpoint, used only by the lm cost.  POST_PROCESS (e.g. sentencepiece) decodes the pieces
# before a bleu cost.
mgs_criterion_flags() {
  local method=$1 scorer=$2 loss alpha loss_name
  for loss_name in "${MGS_TASK_LOSS:-}" "${MRT_TASK_LOSS:-}"; do
    case $loss_name in ''|edit|bleu|chrf|lm) ;; *) die "MGS_TASK_LOSS / MRT_TASK_LOSS: unknown task loss '$loss_name' (edit, bleu, chrf, lm)" ;; esac
  done
  case $method in
    mgs)
      loss=${MGS_TASK_LOSS:?recipe error: MGS_TASK_LOSS is not set}
      alpha=${MGS_ALPHA:-$([ "$loss" = lm ] && echo 1 || echo 100)}
      printf '%s\n' --criterion mgs --mgs-task-loss "$loss" --mgs-num-candidates "${MGS_CANDIDATES:-4}" \
        --mgs-alpha "$alpha" --mgs-noise "${MGS_NOISE:-1.0}"
      [ "$loss" != lm ] || printf '%s\n' --mgs-lm-scorer-path "$scorer"
      [ -z "${POST_PROCESS:-}" ] || printf '%s\n' --mgs-post-process "$POST_PROCESS" ;;
    mrt)
      loss=${MRT_TASK_LOSS:-${MGS_TASK_LOSS:?recipe error: MGS_TASK_LOSS is not set}}
      printf '%s\n' --criterion mrt --mrt-task-loss "$loss" --mrt-candidates "${MRT_CANDIDATES:-beam}" \
        --mrt-num-candidates "${MGS_CANDIDATES:-4}" --mrt-mle-weight "${MRT_MLE_WEIGHT:-0.1}"
      [ "$loss" != lm ] || printf '%s\n' --mrt-lm-scorer-path "$scorer"
      [ -z "${POST_PROCESS:-}" ] || printf '%s\n' --mrt-post-process "$POST_PROCESS" ;;
    *) die "recipe error: no criterion flags for method '$method' (mgs, mrt)" ;;
  esac
}

# The fine-tuning optimiser: Adam at a constant MGS_LR, clipping 1.0 (the warm start resets the schedule).
mgs_optim() {
  MGS_OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 1.0 --lr "${MGS_LR:-1e-4}" --lr-scheduler fixed)
}

# Translation recipes: registers mgs and mrt as stage-2 methods warm-started from the baseline.
mgs_setup() {
  MGS_TASK_LOSS=${MGS_TASK_LOSS:-bleu}
  POST_PROCESS=${POST_PROCESS:-sentencepiece}
  mgs_optim
  local m flags reg=() i
  # the sequence-level criteria have no label smoothing: REG without --label-smoothing X
  for ((i = 0; i < ${#REG[@]}; i++)); do
    if [ "${REG[$i]}" = --label-smoothing ]; then i=$((i + 1)); else reg+=("${REG[$i]}"); fi
  done
  for m in mgs mrt; do
    mapfile -t flags < <(mgs_criterion_flags "$m" "$EXP_DIR/baseline/checkpoint_last.pt")
    [ ${#flags[@]} -gt 0 ] || exit 1   # die() inside <(...) only leaves the subshell: its message is shown
    if [ -n "${MGS_UPDATES:-}" ]; then flags+=(--max-update "$MGS_UPDATES"); fi
    declare -ga "FLAGS_$m=(\"\${flags[@]}\")" "REG_$m=(\"\${reg[@]}\")" "OPTIM_$m=(\"\${MGS_OPTIM[@]}\")"
    METHOD_INIT[$m]=baseline
    METHOD_EPOCHS[$m]=${MGS_EPOCHS:-$([ "$SMOKE" = 1 ] && echo 1 || echo 5)}
    EXTRA_METHODS+=("$m")
  done
  if [ "$ONLY_METHODS" = mgs_mrt ]; then ONLY_METHODS=mgs,mrt; fi
}

# -- text completion -----------------------------------------------------------------------------------------

# completion_generate CKPT BIN OUT_PREFIX N_EXPECTED [extra fairseq-generate flags]: greedy continuations of the
# test prefixes (--task text_completion, the flags of TC), OUT_PREFIX.{cmd,out,err,hyp}; every one of the
# N_EXPECTED test examples must get exactly one hypothesis (tools.py hyps).
completion_generate() {
  local ckpt=$1 bin=$2 out=$3 n=$4; shift 4
  [ -s "$ckpt" ] || die "no checkpoint to decode: $ckpt (run the training stages first)"
  # --required-batch-size-multiple 1: otherwise fairseq may drop the last batch's tail (fairseq issue 5036)
  local cmd=(fairseq-generate "$bin" --user-dir "$USER_DIR" --path "$ckpt" "${TC[@]}" --gen-subset test
    "${DEVICE_FLAGS[@]}" --beam 1 --batch-size "${GEN_BATCH_SIZE:-64}" --required-batch-size-multiple 1
    --num-workers 0 "$@")
  printf '%q ' "${cmd[@]}" > "$out.cmd"; echo >> "$out.cmd"
  "${cmd[@]}" > "$out.out" 2> "$out.err" || { tail -20 "$out.err" >&2; die "fairseq-generate failed: $out.err"; }
  "$PY" "$HELPERS/tools.py" hyps --expected "$n" "$out.out" "$out.hyp"
}

# completion_score NAME GENERATE_OUT TEST_TEXT DICT SCORER: one `COMPLETION NAME: edit .. nonterm .. repetition ..
# length .. lm ..` line (fairseq_ext/modules/completion_metrics.py; LM under the frozen SCORER).
completion_score() {
  local name=$1 gen=$2 text=$3 dict=$4 scorer=$5
  PYTHONPATH="$(dirname "$USER_DIR")${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m fairseq_ext.modules.completion_metrics --name "$name" --generate-output "$gen" \
    --test-text "$text" --dict "$dict" --prefix-length "$PREFIX_LENGTH" --scorer "$scorer" --json "${gen%.out}.json" \
    || die "scoring failed: $gen"
}
