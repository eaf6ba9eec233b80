# The conditional masked LM (CMLM) and Metropolis-Hastings block of a translation recipe: Goyal's
# thesis "Characterizing and Overcoming the Limitations of Neural Autoregressive Models" (CMU 2021),
# chapter 6, "Energy Based Neural Sequence Models: Connection with Masked Language Modelling
# objective" (Goyal, Dyer and Berg-Kirkpatrick).  Sourced by run.sh after stages.sh and flowseq.sh.
#
# The methods this adds to stage 2 (only with --methods; `--methods mh` (or `cmlm`) = all three):
#   distill   no model: the stage-1 baseline translates the training set (recipes/common/distill.sh;
#             the same step as the FlowSeq block's: one EXP_DIR/distill serves both)
#   cmlm_raw  fairseq's cmlm_transformer (Ghazvininejad et al. 2019, "Mask-Predict", as fairseq
#             implements it: --task translation_lev --noise random_mask --criterion nat_loss) on the
#             raw training data (the length-filtered EXP_DIR/raw_maxN when NAR_MAX_LEN > 0)
#   cmlm_kd   the same on the distilled data
# Stage 3 decodes each CMLM model with the decodings of MH_DECODES (default below):
#   warm         the warm start of the chains (thesis Algorithm 4, line 3): one parallel greedy pass
#                over an all-mask target of the predicted length (--task translation_lev,
#                --iter-decode-max-iter 0)
#   maskpredict  fairseq's iterative refinement (mask-predict), length beam 1, exactly 10 passes
#                (--iter-decode-max-iter 9 --iter-decode-force-max-iter --iter-decode-with-beam 1):
#                the "Mask-predict (beam=1, It=10)" row of Table 6.6
#   gibbs        degenerate Gibbs sampling with the masked conditionals (section 6.6)
#   mh_local     Metropolis-Hastings with the locally normalized energy E_local (E_norm; 6.2.4)
#   mh_raw       Metropolis-Hastings with the raw-score energy E_raw (6.2.1)
#   with suffixes, in this order:
#     _block     block proposals of MH_BLOCK_SIZE positions, linearly annealed down to 1 over the
#                chain unless MH_BLOCK_ANNEAL=0 (section 6.7.3, Table 6.4, Figure 6.3)
#     _annealNN  the target distribution's temperature annealed linearly from 1 by 0.NN per epoch
#                (section 6.8; Table 6.5 uses 0.02, 0.04, 0.06), the first MH_FORCED_ACCEPT (2)
#                epochs accepted outright, output MH_ANNEAL_OUTPUT (best); MH only
#     _tNN       proposal temperature NN/10 (t08 = 0.8; Table 6.2 uses 2.0 1.5 1.0 0.8 0.5)
#     _pNN       nucleus (top-p) proposal 0.NN (Table 6.3 uses 0.99 0.95 0.90 0.80)
#   e.g. gibbs_t08 (Table 6.6's degenerate Gibbs at T = 0.8), mh_raw_anneal02_t08 (Table 6.6's
#   "Raw Score Energy"), gibbs_block (the degenerate block Gibbs column of Table 6.4).
# Every sampler decoding runs MH_CHAINS chains per sentence, MH_BURN_IN burn-in epochs then
# MH_EPOCHS sample epochs (an epoch = one sweep over the positions, in MH_ORDER), writes one
# hypothesis per sentence (MH_OUTPUT: final | best; the annealed ones MH_ANNEAL_OUTPUT) and its
# chain statistics to EXP_DIR/<model>/test.<decoding>.stats.jsonl (one JSON line per batch and
# epoch); stage 4 adds, next to the BLEU line, an `MH <model>/<decoding>: ...` line with the
# chain-weighted acceptance and novel-transition rates and mean energies of the sample epochs
# (recipes/common/nar_tools.py mh-stats).
#
# A recipe defines, before calling mh_setup, the arrays CMLM_MODEL CMLM_REG CMLM_OPTIM CMLM_BATCH
# CMLM_LENGTH (the NAT block's conventions).  Env overrides: MH_DECODES, MH_CHAINS (5), MH_BURN_IN (7),
# MH_EPOCHS (26), MH_BLOCK_SIZE (4), MH_BLOCK_ANNEAL (1), MH_ORDER (random), MH_LENGTH_BEAM (1),
# MH_OUTPUT (final), MH_ANNEAL_OUTPUT (best), MH_FORCED_ACCEPT (2), MH_TARGET_TEMPERATURE_FLOOR
# (unset: the generator's default), MH_MAX_TOKENS_PER_PASS (unset), and the distillation's
# (DISTILL_BEAM, DISTILL_FORCE, NAR_MAX_LEN).  The thesis's chain lengths are 7 burn-in and >= 26
# more epochs, >= 5 chains (section 6.5).

if ! declare -F flowseq_distill_step > /dev/null; then
  source "$(dirname "${BASH_SOURCE[0]}")/flowseq.sh"
fi

