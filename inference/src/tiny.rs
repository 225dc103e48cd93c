//! Random-weight model directories in the real file layouts, from tiny to FLUX.1-dev's size.
//!
//! Real weights cannot be downloaded here, so the real loading code is exercised on these:
//! the same key names, shapes, dtypes and file formats as FLUX.1-dev's published files (BFL
//! single-file transformer in bf16, float8 or scaled float8, diffusers' sharded transformer
//! and `vae/`, `ae.safetensors`, HF T5 and CLIP with `config.json`, their tokenizers). Key
//! sets come from building candle-transformers' own (upstream) models against a backend
//! that records every requested tensor ([`plan`]); values are seeded per tensor and written
//! by a streaming writer ([`writer`]), so the full-size model needs a few MB of memory.
//! Same seed, same bytes; and the same tensor has the same values in every layout.

mod plan;
mod tokenizers;
pub mod writer;

use std::path::Path;

use candle_core::DType;
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::flux::{autoencoder, model as upstream_flux};
use candle_transformers::models::t5;
use serde_json::json;

use crate::error::Error;
use crate::model::flux::FluxConfig;
use crate::model::flux_keys::Layout;
use crate::model::manifest::{
    ClipFiles, Defaults, Manifest, T5Files, TransformerFiles, VaeFiles, Variant,
};
use crate::model::schedule::Schedule;
use crate::model::vae::VaeConfig;

/// Where the transformer is in the diffusers layout when it fits in one shard.
pub const DIFFUSERS_TRANSFORMER: &str = "transformer/diffusion_pytorch_model.safetensors";
/// The diffusers autoencoder.
pub const DIFFUSERS_VAE: &str = "vae/diffusion_pytorch_model.safetensors";
pub const T5_SPIECE: &str = "tokenizer_2/spiece.model";

/// diffusers' and transformers' default shard sizes, with which FLUX.1-dev was saved.
const DIFFUSERS_SHARD_BYTES: u64 = 10_000_000_000;
const TRANSFORMERS_SHARD_BYTES: u64 = 5_000_000_000;

/// Dimensions of the T5 v1.1 encoder; `d_model` is the transformer's `context_in_dim`.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Sizes {
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// SentencePiece pieces (T5 adds 100 extra ids); 0 for the smallest vocabulary.
    pub pieces: usize,
    /// The embedding's rows when larger than the tokenizer (T5-XXL pads 32 100 to 32 128).
    pub vocab_size: Option<usize>,
}

