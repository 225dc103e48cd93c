#!/usr/bin/env bash
# CPU benchmark of candle (atelier-inference) against diffusers on the same mid-size random
# Flux transformer (hidden 768, 6 heads of 128, 4 double + 8 single blocks, 512 T5 tokens):
# seconds per denoising step at 512x512 and peak RSS, for bf16 and fp8 weights.
#
# Usage: inference/bench/bench.sh [work dir]   (uses the parity venv, see inference/parity)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${ATELIER_PARITY_VENV:-$HOME/.cache/atelier/parity-venv}"
work="${1:-$(mktemp -d)}"
steps="${BENCH_STEPS:-4}"
# The dev profile builds dependencies (candle's kernels) at opt-level 2, as the whole team
# already has them built; BENCH_PROFILE=release measures the shipped binary's profile.
profile="${BENCH_PROFILE:-dev}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/atelier/target}"

[ -x "$venv/bin/python" ] || { echo "no venv at $venv: run inference/parity/run.sh first" >&2; exit 1; }
(cd "$repo" && cargo build --quiet --profile "$profile" -p atelier-inference --example model_tool)
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
tool="$CARGO_TARGET_DIR/$dir/examples/model_tool"
[ -d "$work/model" ] || "$tool" tiny --out "$work/model" --preset bench --seed 1

# Runs a command under /usr/bin/time and prints its JSON line with peak_rss_mib added.
measure() {
    /usr/bin/time -v -o "$work/time.txt" "$@" > "$work/out.json"
    rss_kib=$(awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$work/time.txt")
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["peak_rss_mib"]=round(int(sys.argv[2])/1024); print(json.dumps(r))' \
        "$work/out.json" "$rss_kib"
}

for precision in bf16 fp8; do
    measure "$tool" bench --model "$work/model" --precision "$precision" --steps "$steps" --width 512 --height 512
    measure "$venv/bin/python" "$here/bench.py" --model "$work/model" --precision "$precision" --steps "$steps"
done | tee "$work/results.jsonl"

python3 - "$work/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
by = {(r["implementation"], r["precision"]): r for r in rows}
print(f"{'precision':9s} {'candle s/step':>13s} {'diffusers s/step':>16s} {'ratio':>6s} {'candle RSS':>10s} {'diffusers RSS':>13s}")
for p in ("bf16", "fp8"):
    c, d = by[("candle", p)], by[("diffusers", p)]
    print(f"{p:9s} {c['steady_step_s']:13.2f} {d['steady_step_s']:16.2f} {c['steady_step_s']/d['steady_step_s']:6.2f} "
          f"{c['peak_rss_mib']:>6d} MiB {d['peak_rss_mib']:>9d} MiB")
PY
