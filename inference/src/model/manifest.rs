//! `atelier-model.json`: what a model directory holds and how to run it.
//!
//! Paths are relative to the model directory (absolute paths are used as they are). The
//! dimension configs default to the real FLUX.1 / `ae.safetensors` values, so a manifest for
//! a real checkpoint names only its files; see docs/models.md for examples.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::model::flux::FluxConfig;
use crate::model::schedule::Schedule;
use crate::model::vae::VaeConfig;

pub const MANIFEST_FILE: &str = "atelier-model.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub variant: Variant,
    pub defaults: Defaults,
    pub schedule: Schedule,
    pub transformer: TransformerFiles,
    pub vae: VaeFiles,
    pub t5: T5Files,
    pub clip: ClipFiles,
    /// Build the text encoders on the device only while encoding a prompt and drop them
    /// before denoising (for GPUs that cannot hold T5-XXL next to the transformer).
    #[serde(default)]
    pub offload_text_encoders: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Guidance-distilled: the transformer embeds the guidance scale.
    Dev,
    /// Timestep-distilled: no guidance embedding.
    Schnell,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Dev => "dev",
            Variant::Schnell => "schnell",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub steps: u32,
    pub guidance: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerFiles {
    /// One safetensors file, or diffusers' shard index
    /// (`transformer/diffusion_pytorch_model.safetensors.index.json`); BFL or diffusers key
    /// layout; bf16 / f32 / float8 e4m3, or scaled float8 (`scale_weight`).
    pub weights: String,
    #[serde(default)]
    pub config: FluxConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeFiles {
    /// `ae.safetensors` in the BFL autoencoder layout, or diffusers'
    /// `vae/diffusion_pytorch_model.safetensors`.
    pub weights: String,
    #[serde(default)]
    pub config: VaeConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct T5Files {
    /// HF `T5EncoderModel` safetensors: files, shards, or the shards' `*.index.json`.
    pub weights: Vec<String>,
    /// HF `config.json`.
    pub config: String,
    /// `tokenizer.json`, or SentencePiece's `spiece.model` (ending in `.model`).
    pub tokenizer: String,
    /// Prompts are padded or truncated to this many tokens (512 for dev, 256 for schnell).
    pub max_length: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipFiles {
    /// HF `CLIPTextModel` safetensors.
    pub weights: Vec<String>,
    /// HF `config.json` (a `CLIPTextConfig`, or a `CLIPConfig` with a `text_config`).
    pub config: String,
    /// `tokenizer.json`; without it the BPE tokenizer is built from `vocab` + `merges`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merges: Option<String>,
}

impl Manifest {
    pub fn read(model_dir: &Path) -> Result<Self, Error> {
        let path = model_dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidModel(format!("{}: {e}", path.display())))?;
        manifest.validate()?;
        Ok(manifest)
    }

    pub fn write(&self, model_dir: &Path) -> Result<(), Error> {
        let path = model_dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::InvalidModel(format!("serializing manifest: {e}")))?;
        std::fs::write(&path, text + "\n").map_err(|source| Error::Io { path, source })
    }

    fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: String| Err(Error::InvalidModel(reason));
        if self.defaults.steps == 0 {
            return invalid("defaults.steps must be at least 1".into());
        }
        if self.t5.max_length == 0 {
            return invalid("t5.max_length must be at least 1".into());
        }
        if self.clip.tokenizer.is_none()
            && (self.clip.vocab.is_none() || self.clip.merges.is_none())
        {
            return invalid("clip needs either tokenizer or both vocab and merges".into());
        }
        self.transformer.config.validate()?;
        self.vae.config.validate()
    }
}