/// Dimensions of the CLIP text model; the width is the transformer's `vec_in_dim`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipSizes {
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// At least the tokenizer's own entries; 0 for the smallest vocabulary.
    pub vocab_size: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TinyModelOptions {
    pub name: String,
    pub variant: Variant,
    pub schedule: Schedule,
    /// T5's width is `context_in_dim`, CLIP's is `vec_in_dim`.
    pub flux: FluxConfig,
    pub vae: VaeConfig,
    pub t5: T5Sizes,
    pub clip: ClipSizes,
    pub t5_max_length: usize,
    /// Name of the BFL single file.
    pub transformer_file: String,
    /// Dtype of the transformer's linear weights in the file: BF16 (as FLUX.1-dev ships),
    /// F32 or F8E4M3 (as float8 finetunes ship); other tensors are BF16.
    pub transformer_dtype: DType,
    /// With F8E4M3: ComfyUI's scaled layout (`scale_weight`, `scale_input`, `scaled_fp8`).
    pub scaled_fp8: bool,
    /// Dtype of the text encoders' linear weights: BF16 as published, or F8E4M3.
    pub text_dtype: DType,
    /// The files the manifest names; diffusers also writes `model_index.json` and
    /// `scheduler/`, and leaves the BFL transformer and `ae.safetensors` out.
    pub layout: Layout,
    /// Also write the diffusers files next to the BFL ones.
    pub diffusers_copy: bool,
    pub transformer_shard_bytes: u64,
    pub text_shard_bytes: u64,
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
            t5: T5Sizes {
                d_kv: 16,
                d_ff: 64,
                num_layers: 2,
                num_heads: 2,
                pieces: 0,
                vocab_size: None,
            },
            clip: ClipSizes {
                intermediate_size: 64,
                num_layers: 2,
                num_heads: 2,
                vocab_size: 0,
            },
            t5_max_length: 32,
            transformer_file: "flux1-tiny.safetensors".into(),
            transformer_dtype: DType::BF16,
            scaled_fp8: false,
            text_dtype: DType::BF16,
            layout: Layout::Bfl,
            diffusers_copy: false,
            transformer_shard_bytes: DIFFUSERS_SHARD_BYTES,
            text_shard_bytes: TRANSFORMERS_SHARD_BYTES,
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

    /// FLUX.1-dev's published sizes: the 11.9 B-parameter transformer (hidden 3072 in 24
    /// heads, 19 double + 38 single blocks), T5-XXL v1.1's encoder (d_model 4096, d_ff 10 240,
    /// 24 layers of 64 heads, vocabulary 32 128), CLIP-L's text model (768 wide, 12 layers,
    /// vocabulary 49 408) and `ae.safetensors` (channels 128, multipliers 1, 2, 4, 4).
    pub fn flux1_dev() -> Self {
        Self {
            name: "flux1-dev-synthetic".into(),
            flux: FluxConfig::default(),
            vae: VaeConfig::default(),
            t5: T5Sizes {
                d_kv: 64,
                d_ff: 10240,
                num_layers: 24,
                num_heads: 64,
                pieces: 32000,
                vocab_size: Some(32128),
            },
            clip: ClipSizes {
                intermediate_size: 3072,
                num_layers: 12,
                num_heads: 12,
                vocab_size: 49408,
            },
            t5_max_length: 512,
            transformer_file: "flux1-dev.safetensors".into(),
            ..Self::tiny()
        }
    }

    fn writes_bfl(&self) -> bool {
        self.layout == Layout::Bfl
    }

    fn writes_diffusers(&self) -> bool {
        self.layout == Layout::Diffusers || self.diffusers_copy
    }

    /// The dtype of a transformer tensor in an unscaled file.
    fn transformer_dtype_of(&self, name: &str, shape: &[usize]) -> DType {
        match shape.len() == 2 && name.ends_with(".weight") {
            true => self.transformer_dtype,
            false => DType::BF16,
        }
    }

    /// The dtype of a text-encoder tensor: linear weights in `text_dtype`, embeddings and
    /// norms in bf16.
    fn text_dtype_of(&self, name: &str, shape: &[usize]) -> DType {
        let embedding = ["shared.", "embed", "relative_attention_bias"]
            .iter()
            .any(|e| name.contains(e));
        match shape.len() == 2 && name.ends_with(".weight") && !embedding {
            true => self.text_dtype,
            false => DType::BF16,
        }
    }
}

