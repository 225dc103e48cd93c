//! Host memory of a model directory: anonymous RSS (`RssAnon` of /proc/self/status; the
//! mmapped checkpoint's pages are the page cache's and do not count) after load, at its peak
//! while loading and generating one image, and steady after it. Prints one JSON line.
//!
//!     cargo run --release -p atelier-inference --example memory -- --model DIR --precision fp8
//!
//! The figures of docs/models.md come from this tool on the full-size synthetic checkpoint.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use atelier_inference::pipeline::{
    ComputeDtype, DeviceChoice, GenerateRequest, LoadOptions, Pipeline, Placement, Precision,
};
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "fp8")]
    precision: Precision,
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// Defaults to the device's own (f32 on the CPU).
    #[arg(long)]
    compute_dtype: Option<ComputeDtype>,
    /// Width and height of the image.
    #[arg(long, default_value_t = 256)]
    size: u32,
    #[arg(long, default_value_t = 1)]
    steps: u32,
}

/// `RssAnon` of this process in bytes.
fn rss_anon() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("/proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .context("no RssAnon line in /proc/self/status")?
        .trim()
        .parse::<u64>()?;
    Ok(kib * 1024)
}

/// Samples [`rss_anon`] every few milliseconds on a thread of its own and keeps the largest.
struct PeakSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl PeakSampler {
    fn start() -> Self {
        let (peak, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let thread = std::thread::spawn({
            let (peak, stop) = (peak.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(rss) = rss_anon() {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        Self { peak, stop, thread }
    }

    /// The largest sample so far, the current value included.
    fn peak(&self) -> anyhow::Result<u64> {
        Ok(self.peak.load(Ordering::Relaxed).max(rss_anon()?))
    }

    fn stop(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        Ok(self.peak.load(Ordering::Relaxed).max(rss_anon()?))
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let sampler = PeakSampler::start();
    let started = Instant::now();
    let options = LoadOptions {
        precision: cli.precision,
        device: cli.device,
        compute_dtype: cli.compute_dtype,
        placement: Placement::Device,
    };
    let pipeline = Pipeline::load_with(&cli.model, &options)
        .with_context(|| format!("loading {}", cli.model.display()))?;
    let load_s = started.elapsed().as_secs_f64();
    let after_load = rss_anon()?;
    let load_peak = sampler.peak()?;
    let request = GenerateRequest {
        prompt: "a photo of a red fox in the snow".into(),
        width: cli.size,
        height: cli.size,
        steps: cli.steps,
        guidance: pipeline.info().default_guidance,
        seed: 1,
        num_images: 1,
    };
    let started = Instant::now();
    pipeline.generate(&request, &mut |_, _| std::ops::ControlFlow::Continue(()))?;
    let generate_s = started.elapsed().as_secs_f64();
    let steady = rss_anon()?;
    let peak = sampler.stop()?;
    let report = serde_json::json!({
        "model": cli.model,
        "precision": cli.precision.as_str(),
        "device": cli.device.to_string(),
        "compute_dtype": format!("{:?}", pipeline.compute_dtype()),
        "size": cli.size,
        "steps": cli.steps,
        "weight_bytes": pipeline.weight_bytes(),
        "transformer_weight_bytes": pipeline.transformer_weight_bytes(),
        "load_s": load_s,
        "generate_s": generate_s,
        "rss_anon_after_load": after_load,
        "rss_anon_peak_load": load_peak,
        "rss_anon_peak": peak,
        "rss_anon_steady": steady,
    });
    println!("{report}");
    Ok(())
}
