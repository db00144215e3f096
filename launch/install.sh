# Sourced by launch/test.sh and launch/demo.sh: install ProFuser into $PY (default python3).
# A torch that is already installed (e.g. your CUDA build) is kept; without torch, the CPU build
# 2.13.0 is installed (a range that admits a newer torch would pull several GB of CUDA wheels).
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install -q "torch==2.13.0"
fi
echo "[install] installing profuser${PROFUSER_EXTRAS:+[$PROFUSER_EXTRAS]}"
"$PY" -m pip install -q -e ".${PROFUSER_EXTRAS:+[$PROFUSER_EXTRAS]}"