MH_METHODS=(distill cmlm_raw cmlm_kd)
MH_DEFAULT_DECODES="warm maskpredict gibbs gibbs_t08 mh_local mh_raw mh_local_block mh_raw_block mh_local_anneal02_t08 mh_raw_anneal02_t08"

# --smoke: a 1+1-layer 32-wide CMLM, one epoch; chains of 1 + 1 epochs, 2 chains, blocks of 2
mh_smoke_settings() {
  CMLM_MODEL=(--arch cmlm_transformer --share-all-embeddings --encoder-layers 1 --decoder-layers 1
              --encoder-embed-dim 32 --decoder-embed-dim 32 --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64
              --encoder-attention-heads 2 --decoder-attention-heads 2)
  CMLM_REG=(--dropout 0.0 --weight-decay 0.0)
  CMLM_OPTIM=(--optimizer adam --lr 5e-3 --lr-scheduler fixed)
  CMLM_BATCH=(--max-tokens 2000 --num-workers 0)
  CMLM_LENGTH=(--max-epoch 1)
  MH_CHAINS=${MH_CHAINS:-2}
  MH_BURN_IN=${MH_BURN_IN:-1}
  MH_EPOCHS=${MH_EPOCHS:-1}
  MH_BLOCK_SIZE=${MH_BLOCK_SIZE:-2}
  DISTILL_BEAM=${DISTILL_BEAM:-2}
}

mh_setup() {
  if [ "$SMOKE" = 1 ]; then mh_smoke_settings; fi
  MH_DECODES=${MH_DECODES:-$MH_DEFAULT_DECODES}
  MH_CHAINS=${MH_CHAINS:-5}
  MH_BURN_IN=${MH_BURN_IN:-7}
  MH_EPOCHS=${MH_EPOCHS:-26}
  MH_BLOCK_SIZE=${MH_BLOCK_SIZE:-4}
  MH_BLOCK_ANNEAL=${MH_BLOCK_ANNEAL:-1}
  MH_ORDER=${MH_ORDER:-random}
  MH_LENGTH_BEAM=${MH_LENGTH_BEAM:-1}
  MH_OUTPUT=${MH_OUTPUT:-final}
  MH_ANNEAL_OUTPUT=${MH_ANNEAL_OUTPUT:-best}
  MH_FORCED_ACCEPT=${MH_FORCED_ACCEPT:-2}
  local v
  for v in MH_CHAINS MH_BLOCK_SIZE MH_LENGTH_BEAM; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
  done
  for v in MH_BURN_IN MH_EPOCHS MH_FORCED_ACCEPT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be an integer >= 0, got '${!v}'"
  done
  [[ $MH_BLOCK_ANNEAL =~ ^[01]$ ]] || die "MH_BLOCK_ANNEAL must be 0 or 1, got '$MH_BLOCK_ANNEAL'"
  [[ $MH_ORDER =~ ^(random|left_to_right)$ ]] || die "MH_ORDER must be random or left_to_right, got '$MH_ORDER'"
  [[ $MH_OUTPUT =~ ^(final|best)$ ]] || die "MH_OUTPUT must be final or best, got '$MH_OUTPUT'"
  [[ $MH_ANNEAL_OUTPUT =~ ^(final|best)$ ]] || die "MH_ANNEAL_OUTPUT must be final or best, got '$MH_ANNEAL_OUTPUT'"
  local d
  for d in $MH_DECODES; do mh_decode_flags "$d" check > /dev/null || die "MH_DECODES: unknown decoding '$d' (warm, maskpredict, gibbs|mh_local|mh_raw[_block][_annealNN][_tNN][_pNN]; _annealNN is for mh_* only)"; done

  # the distillation: the FlowSeq block's step (registered once, whichever block comes first)
  if [ -z "${METHOD_FUNC[distill]:-}" ]; then
    DISTILL_BEAM=${DISTILL_BEAM:-5}
    NAR_MAX_LEN=${NAR_MAX_LEN:-0}
    EXTRA_METHODS+=(distill)
    METHOD_FUNC[distill]=flowseq_distill_step
  fi
  EXTRA_METHODS+=(cmlm_raw cmlm_kd)
  local raw_data=$DATA_DIR/bin hint="run the distillation first: --methods distill (stage 2)"
  if [ "${NAR_MAX_LEN:-0}" -gt 0 ]; then raw_data=$EXP_DIR/raw_max$NAR_MAX_LEN; fi
  # fairseq's NAT example flags for the CMLM (examples/nonautoregressive_translation): learned
  # positions, the length predicted as an offset from the source length (loss weight 0.1), BERT init
  CMLM_MODEL+=(--encoder-learned-pos --decoder-learned-pos --pred-length-offset --length-loss-factor 0.1 --apply-bert-init)
  local m
  for m in cmlm_raw cmlm_kd; do
    CMLM_FLAGS=(--task translation_lev --criterion nat_loss --noise random_mask --ddp-backend legacy_ddp
                "${CMLM_LENGTH[@]}")
    declare -ga "FLAGS_$m=(\"\${CMLM_FLAGS[@]}\")" "MODEL_$m=(\"\${CMLM_MODEL[@]}\")" \
      "REG_$m=(\"\${CMLM_REG[@]}\")" "OPTIM_$m=(\"\${CMLM_OPTIM[@]}\")" "BATCH_$m=(\"\${CMLM_BATCH[@]}\")"
    read -r -a "DECODES_$m" <<< "$MH_DECODES"
  done
  METHOD_DATA[cmlm_raw]=$raw_data; METHOD_DATA[cmlm_kd]=$EXP_DIR/distill
  if [ "${NAR_MAX_LEN:-0}" -gt 0 ]; then METHOD_DATA_HINT[cmlm_raw]=$hint; fi
  METHOD_DATA_HINT[cmlm_kd]=$hint
  DECODE_HOOKS+=(mh_decode_flags)
  # --methods mh / cmlm: the whole block; other names pass through; a name given twice (distill in
  # `flowseq,mh`) runs once
  if [ -n "$ONLY_METHODS" ]; then
    local names out=() n o dup
    IFS=, read -r -a names <<< "$ONLY_METHODS"
    for n in "${names[@]}"; do
      if [ "$n" = mh ] || [ "$n" = cmlm ]; then set -- "${MH_METHODS[@]}"; else set -- "$n"; fi
      for n in "$@"; do
        dup=0; for o in "${out[@]}"; do [ "$o" = "$n" ] && dup=1; done
        [ "$dup" = 1 ] || out+=("$n")
      done
    done
    ONLY_METHODS=$(IFS=,; echo "${out[*]}")
  fi
}

