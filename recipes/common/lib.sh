# Shell helpers shared by the recipes' prepare.sh and run.sh (sourced, never run).
# Every failure goes through die() so a user sees one line that names the culprit.

RECIPES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_DIR=$(cd "$RECIPES_DIR/.." && pwd)
PY=${PYTHON:-python3}
# The plugin is loaded from this checkout unless the user points elsewhere.
USER_DIR=${FAIRSEQ_EXT_USER_DIR:-$REPO_DIR/fairseq_ext}
HELPERS=$RECIPES_DIR/common

die() { echo "ERROR: $*" >&2; exit 1; }

# True when matplotlib imports.  It is an optional extra of the package (setup.py's `plot`), needed only
# for figures: when missing it is installed within requirements/constraints.txt's pins, unless PLOT_INSTALL=0.
have_plot_extra() {
  "$PY" -c 'import matplotlib' 2> /dev/null && return 0
  [ "${PLOT_INSTALL:-1}" = 1 ] || return 1
  echo "installing matplotlib (the package's [plot] extra)" >&2
  "$PY" -m pip install --quiet matplotlib -c "$REPO_DIR/requirements/constraints.txt" || return 1
  "$PY" -c 'import matplotlib' 2> /dev/null
}

FORCE=0
SMOKE=${SMOKE:-0}
# prints the calling script's "# Usage:" header line
usage() { grep -m1 '^# Usage:' "$0" | sed 's/^# //'; exit 2; }

# The options every prepare.sh takes; a recipe's own ones go to its recipe_option NAME VALUE, which
# returns 0 when it took the option (with its value).  Positional arguments are left in POS.
parse_prepare_args() {
  POS=()
  while [ $# -gt 0 ]; do
    case $1 in
      --vocab-size) VOCAB_SIZE=$2; shift 2 ;;
      --smoke) SMOKE=1; shift ;;
      --force) FORCE=1; shift ;;
      -h|--help) usage ;;
      -*)
        if [ $# -ge 2 ] && recipe_option "$1" "$2"; then shift 2; else die "unknown option $1"; fi ;;
      *) POS+=("$1"); shift ;;
    esac
  done
  if [ "$SMOKE" = 1 ]; then VOCAB_SIZE=$SMOKE_VOCAB_SIZE; fi
}
phase() { echo "=== [$(basename "$(dirname "$0")") $(date +%H:%M:%S)] $* ==="; }

# The inputs of a prepare.sh (files and directories): guard_outdir never replaces a path that is,
# contains or lies inside one of them.  A recipe adds its input directories; require_file adds each file.
INPUTS=()

# A file the pipeline needs: present and with at least one byte.
require_file() {
  [ -e "$1" ] || die "missing input file: $1"
  [ -f "$1" ] || die "not a regular file: $1"
  [ -s "$1" ] || die "empty input file: $1"
  INPUTS+=("$1")
}

# Text the pipeline reads must be UTF-8 with no carriage return inside a line (file and line named).
require_text() {
  local f; for f in "$@"; do require_file "$f"; done
  "$PY" "$HELPERS/tools.py" check-text "$@" || exit 1
}

# Parallel files must be line-aligned; a count mismatch means a broken download or a wrong pair.
# Lines are counted as the Python tools and fairseq-preprocess read them (a lone \r ends a line for
# them, not for wc -l), after checking that both files are UTF-8 (tools.py check-parallel).
require_parallel() {
  local a=$1 b=$2
  require_file "$a"; require_file "$b"
  "$PY" "$HELPERS/tools.py" check-parallel "$a" "$b" || exit 1
}

# Refuses to write into a directory that already holds something unless --force was given;
# with --force only the subdirectories this pipeline creates are replaced, nothing else there.
# Whatever --force says, none of those paths may be, contain or lie inside an input (INPUTS; resolved
# real paths, so symbolic links and .. cannot hide it).  If the script then fails, the paths it created
# are removed again (guard_cleanup), so a failed run leaves OUT_DIR as it found it.
GUARD_OUT=
GUARD_SUBS=()
GUARD_CREATED_OUT=0
guard_outdir() {
  local out=$1 force=$2; shift 2
  local inputs=() i
  for i in "${INPUTS[@]}"; do inputs+=(--input "$i"); done
  "$PY" "$HELPERS/tools.py" check-outputs --out "$out" "${inputs[@]}" "$@" || exit 1
  if [ -d "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
    [ "$force" = 1 ] || die "output directory $out already exists and is not empty; refusing to overwrite it (pass --force to replace the recipe's own subdirectories: $*)"
    echo "  --force: replacing $* in $out"
    local sub; for sub in "$@"; do rm -rf "${out:?}/$sub"; done
  fi
  [ -e "$out" ] || GUARD_CREATED_OUT=1
  mkdir -p "$out"
  GUARD_OUT=$out
  GUARD_SUBS=("$@")
  trap guard_cleanup EXIT
}

# EXIT trap of guard_outdir: on failure, removes what this run wrote (the recipe's own paths, which
# did not exist when it started), and OUT_DIR itself when this run created it and it is empty again.
guard_cleanup() {
  local rc=$? sub
  [ "$rc" -ne 0 ] && [ -n "$GUARD_OUT" ] || return 0
  for sub in "${GUARD_SUBS[@]}"; do rm -rf "${GUARD_OUT:?}/$sub"; done
  if [ "$GUARD_CREATED_OUT" = 1 ]; then rmdir "$GUARD_OUT" 2> /dev/null || true; fi
  echo "  (failed: removed the partial outputs of this run from $GUARD_OUT: ${GUARD_SUBS[*]})" >&2
  exit "$rc"
}

# fairseq-train/-generate flags for the device: a GPU when torch sees one, else --cpu.
# DEVICE=cpu|gpu overrides; FP16=1 adds --fp16 on GPU.
device_flags() {
  local dev=${DEVICE:-auto}
  if [ "$dev" = auto ]; then
    if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then dev=gpu; else dev=cpu; fi
  fi
  case $dev in
    cpu) echo "--cpu" ;;
    gpu) if [ "${FP16:-0}" = 1 ]; then echo "--fp16"; fi ;;
    *) die "DEVICE must be auto, cpu or gpu, got '$dev'" ;;
  esac
}

