//! Building the models on one device from the mmapped checkpoint files.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::ClipTextConfig;
use candle_transformers::models::t5;

use crate::error::Error;
use crate::model::flux::{Flux, FluxConfig};
use crate::model::flux_keys;
use crate::model::manifest::{Manifest, Variant};
use crate::model::text::{self, TextEncoders};
use crate::model::vae::{self, VaeDecoder};
use crate::model::vae_keys;
use crate::model::weights::{self, SafetensorsFiles, TensorMap};

use super::Precision;

pub(super) struct Configs {
    pub flux: FluxConfig,
    pub vae: vae::VaeConfig,
    pub t5: t5::Config,
    pub clip: ClipTextConfig,
}

impl Configs {
    pub fn read(model_dir: &Path, manifest: &Manifest) -> Result<Self, Error> {
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

/// The dtype CLIP is held and computes in: its file's precision, never wider than the compute
/// dtype; candle's CLIP cannot compute in float8, so a float8 file computes in bf16.
fn clip_dtype(files: &SafetensorsFiles, compute: DType) -> DType {
    let file_dtype = files.largest_tensor_dtype().unwrap_or(compute);
    match (file_dtype, compute) {
        (DType::F32, compute) => compute,
        (DType::F16, DType::F32) => DType::F16,
        _ => DType::BF16,
    }
}

/// The dtype T5 holds a tensor in: the file's, never wider than the compute dtype. T5 computes
/// in the compute dtype whatever it holds: candle's T5 converts each linear weight to the
/// activations' dtype in its forward, one layer at a time, so T5-XXL stays at 9.5 GB (bf16
/// file) or 4.8 GB (float8 linear weights) and still computes in f32 on the CPU, as accurately
/// as in f32 weights. Float8 is kept for linear weights only (an embedding lookup in float8 has
/// no kernel on every device).
fn t5_holds(name: &str, tensor: &Tensor, compute: DType) -> DType {
    const LINEAR_WEIGHTS: [&str; 8] = [
        ".q.weight",
        ".k.weight",
        ".v.weight",
        ".o.weight",
        ".wi.weight",
        ".wi_0.weight",
        ".wi_1.weight",
        ".wo.weight",
    ];
    let linear = LINEAR_WEIGHTS.iter().any(|suffix| name.ends_with(suffix));
    match (tensor.dtype(), linear) {
        (DType::F8E4M3, true) => DType::F8E4M3,
        (DType::F8E4M3 | DType::F32, _) => compute,
        (held, _) => held,
    }
}

/// Opens a component's files (relative to the model directory).
fn open_files(model_dir: &Path, files: &[String]) -> Result<SafetensorsFiles, Error> {
    SafetensorsFiles::open(&weights::paths(model_dir, files))
}

/// Builds T5 ([`t5_holds`]) and CLIP ([`clip_dtype`]) on `device` from their mmapped files.
pub(super) fn text_encoders(
    model_dir: &Path,
    manifest: &Manifest,
    configs: &Configs,
    device: &Device,
    compute: DType,
) -> Result<TextEncoders, Error> {
    let t5 = open_files(model_dir, &manifest.t5.weights)?.read_to(
        device,
        |name| Some(name.to_string()),
        |name, tensor| t5_holds(name, tensor, compute),
    )?;
    let clip_files = open_files(model_dir, &manifest.clip.weights)?;
    let clip_dtype = clip_dtype(&clip_files, compute);
    let clip = clip_files.read_to(device, |name| Some(name.to_string()), |_, _| clip_dtype)?;
    TextEncoders::build(
        (&t5, compute),
        &configs.t5,
        (&clip, clip_dtype),
        &configs.clip,
        device,
    )
}

/// The models built on one device, each from the mmapped files: nothing else holds a copy
/// of their weights.
pub(super) struct Models {
    pub device: Device,
    pub flux: Flux,
    pub vae: VaeDecoder,
    /// The decoder's dtype: the compute dtype, but f32 on the CPU.
    pub vae_dtype: DType,
    /// `None` while offloaded: built for each prompt and dropped before denoising.
    pub text: Option<TextEncoders>,
    /// Bytes of the weights as read, per component, in the dtypes they are held in.
    pub bytes: WeightBytes,
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct WeightBytes {
    pub transformer: u64,
    pub vae: u64,
    pub text: u64,
}

pub(super) fn build_models(
    model_dir: &Path,
    manifest: &Manifest,
    configs: &Configs,
    precision: Precision,
    device: Device,
    dtype: DType,
) -> Result<Models, Error> {
    let transformer = flux_keys::read_transformer(
        &[model_dir.join(&manifest.transformer.weights)],
        precision.storage_dtype(),
        &configs.flux,
        &device,
    )?;
    // candle's CPU convolutions have no bf16 kernel: on the CPU the decoder stays in f32.
    let vae_dtype = match device.is_cpu() {
        true => DType::F32,
        false => dtype,
    };
    let vae = vae_keys::to_bfl(
        open_files(model_dir, std::slice::from_ref(&manifest.vae.weights))?.read_to(
            &device,
            |name| {
                name.starts_with(vae::DECODER_PREFIX)
                    .then(|| name.to_string())
            },
            |_, _| vae_dtype,
        )?,
    )?;
    let mut bytes = WeightBytes {
        transformer: weights::byte_size(&transformer),
        vae: weights::byte_size(&vae),
        text: 0,
    };
    // The builders take what they need from the maps, which are dropped on return: linear
    // weights are shared as they are, only small tensors are converted to the compute dtype.
    let vb = |map: TensorMap| VarBuilder::from_tensors(map, dtype, &device);
    let flux = Flux::load(
        &configs.flux,
        manifest.variant == Variant::Dev,
        precision.storage_dtype(),
        vb(transformer),
    )
    .map_err(|e| Error::InvalidModel(format!("transformer weights: {e}")))?;
    let vae = VaeDecoder::load(
        &configs.vae,
        VarBuilder::from_tensors(vae, vae_dtype, &device),
    )?;
    let text = match manifest.offload_text_encoders && device.is_cuda() {
        true => None,
        false => {
            let encoders = text_encoders(model_dir, manifest, configs, &device, dtype)?;
            bytes.text = encoders.weight_bytes();
            Some(encoders)
        }
    };
    Ok(Models {
        device,
        flux,
        vae,
        vae_dtype,
        text,
        bytes,
    })
}
