# FlowSeq (Ma et al. 2019) and fairseq's vanilla non-autoregressive transformer (Gu et al. 2018, the
# paper's NAT baseline family) in a translation recipe: knowledge distillation, training on raw and
# distilled data, argmax / IWD / NPD decoding, sacreBLEU (sourced by run.sh after stages.sh).
#
# The methods this adds to stage 2 (only with --methods; `--methods flowseq` = all five):
#   distill      no model: the stage-1 baseline (the autoregressive teacher) decodes the TRAINING set
#                with beam DISTILL_BEAM (recipes/common/distill.sh) -> EXP_DIR/distill, a fairseq data
#                directory with the same dictionaries, valid and test as DATA_DIR/bin; with NAR_MAX_LEN
#                > 0 (WMT 80, IWSLT 60 pieces, as the paper filters) the distilled pairs are
#                length-filtered, and the raw training set too (-> EXP_DIR/raw_maxN)
#   flowseq_raw  FlowSeq (--task translation_flowseq --criterion flowseq_loss) on the raw data
#   flowseq_kd   the same on the distilled data
#   nat_raw      fairseq's nonautoregressive_transformer (--task translation_lev --criterion nat_loss
#                --noise full_mask) on the raw data
#   nat_kd       the same on the distilled data
# Stage 3 decodes the FlowSeq models with argmax, iwdN and npdN (N = FLOWSEQ_LENGTHS x N/FLOWSEQ_LENGTHS
# candidates: length candidates x latent samples at temperature FLOWSEQ_TAU; NPD rescored by the
# baseline checkpoint, the teacher), the NAT models with fairseq's iterative refinement generator and
# --iter-decode-max-iter 0 (one parallel pass: purely non-autoregressive), the baseline with beam 5
# and greedy; stage 4 scores everything with sacreBLEU.
#
# A recipe defines, before calling flowseq_setup, the arrays FLOWSEQ_MODEL FLOWSEQ_REG FLOWSEQ_OPTIM
# FLOWSEQ_BATCH FLOWSEQ_LENGTH and NAT_MODEL NAT_REG NAT_OPTIM NAT_BATCH NAT_LENGTH (each replaces
# the recipe's MODEL/REG/OPTIM/BATCH for those models; *_LENGTH is appended after LENGTH, so it wins),
# and may set FLOWSEQ_INIT (autoencoder pre-training updates before the prior's init),
# FLOWSEQ_KL_HOLD, FLOWSEQ_KL_WARMUP, NAR_MAX_LEN.  Env overrides: DISTILL_BEAM (5), DISTILL_FORCE=1
# (rebuild EXP_DIR/distill), FLOWSEQ_DECODES ("argmax iwd15 npd15 npd30"), FLOWSEQ_LENGTHS (3),
# FLOWSEQ_TAU (0.3), FLOWSEQ_IWD_K (4), FLOWSEQ_GEN_BATCH_SIZE (32 sentences, times the candidates).

source "$(dirname "${BASH_SOURCE[0]}")/distill.sh"

FLOWSEQ_METHODS=(distill flowseq_raw flowseq_kd nat_raw nat_kd)

# --smoke: tiny FlowSeq and NAT models, a few updates each, so that every new stage runs in seconds
flowseq_smoke_settings() {
  FLOWSEQ_MODEL=(--arch flowseq_tiny --share-all-embeddings)
  FLOWSEQ_REG=(--dropout 0.0 --weight-decay 0.0)
  FLOWSEQ_OPTIM=(--optimizer adam --lr 5e-3 --lr-scheduler fixed)
  FLOWSEQ_BATCH=(--max-tokens 300 --num-workers 0)
  FLOWSEQ_LENGTH=(--max-epoch 2)
  FLOWSEQ_INIT=3; FLOWSEQ_KL_HOLD=0; FLOWSEQ_KL_WARMUP=2
  NAT_MODEL=(--arch nonautoregressive_transformer --share-all-embeddings --encoder-layers 1 --decoder-layers 1
             --encoder-embed-dim 32 --decoder-embed-dim 32 --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64
             --encoder-attention-heads 2 --decoder-attention-heads 2)
  NAT_REG=(--dropout 0.0 --weight-decay 0.0)
  NAT_OPTIM=(--optimizer adam --lr 5e-3 --lr-scheduler fixed)
  NAT_BATCH=(--max-tokens 2000 --num-workers 0)
  NAT_LENGTH=(--max-epoch 1)
  FLOWSEQ_DECODES=${FLOWSEQ_DECODES:-argmax iwd4 npd4}
  FLOWSEQ_LENGTHS=${FLOWSEQ_LENGTHS:-2}
  FLOWSEQ_TAU=${FLOWSEQ_TAU:-0.5}
  FLOWSEQ_IWD_K=${FLOWSEQ_IWD_K:-2}
  DISTILL_BEAM=${DISTILL_BEAM:-2}
}

