//! The decoder half of the Flux autoencoder (`ae.safetensors`, BFL layout), from
//! candle-transformers. Generation never encodes images, so the encoder is not loaded.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::flux::autoencoder;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Key prefix of the decoder in `ae.safetensors`.
pub const DECODER_PREFIX: &str = "decoder.";

/// Dimensions of the autoencoder; the default is FLUX.1's `ae.safetensors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaeConfig {
    pub resolution: usize,
    pub in_channels: usize,
    /// Base channel count; every level's `ch * ch_mult` must be a multiple of 32 (GroupNorm).
    pub ch: usize,
    pub out_ch: usize,
    /// One entry per level; four levels give the 8x down-sampling the pipeline assumes.
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub z_channels: usize,
    pub scale_factor: f64,
    pub shift_factor: f64,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            resolution: 256,
            in_channels: 3,
            ch: 128,
            out_ch: 3,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            z_channels: 16,
            scale_factor: 0.3611,
            shift_factor: 0.1159,
        }
    }
}

impl VaeConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if self.ch_mult.len() != 4 {
            return Err(Error::InvalidModel(format!(
                "vae: ch_mult {:?} must have 4 levels (8x latent down-sampling)",
                self.ch_mult
            )));
        }
        if self
            .ch_mult
            .iter()
            .any(|m| !(self.ch * m).is_multiple_of(32))
        {
            return Err(Error::InvalidModel(format!(
                "vae: ch {} x ch_mult {:?} must be multiples of 32 (GroupNorm groups)",
                self.ch, self.ch_mult
            )));
        }
        Ok(())
    }

    pub fn to_candle(&self) -> autoencoder::Config {
        autoencoder::Config {
            resolution: self.resolution,
            in_channels: self.in_channels,
            ch: self.ch,
            out_ch: self.out_ch,
            ch_mult: self.ch_mult.clone(),
            num_res_blocks: self.num_res_blocks,
            z_channels: self.z_channels,
            scale_factor: self.scale_factor,
            shift_factor: self.shift_factor,
        }
    }
}

#[derive(Debug, Clone)]
pub struct VaeDecoder {
    decoder: autoencoder::Decoder,
    scale_factor: f64,
    shift_factor: f64,
}

impl VaeDecoder {
    /// `vb` is rooted at the autoencoder (keys `decoder.*`).
    pub fn load(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self, Error> {
        let decoder = autoencoder::Decoder::new(&cfg.to_candle(), vb.pp("decoder"))
            .map_err(|e| Error::InvalidModel(format!("vae weights: {e}")))?;
        Ok(Self {
            decoder,
            scale_factor: cfg.scale_factor,
            shift_factor: cfg.shift_factor,
        })
    }

    /// Latents `(batch, z_channels, h/8, w/8)` to images `(batch, 3, h, w)`, about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, Error> {
        let xs = ((latents / self.scale_factor)? + self.shift_factor)?;
        Ok(self.decoder.forward(&xs)?)
    }
}
