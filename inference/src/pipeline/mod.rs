//! Text-to-image generation with a Flux model directory.
//!
//! [`Pipeline::load_with`] opens the chosen device and builds the models from the mmapped
//! checkpoint files, one tensor at a time, with the weights in their storage dtype;
//! [`Pipeline::move_to`] rebuilds them on the GPU (or back on the host) from the same files,
//! so no second copy of what sits on one device is kept on the other. [`Pipeline::generate`] is a
//! straight sequence of stages, each also public for tests and tools: tokenize, T5 + CLIP
//! ([`Pipeline::encode_prompt`]), seeded host noise ([`Pipeline::initial_noise`]), schedule
//! ([`Pipeline::sigmas`]), Euler denoising ([`Pipeline::denoise`]), VAE decode
//! ([`Pipeline::decode`]), PNG.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::flux::sampling;
use serde::{Deserialize, Serialize};

mod models;

pub use crate::device::{ComputeDtype, DeviceChoice};
pub use crate::error::Error;
use crate::model::flux::Rope;
use crate::model::image::encode_png;
use crate::model::manifest::Manifest;
use crate::model::noise;
use crate::model::text::Tokenizers;
use models::{Configs, Models, WeightBytes, build_models, text_encoders};

/// The device a placement computes on: the chosen device for [`Placement::Device`]; for
/// [`Placement::Host`] the CPU if that is the chosen device, else none (parked).
fn placement_device(compute_device: &Device, placement: Placement) -> Option<Device> {
    match placement {
        Placement::Device => Some(compute_device.clone()),
        Placement::Host => compute_device.is_cpu().then_some(Device::Cpu),
    }
}

/// Largest accepted width or height, in pixels.
pub const MAX_SIDE: u32 = 2048;
/// Most denoising steps accepted in one request.
pub const MAX_STEPS: u32 = 100;
/// Most images in one request.
pub const MAX_IMAGES: u32 = 4;

/// How the transformer's weights are held in memory. Computation is in the pipeline's compute
/// dtype either way (bf16 on a GPU, f32 on the CPU unless asked otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Bf16,
    /// float8 e4m3, one byte per weight; widened layer by layer for each matmul.
    Fp8,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
        }
    }

    /// Dtype of the transformer's linear weights.
    fn storage_dtype(self) -> DType {
        match self {
            Precision::Bf16 => DType::BF16,
            Precision::Fp8 => DType::F8E4M3,
        }
    }
}

impl FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "bf16" => Ok(Precision::Bf16),
            "fp8" => Ok(Precision::Fp8),
            _ => Err(Error::InvalidConfig(format!(
                "unknown precision {s:?}, expected bf16 or fp8"
            ))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the models live: host memory (parked, or computing on the CPU) or the accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    Host,
    Device,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f32,
    /// Image `i` of the batch uses `seed + i`.
    pub seed: u64,
    pub num_images: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedImage {
    /// PNG with tEXt chunks `prompt`, `seed`, `steps`, `guidance`, `model` (iTXt for text
    /// that is not Latin-1).
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    /// `dev` or `schnell`.
    pub variant: String,
    pub default_steps: u32,
    pub default_guidance: f32,
}

/// The text conditioning of one prompt, on the pipeline's device in its compute dtype.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// T5 hidden states `(1, t5.max_length, context_in_dim)`.
    pub t5: Tensor,
    /// Pooled CLIP output `(1, vec_in_dim)`.
    pub clip: Tensor,
}

/// What [`Pipeline::load_with`] loads onto what.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub precision: Precision,
    /// The device of [`Placement::Device`].
    pub device: DeviceChoice,
    /// Activations' dtype; `None` for the device's own ([`DeviceChoice::default_compute_dtype`]).
    pub compute_dtype: Option<ComputeDtype>,
    /// Where the models are built at load.
    pub placement: Placement,
}

