#!/usr/bin/env bash
# GPU throughput of the filter stage's scoring with ViT-L-14 (random weights: nothing is
# downloaded; the speed is the same as with real weights).
#
# Goal: >= 312 images/s per A100, the figure clip-retrieval publishes for ViT-L/14 inference.
# What it does: writes N synthetic 224 px JPEG tiles and a caption CSV, then runs
#   skyscript-build filter --model ViT-L-14 --pretrained none --device cuda --batch-size 256
# and prints the images/s of the scoring pass (decode workers + autocast forward + parquet
# writes; model loading excluded), plus the GPU's name.
#
# STATUS: untested on a GPU (written in a session without one); tested on CPU with
#   MODEL=tiny-random DEVICE=cpu N=256 bash bench/gpu_filter_vitl14.sh
#
# Settings (environment): N (16384), MODEL (ViT-L-14), DEVICE (cuda), BATCH (256),
# WORKERS (cores, at most 16), SIZE (224), PY (.venv/bin/python, else python3), WORK (a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-16384}
MODEL=${MODEL:-ViT-L-14}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-256}
CORES=$(nproc)
WORKERS=${WORKERS:-$(( CORES < 16 ? CORES : 16 ))}
SIZE=${SIZE:-224}
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
WORK=${WORK:-$(mktemp -d /tmp/gpu_filter.XXXXXX)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 SKYSCRIPT_NO_PROGRESS=1

"$PY" -c "import torch, open_clip" 2>/dev/null || {
  echo "needs torch and open_clip_torch: $PY -m pip install -e '.[clip]'" >&2; exit 3; }
"$PY" - <<EOF
import torch
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF

echo "writing $N synthetic ${SIZE}px tiles to $WORK/ds ($WORKERS processes)"
"$PY" - "$WORK/ds" "$N" "$SIZE" "$WORKERS" <<'EOF'
import csv, sys
from multiprocessing import Pool
from pathlib import Path
import numpy as np
from PIL import Image

root, n, size, procs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
CAPTIONS = ["building", "landuse of grass", "road of footway, surrounded by natural tree",
            "amenity of parking with surface of asphalt", "leisure of park"]

def write(i):
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(xx * rng.uniform(2, 9) + c) * np.cos(yy * rng.uniform(2, 9))
                     for c in range(3)], axis=-1)
    img = ((base + 1) * 100 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    name = f"images{2 + i % 6}/w{i}_FI_19.jpg"
    Image.fromarray(img).save(root / name, quality=90)
    return name, CAPTIONS[i % len(CAPTIONS)]

for k in range(2, 8):
    (root / f"images{k}").mkdir(parents=True, exist_ok=True)
with Pool(procs) as pool:
    rows = pool.map(write, range(n), chunksize=64)
with open(root / "captions.csv", "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["filepath", "title", "title_multi_objects"])
    for name, title in sorted(rows):
        w.writerow([name, title, title])
EOF

rm -rf "$WORK/out"
START=$(date +%s.%N)
"$PY" -m skyscript_build.cli filter --dataset "$WORK/ds" --captions "$WORK/ds/captions.csv" \
  --name bench --model "$MODEL" --pretrained none --device "$DEVICE" --batch-size "$BATCH" \
  --workers "$WORKERS" --val-size 0 --test-size 0 --top 0.5 --out "$WORK/out" \
  | tee "$WORK/summary.txt"
END=$(date +%s.%N)
SPEED=$(grep -o '[0-9.]* images/s' "$WORK/summary.txt" | head -1)
echo "RESULT model=$MODEL device=$DEVICE batch=$BATCH workers=$WORKERS n=$N: scoring $SPEED" \
  "(goal >= 312 images/s per A100); whole command incl. model load:" \
  "$(awk "BEGIN {printf \"%.1f\", $END - $START}") s"
[ -n "${KEEP:-}" ] || rm -rf "$WORK"
