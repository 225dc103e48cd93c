//! Developer tool for the model side, driven by inference/parity/run.sh and
//! inference/bench/bench.sh:
//!
//! - `tiny`: write a random-weight model directory (tiny, the mid-size bench preset, or
//!   FLUX.1-dev's full size) in the published file layouts;
//! - `dump`: run one prompt through both schedules and write every intermediate the
//!   diffusers side needs (token ids, text states, noise, sigmas, latents, images);
//! - `bench`: time whole images and their denoising steps on the CPU or a CUDA device, with
//!   device synchronisation, and print them as JSON (inference/bench/bench.sh and gpu.sh).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use atelier_inference::model::flux_keys::Layout;
use atelier_inference::model::schedule::Schedule;
use atelier_inference::pipeline::{
    ComputeDtype, Conditioning, DeviceChoice, GenerateRequest, LoadOptions, Pipeline, Placement,
    Precision,
};
use atelier_inference::tiny::{TinyModelOptions, make_tiny_model};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    Tiny,
    Bench,
    #[value(name = "flux1-dev")]
    Flux1Dev,
}

/// How the BFL single-file transformer stores its linear weights.
#[derive(Clone, Copy, ValueEnum)]
enum TransformerWeights {
    Bf16,
    Fp8,
    /// float8 e4m3 with per-tensor `scale_weight` (ComfyUI's scaled fp8).
    Fp8Scaled,
}

#[derive(Clone, Copy, ValueEnum)]
enum CheckpointLayout {
    Bfl,
    Diffusers,
}

#[derive(Clone, Copy, ValueEnum)]
enum TextDtype {
    Bf16,
    Fp8,
}

#[derive(clap::Args)]
struct TinyArgs {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "tiny")]
    preset: Preset,
    #[arg(long, value_enum, default_value = "bf16")]
    transformer: TransformerWeights,
    /// Which files the manifest names; diffusers leaves the BFL files out.
    #[arg(long, value_enum, default_value = "bfl")]
    layout: CheckpointLayout,
    #[arg(long, value_enum, default_value = "bf16")]
    text_dtype: TextDtype,
    /// Also write the diffusers layout (transformer/, vae/, scheduler/, model_index.json).
    #[arg(long)]
    diffusers_copy: bool,
}

impl TinyArgs {
    fn options(&self) -> TinyModelOptions {
        let preset = match self.preset {
            Preset::Tiny => TinyModelOptions::tiny(),
            Preset::Bench => TinyModelOptions::bench(),
            Preset::Flux1Dev => TinyModelOptions::flux1_dev(),
        };
        let (transformer_dtype, scaled_fp8) = match self.transformer {
            TransformerWeights::Bf16 => (DType::BF16, false),
            TransformerWeights::Fp8 => (DType::F8E4M3, false),
            TransformerWeights::Fp8Scaled => (DType::F8E4M3, true),
        };
        TinyModelOptions {
            transformer_dtype,
            scaled_fp8,
            text_dtype: match self.text_dtype {
                TextDtype::Bf16 => DType::BF16,
                TextDtype::Fp8 => DType::F8E4M3,
            },
            layout: match self.layout {
                CheckpointLayout::Bfl => Layout::Bfl,
                CheckpointLayout::Diffusers => Layout::Diffusers,
            },
            diffusers_copy: self.diffusers_copy,
            ..preset
        }
    }
}

