//! Text-to-image generation with a Flux model directory.
//!
//! [`Pipeline::load`] reads every weight into host memory once; [`Pipeline::move_to`] builds
//! the models on the GPU (or back on the host) from those host copies, so a pod can park a
//! model in RAM and bring it back without touching the disk. [`Pipeline::generate`] is a
//! straight sequence of stages, each also public for tests and tools: tokenize, T5 + CLIP
//! ([`Pipeline::encode_prompt`]), seeded host noise ([`Pipeline::initial_noise`]), schedule
//! ([`Pipeline::sigmas`]), Euler denoising ([`Pipeline::denoise`]), VAE decode
//! ([`Pipeline::decode`]), PNG.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::ClipTextConfig;
use candle_transformers::models::flux::sampling;
use candle_transformers::models::t5;
use serde::{Deserialize, Serialize};

use crate::model::flux::{Flux, FluxConfig, Rope};
use crate::model::flux_keys::{self, Layout};
use crate::model::image::encode_png;
use crate::model::manifest::{Manifest, Variant};
use crate::model::noise;
use crate::model::text::{self, TextEncoders, Tokenizers};
use crate::model::vae::{self, VaeDecoder};
use crate::model::weights::{self, SafetensorsFiles, TensorMap};

/// Largest accepted width or height, in pixels.
pub const MAX_SIDE: u32 = 2048;
/// Most denoising steps accepted in one request.
pub const MAX_STEPS: u32 = 100;
/// Most images in one request.
pub const MAX_IMAGES: u32 = 4;

/// How the transformer's weights are held in memory. Computation is in bf16 on a GPU and in
/// f32 on the CPU either way.
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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generation cancelled")]
    Cancelled,
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("invalid model: {0}")]
    InvalidModel(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tensor computation: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("PNG encoding: {0}")]
    Png(#[from] png::EncodingError),
}

impl Error {
    /// A stable, short reason for metrics, events and job status.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Cancelled => "Cancelled",
            Error::InvalidRequest(_) => "InvalidRequest",
            Error::InvalidConfig(_) => "InvalidConfig",
            Error::InvalidModel(_) => "InvalidModel",
            Error::Io { .. } => "Io",
            Error::Tokenizer(_) => "Tokenizer",
            Error::Tensor(_) => "Tensor",
            Error::Png(_) => "Png",
        }
    }
}

/// The text conditioning of one prompt, on the pipeline's device in its compute dtype.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// T5 hidden states `(1, t5.max_length, context_in_dim)`.
    pub t5: Tensor,
    /// Pooled CLIP output `(1, vec_in_dim)`.
    pub clip: Tensor,
}

struct Configs {
    flux: FluxConfig,
    vae: vae::VaeConfig,
    t5: t5::Config,
    clip: ClipTextConfig,
}

impl Configs {
    fn read(model_dir: &Path, manifest: &Manifest) -> Result<Self, Error> {
        let configs = Self {
            flux: manifest.transformer.config.clone(),
            vae: manifest.vae.config.clone(),
            t5: text::t5_config(&model_dir.join(&manifest.t5.config))?,
            clip: text::clip_config(&model_dir.join(&manifest.clip.config))?,
        };
        let mismatch = |what: &str, a: usize, b: usize| {
            Err(Error::InvalidModel(format!("{what}: {a} != {b}")))
        };
        if configs.flux.context_in_dim != configs.t5.d_model {
            return mismatch(
                "transformer context_in_dim vs T5 d_model",
                configs.flux.context_in_dim,
                configs.t5.d_model,
            );
        }
        if configs.flux.vec_in_dim != configs.clip.embed_dim {
            return mismatch(
                "transformer vec_in_dim vs CLIP hidden_size",
                configs.flux.vec_in_dim,
                configs.clip.embed_dim,
            );
        }
        if configs.flux.in_channels != 4 * configs.vae.z_channels {
            return mismatch(
                "transformer in_channels vs 4 x VAE z_channels",
                configs.flux.in_channels,
                4 * configs.vae.z_channels,
            );
        }
        Ok(configs)
    }
}

/// Every weight, in host memory, in its storage dtype.
struct HostWeights {
    transformer: TensorMap,
    vae: TensorMap,
    t5: TensorMap,
    clip: TensorMap,
}