# Registers the five methods (EXTRA_METHODS: trained only when --methods names them) and expands
# the alias `flowseq` in --methods.
flowseq_setup() {
  if [ "$SMOKE" = 1 ]; then flowseq_smoke_settings; fi
  DISTILL_BEAM=${DISTILL_BEAM:-5}
  NAR_MAX_LEN=${NAR_MAX_LEN:-0}
  FLOWSEQ_DECODES=${FLOWSEQ_DECODES:-argmax iwd15 npd15 npd30}
  FLOWSEQ_LENGTHS=${FLOWSEQ_LENGTHS:-3}
  FLOWSEQ_TAU=${FLOWSEQ_TAU:-0.3}
  FLOWSEQ_IWD_K=${FLOWSEQ_IWD_K:-4}
  [[ $DISTILL_BEAM =~ ^[1-9][0-9]*$ ]] || die "DISTILL_BEAM must be a positive integer, got '$DISTILL_BEAM'"
  [[ $NAR_MAX_LEN =~ ^[0-9]+$ ]] || die "NAR_MAX_LEN must be an integer >= 0, got '$NAR_MAX_LEN'"
  check_flowseq_decodes
  EXTRA_METHODS+=("${FLOWSEQ_METHODS[@]}")
  METHOD_FUNC[distill]=flowseq_distill_step
  local raw_data=$DATA_DIR/bin hint="run the distillation first: --methods distill (stage 2)"
  if [ "$NAR_MAX_LEN" -gt 0 ]; then raw_data=$EXP_DIR/raw_max$NAR_MAX_LEN; fi
  local m
  for m in flowseq_raw flowseq_kd; do
    FLOWSEQ_FLAGS=(--task translation_flowseq --criterion flowseq_loss --ddp-backend legacy_ddp
                   --flowseq-init-updates "${FLOWSEQ_INIT:-30000}" --flowseq-kl-hold-updates "${FLOWSEQ_KL_HOLD:-0}"
                   --flowseq-kl-warmup-updates "${FLOWSEQ_KL_WARMUP:-10000}" "${FLOWSEQ_LENGTH[@]}")
    declare -ga "FLAGS_$m=(\"\${FLOWSEQ_FLAGS[@]}\")" "MODEL_$m=(\"\${FLOWSEQ_MODEL[@]}\")" \
      "REG_$m=(\"\${FLOWSEQ_REG[@]}\")" "OPTIM_$m=(\"\${FLOWSEQ_OPTIM[@]}\")" "BATCH_$m=(\"\${FLOWSEQ_BATCH[@]}\")" \
      "GEN_$m=(--task translation_flowseq --batch-size ${FLOWSEQ_GEN_BATCH_SIZE:-32})"
    read -r -a "DECODES_$m" <<< "$FLOWSEQ_DECODES"
  done
  # the model flags of fairseq's NAT example (examples/nonautoregressive_translation): learned
  # positions, length prediction as an offset from the source length (loss weight 0.1), BERT init
  NAT_MODEL+=(--encoder-learned-pos --decoder-learned-pos --pred-length-offset --length-loss-factor 0.1 --apply-bert-init)
  for m in nat_raw nat_kd; do
    NAT_FLAGS=(--task translation_lev --criterion nat_loss --noise full_mask --ddp-backend legacy_ddp
               "${NAT_LENGTH[@]}")
    declare -ga "FLAGS_$m=(\"\${NAT_FLAGS[@]}\")" "MODEL_$m=(\"\${NAT_MODEL[@]}\")" \
      "REG_$m=(\"\${NAT_REG[@]}\")" "OPTIM_$m=(\"\${NAT_OPTIM[@]}\")" "BATCH_$m=(\"\${NAT_BATCH[@]}\")" \
      "GEN_$m=(--task translation_lev)" "DECODES_$m=(nat)"
  done
  METHOD_DATA[flowseq_raw]=$raw_data; METHOD_DATA[nat_raw]=$raw_data
  METHOD_DATA[flowseq_kd]=$EXP_DIR/distill; METHOD_DATA[nat_kd]=$EXP_DIR/distill
  if [ "$NAR_MAX_LEN" -gt 0 ]; then METHOD_DATA_HINT[flowseq_raw]=$hint; METHOD_DATA_HINT[nat_raw]=$hint; fi
  METHOD_DATA_HINT[flowseq_kd]=$hint; METHOD_DATA_HINT[nat_kd]=$hint
  # --methods flowseq: the whole block; any other names pass through
  if [ -n "$ONLY_METHODS" ]; then
    local names out=() n
    IFS=, read -r -a names <<< "$ONLY_METHODS"
    for n in "${names[@]}"; do
      if [ "$n" = flowseq ]; then out+=("${FLOWSEQ_METHODS[@]}"); else out+=("$n"); fi
    done
    ONLY_METHODS=$(IFS=,; echo "${out[*]}")
  fi
}

