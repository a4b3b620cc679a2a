#!/bin/sh
# Builds run_package against the installed torch (its headers and libraries): sh build.sh OUT_BINARY
# (OPT=-O0 compiles it in about two thirds of the time: the package's own code does the work)
set -e
PY=${PYTHON:-python3}
TORCH=$($PY -c "import os, torch; print(os.path.dirname(torch.__file__))")
ABI=$($PY -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
${CXX:-g++} -std=c++20 ${OPT:--O1} -D_GLIBCXX_USE_CXX11_ABI=$ABI "$(dirname "$0")/run_package.cpp" -o "$1" \
  -I"$TORCH/include" -I"$TORCH/include/torch/csrc/api/include" \
  -L"$TORCH/lib" -Wl,-rpath,"$TORCH/lib" -ltorch -ltorch_cpu -lc10
