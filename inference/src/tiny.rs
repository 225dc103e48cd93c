//! Tiny random-weight model directories in the real file layouts.
//!
//! Real weights cannot be downloaded here, so the real loading code is exercised on these:
//! the same key names, dtypes and file formats as FLUX.1-dev's single files (BFL transformer,
//! `ae.safetensors`, HF T5 and CLIP with `config.json`, their tokenizers), only small. Key
//! sets come from building candle-transformers' own (upstream) models against a backend
//! that records every requested tensor and fills it from a seeded host RNG, so the files
//! hold exactly what those layouts contain. Same seed, same bytes.

mod tokenizers;

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::flux::{autoencoder, model as upstream_flux};
use candle_transformers::models::t5;
use serde_json::json;

use crate::error::Error;
use crate::model::flux::FluxConfig;
use crate::model::flux_keys;
use crate::model::manifest::{
    ClipFiles, Defaults, Manifest, T5Files, TransformerFiles, VaeFiles, Variant,
};
use crate::model::noise;
use crate::model::schedule::Schedule;
use crate::model::vae::VaeConfig;
use crate::model::weights::{self, TensorMap};

/// Where a tiny model keeps the transformer in the diffusers layout, when asked to.
pub const DIFFUSERS_TRANSFORMER: &str = "transformer/diffusion_pytorch_model.safetensors";

#[derive(Debug, Clone, PartialEq)]
pub struct TinyModelOptions {
    pub name: String,
    pub variant: Variant,
    pub schedule: Schedule,
    /// T5's width is `context_in_dim`, CLIP's is `vec_in_dim`.
    pub flux: FluxConfig,
    pub vae: VaeConfig,
    pub t5_max_length: usize,
    /// Dtype of the transformer's linear weights in the file: BF16 (as FLUX.1-dev ships),
    /// F32 or F8E4M3 (as float8 finetunes ship); other tensors are BF16.
    pub transformer_dtype: DType,
    /// Also write the transformer in the diffusers layout at [`DIFFUSERS_TRANSFORMER`].
    pub diffusers_copy: bool,
}

impl TinyModelOptions {
    /// The smallest dimensions the real code paths accept: hidden 64, 2 heads of 32
    /// (rotary axes 4 + 14 + 14), 2 double + 2 single blocks, T5 and CLIP width 32, a
    /// 4-level VAE with 32 base channels (multipliers 1, 1, 2, 2 rather than FLUX's 1, 2, 4, 4,
    /// which would make decoding the slowest part of every test) and 16 latent channels.
    pub fn tiny() -> Self {
        Self {
            name: "flux-tiny".into(),
            variant: Variant::Dev,
            schedule: Schedule::FluxDynamicShift {
                base_shift: 0.5,
                max_shift: 1.15,
            },
            flux: FluxConfig {
                in_channels: 64,
                vec_in_dim: 32,
                context_in_dim: 32,
                hidden_size: 64,
                mlp_ratio: 4.0,
                num_heads: 2,
                depth: 2,
                depth_single_blocks: 2,
                axes_dim: vec![4, 14, 14],
                theta: 10_000,
                qkv_bias: true,
            },
            vae: VaeConfig {
                ch: 32,
                ch_mult: vec![1, 1, 2, 2],
                num_res_blocks: 1,
                ..VaeConfig::default()
            },
            t5_max_length: 32,
            transformer_dtype: DType::BF16,
            diffusers_copy: false,
        }
    }

    /// A mid-size transformer for CPU benchmarks: hidden 768 in 6 heads of FLUX's 128
    /// (rotary axes 16 + 56 + 56), 4 double + 8 single blocks, 512 T5 tokens.
    pub fn bench() -> Self {
        let tiny = Self::tiny();
        Self {
            name: "flux-bench".into(),
            flux: FluxConfig {
                hidden_size: 768,
                num_heads: 6,
                depth: 4,
                depth_single_blocks: 8,
                axes_dim: vec![16, 56, 56],
                ..tiny.flux
            },
            t5_max_length: 512,
            ..tiny
        }
    }
}

