"""diffusers side of inference/bench/gpu.sh: seconds per image of diffusers' FluxPipeline on the
model directory Atelier was timed on, its peak GPU memory, and the final latents of a replay
from Atelier's own initial noise and text states (inference/parity/parity.py's denoising loop,
here on the GPU in the pipeline's dtype) against the latents Atelier ended with.

Prints one JSON line.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "parity"))
from parity import denoise, scheduler_for  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_images(pipe, args, device):
    """One first run (CUDA context, kernel selection, allocator warm-up), then the warm runs,
    each a whole image (text encoders, denoising, VAE decoding) ended by a synchronisation."""

    def image(steps):
        synchronize(device)
        started = time.perf_counter()
        pipe(
            prompt=args.prompt,
            width=args.width,
            height=args.height,
            num_inference_steps=steps,
            guidance_scale=args.guidance,
            generator=torch.Generator(device).manual_seed(args.seed),
            output_type="np",
        )
        synchronize(device)
        return time.perf_counter() - started

    first_s = image(args.first_run_steps or args.steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm_s = [image(args.steps) for _ in range(args.warm_runs)]
    return first_s, warm_s


@torch.no_grad()
def replay(transformer, atelier_latents, device, dtype):
    """Max abs differences of the sigmas and the final latents against Atelier's run."""
    dump = load_file(atelier_latents)
    params = json.loads(atelier_latents.with_suffix(".json").read_text())
    schedule = dict(params["schedule"])
    name = schedule.pop("kind")
    h, w = params["height"] // 8, params["width"] // 8
    scheduler = scheduler_for(name, schedule, params["steps"], (h // 2) * (w // 2))
    sigma_diff = (scheduler.sigmas.double() - dump["sigmas"].double()).abs().max().item()
    # The transformer takes the timesteps on its own device; the scheduler keeps its sigmas on
    # the host on purpose (diffusers does the same in FluxPipeline).
    scheduler.timesteps = scheduler.timesteps.to(device)
    inputs = [dump[key].to(device, dtype) for key in ("noise", "t5", "clip")]
    # parity.denoise makes its position ids and guidance with torch's factory functions.
    with torch.device(device):
        latents = denoise(transformer, scheduler, *inputs, params["guidance"])
    return sigma_diff, (latents.float().cpu() - dump["latents"]).abs().max().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a diffusers-layout model directory")
    parser.add_argument("--atelier-latents", type=Path, help="written by model_tool bench --latents-out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--prompt", default="a photo of a red cat in the city at night")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--first-run-steps", type=int)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-runs", type=int, default=2)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    started = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    synchronize(device)
    load_s = time.perf_counter() - started
    first_s, warm_s = time_images(pipe, args, device)
    report = {
        "implementation": "diffusers",
        "precision": args.dtype,
        "device": str(device),
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "load_s": load_s,
        "first_run_s": first_s,
        "warm_runs_s": warm_s,
        "seconds_per_image": sum(warm_s) / len(warm_s) if warm_s else first_s,
    }
    if device.type == "cuda":
        report["torch_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) >> 20
        report["torch_peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) >> 20
    if args.atelier_latents:
        sigma_diff, latents_diff = replay(pipe.transformer, args.atelier_latents, device, dtype)
        report["sigmas_max_abs_diff"] = sigma_diff
        report["latents_max_abs_diff"] = latents_diff
    print(json.dumps(report))


if __name__ == "__main__":
    main()
