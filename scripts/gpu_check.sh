#!/usr/bin/env bash
# fcexp on a CUDA machine, checked in one go (about 10 minutes on one GPU, my estimate; it stops at the first failure):
#   bash scripts/gpu_check.sh [output folder, default runs/gpu_check/<time>; it must not exist yet]
# 1. the default run on CUDA, then with bf16-mixed, then with model.compile=true (wall time of each);
# 2. the benchmark on CUDA (scripts/bench.py, JSON kept);
# 3. the sync check: training steps between logging steps with torch.cuda.set_sync_debug_mode("error");
# 4. a 2-job +launcher=parallel sweep, and the GPU each job trained on;
# 5. the benchmark with the 16-job grid at 1 epoch four ways (one after another, parallel, packed fp32 and bf16),
#    so the pack's gain on a GPU is measured in the same run (in bench.json's "grid16").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
PY=${PY:-.venv/bin/python}
"$PY" -c "import sys, torch; torch.cuda.is_available() or sys.exit('error: no CUDA on this machine; this script checks fcexp on a GPU')"
if [[ -e "$OUT" ]]; then
    echo "error: $OUT exists; give a new folder (a sweep rerun into an old one would refuse its completed jobs)" >&2
    exit 2
fi
mkdir -p "$OUT"
QUIET=(callbacks.progress.refresh_rate=0)

"$PY" -c "import torch; print('GPUs:', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"

timed() {  # name, then the command: its wall time goes to $OUT/times.tsv
    local name=$1 start
    shift
    echo "== $name: $*"
    start=$(date +%s%N)
    "$@" > "$OUT/$name.log" 2>&1 || { tail -30 "$OUT/$name.log"; return 1; }
    tail -4 "$OUT/$name.log"
    printf '%s\t%d\n' "$name" $((($(date +%s%N) - start) / 1000000000)) >> "$OUT/times.tsv"
}
: > "$OUT/times.tsv"
timed default "$PY" -m fcexp.train runs_dir="$OUT/default" "${QUIET[@]}"
timed bf16 "$PY" -m fcexp.train runs_dir="$OUT/bf16" trainer.precision=bf16-mixed "${QUIET[@]}"
timed compile "$PY" -m fcexp.train runs_dir="$OUT/compile" model.compile=true "${QUIET[@]}"
timed bench "$PY" scripts/bench.py --grid16 --json "$OUT/bench.json"
timed sync_check "$PY" -m pytest -q -p no:cacheprovider tests/test_train.py -k reads_nothing
timed parallel "$PY" -m fcexp.train -m +launcher=parallel seed=0,1 trainer.max_epochs=1 \
    hydra.sweep.dir="$OUT/parallel" "${QUIET[@]}"

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("default", "bf16", "compile"):
    for record in sorted((out / name).glob("*/metrics.json")):
        r = json.loads(record.read_text())
        used = r["provenance"]["device"].get("used", "")
        print(f"{name}: test acc {r['metrics']['test/acc']:.4f}, {r['wall_time_s']:.1f} s, on {used}")
        assert used.startswith("cuda"), f"{name} trained on {used!r}, not on CUDA"
for record in sorted((out / "parallel").glob("*/metrics.json")):
    r = json.loads(record.read_text())
    print(f"parallel job {record.parent.name}: trained on {r['provenance']['device'].get('used')}")
print("wall times (s):", dict(line.split("\t") for line in (out / "times.tsv").read_text().splitlines()))
PYEOF
