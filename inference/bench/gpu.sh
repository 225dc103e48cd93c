#!/usr/bin/env bash
# The prepared GPU run of issue 15: Atelier (fp8 and bf16) against diffusers' FluxPipeline
# (bf16) on the same full-size random FLUX.1-dev weights, at 1024x1024, 28 steps, guidance 3.5,
# seed 0: seconds per image (two warm runs each, every phase ended by a device
# synchronisation), peak GPU memory (nvidia-smi, sampled every 100 ms, the same for both
# sides), peak host memory (RssAnon, sampled) and the ratios; then the max abs difference of
# the final latents of Atelier bf16 and of diffusers replaying the same run from Atelier's
# initial noise and text states, as `make parity` does.
#
# Two places, two commands:
#
#   here (Rust, network):  inference/bench/gpu.sh pack [bundle.tar.xz]
#       builds with `make cuda`, strips model_tool (the server's pipeline with a benchmark
#       front; atelier-inference itself is not needed), fetches the pinned diffusers wheel
#       (pip download diffusers==0.42.1 --no-deps) and writes an xz bundle with the binary,
#       the wheel, this script, gpu_diffusers.py, parity.py and the wheels' libcurand.so.10
#       (PyTorch's own CUDA wheels no longer carry cuRAND); limit 64 MiB.
#   there (NVIDIA GPU with a CUDA 13.0 driver, python3 with a CUDA build of torch and
#   transformers; no network, no Rust):  tar xJf bundle.tar.xz && atelier-gpu/gpu.sh run
#       writes about 34 GB of weights into $GPU_BENCH_WORK (default ./gpu-bench-work), needs the
#       CUDA 13 libraries the binary links (libcudart.so.13, libcublas.so.13 with
#       libcublasLt.so.13, libcurand.so.10) from the loader's path, torch's nvidia wheels,
#       /usr/local/cuda, or (cuRAND) the bundle.
#
# Smoke test of the plumbing on the CPU at the tiny preset: gpu.sh run --tiny --device cpu
# (the same steps on a tiny model at 256x256, 4 steps; diffusers in f32; no GPU figures), with
# GPU_BENCH_BIN=<dir of model_tool> and GPU_BENCH_PYTHON=<python with diffusers> in a checkout.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
diffusers_pin=diffusers==0.42.1

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

pack() {
  local repo bundle stage
  repo=$(cd "$here/../.." && pwd)
  bundle=$(realpath -m "${1:-atelier-gpu.tar.xz}")
  make -C "$repo" cuda
  local cache=${ATELIER_CACHE:-$HOME/.cache/atelier}
  local release=${CUDA_TARGET_DIR:-$cache/target-cuda}/release
  stage=$(mktemp -d)
  mkdir -p "$stage/atelier-gpu/bin" "$stage/atelier-gpu/wheels" "$stage/parity"
  strip -o "$stage/atelier-gpu/bin/model_tool" "$release/examples/model_tool"
  mkdir "$stage/atelier-gpu/lib"
  cp "$(readlink -f "$cache/cuda-13.0/link/lib/libcurand.so")" "$stage/atelier-gpu/lib/"
  pip download --quiet --no-deps --dest "$stage/atelier-gpu/wheels" "$diffusers_pin"
  cp "$here/gpu.sh" "$here/gpu_diffusers.py" "$stage/atelier-gpu/"
  # gpu_diffusers.py finds parity.py at ../parity, as in the repository.
  cp "$repo/inference/parity/parity.py" "$stage/parity/"
  XZ_OPT=-6T0 tar -C "$stage" -cJf "$bundle" atelier-gpu parity
  du -sb "$stage" | awk '{printf "unpacked: %.1f MiB\n", $1 / 1048576}'
  rm -rf "$stage"
  du -b "$bundle" | awk '{printf "%s: %.1f MiB (limit 64 MiB)\n", $2, $1 / 1048576}'
}

