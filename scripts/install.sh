#!/usr/bin/env bash
# Installs fairseq_ext and everything it needs into the active Python (use a venv if you like).
#   - torch: an already installed torch (a CUDA build, say) is kept; otherwise the 2.13.0 CPU build.
#   - fairseq-fixed 0.12.3.1 (the `fairseq` module with Python 3.11 fixes), built against that torch
#     with --no-build-isolation --no-deps, so pip never resolves torch or torchaudio by itself.
#   - fairseq's dependencies without torchaudio, numpy<2 and bitarray<3 (see requirements/).
#   - this package, editable, --no-deps.
# Idempotent: a second run only checks.  Usage: bash scripts/install.sh [--with-tests]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

torch_version=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ -z "$torch_version" ]; then
  echo "[install] torch 2.13.0 (CPU build)"
  pip_install torch==2.13.0
  torch_version=2.13.0
else
  echo "[install] keeping the installed torch $torch_version"
fi
constraints=$(mktemp); trap 'rm -f "$constraints"' EXIT
{ cat requirements/constraints.txt; echo "torch==$torch_version"; } > "$constraints"
# PIP_CONSTRAINT also reaches any build environment pip makes, so torch cannot be re-resolved there.
export PIP_CONSTRAINT="$constraints"

if ! "$PY" -c 'import fairseq, fairseq.libbase, fairseq.data.data_utils_fast, numpy, omegaconf, sacrebleu, sklearn, scipy, sentencepiece
import numpy as np; assert np.__version__.startswith("1."), np.__version__' 2>/dev/null; then
  echo "[install] fairseq dependencies"
  pip_install -r requirements/runtime.txt
  echo "[install] fairseq-fixed 0.12.3.1 (compiles its C++/Cython extensions: about 2 minutes)"
  pip_install --no-build-isolation --no-deps fairseq-fixed==0.12.3.1
fi
# added to requirements/runtime.txt after fairseq's own dependencies: installed on its own when missing
if ! "$PY" -c 'import editdistance' 2>/dev/null; then
  echo "[install] editdistance (the mgs task loss 'edit')"
  pip_install "$(grep '^editdistance' requirements/runtime.txt)"
fi
if [ "${1:-}" = "--with-tests" ] && ! "$PY" -c 'import pytest' 2>/dev/null; then
  pip_install -r requirements/test.txt
fi
# Checked from / so that the checkout itself (the current directory is on sys.path) does not pass for an install.
installed_from=$(cd / && "$PY" -c 'import fairseq_ext, os; print(os.path.dirname(os.path.dirname(os.path.abspath(fairseq_ext.__file__))))' 2>/dev/null || true)
if [ "$installed_from" != "$PWD" ]; then
  echo "[install] fairseq_ext (editable, --no-deps)"
  pip_install --no-deps --no-build-isolation -e .
fi
"$PY" -c 'import fairseq_ext, fairseq, torch; print(f"[install] ok: fairseq_ext {fairseq_ext.__version__}, fairseq {fairseq.__version__}, torch {torch.__version__}")'
