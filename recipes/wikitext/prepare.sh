#!/usr/bin/env bash
# WikiText-103 or WikiText-2 (Merity et al. 2016, "Pointer Sentinel Mixture Models"; the tokenised release,
# rare words already <unk>) -> text-completion examples for the MGS recipe (Welleck and Cho, AAAI 2021,
# section 5.1), binarised for fairseq's language models.
#
# Usage: prepare.sh WIKITEXT_DIR OUT_DIR [--unit sentence|paragraph] [--prefix-length K] [--max-tokens N]
#                   [--vocab-size N] [--smoke] [--force]
#   WIKITEXT_DIR  your copy of wikitext-103/ or wikitext-2/: wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens
#   --unit        sentence (default): each paragraph is cut after every ` . ` token, one sentence a line (short
#                 continuations: cheap to decode); paragraph: one paragraph a line, as the paper does
#   --prefix-length K (10, the paper's): a line is kept only when it has more than K tokens (the prefix and a
#                 non-empty continuation), so test example i is line i of OUT_DIR/text/test.txt
#   --max-tokens N  longest line kept, EOS included (64 for sentences, 512 for paragraphs) = the model's positions
#   --vocab-size N  the N most frequent training words (fairseq-preprocess --nwordssrc; 0 = all, the default)
# Headings (` = Title = `) and blank lines are dropped.  Env: TRAIN_LINES, VALID_LINES, TEST_LINES (0 = all):
# keep only the first N lines of a split.  --smoke: at most 2000 / 50 / 30 lines.
# Writes OUT_DIR/{text,bin,lm.env,preprocess.log}; the inputs are only read.
set -euo pipefail
source "$(dirname "$0")/../common/lib.sh"

UNIT=sentence
PREFIX_LENGTH=10
MAX_TOKENS=
VOCAB_SIZE=0
SMOKE_VOCAB_SIZE=0
recipe_option() {  # this recipe's own options (the common ones: parse_prepare_args in common/lib.sh)
  case $1 in
    --unit) UNIT=$2 ;;
    --prefix-length) PREFIX_LENGTH=$2 ;;
    --max-tokens) MAX_TOKENS=$2 ;;
    *) return 1 ;;
  esac
}
parse_prepare_args "$@"
[ ${#POS[@]} -eq 2 ] || usage
WT_DIR=${POS[0]}
OUT_DIR=${POS[1]}
case $UNIT in
  sentence) MAX_TOKENS=${MAX_TOKENS:-64} ;;
  paragraph) MAX_TOKENS=${MAX_TOKENS:-512} ;;
  *) die "--unit must be sentence or paragraph, got '$UNIT'" ;;
esac
[[ $PREFIX_LENGTH =~ ^[1-9][0-9]*$ ]] || die "--prefix-length must be a positive integer, got '$PREFIX_LENGTH'"
[[ $MAX_TOKENS =~ ^[1-9][0-9]*$ ]] && [ "$MAX_TOKENS" -gt $((PREFIX_LENGTH + 1)) ] \
  || die "--max-tokens must be an integer above the prefix length + 1, got '$MAX_TOKENS'"
[[ $VOCAB_SIZE =~ ^[0-9]+$ ]] || die "--vocab-size must be an integer >= 0, got '$VOCAB_SIZE'"
if [ "$SMOKE" = 1 ]; then
  TRAIN_LINES=${TRAIN_LINES:-2000} VALID_LINES=${VALID_LINES:-50} TEST_LINES=${TEST_LINES:-30}
fi

[ -d "$WT_DIR" ] || die "WikiText directory not found: $WT_DIR"
phase "checking inputs in $WT_DIR"
INPUTS+=("$WT_DIR")
for split in train valid test; do require_text "$WT_DIR/wiki.$split.tokens"; done

phase "output directory $OUT_DIR"
guard_outdir "$OUT_DIR" "$FORCE" text bin lm.env preprocess.log
mkdir -p "$OUT_DIR/text"

# one line per example: headings and blank lines dropped; sentences cut after a "." token (--unit sentence);
# lines of <= K tokens or of more than MAX_TOKENS - 1 tokens dropped; at most LIMIT lines (0 = all)
to_lines() {
  awk -v unit="$UNIT" -v k="$PREFIX_LENGTH" -v max="$MAX_TOKENS" -v limit="$2" -v name="$1" '
    function emit(n, s) {
      if (n <= k) short++
      else if (n + 1 > max) long++
      else { print s; kept++; if (limit > 0 && kept >= limit) { done = 1 } }
    }
    done { next }   # read to the end: an early exit would break the pipe (pipefail)
    NF == 0 { next }
    $1 == "=" && $NF == "=" { next }
    {
      paragraphs++
      if (unit == "paragraph") { emit(NF, $0); next }
      s = ""; n = 0
      for (i = 1; i <= NF && !done; i++) {
        s = n ? s " " $i : $i; n++
        if ($i == ".") { emit(n, s); s = ""; n = 0 }
      }
      if (n && !done) emit(n, s)
    }
    END {
      printf "  %s: %d lines from %d paragraphs (%d of <= %d tokens, %d of > %d tokens dropped)\n", name, kept, paragraphs, short, k, long, max - 1 > "/dev/stderr"
      if (kept == 0) exit 3
    }'
}
phase "text: one $UNIT a line, prefix $PREFIX_LENGTH tokens, at most $MAX_TOKENS tokens with EOS"
for split in train valid test; do
  limit_var=${split^^}_LINES
  # paragraphs are re-joined with single spaces, so a paragraph line is also its tokens joined by one space
  tr -s ' ' < "$WT_DIR/wiki.$split.tokens" | sed 's/^ //; s/ $//' \
    | to_lines "$split" "${!limit_var:-0}" > "$OUT_DIR/text/$split.txt" \
    || die "no usable $UNIT in $WT_DIR/wiki.$split.tokens (each needs more than $PREFIX_LENGTH and at most $((MAX_TOKENS - 1)) tokens)"
done

phase "fairseq-preprocess --only-source: binarising into $OUT_DIR/bin"
vocab=()
[ "$VOCAB_SIZE" = 0 ] || vocab=(--nwordssrc "$VOCAB_SIZE")
fairseq-preprocess --only-source --trainpref "$OUT_DIR/text/train.txt" --validpref "$OUT_DIR/text/valid.txt" \
  --testpref "$OUT_DIR/text/test.txt" --destdir "$OUT_DIR/bin" "${vocab[@]}" --workers 1 > "$OUT_DIR/preprocess.log" 2>&1 \
  || { tail -20 "$OUT_DIR/preprocess.log" >&2; die "fairseq-preprocess failed (log: $OUT_DIR/preprocess.log)"; }
for split in train valid test; do
  [ -s "$OUT_DIR/bin/$split.bin" ] || die "fairseq-preprocess wrote no $split data: $OUT_DIR/bin/$split.bin"
done
echo "  dictionary: $(wc -l < "$OUT_DIR/bin/dict.txt") types; test: $(wc -l < "$OUT_DIR/text/test.txt") examples"
# run.sh reads the unit, prefix length and positions from here
printf 'UNIT=%s\nPREFIX_LENGTH=%s\nMAX_TOKENS=%s\n' "$UNIT" "$PREFIX_LENGTH" "$MAX_TOKENS" > "$OUT_DIR/lm.env"
phase "done: $OUT_DIR/bin; next: recipes/wikitext/run.sh $OUT_DIR EXP_DIR"
