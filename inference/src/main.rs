//! `atelier-inference`: the inference pod's binary (see `docs/inference-api.md`).

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use atelier_inference::pipeline::{
    ComputeDtype, DeviceChoice, GenerateRequest, LoadOptions, Pipeline, Placement, Precision,
};
use atelier_inference::server::auth::ApiToken;
use atelier_inference::server::simulate::SimulateConfig;
use atelier_inference::server::{self, ServeConfig};
use atelier_inference::tiny::{self, TinyModelOptions};
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "atelier-inference",
    version,
    about = "Atelier's Flux inference server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the model and serve generation jobs over HTTP.
    Serve(ServeArgs),
    /// Serve a tenant's image history from the outputs directory (no model).
    ServeOutputs(ServeOutputsArgs),
    /// Generate one image to a file, without a server.
    Generate(GenerateArgs),
    /// Write a tiny random-weight checkpoint with the real layout, for tests.
    MakeTinyModel(MakeTinyModelArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[cfg_attr(
        feature = "simulate",
        arg(long, env = "ATELIER_MODEL_DIR", required_unless_present = "simulate")
    )]
    #[cfg_attr(
        not(feature = "simulate"),
        arg(long, env = "ATELIER_MODEL_DIR", required = true)
    )]
    model_dir: Option<PathBuf>,
    #[arg(long, env = "ATELIER_OUTPUTS_DIR")]
    outputs_dir: PathBuf,
    #[arg(long, env = "ATELIER_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[arg(long, env = "ATELIER_PRECISION", default_value = "bf16", value_parser = parse_precision)]
    precision: Precision,
    /// Device of the model: cpu, cuda (device 0) or cuda:N. CUDA needs a build with the
    /// `cuda` feature and a GPU; asking for it otherwise is an error at start.
    #[arg(long, env = "ATELIER_DEVICE", default_value = "cpu", value_parser = parse_device)]
    device: DeviceChoice,
    /// Activations' dtype: f32 or bf16; defaults to the device's own (bf16 on CUDA, f32 on the
    /// CPU). bf16 on the CPU runs the GPU's numerics where there is no GPU.
    #[arg(long, env = "ATELIER_COMPUTE_DTYPE", value_parser = parse_compute_dtype)]
    compute_dtype: Option<ComputeDtype>,
    /// Jobs accepted at once (running + waiting); more are answered 429.
    #[arg(long, env = "ATELIER_CONCURRENCY", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Time without jobs after which the weights move from the device back to host memory.
    #[arg(long, env = "ATELIER_IDLE_OFFLOAD", default_value = "5m", value_parser = humantime::parse_duration)]
    idle_offload: Duration,
    /// On SIGTERM, how long running jobs may finish before they are cancelled.
    #[arg(long, env = "ATELIER_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// File holding the token every `/v1` request must carry as `Authorization: Bearer` (the
    /// operator mounts the tenant's); without it the API is open.
    #[arg(long, env = "ATELIER_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Load no model: report the steps and write a flat-colour PNG per image (benchmarks of the
    /// control plane; see docs/inference-api.md). Only in builds with the `simulate` feature,
    /// which the workspace's test build has and release images do not.
    #[cfg(feature = "simulate")]
    #[arg(long, env = "ATELIER_SIMULATE")]
    simulate: bool,
    /// With --simulate: time each step takes.
    #[cfg(feature = "simulate")]
    #[arg(long, env = "ATELIER_SIMULATE_STEP_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    simulate_step_delay: Duration,
}

impl ServeArgs {
    /// The simulated worker's settings when `--simulate` is given.
    fn simulated(&self) -> Option<SimulateConfig> {
        #[cfg(feature = "simulate")]
        if self.simulate {
            return Some(SimulateConfig {
                step_delay: self.simulate_step_delay,
            });
        }
        None
    }
}

#[derive(Args)]
struct ServeOutputsArgs {
    #[arg(long, env = "ATELIER_OUTPUTS_DIR")]
    outputs_dir: PathBuf,
    #[arg(long, env = "ATELIER_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// File holding the token every `/v1` request must carry as `Authorization: Bearer`;
    /// without it the API is open.
    #[arg(long, env = "ATELIER_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long, env = "ATELIER_MODEL_DIR")]
    model_dir: PathBuf,
    #[arg(long, env = "ATELIER_PRECISION", default_value = "bf16", value_parser = parse_precision)]
    precision: Precision,
    /// Device of the model: cpu, cuda (device 0) or cuda:N. CUDA needs a build with the
    /// `cuda` feature and a GPU; asking for it otherwise is an error at start.
    #[arg(long, env = "ATELIER_DEVICE", default_value = "cpu", value_parser = parse_device)]
    device: DeviceChoice,
    /// Activations' dtype: f32 or bf16; defaults to the device's own (bf16 on CUDA, f32 on the
    /// CPU). bf16 on the CPU runs the GPU's numerics where there is no GPU.
    #[arg(long, env = "ATELIER_COMPUTE_DTYPE", value_parser = parse_compute_dtype)]
    compute_dtype: Option<ComputeDtype>,
    #[arg(long, env = "ATELIER_PROMPT")]
    prompt: String,
    #[arg(long, env = "ATELIER_SEED")]
    seed: u64,
    #[arg(long, env = "ATELIER_WIDTH", default_value_t = 1024)]
    width: u32,
    #[arg(long, env = "ATELIER_HEIGHT", default_value_t = 1024)]
    height: u32,
    /// Defaults to the model's own default.
    #[arg(long, env = "ATELIER_STEPS")]
    steps: Option<u32>,
    /// Defaults to the model's own default.
    #[arg(long, env = "ATELIER_GUIDANCE")]
    guidance: Option<f32>,
    #[arg(long, env = "ATELIER_OUT")]
    out: PathBuf,
}