impl Default for TinyModelOptions {
    fn default() -> Self {
        Self::tiny()
    }
}

/// Writes a complete model directory (manifest, weights, configs, tokenizers) to `out`.
pub fn make_tiny_model(out: &Path, seed: u64, options: &TinyModelOptions) -> Result<(), Error> {
    let create_dir = |dir: &Path| {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })
    };
    for dir in [
        "",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
    ] {
        create_dir(&out.join(dir))?;
    }
    let t5_vocab = tokenizers::write_t5_tokenizer(&out.join("tokenizer_2/tokenizer.json"))?;
    let clip_vocab = tokenizers::write_clip_bpe(
        &out.join("tokenizer/vocab.json"),
        &out.join("tokenizer/merges.txt"),
    )?;

    let flux = &options.flux;
    let transformer = random_weights(seed, "transformer", |vb| {
        let cfg = flux.to_candle(options.variant == Variant::Dev);
        upstream_flux::Flux::new(&cfg, vb).map(drop)
    })?;
    let transformer = with_dtypes(transformer, |name, t| {
        match t.rank() == 2 && name.ends_with(".weight") {
            true => options.transformer_dtype,
            false => DType::BF16,
        }
    })?;
    save(&transformer, &out.join("flux1-tiny.safetensors"))?;
    if options.diffusers_copy {
        let diffusers = flux_keys::bfl_to_diffusers(transformer, flux.hidden_size)?;
        let path = out.join(DIFFUSERS_TRANSFORMER);
        if let Some(dir) = path.parent() {
            create_dir(dir)?;
        }
        save(&diffusers, &path)?;
    }

    // BFL ships ae.safetensors in f32, the text encoders in bf16.
    let vae = random_weights(seed, "vae", |vb| {
        autoencoder::AutoEncoder::new(&options.vae.to_candle(), vb).map(drop)
    })?;
    save(&vae, &out.join("ae.safetensors"))?;

    let t5_config = tiny_t5_config(flux.context_in_dim, t5_vocab);
    let t5_weights = random_weights(seed, "t5", |vb| {
        let cfg: t5::Config =
            serde_json::from_value(t5_config.clone()).map_err(candle_core::Error::wrap)?;
        t5::T5EncoderModel::load(vb, &cfg).map(drop)
    })?;
    save(
        &with_dtypes(t5_weights, |_, _| DType::BF16)?,
        &out.join("text_encoder_2/model.safetensors"),
    )?;
    write_json(&out.join("text_encoder_2/config.json"), &t5_config)?;

    let clip_config = tiny_clip_config(flux.vec_in_dim, clip_vocab);
    let clip_weights = random_weights(seed, "clip", |vb| {
        let cfg = ClipTextConfig {
            vocab_size: clip_vocab,
            embed_dim: flux.vec_in_dim,
            activation: Activation::QuickGelu,
            intermediate_size: 2 * flux.vec_in_dim,
            max_position_embeddings: 77,
            pad_with: None,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            projection_dim: flux.vec_in_dim,
        };
        ClipTextTransformer::new(vb.pp("text_model"), &cfg).map(drop)
    })?;
    save(
        &with_dtypes(clip_weights, |_, _| DType::BF16)?,
        &out.join("text_encoder/model.safetensors"),
    )?;
    write_json(&out.join("text_encoder/config.json"), &clip_config)?;

    manifest(options).write(out)
}