impl LoadOptions {
    /// On the CPU, in f32, starting on the host.
    pub fn cpu(precision: Precision) -> Self {
        Self {
            precision,
            device: DeviceChoice::Cpu,
            compute_dtype: None,
            placement: Placement::Host,
        }
    }
}

pub struct Pipeline {
    model_dir: PathBuf,
    manifest: Manifest,
    info: ModelInfo,
    precision: Precision,
    placement: Placement,
    configs: Configs,
    tokenizers: Tokenizers,
    /// The device of [`Placement::Device`], opened once at load.
    compute_device: Device,
    dtype: DType,
    /// `None` while a GPU pipeline is parked on [`Placement::Host`]: its weights are then only
    /// in the mmapped files (page cache, not the process's memory) until the next move.
    models: Option<Models>,
    /// Of the models last built.
    bytes: WeightBytes,
}

impl Pipeline {
    /// [`Pipeline::load_with`] on the CPU in f32, on [`Placement::Host`].
    pub fn load(model_dir: &Path, precision: Precision) -> Result<Self, Error> {
        Self::load_with(model_dir, &LoadOptions::cpu(precision))
    }

    /// Opens the device (an error naming CUDA if it is asked for and missing), then builds
    /// the models on the options' placement from the mmapped files, one tensor at a time.
    pub fn load_with(model_dir: &Path, options: &LoadOptions) -> Result<Self, Error> {
        let compute_device = options.device.open()?;
        let dtype = options
            .compute_dtype
            .unwrap_or(options.device.default_compute_dtype())
            .dtype();
        let manifest = Manifest::read(model_dir)?;
        let configs = Configs::read(model_dir, &manifest)?;
        let tokenizers = Tokenizers::load(
            model_dir,
            &manifest.t5,
            configs.t5.pad_token_id as u32,
            &manifest.clip,
            configs.clip.max_position_embeddings,
        )?;
        let models = match placement_device(&compute_device, options.placement) {
            Some(device) => Some(build_models(
                model_dir,
                &manifest,
                &configs,
                options.precision,
                device,
                dtype,
            )?),
            None => None,
        };
        let bytes = models.as_ref().map(|m| m.bytes).unwrap_or_default();
        let info = ModelInfo {
            name: manifest.name.clone(),
            variant: manifest.variant.as_str().to_string(),
            default_steps: manifest.defaults.steps,
            default_guidance: manifest.defaults.guidance,
        };
        Ok(Self {
            model_dir: model_dir.to_path_buf(),
            manifest,
            info,
            precision: options.precision,
            placement: options.placement,
            configs,
            tokenizers,
            compute_device,
            dtype,
            models,
            bytes,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The activations' dtype.
    pub fn compute_dtype(&self) -> DType {
        self.dtype
    }

    /// To [`Placement::Device`]: builds the models on the device from the mmapped files (the
    /// page cache after the first read), one tensor at a time, and only then drops what was
    /// there, so a failed move keeps the pipeline where it was. To [`Placement::Host`] on a
    /// GPU: frees the device and keeps no copy in the process (the files are the copy). With
    /// `--device cpu` both placements are the CPU: only the placement is recorded.
    pub fn move_to(&mut self, placement: Placement) -> Result<(), Error> {
        let target = placement_device(&self.compute_device, placement);
        let unchanged = match (&target, &self.models) {
            (Some(target), Some(models)) => target.same_device(&models.device),
            _ => false,
        };
        if !unchanged {
            self.models = match target {
                Some(device) => {
                    let models = build_models(
                        &self.model_dir,
                        &self.manifest,
                        &self.configs,
                        self.precision,
                        device,
                        self.dtype,
                    )?;
                    self.bytes = models.bytes;
                    Some(models)
                }
                None => None,
            };
        }
        self.placement = placement;
        Ok(())
    }

    /// The models, or an error while a GPU pipeline is parked.
    fn models(&self) -> Result<&Models, Error> {
        self.models.as_ref().ok_or_else(|| {
            Error::InvalidConfig(
                "the model is parked off the GPU; move it to the device to generate".into(),
            )
        })
    }

    /// Bytes of the weights of the models last built (all components; the text encoders
    /// only while resident), in the dtypes they are held in.
    pub fn weight_bytes(&self) -> u64 {
        self.bytes.transformer + self.bytes.vae + self.bytes.text
    }

    /// Bytes of the transformer's weights alone, where the precision makes its difference.
    pub fn transformer_weight_bytes(&self) -> u64 {
        self.bytes.transformer
    }

    /// Bytes of weights the process holds in host memory: all of them on the CPU, none on a
    /// GPU or while parked.
    pub fn host_weight_bytes(&self) -> u64 {
        match &self.models {
            Some(models) if models.device.is_cpu() => self.weight_bytes(),
            _ => 0,
        }
    }

    /// Calls on_step(step, total) after every denoising step (1-based); returning
    /// ControlFlow::Break(()) cancels (Error::Cancelled) within one step.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(u32, u32) -> ControlFlow<()>,
    ) -> Result<Vec<GeneratedImage>, Error> {
        validate(req)?;
        let conditioning = self.encode_prompt(&req.prompt)?;
        let noise = self.initial_noise(req)?;
        let latents = self.denoise(
            &conditioning,
            &noise,
            &self.sigmas(req),
            req.guidance,
            on_step,
        )?;
        let images = self.decode(&latents)?;
        (0..req.num_images)
            .map(|i| {
                let seed = req.seed.wrapping_add(u64::from(i));
                let text = [
                    ("prompt", req.prompt.clone()),
                    ("seed", seed.to_string()),
                    ("steps", req.steps.to_string()),
                    ("guidance", req.guidance.to_string()),
                    ("model", self.info.name.clone()),
                ];
                Ok(GeneratedImage {
                    png: encode_png(&images.get(i as usize)?, &text)?,
                    width: req.width,
                    height: req.height,
                    seed,
                })
            })
            .collect()
    }

    /// The T5 (padded) and CLIP token ids of a prompt.
    pub fn token_ids(&self, prompt: &str) -> Result<(Vec<u32>, Vec<u32>), Error> {
        Ok((
            self.tokenizers.t5_ids(prompt)?,
            self.tokenizers.clip_ids(prompt)?,
        ))
    }

    /// Tokenizes and encodes a prompt. With offloaded text encoders they are built on the
    /// device here and freed when this returns, before denoising needs the memory.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Conditioning, Error> {
        let (t5_ids, clip_ids) = self.token_ids(prompt)?;
        let offloaded;
        let models = self.models()?;
        let encoders = match &models.text {
            Some(encoders) => encoders,
            None => {
                offloaded = text_encoders(
                    &self.model_dir,
                    &self.manifest,
                    &self.configs,
                    &models.device,
                    self.dtype,
                )?;
                &offloaded
            }
        };
        let (t5, clip) = encoders.encode(&t5_ids, &clip_ids)?;
        Ok(Conditioning {
            t5: t5.to_dtype(self.dtype)?,
            clip: clip.to_dtype(self.dtype)?,
        })
    }

    /// Unpacked latent noise `(num_images, z_channels, height/8, width/8)`, image `i` from
    /// `seed + i`, drawn on the host so that every device starts from the same numbers; in
    /// f32, the dtype the latents keep through denoising on every device.
    pub fn initial_noise(&self, req: &GenerateRequest) -> Result<Tensor, Error> {
        let shape = (
            req.num_images as usize,
            self.configs.vae.z_channels,
            req.height as usize / 8,
            req.width as usize / 8,
        );
        let per_image = shape.1 * shape.2 * shape.3;
        let values: Vec<f32> = (0..req.num_images)
            .flat_map(|i| noise::standard_normal(req.seed.wrapping_add(u64::from(i)), per_image))
            .collect();
        let noise = Tensor::from_vec(values, shape, &Device::Cpu)?;
        Ok(noise.to_device(&self.models()?.device)?)
    }

    /// The manifest's schedule for this request's step count and resolution.
    pub fn sigmas(&self, req: &GenerateRequest) -> Vec<f64> {
        let image_tokens = (req.width as usize / 16) * (req.height as usize / 16);
        self.manifest.schedule.sigmas(req.steps, image_tokens)
    }

    /// Euler integration of the flow from `noise` (unpacked latents) along `sigmas`, calling
    /// `on_step` after each step. Returns unpacked latents of the same shape.
    ///
    /// The latents and the Euler update stay in f32 on every device, as diffusers' scheduler
    /// computes them; only the transformer's input and output are in the compute dtype.
    pub fn denoise(
        &self,
        conditioning: &Conditioning,
        noise: &Tensor,
        sigmas: &[f64],
        guidance: f32,
        on_step: &mut dyn FnMut(u32, u32) -> ControlFlow<()>,
    ) -> Result<Tensor, Error> {
        let models = self.models()?;
        let device = &models.device;
        let (batch, _, latent_h, latent_w) = noise.dims4()?;
        // Packs 2x2 latent patches into tokens and repeats the text for the batch.
        let state = sampling::State::new(
            &conditioning.t5,
            &conditioning.clip,
            &noise.to_dtype(DType::F32)?,
        )?;
        let rope = Rope::new(
            &self.configs.flux,
            state.txt.dim(1)?,
            (latent_h / 2, latent_w / 2),
            device,
        )?;
        let guidance = Tensor::full(guidance, batch, device)?;
        let total = sigmas.len().saturating_sub(1) as u32;
        let mut img = state.img;
        for (step, pair) in (1..).zip(sigmas.windows(2)) {
            let (sigma, next) = (pair[0], pair[1]);
            let t = Tensor::full(sigma as f32, batch, device)?;
            let velocity = models.flux.forward(
                &img.to_dtype(self.dtype)?,
                &state.txt,
                &state.vec,
                &rope,
                &t,
                Some(&guidance),
            )?;
            img = (img + (velocity.to_dtype(DType::F32)? * (next - sigma))?)?;
            if on_step(step, total).is_break() {
                return Err(Error::Cancelled);
            }
        }
        Ok(sampling::unpack(&img, latent_h * 8, latent_w * 8)?)
    }

    /// Decodes unpacked latents to `(batch, 3, height, width)` f32 images on the host,
    /// nominally in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, Error> {
        let models = self.models()?;
        let images = models.vae.decode(&latents.to_dtype(models.vae_dtype)?)?;
        Ok(images.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
    }
}

/// Checks a request against the limits above ([`Error::InvalidRequest`] says which one
/// fails). [`Pipeline::generate`] calls it first; the HTTP server calls it on submission too,
/// so that a bad request is a 400 rather than a job that fails later.
pub fn validate(req: &GenerateRequest) -> Result<(), Error> {
    let invalid = |message: String| Err(Error::InvalidRequest(message));
    for (name, value) in [("width", req.width), ("height", req.height)] {
        if value == 0 || value % 16 != 0 || value > MAX_SIDE {
            return invalid(format!(
                "{name} {value} must be a positive multiple of 16 up to {MAX_SIDE}"
            ));
        }
    }
    if !(1..=MAX_STEPS).contains(&req.steps) {
        return invalid(format!(
            "steps {} must be between 1 and {MAX_STEPS}",
            req.steps
        ));
    }
    if !(1..=MAX_IMAGES).contains(&req.num_images) {
        return invalid(format!(
            "num_images {} must be between 1 and {MAX_IMAGES}",
            req.num_images
        ));
    }
    if !req.guidance.is_finite() || req.guidance < 0.0 {
        return invalid(format!(
            "guidance {} must be a finite number >= 0",
            req.guidance
        ));
    }
    Ok(())
}