impl HostWeights {
    fn read(model_dir: &Path, manifest: &Manifest, precision: Precision) -> Result<Self, Error> {
        let transformer =
            read_transformer(&model_dir.join(&manifest.transformer.weights), precision)?;
        // Text encoders and VAE are held in the dtype they compute in where they mostly
        // run: bf16 when a GPU is present (halving T5-XXL's 19 GB), f32 on CPU-only hosts,
        // where the models then share the host copies instead of converting them.
        let dtype = match candle_core::utils::cuda_is_available() {
            true => DType::BF16,
            false => DType::F32,
        };
        let read = |files: &[String], select: &dyn Fn(&str) -> Option<String>| {
            SafetensorsFiles::open(&weights::paths(model_dir, files))?.read(select, |_, _| dtype)
        };
        let all = |name: &str| Some(name.to_string());
        let decoder = |name: &str| {
            name.starts_with(vae::DECODER_PREFIX)
                .then(|| name.to_string())
        };
        Ok(Self {
            transformer,
            vae: read(std::slice::from_ref(&manifest.vae.weights), &decoder)?,
            t5: read(&manifest.t5.weights, &all)?,
            clip: read(&manifest.clip.weights, &all)?,
        })
    }

    fn byte_size(&self) -> u64 {
        [&self.transformer, &self.vae, &self.t5, &self.clip]
            .into_iter()
            .map(weights::byte_size)
            .sum()
    }
}

/// Reads a transformer file in either key layout into BFL names, with linear weights in the
/// precision's storage dtype and the small tensors (biases, norm scales) in bf16.
fn read_transformer(path: &Path, precision: Precision) -> Result<TensorMap, Error> {
    let files = SafetensorsFiles::open(&[path.to_path_buf()])?;
    let select = flux_keys::transformer_key_selector(&files.names());
    let map = files.read(select, |name, tensor| {
        match tensor.rank() == 2 && name.ends_with(".weight") {
            true => precision.storage_dtype(),
            false => DType::BF16,
        }
    })?;
    match flux_keys::detect_layout(&map)? {
        Layout::Bfl => Ok(map),
        Layout::Diffusers => flux_keys::diffusers_to_bfl(map),
    }
}

/// The models built on one device.
struct Models {
    device: Device,
    dtype: DType,
    flux: Flux,
    vae: VaeDecoder,
    /// `None` while offloaded: built for each prompt and dropped before denoising.
    text: Option<TextEncoders>,
}

pub struct Pipeline {
    manifest: Manifest,
    info: ModelInfo,
    precision: Precision,
    placement: Placement,
    configs: Configs,
    host: HostWeights,
    tokenizers: Tokenizers,
    models: Models,
}

