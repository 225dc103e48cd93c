"""diffusers side of inference/bench/bench.sh: seconds per denoising step of
FluxTransformer2DModel on the CPU, on the same model directory as the candle side.

Precisions: `bf16` and `fp8` hold the weights in that dtype and compute in f32 layer by layer
(diffusers' enable_layerwise_casting), as candle does on the CPU; `f32` holds f32 weights.
Prints one JSON line like model_tool bench.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "parity"))
from parity import image_ids, load_transformer, pack, scheduler_for  # noqa: E402

STORAGE = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--precision", choices=["bf16", "fp8", "f32"], default="bf16")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    manifest = json.loads((args.model / "atelier-model.json").read_text())
    cfg = manifest["transformer"]["config"]

    started = time.perf_counter()
    transformer, _ = load_transformer(args.model, manifest)
    if args.precision in STORAGE:
        transformer.enable_layerwise_casting(storage_dtype=STORAGE[args.precision], compute_dtype=torch.float32)
    load_s = time.perf_counter() - started
    weight_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())

    torch.manual_seed(0)
    h, w = args.height // 8, args.width // 8
    latents = pack(torch.randn(1, 16, h, w))
    t5 = torch.randn(1, manifest["t5"]["max_length"], cfg["context_in_dim"])
    clip = torch.randn(1, cfg["vec_in_dim"])
    img_ids, txt_ids = image_ids(h, w), torch.zeros(t5.shape[1], 3)
    schedule = {"base_shift": 0.5, "max_shift": 1.15}
    scheduler = scheduler_for("flux-dynamic-shift", schedule, args.steps, (h // 2) * (w // 2))
    guidance = torch.full([1], 3.5) if transformer.config.guidance_embeds else None
    step_s = []
    for t in scheduler.timesteps:
        last = time.perf_counter()
        velocity = transformer(
            hidden_states=latents,
            timestep=t.expand(1) / 1000,
            guidance=guidance,
            pooled_projections=clip,
            encoder_hidden_states=t5,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        step_s.append(time.perf_counter() - last)
    steady = step_s[1:] or step_s
    print(json.dumps({
        "implementation": "diffusers",
        "precision": args.precision,
        "torch_threads": torch.get_num_threads(),
        "load_s": load_s,
        "step_s": step_s,
        "mean_step_s": sum(step_s) / len(step_s),
        "steady_step_s": sum(steady) / len(steady),
        "transformer_weight_bytes": weight_bytes,
    }))


if __name__ == "__main__":
    main()