#[derive(clap::Args)]
struct RequestArgs {
    #[arg(long, default_value = "a photo of a red cat in the city at night")]
    prompt: String,
    #[arg(long, default_value_t = 256)]
    width: u32,
    #[arg(long, default_value_t = 256)]
    height: u32,
    #[arg(long, default_value_t = 4)]
    steps: u32,
    #[arg(long, default_value_t = 3.5)]
    guidance: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl RequestArgs {
    fn request(&self) -> GenerateRequest {
        GenerateRequest {
            prompt: self.prompt.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance: self.guidance,
            seed: self.seed,
            num_images: 1,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    Tiny(TinyArgs),
    Dump {
        #[arg(long)]
        model: PathBuf,
        /// A .safetensors file; a .json with the parameters is written next to it.
        #[arg(long)]
        out: PathBuf,
        /// bf16 runs the GPU's dtype path on the CPU; the default is f32.
        #[arg(long, default_value = "f32")]
        compute_dtype: ComputeDtype,
        #[command(flatten)]
        request: RequestArgs,
    },
    Bench {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "bf16")]
        precision: Precision,
        /// cpu, cuda or cuda:N: an error, not a CPU run, when the build or the host has no CUDA.
        #[arg(long, default_value = "cpu")]
        device: DeviceChoice,
        /// Whole images timed after the first run, which pays for kernel compilation and
        /// first allocations and is reported apart.
        #[arg(long, default_value_t = 0)]
        warm_runs: u32,
        /// Steps of the first run (default: --steps); at the same size it compiles the same
        /// kernels, so a short one is enough before warm runs.
        #[arg(long)]
        first_run_steps: Option<u32>,
        /// Write the last run's T5 states, pooled CLIP vector, initial noise, sigmas and final
        /// latents (f32 safetensors, parameters in a .json beside it) for a replay in diffusers.
        #[arg(long)]
        latents_out: Option<PathBuf>,
        #[command(flatten)]
        request: RequestArgs,
    },
}

/// The two schedules checked for parity, under the names the manifest uses.
fn parity_schedules() -> [(&'static str, Schedule); 2] {
    [
        (
            "flux-dynamic-shift",
            Schedule::FluxDynamicShift {
                base_shift: 0.5,
                max_shift: 1.15,
            },
        ),
        (
            "shift",
            Schedule::Shift {
                shift: 3.0,
                sigma_min: 0.003 / 1.002,
            },
        ),
    ]
}

fn dump(
    model: PathBuf,
    out: PathBuf,
    compute_dtype: ComputeDtype,
    args: &RequestArgs,
) -> anyhow::Result<()> {
    let options = LoadOptions {
        compute_dtype: Some(compute_dtype),
        ..LoadOptions::cpu(Precision::Bf16)
    };
    let pipeline = Pipeline::load_with(&model, &options)?;
    let req = args.request();
    let (t5_ids, clip_ids) = pipeline.token_ids(&req.prompt)?;
    let conditioning = pipeline.encode_prompt(&req.prompt)?;
    let noise = pipeline.initial_noise(&req)?;
    let ids = |ids: Vec<u32>| {
        Tensor::new(
            ids.into_iter().map(i64::from).collect::<Vec<_>>(),
            &Device::Cpu,
        )
    };
    let mut tensors: HashMap<String, Tensor> = HashMap::from([
        ("t5_ids".into(), ids(t5_ids)?),
        ("clip_ids".into(), ids(clip_ids)?),
        ("t5".into(), conditioning.t5.to_dtype(DType::F32)?),
        ("clip".into(), conditioning.clip.to_dtype(DType::F32)?),
        ("noise".into(), noise.to_dtype(DType::F32)?),
    ]);
    let image_tokens = (req.width as usize / 16) * (req.height as usize / 16);
    let mut schedules = serde_json::Map::new();
    for (name, schedule) in parity_schedules() {
        let sigmas = schedule.sigmas(req.steps, image_tokens);
        let latents =
            pipeline.denoise(&conditioning, &noise, &sigmas, req.guidance, &mut |_, _| {
                ControlFlow::Continue(())
            })?;
        tensors.insert(format!("image.{name}"), pipeline.decode(&latents)?);
        tensors.insert(format!("latents.{name}"), latents.to_dtype(DType::F32)?);
        tensors.insert(format!("sigmas.{name}"), Tensor::new(sigmas, &Device::Cpu)?);
        schedules.insert(name.into(), serde_json::to_value(&schedule)?);
    }
    candle_core::safetensors::save(&tensors, &out)?;
    let params = serde_json::json!({
        "prompt": req.prompt,
        "compute_dtype": format!("{compute_dtype:?}").to_lowercase(),
        "width": req.width,
        "height": req.height,
        "steps": req.steps,
        "guidance": req.guidance,
        "schedules": schedules,
    });
    let json_path = out.with_extension("json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&params)?)
        .with_context(|| json_path.display().to_string())?;
    Ok(())
}

/// What `bench` measures of one image: each phase ends with a device synchronisation, so
/// that the times are the device's, not the time to queue its kernels.
struct ImageRun {
    encode_s: f64,
    denoise_s: f64,
    decode_s: f64,
    step_s: Vec<f64>,
    conditioning: Conditioning,
    noise: Tensor,
    latents: Tensor,
}

impl ImageRun {
    fn total_s(&self) -> f64 {
        self.encode_s + self.denoise_s + self.decode_s
    }

    fn report(&self) -> serde_json::Value {
        serde_json::json!({
            "total_s": self.total_s(),
            "encode_s": self.encode_s,
            "denoise_s": self.denoise_s,
            "decode_s": self.decode_s,
            "step_s": self.step_s,
        })
    }
}

fn run_image(pipeline: &Pipeline, req: &GenerateRequest) -> anyhow::Result<ImageRun> {
    let started = Instant::now();
    let conditioning = pipeline.encode_prompt(&req.prompt)?;
    let noise = pipeline.initial_noise(req)?;
    let device = noise.device().clone();
    device.synchronize()?;
    let encode_s = started.elapsed().as_secs_f64();
    let mut step_s = Vec::new();
    let mut sync_error = None;
    let mut last = Instant::now();
    let latents = pipeline.denoise(
        &conditioning,
        &noise,
        &pipeline.sigmas(req),
        req.guidance,
        &mut |_, _| {
            if let Err(e) = device.synchronize() {
                sync_error = Some(e);
                return ControlFlow::Break(());
            }
            step_s.push(last.elapsed().as_secs_f64());
            last = Instant::now();
            ControlFlow::Continue(())
        },
    );
    if let Some(e) = sync_error {
        return Err(e).context("synchronising the device after a step");
    }
    let latents = latents?;
    let denoise_s = step_s.iter().sum();
    let decoding = Instant::now();
    // The images come back to the host, which waits for the device.
    pipeline.decode(&latents)?;
    Ok(ImageRun {
        encode_s,
        denoise_s,
        decode_s: decoding.elapsed().as_secs_f64(),
        step_s,
        conditioning,
        noise,
        latents,
    })
}

/// Anonymous resident memory of this process (`RssAnon`: mapped weight files are the page
/// cache's and do not count), in MiB.
fn rss_anon_mib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .context("no RssAnon in /proc/self/status")?;
    Ok(kib / 1024)
}

fn write_latents(
    out: &Path,
    run: &ImageRun,
    pipeline: &Pipeline,
    req: &GenerateRequest,
) -> anyhow::Result<()> {
    let f32_host = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let tensors = HashMap::from([
        ("t5".to_string(), f32_host(&run.conditioning.t5)?),
        ("clip".to_string(), f32_host(&run.conditioning.clip)?),
        ("noise".to_string(), f32_host(&run.noise)?),
        ("latents".to_string(), f32_host(&run.latents)?),
        (
            "sigmas".to_string(),
            Tensor::new(pipeline.sigmas(req), &Device::Cpu)?,
        ),
    ]);
    candle_core::safetensors::save(&tensors, out)?;
    let params = serde_json::json!({
        "prompt": req.prompt,
        "width": req.width,
        "height": req.height,
        "steps": req.steps,
        "guidance": req.guidance,
        "seed": req.seed,
        "precision": pipeline.precision().as_str(),
        "schedule": pipeline.manifest().schedule,
    });
    let json_path = out.with_extension("json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&params)?)
        .with_context(|| json_path.display().to_string())?;
    Ok(())
}

struct BenchOptions {
    precision: Precision,
    device: DeviceChoice,
    warm_runs: u32,
    first_run_steps: Option<u32>,
    latents_out: Option<PathBuf>,
}

fn bench(model: &Path, options: &BenchOptions, args: &RequestArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let pipeline = Pipeline::load_with(
        model,
        &LoadOptions {
            precision: options.precision,
            device: options.device,
            compute_dtype: None,
            placement: Placement::Device,
        },
    )?;
    let load_s = started.elapsed().as_secs_f64();
    let rss_anon_loaded_mib = rss_anon_mib()?;
    let req = args.request();
    let first_req = GenerateRequest {
        steps: options.first_run_steps.unwrap_or(req.steps),
        ..req.clone()
    };
    let first = run_image(&pipeline, &first_req)?;
    let mut warm = Vec::new();
    for _ in 0..options.warm_runs {
        warm.push(run_image(&pipeline, &req)?);
    }
    let last = warm.last().unwrap_or(&first);
    if let Some(out) = &options.latents_out {
        write_latents(out, last, &pipeline, &req)?;
    }
    // The first step of a run also pays for one-off allocations; report the steady state too.
    let steps: Vec<f64> = match warm.is_empty() {
        true => first.step_s.iter().skip(1).copied().collect(),
        false => warm.iter().flat_map(|run| run.step_s.clone()).collect(),
    };
    let seconds_per_image = match warm.is_empty() {
        true => first.total_s(),
        false => warm.iter().map(ImageRun::total_s).sum::<f64>() / warm.len() as f64,
    };
    let report = serde_json::json!({
        "implementation": "candle",
        "precision": options.precision.as_str(),
        "device": format!("{:?}", last.noise.device().location()),
        "width": req.width,
        "height": req.height,
        "steps": req.steps,
        "load_s": load_s,
        "first_run": first.report(),
        "warm_runs": warm.iter().map(ImageRun::report).collect::<Vec<_>>(),
        "seconds_per_image": seconds_per_image,
        "step_s": first.step_s,
        "mean_step_s": first.step_s.iter().sum::<f64>() / first.step_s.len().max(1) as f64,
        "steady_step_s": steps.iter().sum::<f64>() / steps.len().max(1) as f64,
        "transformer_weight_bytes": pipeline.transformer_weight_bytes(),
        "weight_bytes": pipeline.weight_bytes(),
        "rss_anon_loaded_mib": rss_anon_loaded_mib,
        "rss_anon_end_mib": rss_anon_mib()?,
    });
    println!("{report}");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Tiny(args) => {
            make_tiny_model(&args.out, args.seed, &args.options())?;
            Ok(())
        }
        Command::Dump {
            model,
            out,
            compute_dtype,
            request,
        } => dump(model, out, compute_dtype, &request),
        Command::Bench {
            model,
            precision,
            device,
            warm_runs,
            first_run_steps,
            latents_out,
            request,
        } => bench(
            &model,
            &BenchOptions {
                precision,
                device,
                warm_runs,
                first_run_steps,
                latents_out,
            },
            &request,
        ),
    }
}