fn manifest(options: &TinyModelOptions) -> Manifest {
    Manifest {
        name: options.name.clone(),
        variant: options.variant,
        defaults: Defaults {
            steps: 4,
            guidance: 3.5,
        },
        schedule: options.schedule.clone(),
        transformer: TransformerFiles {
            weights: "flux1-tiny.safetensors".into(),
            config: options.flux.clone(),
        },
        vae: VaeFiles {
            weights: "ae.safetensors".into(),
            config: options.vae.clone(),
        },
        t5: T5Files {
            weights: vec!["text_encoder_2/model.safetensors".into()],
            config: "text_encoder_2/config.json".into(),
            tokenizer: "tokenizer_2/tokenizer.json".into(),
            max_length: options.t5_max_length,
        },
        clip: ClipFiles {
            weights: vec!["text_encoder/model.safetensors".into()],
            config: "text_encoder/config.json".into(),
            tokenizer: None,
            vocab: Some("tokenizer/vocab.json".into()),
            merges: Some("tokenizer/merges.txt".into()),
        },
        offload_text_encoders: false,
    }
}

/// HF `config.json` of a tiny T5 v1.1 encoder (gated GELU, untied embeddings).
fn tiny_t5_config(width: usize, vocab_size: usize) -> serde_json::Value {
    json!({
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "d_model": width,
        "d_kv": width / 2,
        "d_ff": 2 * width,
        "num_layers": 2,
        "num_heads": 2,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.1,
        "layer_norm_epsilon": 1e-6,
        "initializer_factor": 1.0,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": true,
        "tie_word_embeddings": false,
        "vocab_size": vocab_size,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    })
}

/// HF `config.json` of a tiny `CLIPTextModel`.
fn tiny_clip_config(width: usize, vocab_size: usize) -> serde_json::Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": width,
        "vocab_size": vocab_size,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    })
}

/// Records every tensor a model asks for and fills it with seeded random values.
struct RandomWeights {
    seed: u64,
    component: &'static str,
    tensors: Arc<Mutex<TensorMap>>,
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = shape.dims();
        // Norm gains around 1, biases small, weights scaled by fan-in so activations keep
        // unit scale through the random layers and the outputs stay finite and varied.
        let (offset, std) = match dims.len() {
            1 if name.ends_with(".bias") => (0.0, 0.02),
            1 => (1.0, 0.1),
            _ => (
                0.0,
                1.0 / (dims[1..].iter().product::<usize>() as f32).sqrt(),
            ),
        };
        let seed = noise::named_seed(self.seed, &format!("{}/{name}", self.component));
        let values: Vec<f32> = noise::standard_normal(seed, shape.elem_count())
            .into_iter()
            .map(|v| offset + std * v)
            .collect();
        let tensor = Tensor::from_vec(values, shape, dev)?;
        let mut tensors = self
            .tensors
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        tensors.insert(name.to_string(), tensor.clone());
        tensor.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("tiny weights need a shape for {name}")
    }

    /// Claims every tensor, so that loaders probing for optional names (T5's `shared`
    /// embedding) take the first layout they try, which is HF's.
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The tensors `build` asks for, in f32.
fn random_weights(
    seed: u64,
    component: &'static str,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<()>,
) -> Result<TensorMap, Error> {
    let tensors = Arc::new(Mutex::new(TensorMap::new()));
    let backend = RandomWeights {
        seed,
        component,
        tensors: tensors.clone(),
    };
    build(VarBuilder::from_backend(
        Box::new(backend),
        DType::F32,
        Device::Cpu,
    ))?;
    let map = tensors
        .lock()
        .map_err(|_| Error::InvalidModel("poisoned".into()))?
        .clone();
    Ok(map)
}

fn with_dtypes(
    map: TensorMap,
    dtype_of: impl Fn(&str, &Tensor) -> DType,
) -> Result<TensorMap, Error> {
    map.into_iter()
        .map(|(name, t)| {
            let dtype = dtype_of(&name, &t);
            Ok((name, weights::to_host_dtype(t, dtype)?))
        })
        .collect()
}

fn save(map: &TensorMap, path: &Path) -> Result<(), Error> {
    Ok(candle_core::safetensors::save(map, path)?)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), Error> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| Error::InvalidModel(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}