# The fairseq-generate flags of one decoding of the block (stage 3's decode_flags calls this through
# DECODE_HOOKS); returns 1 for a name it does not know.  MODEL = check: only validates the name.
mh_decode_flags() {
  local decode=$1 model=$2
  case $decode in
    warm) echo "--task translation_lev --iter-decode-max-iter 0 --iter-decode-eos-penalty 0 --beam 1"; return 0 ;;
    maskpredict)
      echo "--task translation_lev --iter-decode-max-iter 9 --iter-decode-force-max-iter --iter-decode-with-beam 1 --iter-decode-eos-penalty 0 --beam 1"
      return 0 ;;
  esac
  [[ $decode =~ ^(gibbs|mh_local|mh_raw)(_block)?(_anneal([0-9][0-9]))?(_t([0-9][0-9]))?(_p([0-9][0-9]))?$ ]] || return 1
  local kind=${BASH_REMATCH[1]} block=${BASH_REMATCH[2]} anneal=${BASH_REMATCH[4]} temp=${BASH_REMATCH[6]} top_p=${BASH_REMATCH[8]}
  if [ "$kind" = gibbs ] && [ -n "$anneal" ]; then return 1; fi   # no target distribution to anneal
  if [ -n "$temp" ] && [ "$temp" = 00 ]; then return 1; fi
  if [ -n "$top_p" ] && [ "$top_p" = 00 ]; then return 1; fi
  [ "$model" = check ] && return 0
  local f=(--task translation_mh --beam 1 --nbest 1)
  case $kind in
    gibbs) f+=(--mh-sampler gibbs) ;;
    mh_local) f+=(--mh-sampler mh --mh-energy local) ;;
    mh_raw) f+=(--mh-sampler mh --mh-energy raw) ;;
  esac
  f+=(--mh-chains "$MH_CHAINS" --mh-burn-in-epochs "$MH_BURN_IN" --mh-sample-epochs "$MH_EPOCHS"
      --mh-order "$MH_ORDER" --mh-length-beam "$MH_LENGTH_BEAM")
  if [ -n "$block" ]; then
    f+=(--mh-block-size "$MH_BLOCK_SIZE")
    [ "$MH_BLOCK_ANNEAL" = 1 ] && f+=(--mh-block-anneal)
  else
    f+=(--mh-block-size 1)
  fi
  [ -z "$temp" ] || f+=(--mh-proposal-temperature "$((10#$temp / 10)).$((10#$temp % 10))")
  [ -z "$top_p" ] || f+=(--mh-top-p "0.$top_p")
  if [ -n "$anneal" ]; then
    f+=(--mh-target-temperature 1.0 --mh-target-temperature-step "0.$anneal"
        --mh-forced-accept-epochs "$MH_FORCED_ACCEPT" --mh-output "$MH_ANNEAL_OUTPUT")
    [ -z "${MH_TARGET_TEMPERATURE_FLOOR:-}" ] || f+=(--mh-target-temperature-floor "$MH_TARGET_TEMPERATURE_FLOOR")
  else
    f+=(--mh-output "$MH_OUTPUT")
  fi
  [ -z "${MH_MAX_TOKENS_PER_PASS:-}" ] || f+=(--mh-max-tokens-per-pass "$MH_MAX_TOKENS_PER_PASS")
  # the statistics of this decoding only: a rerun starts the file afresh
  local stats=$EXP_DIR/$model/test.$decode.stats.jsonl
  rm -f "$stats"
  f+=(--mh-stats-path "$stats")
  echo "${f[*]}"
}