# Stage 2's `distill`: the distilled training set, and the length-filtered raw one (NAR_MAX_LEN > 0).
flowseq_distill_step() {
  local force=0
  [ "${DISTILL_FORCE:-0}" = 1 ] && force=1
  distill_data "$DATA_DIR/bin" "$EXP_DIR/baseline/checkpoint_last.pt" "$EXP_DIR/distill" "$force" 1 \
    "$DISTILL_BEAM" "$NAR_MAX_LEN" "${GEN[@]}"
  if [ "$NAR_MAX_LEN" -gt 0 ]; then
    local out=$EXP_DIR/raw_max$NAR_MAX_LEN
    if [ -s "$out/DONE" ] && [ "$force" != 1 ]; then
      echo "  reusing the length-filtered raw training set $out"
    else
      phase "the raw training pairs of at most $NAR_MAX_LEN pieces -> $out"
      rm -rf "$out"; mkdir -p "$out/text"
      "$PY" "$HELPERS/tools.py" clean --max-len "$NAR_MAX_LEN" --ratio 1000000 \
        "$DATA_DIR/spm/train.$SRC" "$DATA_DIR/spm/train.$TGT" "$out/text/train.$SRC" "$out/text/train.$TGT"
      binarize_train_like "$DATA_DIR/bin" "$out/text/train" "$out"
      echo "max_len=$NAR_MAX_LEN from $DATA_DIR/spm/train" > "$out/DONE"
    fi
  fi
}

# fairseq-generate flags of the decodings named in DECODES_<model> (stages.sh calls this for any
# name it does not know, inside $(...): the names are checked by flowseq_setup): argmax | iwdN | npdN | nat.
recipe_decode_flags() {
  local decode=$1 l=$FLOWSEQ_LENGTHS n
  case $decode in
    argmax) echo "--flowseq-decoding argmax" ;;
    iwd[0-9]*)
      n=${decode:3}
      echo "--flowseq-decoding iwd --flowseq-length-candidates $l --flowseq-samples $((n / l)) --flowseq-temperature $FLOWSEQ_TAU --flowseq-iwd-samples $FLOWSEQ_IWD_K" ;;
    npd[0-9]*)
      # the teacher: the stage-1 autoregressive baseline (a missing file fails in fairseq-generate, by name)
      n=${decode:3}
      echo "--flowseq-decoding npd --flowseq-length-candidates $l --flowseq-samples $((n / l)) --flowseq-temperature $FLOWSEQ_TAU --flowseq-teacher-path $EXP_DIR/baseline/checkpoint_last.pt" ;;
    nat) echo "--iter-decode-max-iter 0 --iter-decode-eos-penalty 0 --beam 1" ;;
    *) echo "--unknown-decoding-$decode" ;;
  esac
}

# FLOWSEQ_DECODES: argmax, iwdN, npdN with N a positive multiple of FLOWSEQ_LENGTHS
check_flowseq_decodes() {
  local d n
  [[ $FLOWSEQ_LENGTHS =~ ^[1-9][0-9]*$ ]] || die "FLOWSEQ_LENGTHS must be a positive integer, got '$FLOWSEQ_LENGTHS'"
  for d in $FLOWSEQ_DECODES; do
    case $d in
      argmax) ;;
      iwd[0-9]*|npd[0-9]*)
        n=${d:3}
        [[ $n =~ ^[1-9][0-9]*$ ]] && [ $((n % FLOWSEQ_LENGTHS)) -eq 0 ] \
          || die "FLOWSEQ_DECODES: $d: the number of candidates must be a multiple of FLOWSEQ_LENGTHS=$FLOWSEQ_LENGTHS" ;;
      *) die "FLOWSEQ_DECODES: unknown decoding '$d' (argmax, iwdN, npdN)" ;;
    esac
  done
}