# OUT/raw/{train,valid,test}.{SRC,TGT} (raw text) -> a joint sentencepiece model OUT/spm/spm.model,
# the encoded text OUT/spm/*, and fairseq's binarised data with a joined dictionary in OUT/bin.
# Extra arguments go to spm-train (e.g. --input-sentence-size for large corpora).
spm_and_binarize() {
  local out=$1 src=$2 tgt=$3 vocab=$4; shift 4
  local split lang
  phase "sentencepiece: training a joint $vocab-piece model on train.$src + train.$tgt"
  mkdir -p "$out/spm"
  "$PY" "$HELPERS/tools.py" spm-train --model-prefix "$out/spm/spm" --vocab-size "$vocab" "$@" \
    "$out/raw/train.$src" "$out/raw/train.$tgt"
  phase "sentencepiece: encoding train/valid/test"
  for split in train valid test; do
    for lang in "$src" "$tgt"; do
      "$PY" "$HELPERS/tools.py" spm-encode --model "$out/spm/spm.model" "$out/raw/$split.$lang" "$out/spm/$split.$lang"
    done
  done
  phase "fairseq-preprocess: binarising into $out/bin (joined dictionary)"
  # --workers 1 keeps the dictionary order (and so the data) identical from run to run.
  fairseq-preprocess --source-lang "$src" --target-lang "$tgt" \
    --trainpref "$out/spm/train" --validpref "$out/spm/valid" --testpref "$out/spm/test" \
    --destdir "$out/bin" --joined-dictionary --workers 1 > "$out/preprocess.log" 2>&1 \
    || { tail -20 "$out/preprocess.log" >&2; die "fairseq-preprocess failed (log: $out/preprocess.log)"; }
  for split in train valid test; do
    [ -s "$out/bin/$split.$src-$tgt.$src.bin" ] || die "fairseq-preprocess wrote no $split data: $out/bin/$split.$src-$tgt.$src.bin"
  done
  echo "  dictionary: $(wc -l < "$out/bin/dict.$src.txt") types; test: $(wc -l < "$out/raw/test.$src") sentences"
  # Lets run.sh know the pair without being told again.
  printf 'SRC=%s\nTGT=%s\n' "$src" "$tgt" > "$out/pair.env"
}

# DIR/{train,valid,test}.{SRC,TGT}, checked pairwise, copied to OUT/raw.
# binarize_tagging OUT_DIR: OUT_DIR/raw/{train,valid,test}.{words,tags} -> OUT_DIR/bin with separate word and
# label dictionaries (the target dictionary holds labels only), and OUT_DIR/pair.env
binarize_tagging() {
  local out=$1
  phase "binarising with fairseq-preprocess"
  fairseq-preprocess --source-lang words --target-lang tags \
    --trainpref "$out/raw/train" --validpref "$out/raw/valid" --testpref "$out/raw/test" \
    --destdir "$out/bin" --workers 1 > "$out/preprocess.log" 2>&1 \
    || { tail -20 "$out/preprocess.log" >&2; die "fairseq-preprocess failed: $out/preprocess.log"; }
  printf 'SRC=words\nTGT=tags\n' > "$out/pair.env"
}

copy_plain_splits() {
  local dir=$1 out=$2 src=$3 tgt=$4 split lang
  for split in train valid test; do require_parallel "$dir/$split.$src" "$dir/$split.$tgt"; done
  mkdir -p "$out/raw"
  for split in train valid test; do
    for lang in "$src" "$tgt"; do cp "$dir/$split.$lang" "$out/raw/$split.$lang"; done
  done
}

# Downloads URL to FILE unless FILE is already there (a .part file is never mistaken for it),
# then checks that it is a gzip tarball holding every MEMBER given.
fetch_tarball() {
  local url=$1 file=$2 member; shift 2
  if [ ! -s "$file" ]; then
    echo "  downloading $url"
    if command -v curl > /dev/null; then
      curl -fL --retry 3 -o "$file.part" "$url" || die "download failed: $url"
    elif command -v wget > /dev/null; then
      wget -q -O "$file.part" "$url" || die "download failed: $url"
    else
      die "neither curl nor wget is installed: cannot download $url"
    fi
    mv "$file.part" "$file"
  else
    echo "  reusing $file"
  fi
  [ -s "$file" ] || die "empty download: $file (from $url)"
  local listing
  listing=$(tar -tzf "$file" 2>/dev/null) || die "not a readable .tgz (broken or partial download? delete it and retry): $file"
  for member in "$@"; do
    grep -qxF "$member" <<< "$listing" || die "$file does not contain $member (unexpected archive from $url)"
  done
}

# The fairseq console scripts, or the same modules run by $PY when they are not on PATH
# (a virtual environment that is not activated, say).
for _tool in preprocess train generate; do
  if ! command -v "fairseq-$_tool" > /dev/null 2>&1; then
    eval "fairseq-$_tool() { \"\$PY\" -m fairseq_cli.$_tool \"\$@\"; }"
  fi
done
unset _tool