impl Default for TinyModelOptions {
    fn default() -> Self {
        Self::tiny()
    }
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes a complete model directory (manifest, weights, configs, tokenizers) to `out`.
pub fn make_tiny_model(out: &Path, seed: u64, options: &TinyModelOptions) -> Result<(), Error> {
    if options.scaled_fp8 && options.transformer_dtype != DType::F8E4M3 {
        return Err(Error::InvalidConfig(
            "scaled fp8 needs the transformer in F8E4M3".into(),
        ));
    }
    if options.scaled_fp8 && options.layout == Layout::Diffusers {
        return Err(Error::InvalidConfig(
            "scaled fp8 is a BFL single-file layout; diffusers has none".into(),
        ));
    }
    for dir in [
        "",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
    ] {
        create_dir(&out.join(dir))?;
    }
    let t5_vocab = tokenizers::write_t5_tokenizer(
        &out.join(T5_SPIECE),
        &out.join("tokenizer_2/tokenizer.json"),
        options.t5.pieces,
    )?;
    let clip_vocab = tokenizers::write_clip_bpe(
        &out.join("tokenizer/vocab.json"),
        &out.join("tokenizer/merges.txt"),
        options.clip.vocab_size,
    )?;
    let mut files = Files {
        transformer: options.transformer_file.clone(),
        vae: "ae.safetensors".into(),
        t5: String::new(),
    };

    let flux = &options.flux;
    let transformer = plan::record(|vb| {
        let cfg = flux.to_candle(options.variant == Variant::Dev);
        upstream_flux::Flux::new(&cfg, vb).map(drop)
    })?;
    let vae =
        plan::record(|vb| autoencoder::AutoEncoder::new(&options.vae.to_candle(), vb).map(drop))?;
    let metadata = json!({"format": "pt"});
    if options.writes_bfl() {
        let tensors = match options.scaled_fp8 {
            true => plan::scaled_fp8(seed, &transformer),
            false => plan::plain(seed, "transformer", &transformer, |n, s| {
                options.transformer_dtype_of(n, s)
            }),
        };
        writer::write_safetensors(&out.join(&options.transformer_file), &tensors, &metadata)?;
        // BFL ships ae.safetensors in f32.
        let tensors = plan::plain(seed, "vae", &vae, |_, _| DType::F32);
        writer::write_safetensors(&out.join("ae.safetensors"), &tensors, &metadata)?;
    }
    if options.writes_diffusers() {
        let diffusers_transformer = write_diffusers(out, seed, options, &transformer, &vae)?;
        if options.layout == Layout::Diffusers {
            files.transformer = diffusers_transformer;
            files.vae = DIFFUSERS_VAE.into();
        }
    }

    let t5_config = t5_config(options, t5_vocab);
    let t5_weights = plan::record(|vb| {
        let cfg: t5::Config =
            serde_json::from_value(t5_config.clone()).map_err(candle_core::Error::wrap)?;
        t5::T5EncoderModel::load(vb, &cfg).map(drop)
    })?;
    let tensors = plan::plain(seed, "t5", &t5_weights, |n, s| options.text_dtype_of(n, s));
    let t5_file = plan::write_sharded(
        &out.join("text_encoder_2"),
        "model",
        &tensors,
        options.text_shard_bytes,
    )?;
    files.t5 = format!("text_encoder_2/{t5_file}");
    write_json(&out.join("text_encoder_2/config.json"), &t5_config)?;

    let clip_config = clip_config(options, clip_vocab);
    let clip_weights = plan::record(|vb| {
        let cfg = ClipTextConfig {
            vocab_size: clip_vocab,
            embed_dim: flux.vec_in_dim,
            activation: Activation::QuickGelu,
            intermediate_size: options.clip.intermediate_size,
            max_position_embeddings: 77,
            pad_with: None,
            num_hidden_layers: options.clip.num_layers,
            num_attention_heads: options.clip.num_heads,
            projection_dim: flux.vec_in_dim,
        };
        ClipTextTransformer::new(vb.pp("text_model"), &cfg).map(drop)
    })?;
    let tensors = plan::plain(seed, "clip", &clip_weights, |n, s| {
        options.text_dtype_of(n, s)
    });
    writer::write_safetensors(
        &out.join("text_encoder/model.safetensors"),
        &tensors,
        &metadata,
    )?;
    write_json(&out.join("text_encoder/config.json"), &clip_config)?;

    manifest(options, &files).write(out)
}

/// The files the manifest names, relative to the model directory.
struct Files {
    transformer: String,
    vae: String,
    t5: String,
}

/// Writes diffusers' `transformer/`, `vae/`, `scheduler/` and `model_index.json` (what
/// `FluxPipeline.from_pretrained` reads besides the text encoders and tokenizers); returns
/// the transformer's file (its index when sharded).
fn write_diffusers(
    out: &Path,
    seed: u64,
    options: &TinyModelOptions,
    transformer: &plan::Shapes,
    vae: &plan::Shapes,
) -> Result<String, Error> {
    for dir in ["transformer", "vae", "scheduler"] {
        create_dir(&out.join(dir))?;
    }
    let flux = &options.flux;
    let tensors = plan::diffusers_transformer(seed, transformer, flux.hidden_size, |n, s| {
        options.transformer_dtype_of(n, s)
    })?;
    let file = plan::write_sharded(
        &out.join("transformer"),
        "diffusion_pytorch_model",
        &tensors,
        options.transformer_shard_bytes,
    )?;
    // diffusers publishes the autoencoder in bf16.
    let levels = options.vae.ch_mult.len();
    let tensors = plan::diffusers_vae(seed, vae, levels, options.vae.num_res_blocks, DType::BF16)?;
    writer::write_safetensors(&out.join(DIFFUSERS_VAE), &tensors, &json!({"format": "pt"}))?;
    write_json(
        &out.join("transformer/config.json"),
        &json!({
            "_class_name": "FluxTransformer2DModel",
            "attention_head_dim": flux.hidden_size / flux.num_heads,
            "axes_dims_rope": flux.axes_dim,
            "guidance_embeds": options.variant == Variant::Dev,
            "in_channels": flux.in_channels,
            "joint_attention_dim": flux.context_in_dim,
            "num_attention_heads": flux.num_heads,
            "num_layers": flux.depth,
            "num_single_layers": flux.depth_single_blocks,
            "patch_size": 1,
            "pooled_projection_dim": flux.vec_in_dim,
        }),
    )?;
    let vae_config = &options.vae;
    write_json(
        &out.join("vae/config.json"),
        &json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": vae_config.ch_mult.iter().map(|m| m * vae_config.ch).collect::<Vec<_>>(),
            "down_block_types": vec!["DownEncoderBlock2D"; levels],
            "force_upcast": true,
            "in_channels": vae_config.in_channels,
            "latent_channels": vae_config.z_channels,
            "layers_per_block": vae_config.num_res_blocks,
            "mid_block_add_attention": true,
            "norm_num_groups": 32,
            "out_channels": vae_config.out_ch,
            "sample_size": vae_config.resolution,
            "scaling_factor": vae_config.scale_factor,
            "shift_factor": vae_config.shift_factor,
            "up_block_types": vec!["UpDecoderBlock2D"; levels],
            "use_post_quant_conv": false,
            "use_quant_conv": false,
        }),
    )?;
    let (base_shift, max_shift) = match options.schedule {
        Schedule::FluxDynamicShift {
            base_shift,
            max_shift,
        } => (base_shift, max_shift),
        _ => (0.5, 1.15),
    };
    write_json(
        &out.join("scheduler/scheduler_config.json"),
        &json!({
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "base_image_seq_len": 256,
            "base_shift": base_shift,
            "max_image_seq_len": 4096,
            "max_shift": max_shift,
            "num_train_timesteps": 1000,
            "shift": 3.0,
            "use_dynamic_shifting": true,
        }),
    )?;
    write_json(
        &out.join("model_index.json"),
        &json!({
            "_class_name": "FluxPipeline",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
    )?;
    Ok(format!("transformer/{file}"))
}

fn manifest(options: &TinyModelOptions, files: &Files) -> Manifest {
    Manifest {
        name: options.name.clone(),
        variant: options.variant,
        defaults: Defaults {
            steps: 4,
            guidance: 3.5,
        },
        schedule: options.schedule.clone(),
        transformer: TransformerFiles {
            weights: files.transformer.clone(),
            config: options.flux.clone(),
        },
        vae: VaeFiles {
            weights: files.vae.clone(),
            config: options.vae.clone(),
        },
        t5: T5Files {
            weights: vec![files.t5.clone()],
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

/// HF `config.json` of a T5 v1.1 encoder (gated GELU, untied embeddings), as
/// `google/t5-v1_1-xxl`'s at FLUX.1-dev's size.
fn t5_config(options: &TinyModelOptions, tokenizer_vocab: usize) -> serde_json::Value {
    let t5 = &options.t5;
    json!({
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "d_model": options.flux.context_in_dim,
        "d_kv": t5.d_kv,
        "d_ff": t5.d_ff,
        "num_layers": t5.num_layers,
        "num_decoder_layers": t5.num_layers,
        "num_heads": t5.num_heads,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.1,
        "layer_norm_epsilon": 1e-6,
        "initializer_factor": 1.0,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": true,
        "is_encoder_decoder": true,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "vocab_size": t5.vocab_size.unwrap_or(tokenizer_vocab).max(tokenizer_vocab),
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    })
}

/// HF `config.json` of a `CLIPTextModel`, as `openai/clip-vit-large-patch14`'s text model
/// at FLUX.1-dev's size.
fn clip_config(options: &TinyModelOptions, vocab_size: usize) -> serde_json::Value {
    let clip = &options.clip;
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": options.flux.vec_in_dim,
        "intermediate_size": clip.intermediate_size,
        "num_hidden_layers": clip.num_layers,
        "num_attention_heads": clip.num_heads,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": options.flux.vec_in_dim,
        "torch_dtype": "bfloat16",
        "vocab_size": vocab_size,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    })
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), Error> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| Error::InvalidModel(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}
