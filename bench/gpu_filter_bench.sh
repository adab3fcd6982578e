#!/usr/bin/env bash
# The filter stage on a GPU: ViT-L-14 and ViT-B-32 images/s against the bf16 image-forward
# bound, bf16 vs fp32, GPU decoding vs PIL, two processes vs one, and a profile, in one run
# (bench/gpu_filter.py says what each step measures; random weights, synthetic tiles).
#
# Goals (issue 17, one H200): ViT-L-14 >= 90 % of the bound; ViT-B-32 >= 8,000 images/s.
# Needs torch, torchvision and open_clip_torch (pip install -e '.[clip]'); py-spy if present.
# Results: printed (=== SUMMARY last) and in $OUT/gpu_filter.json (OUT defaults to bench/out).
# Copy the figures, with the GPU's name, into bench/RESULTS.md's filter section.
#
#   bash bench/gpu_filter_bench.sh                       # on a CUDA machine
#   bash bench/gpu_filter_bench.sh --device cpu --large tiny-random --base tiny-random \
#       --n-large 256 --n-base 512 --n-512 128 --n-check 256   # a dry run on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_filter.py "$@"
