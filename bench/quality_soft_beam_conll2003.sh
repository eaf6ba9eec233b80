#!/usr/bin/env bash
# Quality benchmark: the rows of Tables 4.1/4.2 and 5.1-5.3 of Goyal's thesis on
# CoNLL-2003 English with the seq2seq tagger, through recipes/conll2003/run.sh.
#
# Usage: bench/quality_soft_beam_conll2003.sh CONLL2003_DIR [RUN_DIR]    (RUN_DIR default: bench/runs/soft_beam_conll2003)
#   CONLL2003_DIR: train.txt valid.txt test.txt in CoNLL column format; read, never copied here.
#   Env: PARTS ("ner pos pos_uni"), SEEDS ("1"), EPOCHS (cross-entropy and self-normalized
#        training, 20), SB_EPOCHS (each soft beam fine-tune, 5), SB_ALPHA_PERIOD (55: about one
#        NER/POS epoch of updates, so the annealed alpha grows x1.2 per epoch), PARALLEL (1: parts
#        run one after another; 2: two at a time), RESULTS_MD (where the table goes), plus
#        recipes/conll2003/run.sh's (SB_*, SELF_NORM_LAMBDA, TAG_SPLITS, ...).
#
# Parts (each one recipes/conll2003/run.sh run per seed, into RUN_DIR/<part>/seedN):
#   ner      NER tags, span F1 (Table 4.2): CE; sb_direct_fixed, sb_direct_annealed, sb_hinge_fixed,
#            sb_hinge_annealed (local normalization, warm-started from CE, beam 3, a wrong O costs 2);
#            decoded greedy, hard beam 3, soft beam 3
#   pos      the POS column (prepare.sh --tag-column 1; 45 labels standing in for CCG supertags, whose
#            data is licensed), tag accuracy: the same four methods (Table 4.1), plus selfnorm and the
#            2x2 local / global x CE / selfnorm initialisation (direct loss, annealed alpha), and log Z
#            of CE vs selfnorm (Tables 5.1, 5.2 and 5.3, bidirectional encoder)
#   pos_uni  the Table 5.2/5.3 models again with a unidirectional encoder (ENCODER_BIDIRECTIONAL=false)
# Re-running resumes (fairseq-train continues from checkpoint_last.pt; finished stages are redone
# cheaply).  The tables go to bench/results/quality_soft_beam_conll2003.md (bench/soft_beam_table.py),
# every command in the run directories' *.cmd files, every run's output in RUN_DIR/<part>/seedN.out.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONWARNINGS=ignore DEVICE=${DEVICE:-cpu}
export EPOCHS=${EPOCHS:-20} SB_EPOCHS=${SB_EPOCHS:-5} SB_ALPHA_PERIOD=${SB_ALPHA_PERIOD:-55}
PARTS=${PARTS:-"ner pos pos_uni"}
SEEDS=${SEEDS:-"1"}
PARALLEL=${PARALLEL:-1}
log() { echo "[$(date +%H:%M:%S)] $*"; }

# one part and seed: PART SEED
job() {
  local part=$1 seed=$2 data methods bidir=true
  case $part in
    ner) data=$RUN_DIR/ner_data; methods=soft_beam ;;
    pos) data=$RUN_DIR/pos_data; methods=soft_beam,global ;;
    pos_uni) data=$RUN_DIR/pos_data; methods=global; bidir=false ;;
    *) echo "unknown part $part (ner, pos, pos_uni)"; return 1 ;;
  esac
  mkdir -p "$RUN_DIR/$part"
  log "$part seed $seed (methods $methods, bidirectional $bidir, EPOCHS=$EPOCHS SB_EPOCHS=$SB_EPOCHS)"
  SEED=$seed ENCODER_BIDIRECTIONAL=$bidir bash "$REPO_DIR/recipes/conll2003/run.sh" "$data" "$RUN_DIR/$part/seed$seed" \
    --methods "$methods" > "$RUN_DIR/$part/seed$seed.out" 2>&1 \
    || { tail -20 "$RUN_DIR/$part/seed$seed.out"; log "$part seed $seed failed (log: $RUN_DIR/$part/seed$seed.out)"; return 1; }
  log "$part seed $seed done"
}
main() {
if [ "${1:-}" = --job ]; then RUN_DIR=$2; job "$3" "$4"; return; fi
[ $# -ge 1 ] || { sed -n 2,20p "$0"; exit 2; }
SRC_DIR=$1
RUN_DIR=${2:-$REPO_DIR/bench/runs/soft_beam_conll2003}
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)

if [ ! -s "$RUN_DIR/ner_data/pair.env" ]; then bash "$REPO_DIR/recipes/conll2003/prepare.sh" "$SRC_DIR" "$RUN_DIR/ner_data"; fi
if [ ! -s "$RUN_DIR/pos_data/pair.env" ]; then bash "$REPO_DIR/recipes/conll2003/prepare.sh" "$SRC_DIR" "$RUN_DIR/pos_data" --tag-column 1; fi


for part in $PARTS; do for seed in $SEEDS; do echo "$part $seed"; done; done \
  | xargs -P "$PARALLEL" -L 1 bash "$0" --job "$RUN_DIR" || log "some runs failed: see above"
python3 "$BENCH_DIR/soft_beam_table.py" --run-dir "$RUN_DIR" --md "${RESULTS_MD:-$REPO_DIR/bench/results/quality_soft_beam_conll2003.md}" \
  --command "PARTS=\"$PARTS\" SEEDS=\"$SEEDS\" EPOCHS=$EPOCHS SB_EPOCHS=$SB_EPOCHS SB_ALPHA_PERIOD=$SB_ALPHA_PERIOD bash bench/quality_soft_beam_conll2003.sh $SRC_DIR"
}

# The whole body is one function, so bash has read all of it before it runs: editing this file
# while a long run is under way cannot change what that run does.
main "$@"; exit