# The CUDA 13 libraries of the binaries, when the loader does not already find them.
find_cuda_libraries() {
  local tool=$1 dir
  ldd "$tool" | grep -q 'not found' || return 0
  for dir in $("$python" -c 'import glob, os, site
for root in site.getsitepackages():
    print("\n".join(sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib")))))' 2>/dev/null) \
    /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib "$here/lib"; do
    if [ -e "$dir/libcublas.so.13" ] || [ -e "$dir/libcurand.so.10" ]; then
      export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$dir
    fi
  done
  if ldd "$tool" | grep 'not found' >&2; then
    echo "the libraries above are missing: install CUDA 13's runtime, cuBLAS and cuRAND" \
      "(torch's cu13 wheels carry them) or put them on LD_LIBRARY_PATH" >&2
    exit 1
  fi
}

# The carried diffusers wheel, in a venv over the system's torch and transformers.
python_env() {
  python=${GPU_BENCH_PYTHON:-python3}
  if ! "$python" -c 'import diffusers' 2>/dev/null; then
    "$python" -m venv --system-site-packages "$work/venv"
    python=$work/venv/bin/python
    "$python" -m pip install --quiet --no-index --no-deps "$here"/wheels/diffusers-*.whl
  fi
  "$python" -c 'import diffusers, torch, transformers, safetensors, numpy' || {
    echo "$python needs torch, transformers, safetensors, numpy and what diffusers imports" \
      "(huggingface_hub, regex, requests, Pillow, filelock): the module above is missing" >&2
    exit 1
  }
}

# measure NAME COMMAND...: runs COMMAND, keeps its JSON line in $work/NAME.json with the peak
# GPU memory used on the device (MiB, nvidia-smi) and the peak RssAnon of the process (MiB).
measure() {
  local name=$1 pid smi_pid=
  shift
  if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$work/$name.gpu" &
    smi_pid=$!
  fi
  "$@" >"$work/$name.out" &
  pid=$!
  : >"$work/$name.rss"
  while kill -0 "$pid" 2>/dev/null; do
    awk '/^RssAnon:/ {print $2}' "/proc/$pid/status" 2>/dev/null >>"$work/$name.rss" || true
    sleep 0.2
  done
  local status=0
  wait "$pid" || status=$?
  [ -z "$smi_pid" ] || kill "$smi_pid"
  [ "$status" = 0 ] || { echo "$name failed (exit $status)" >&2; exit "$status"; }
  "$python" - "$work" "$name" <<'PY'
import json, pathlib, sys
work, name = pathlib.Path(sys.argv[1]), sys.argv[2]
report = json.loads((work / f"{name}.out").read_text().strip().splitlines()[-1])
def peak(suffix, scale):
    path = work / f"{name}.{suffix}"
    values = [int(v) for v in path.read_text().split()] if path.exists() else []
    return max(values) // scale if values else None
report["gpu_peak_used_mib"] = peak("gpu", 1)
report["host_peak_rss_anon_mib"] = peak("rss", 1024)
(work / f"{name}.json").write_text(json.dumps(report))
gpu = report["gpu_peak_used_mib"]
print(f"  {name}: {report['seconds_per_image']:.2f} s/image, GPU peak {'-' if gpu is None else gpu} MiB,"
      f" host peak {report['host_peak_rss_anon_mib']} MiB")
PY
}

summary() {
  "$python" - "$work" <<'PY'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
rows = {name: json.loads((work / f"{name}.json").read_text()) for name in ("atelier-fp8", "atelier-bf16", "diffusers")}
base = rows["diffusers"]
def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"
print(f"{'run':15s} {'s/image':>8s} {'x diffusers':>11s} {'GPU peak MiB':>12s} {'x diffusers':>11s} {'host peak MiB':>13s} {'load s':>7s}")
for name, r in rows.items():
    gpu = r["gpu_peak_used_mib"]
    print(f"{name:15s} {r['seconds_per_image']:8.2f} {ratio(r['seconds_per_image'], base['seconds_per_image']):>11s} "
          f"{gpu if gpu is not None else '-':>12} {ratio(gpu, base['gpu_peak_used_mib']):>11s} "
          f"{r['host_peak_rss_anon_mib']:>13} {r['load_s']:7.1f}")
a = rows["atelier-bf16"]
print(f"atelier bf16 after load: RssAnon {a['rss_anon_loaded_mib']} MiB, at the end {a['rss_anon_end_mib']} MiB")
if "torch_peak_reserved_mib" in base:
    print(f"diffusers torch peak: allocated {base['torch_peak_allocated_mib']} MiB, reserved {base['torch_peak_reserved_mib']} MiB")
print(f"final latents, Atelier bf16 vs diffusers from the same noise and text states: max abs diff "
      f"{base['latents_max_abs_diff']:.3e} (sigmas {base['sigmas_max_abs_diff']:.1e})")
PY
}

run() {
  local preset=flux1-dev width=1024 height=1024 steps=28 dtype=bf16
  device=cuda
  while [ $# -gt 0 ]; do
    case $1 in
      --tiny) preset=tiny width=256 height=256 steps=4 ;;
      --device) device=$2; shift ;;
      *) usage ;;
    esac
    shift
  done
  [ "$device" = cuda ] || dtype=f32
  # No network there: everything comes from the model directory.
  export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
  work=$(realpath -m "${GPU_BENCH_WORK:-gpu-bench-work}")
  mkdir -p "$work"
  local tool=${GPU_BENCH_BIN:-$here/bin}/model_tool
  [ -x "$tool" ] || { echo "no $tool: unpack the bundle of 'gpu.sh pack'" >&2; exit 1; }
  python_env
  find_cuda_libraries "$tool"
  if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  fi
  # The diffusers layout of FLUX.1-dev in bf16: transformer 23.8 GB, T5-XXL 9.5 GB, CLIP, VAE.
  local free_gib
  free_gib=$(df -Pk "$work" | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "$preset" = flux1-dev ] && [ ! -e "$work/model/.complete" ] && [ "$free_gib" -lt 36 ]; then
    echo "$work has $free_gib GiB free; the weights need 36" >&2
    exit 1
  fi
  local started=$SECONDS
  if [ ! -e "$work/model/.complete" ]; then
    echo "== writing the $preset weights (diffusers layout) into $work/model"
    rm -rf "$work/model"
    "$tool" tiny --preset "$preset" --layout diffusers --seed 1 --out "$work/model"
    touch "$work/model/.complete"
    echo "   $((SECONDS - started)) s, $(du -sh "$work/model" | cut -f1)"
  fi
  local request=(--width "$width" --height "$height" --steps "$steps" --seed 0)
  local bench=("$tool" bench --model "$work/model" --device "$device" "${request[@]}"
    --first-run-steps 2 --warm-runs 2)
  echo "== Atelier fp8 ($((SECONDS - started)) s)"
  measure atelier-fp8 "${bench[@]}" --precision fp8
  echo "== Atelier bf16 ($((SECONDS - started)) s)"
  measure atelier-bf16 "${bench[@]}" --precision bf16 --latents-out "$work/atelier-bf16-latents.safetensors"
  echo "== diffusers FluxPipeline $dtype ($((SECONDS - started)) s)"
  measure diffusers "$python" "$here/gpu_diffusers.py" --model "$work/model" --device "$device" \
    --dtype "$dtype" "${request[@]}" --first-run-steps 2 --warm-runs 2 \
    --atelier-latents "$work/atelier-bf16-latents.safetensors"
  echo "== results ($((SECONDS - started)) s in all; JSON in $work/*.json)"
  summary
}

case ${1:-} in
  pack) shift; pack "$@" ;;
  run) shift; run "$@" ;;
  *) usage ;;
esac