impl Pipeline {
    /// Loads all weights of the model directory into host memory; the pipeline starts on
    /// [`Placement::Host`].
    pub fn load(model_dir: &Path, precision: Precision) -> Result<Self, Error> {
        let manifest = Manifest::read(model_dir)?;
        let configs = Configs::read(model_dir, &manifest)?;
        let tokenizers = Tokenizers::load(
            model_dir,
            &manifest.t5,
            configs.t5.pad_token_id as u32,
            &manifest.clip,
            configs.clip.max_position_embeddings,
        )?;
        let host = HostWeights::read(model_dir, &manifest, precision)?;
        let info = ModelInfo {
            name: manifest.name.clone(),
            variant: manifest.variant.as_str().to_string(),
            default_steps: manifest.defaults.steps,
            default_guidance: manifest.defaults.guidance,
        };
        Ok(Self {
            models: build_models(&manifest, &configs, &host, precision, Device::Cpu)?,
            manifest,
            info,
            precision,
            placement: Placement::Host,
            configs,
            host,
            tokenizers,
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

    /// `Device` is CUDA device 0 when built with the `cuda` feature and a GPU is present;
    /// otherwise there is nothing to move and only the placement is recorded.
    pub fn move_to(&mut self, placement: Placement) -> Result<(), Error> {
        let device = match placement {
            Placement::Host => Device::Cpu,
            Placement::Device => Device::cuda_if_available(0)?,
        };
        if !device.same_device(&self.models.device) {
            self.models = build_models(
                &self.manifest,
                &self.configs,
                &self.host,
                self.precision,
                device,
            )?;
        }
        self.placement = placement;
        Ok(())
    }

    /// Bytes of weights held in host memory (all components).
    pub fn weight_bytes(&self) -> u64 {
        self.host.byte_size()
    }

    /// Bytes of the transformer's weights alone, where the precision makes its difference.
    pub fn transformer_weight_bytes(&self) -> u64 {
        weights::byte_size(&self.host.transformer)
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
        let encoders = match &self.models.text {
            Some(encoders) => encoders,
            None => {
                offloaded = text_encoders(
                    &self.configs,
                    &self.host,
                    &self.models.device,
                    self.models.dtype,
                )?;
                &offloaded
            }
        };
        let (t5, clip) = encoders.encode(&t5_ids, &clip_ids)?;
        Ok(Conditioning {
            t5: t5.to_dtype(self.models.dtype)?,
            clip: clip.to_dtype(self.models.dtype)?,
        })
    }

    /// Unpacked latent noise `(num_images, z_channels, height/8, width/8)`, image `i` from
    /// `seed + i`, drawn on the host so that every device starts from the same numbers.
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
        Ok(noise
            .to_device(&self.models.device)?
            .to_dtype(self.models.dtype)?)
    }

    /// The manifest's schedule for this request's step count and resolution.
    pub fn sigmas(&self, req: &GenerateRequest) -> Vec<f64> {
        let image_tokens = (req.width as usize / 16) * (req.height as usize / 16);
        self.manifest.schedule.sigmas(req.steps, image_tokens)
    }

    /// Euler integration of the flow from `noise` (unpacked latents) along `sigmas`, calling
    /// `on_step` after each step. Returns unpacked latents of the same shape.
    pub fn denoise(
        &self,
        conditioning: &Conditioning,
        noise: &Tensor,
        sigmas: &[f64],
        guidance: f32,
        on_step: &mut dyn FnMut(u32, u32) -> ControlFlow<()>,
    ) -> Result<Tensor, Error> {
        let (device, dtype) = (&self.models.device, self.models.dtype);
        let (batch, _, latent_h, latent_w) = noise.dims4()?;
        // Packs 2x2 latent patches into tokens and repeats the text for the batch.
        let state = sampling::State::new(&conditioning.t5, &conditioning.clip, noise)?;
        let rope = Rope::new(
            &self.configs.flux,
            state.txt.dim(1)?,
            (latent_h / 2, latent_w / 2),
            device,
            dtype,
        )?;
        let guidance = Tensor::full(guidance, batch, device)?;
        let total = sigmas.len().saturating_sub(1) as u32;
        let mut img = state.img;
        for (step, pair) in (1..).zip(sigmas.windows(2)) {
            let (sigma, next) = (pair[0], pair[1]);
            let t = Tensor::full(sigma as f32, batch, device)?;
            let velocity = self.models.flux.forward(
                &img,
                &state.txt,
                &state.vec,
                &rope,
                &t,
                Some(&guidance),
            )?;
            img = (img + (velocity * (next - sigma))?)?;
            if on_step(step, total).is_break() {
                return Err(Error::Cancelled);
            }
        }
        Ok(sampling::unpack(&img, latent_h * 8, latent_w * 8)?)
    }

    /// Decodes unpacked latents to `(batch, 3, height, width)` f32 images on the host,
    /// nominally in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, Error> {
        let images = self.models.vae.decode(latents)?;
        Ok(images.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
    }
}

fn text_encoders(
    configs: &Configs,
    host: &HostWeights,
    device: &Device,
    dtype: DType,
) -> Result<TextEncoders, Error> {
    TextEncoders::build(
        &host.t5,
        &configs.t5,
        &host.clip,
        &configs.clip,
        device,
        dtype,
    )
}

fn build_models(
    manifest: &Manifest,
    configs: &Configs,
    host: &HostWeights,
    precision: Precision,
    device: Device,
) -> Result<Models, Error> {
    let dtype = match device.is_cuda() {
        true => DType::BF16,
        false => DType::F32,
    };
    let vb = |map: &TensorMap| VarBuilder::from_tensors(map.clone(), dtype, &device);
    let flux = Flux::load(
        &configs.flux,
        manifest.variant == Variant::Dev,
        precision.storage_dtype(),
        vb(&host.transformer),
    )
    .map_err(|e| Error::InvalidModel(format!("transformer weights: {e}")))?;
    let vae = VaeDecoder::load(&configs.vae, vb(&host.vae))?;
    // On the CPU the encoders share the host tensors, so keeping them costs nothing.
    let text = match manifest.offload_text_encoders && device.is_cuda() {
        true => None,
        false => Some(text_encoders(configs, host, &device, dtype)?),
    };
    Ok(Models {
        device,
        dtype,
        flux,
        vae,
        text,
    })
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
