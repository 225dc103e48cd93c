#!/usr/bin/env bash
# Parity of atelier-inference (candle) with diffusers on a tiny random-weight checkpoint:
# builds the Rust side, writes the tiny model and the Rust dump, runs parity.py in a venv with
# the pinned requirements, and prints each max abs diff and PASS/FAIL.
#
# Usage: inference/parity/run.sh [work dir]   (default: a fresh temporary directory)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${ATELIER_PARITY_VENV:-$HOME/.cache/atelier/parity-venv}"
work="${1:-$(mktemp -d)}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/atelier/target}"
# Offline and quiet: everything comes from the model directory.
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error

if [ ! -x "$venv/bin/python" ] || ! cmp -s "$here/requirements.txt" "$venv/requirements.txt"; then
    echo "== installing $here/requirements.txt into $venv"
    start=$(date +%s)
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --no-input -r "$here/requirements.txt"
    cp "$here/requirements.txt" "$venv/requirements.txt"
    echo "   took $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1)"
fi

echo "== building the Rust side"
(cd "$repo" && cargo build --quiet -p atelier-inference --example model_tool)
tool="$CARGO_TARGET_DIR/debug/examples/model_tool"

echo "== tiny model and Rust dump in $work"
"$tool" tiny --out "$work/model" --seed 7 --diffusers-copy
for dtype in f32 bf16; do
    "$tool" dump --model "$work/model" --out "$work/dump-$dtype.safetensors" --compute-dtype "$dtype" \
        --steps 4 --width 256 --height 256 --seed 3 \
        --prompt "A photo of a red cat in the City at night, 42 Ünïcode's  TEST!!"
done

# Both runs, then one exit status: a failure in f32 must not hide the bf16 figures.
status=0
for dtype in f32 bf16; do
    echo "== diffusers side, $dtype"
    "$venv/bin/python" "$here/parity.py" --model "$work/model" --dump "$work/dump-$dtype.safetensors" || status=1
done
exit "$status"