#[derive(Args)]
struct MakeTinyModelArgs {
    #[arg(long, env = "ATELIER_OUT")]
    out: PathBuf,
    #[arg(long, env = "ATELIER_SEED", default_value_t = 0)]
    seed: u64,
}

fn parse_precision(s: &str) -> Result<Precision, String> {
    s.parse::<Precision>().map_err(|e| e.to_string())
}

fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse::<DeviceChoice>().map_err(|e| e.to_string())
}

fn parse_compute_dtype(s: &str) -> Result<ComputeDtype, String> {
    s.parse::<ComputeDtype>().map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Serve(args) => runtime()?.block_on(serve(args)),
        Command::ServeOutputs(args) => runtime()?.block_on(serve_outputs(args)),
        Command::Generate(args) => generate(args),
        Command::MakeTinyModel(args) => {
            tiny::make_tiny_model(&args.out, args.seed, &TinyModelOptions::tiny())
                .with_context(|| format!("writing a tiny model to {}", args.out.display()))?;
            Ok(())
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    Ok(listener)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let simulated = args.simulated();
    if simulated.is_none() {
        // Before listening: a pod that cannot have its device fails at start, not at load.
        args.device.open().context("opening the model's device")?;
    }
    let listener = bind(args.listen).await?;
    let config = ServeConfig {
        model_dir: args.model_dir.unwrap_or_default(),
        outputs_dir: args.outputs_dir,
        precision: args.precision,
        device: args.device,
        compute_dtype: args.compute_dtype,
        concurrency: usize::from(args.concurrency),
        idle_offload: args.idle_offload,
        shutdown_grace: args.shutdown_grace,
        api_token: api_token(args.api_token_file.as_deref())?,
    };
    match simulated {
        Some(simulate) => {
            server::serve_simulated(listener, config, simulate, shutdown_signal()).await?
        }
        None => server::serve(listener, config, shutdown_signal()).await?,
    }
    Ok(())
}

async fn serve_outputs(args: ServeOutputsArgs) -> anyhow::Result<()> {
    let token = api_token(args.api_token_file.as_deref())?;
    let listener = bind(args.listen).await?;
    server::serve_outputs(listener, args.outputs_dir, token, shutdown_signal()).await?;
    Ok(())
}

fn api_token(path: Option<&std::path::Path>) -> anyhow::Result<Option<ApiToken>> {
    let Some(path) = path else {
        tracing::warn!("no --api-token-file: the /v1 API answers anyone who can reach it");
        return Ok(None);
    };
    let token = ApiToken::read(path)
        .with_context(|| format!("reading the API token {}", path.display()))?;
    Ok(Some(token))
}

/// SIGTERM (what the kubelet sends) or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown requested");
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let options = LoadOptions {
        precision: args.precision,
        device: args.device,
        compute_dtype: args.compute_dtype,
        placement: Placement::Device,
    };
    let pipeline = Pipeline::load_with(&args.model_dir, &options)
        .with_context(|| format!("loading the model from {}", args.model_dir.display()))?;
    let info = pipeline.info();
    let request = GenerateRequest {
        prompt: args.prompt,
        width: args.width,
        height: args.height,
        steps: args.steps.unwrap_or(info.default_steps),
        guidance: args.guidance.unwrap_or(info.default_guidance),
        seed: args.seed,
        num_images: 1,
    };
    let mut on_step = |step: u32, total: u32| {
        tracing::info!(step, total, "denoising");
        ControlFlow::Continue(())
    };
    let images = pipeline
        .generate(&request, &mut on_step)
        .context("generating")?;
    let Some(image) = images.first() else {
        bail!("the pipeline returned no image")
    };
    std::fs::write(&args.out, &image.png)
        .with_context(|| format!("writing {}", args.out.display()))?;
    tracing::info!(out = %args.out.display(), width = image.width, height = image.height, seed = image.seed, "image written");
    Ok(())
}
