//! The FLUX.1 transformer in the BFL key layout.
//!
//! Ported from candle-transformers' `flux::model` (same math, same tensor names) because its
//! blocks hold `candle_nn::Linear`, which cannot keep float8 weights; here every linear layer
//! is [`Linear`], which stores weights in the precision's storage dtype. Two deliberate
//! differences: rotary tables are computed once per generation (`model/rope.rs`) instead of
//! per step in the compute dtype, and normalisations use candle's fused kernels. Attention
//! runs in query blocks (`model/attention.rs`); with f32 activations in host memory, attention
//! and GELU run through the vectorized kernels of `model/cpu.rs` (same math, about 1e-6 apart
//! from candle's ops).

use candle_core::{D, DType, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::model::linear::Linear;
pub use crate::model::rope::Rope;
use crate::model::{attention, cpu};

/// Dimensions of the transformer; the default is FLUX.1 dev/schnell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FluxConfig {
    /// Packed latent channels: 16 VAE channels x 2x2 patch.
    pub in_channels: usize,
    /// Width of the pooled CLIP vector.
    pub vec_in_dim: usize,
    /// Width of the T5 hidden states.
    pub context_in_dim: usize,
    pub hidden_size: usize,
    pub mlp_ratio: f64,
    pub num_heads: usize,
    /// Double-stream blocks.
    pub depth: usize,
    pub depth_single_blocks: usize,
    /// Rotary dimensions per position axis (always-zero, row, column); sums to the head dim.
    pub axes_dim: Vec<usize>,
    pub theta: usize,
    pub qkv_bias: bool,
}

impl Default for FluxConfig {
    fn default() -> Self {
        Self {
            in_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_ratio: 4.0,
            num_heads: 24,
            depth: 19,
            depth_single_blocks: 38,
            axes_dim: vec![16, 56, 56],
            theta: 10_000,
            qkv_bias: true,
        }
    }
}

impl FluxConfig {
    pub fn validate(&self) -> std::result::Result<(), Error> {
        let invalid = |reason: String| Err(Error::InvalidModel(format!("transformer: {reason}")));
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return invalid(format!(
                "hidden_size {} is not a multiple of num_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        let head_dim = self.hidden_size / self.num_heads;
        if self.axes_dim.iter().sum::<usize>() != head_dim || self.axes_dim.len() != 3 {
            return invalid(format!(
                "axes_dim {:?} must be 3 dims summing to the head dim {head_dim}",
                self.axes_dim
            ));
        }
        if self.axes_dim.iter().any(|d| !d.is_multiple_of(2)) {
            return invalid(format!("axes_dim {:?} must be even", self.axes_dim));
        }
        if !self.in_channels.is_multiple_of(4) {
            return invalid(format!(
                "in_channels {} must be 4 x latent channels",
                self.in_channels
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    fn mlp_dim(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// The same dimensions as candle-transformers' config (used to enumerate the BFL keys).
    pub fn to_candle(
        &self,
        guidance_embed: bool,
    ) -> candle_transformers::models::flux::model::Config {
        candle_transformers::models::flux::model::Config {
            in_channels: self.in_channels,
            vec_in_dim: self.vec_in_dim,
            context_in_dim: self.context_in_dim,
            hidden_size: self.hidden_size,
            mlp_ratio: self.mlp_ratio,
            num_heads: self.num_heads,
            depth: self.depth,
            depth_single_blocks: self.depth_single_blocks,
            axes_dim: self.axes_dim.clone(),
            theta: self.theta,
            qkv_bias: self.qkv_bias,
            guidance_embed,
        }
    }
}

/// LayerNorm without affine parameters (BFL's `elementwise_affine=False`).
#[derive(Debug, Clone)]
struct LayerNorm {
    ones: Tensor,
    zeros: Tensor,
}

impl LayerNorm {
    fn new(dim: usize, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            ones: Tensor::ones(dim, vb.dtype(), vb.device())?,
            zeros: Tensor::zeros(dim, vb.dtype(), vb.device())?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm(&xs.contiguous()?, &self.ones, &self.zeros, 1e-6)
    }
}

#[derive(Debug, Clone)]
struct QkNorm {
    query_scale: Tensor,
    key_scale: Tensor,
}

impl QkNorm {
    fn load(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            query_scale: vb.get(dim, "query_norm.scale")?,
            key_scale: vb.get(dim, "key_norm.scale")?,
        })
    }

    fn forward(&self, q: &Tensor, k: &Tensor) -> Result<(Tensor, Tensor)> {
        let norm = |xs: &Tensor, scale| candle_nn::ops::rms_norm(&xs.contiguous()?, scale, 1e-6);
        Ok((norm(q, &self.query_scale)?, norm(k, &self.key_scale)?))
    }
}

fn timestep_embedding(t: &Tensor, dim: usize, dtype: DType) -> Result<Tensor> {
    const TIME_FACTOR: f64 = 1000.;
    const MAX_PERIOD: f64 = 10000.;
    let half = dim / 2;
    let freqs = (Tensor::arange(0, half as u32, t.device())?.to_dtype(DType::F32)?
        * (-MAX_PERIOD.ln() / half as f64))?
        .exp()?;
    let args = (t.to_dtype(DType::F32)? * TIME_FACTOR)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs.unsqueeze(0)?)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?.to_dtype(dtype)
}

/// Softmax attention of the rotated queries and keys, heads merged in the output.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope) -> Result<Tensor> {
    attention::attention(&rope.apply(q)?, &rope.apply(k)?, v)
}

/// Splits `(batch, tokens, 3 * hidden)` into q, k, v of `(batch, heads, tokens, head_dim)`.
fn split_qkv(qkv: &Tensor, num_heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, l, _) = qkv.dims3()?;
    let qkv = qkv
        .reshape((b, l, 3, num_heads, ()))?
        .permute((2, 0, 3, 1, 4))?
        .contiguous()?;
    Ok((qkv.get(0)?, qkv.get(1)?, qkv.get(2)?))
}

#[derive(Debug, Clone)]
struct MlpEmbedder {
    in_layer: Linear,
    out_layer: Linear,
}

impl MlpEmbedder {
    fn load(in_dim: usize, hidden: usize, storage: DType, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            in_layer: Linear::load(vb.pp("in_layer"), in_dim, hidden, true, storage)?,
            out_layer: Linear::load(vb.pp("out_layer"), hidden, hidden, true, storage)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.out_layer.forward(&self.in_layer.forward(xs)?.silu()?)
    }
}

struct ModulationOut {
    shift: Tensor,
    scale: Tensor,
    gate: Tensor,
}

impl ModulationOut {
    fn scale_shift(&self, xs: &Tensor) -> Result<Tensor> {
        xs.broadcast_mul(&(&self.scale + 1.)?)?
            .broadcast_add(&self.shift)
    }

    fn gate(&self, xs: &Tensor) -> Result<Tensor> {
        self.gate.broadcast_mul(xs)
    }
}

/// adaLN modulation producing `sets` (shift, scale, gate) triples from the conditioning vector.
#[derive(Debug, Clone)]
struct Modulation {
    lin: Linear,
    sets: usize,
}

impl Modulation {
    fn load(dim: usize, sets: usize, storage: DType, vb: VarBuilder) -> Result<Self> {
        let lin = Linear::load(vb.pp("lin"), dim, 3 * sets * dim, true, storage)?;
        Ok(Self { lin, sets })
    }

    fn forward(&self, vec: &Tensor) -> Result<Vec<ModulationOut>> {
        let chunks = self
            .lin
            .forward(&vec.silu()?)?
            .unsqueeze(1)?
            .chunk(3 * self.sets, D::Minus1)?;
        Ok(chunks
            .chunks(3)
            .map(|c| ModulationOut {
                shift: c[0].clone(),
                scale: c[1].clone(),
                gate: c[2].clone(),
            })
            .collect())
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    lin1: Linear,
    lin2: Linear,
}

impl Mlp {
    fn load(dim: usize, mlp_dim: usize, storage: DType, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            lin1: Linear::load(vb.pp("0"), dim, mlp_dim, true, storage)?,
            lin2: Linear::load(vb.pp("2"), mlp_dim, dim, true, storage)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.lin2.forward(&cpu::gelu_tanh(&self.lin1.forward(xs)?)?)
    }
}

/// One stream (image or text) of a double block.
#[derive(Debug, Clone)]
struct Stream {
    modulation: Modulation,
    qkv: Linear,
    qk_norm: QkNorm,
    proj: Linear,
    mlp: Mlp,
}

impl Stream {
    /// `name` is `img` or `txt`.
    fn load(cfg: &FluxConfig, name: &str, storage: DType, vb: &VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let attn = vb.pp(format!("{name}_attn"));
        Ok(Self {
            modulation: Modulation::load(h, 2, storage, vb.pp(format!("{name}_mod")))?,
            qkv: Linear::load(attn.pp("qkv"), h, 3 * h, cfg.qkv_bias, storage)?,
            qk_norm: QkNorm::load(cfg.head_dim(), attn.pp("norm"))?,
            proj: Linear::load(attn.pp("proj"), h, h, true, storage)?,
            mlp: Mlp::load(h, cfg.mlp_dim(), storage, vb.pp(format!("{name}_mlp")))?,
        })
    }
}

#[derive(Debug, Clone)]
struct DoubleStreamBlock {
    img: Stream,
    txt: Stream,
    norm: LayerNorm,
    num_heads: usize,
}

impl DoubleStreamBlock {
    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec: &Tensor,
        rope: &Rope,
    ) -> Result<(Tensor, Tensor)> {
        let img_mod = self.img.modulation.forward(vec)?;
        let txt_mod = self.txt.modulation.forward(vec)?;
        let qkv = |stream: &Stream, xs: &Tensor, m: &ModulationOut| -> Result<_> {
            let xs = m.scale_shift(&self.norm.forward(xs)?)?;
            let (q, k, v) = split_qkv(&stream.qkv.forward(&xs)?, self.num_heads)?;
            let (q, k) = stream.qk_norm.forward(&q, &k)?;
            Ok((q, k, v))
        };
        let (img_q, img_k, img_v) = qkv(&self.img, img, &img_mod[0])?;
        let (txt_q, txt_k, txt_v) = qkv(&self.txt, txt, &txt_mod[0])?;
        let attn = attention(
            &Tensor::cat(&[txt_q, img_q], 2)?,
            &Tensor::cat(&[txt_k, img_k], 2)?,
            &Tensor::cat(&[txt_v, img_v], 2)?,
            rope,
        )?;
        let txt_len = txt.dim(1)?;
        let txt_attn = attn.narrow(1, 0, txt_len)?;
        let img_attn = attn.narrow(1, txt_len, attn.dim(1)? - txt_len)?;
        let residual = |stream: &Stream, xs: &Tensor, attn: &Tensor, m: &[ModulationOut]| {
            let xs = (xs + m[0].gate(&stream.proj.forward(attn)?)?)?;
            let mlp_in = m[1].scale_shift(&self.norm.forward(&xs)?)?;
            &xs + m[1].gate(&stream.mlp.forward(&mlp_in)?)?
        };
        Ok((
            residual(&self.img, img, &img_attn, &img_mod)?,
            residual(&self.txt, txt, &txt_attn, &txt_mod)?,
        ))
    }
}

#[derive(Debug, Clone)]
struct SingleStreamBlock {
    linear1: Linear,
    linear2: Linear,
    qk_norm: QkNorm,
    norm: LayerNorm,
    modulation: Modulation,
    hidden_size: usize,
    num_heads: usize,
}

impl SingleStreamBlock {
    fn forward(&self, xs: &Tensor, vec: &Tensor, rope: &Rope) -> Result<Tensor> {
        let m = &self.modulation.forward(vec)?[0];
        let x_mod = self
            .linear1
            .forward(&m.scale_shift(&self.norm.forward(xs)?)?)?;
        let h3 = 3 * self.hidden_size;
        let (q, k, v) = split_qkv(&x_mod.narrow(D::Minus1, 0, h3)?, self.num_heads)?;
        let mlp = x_mod.narrow(D::Minus1, h3, x_mod.dim(D::Minus1)? - h3)?;
        let (q, k) = self.qk_norm.forward(&q, &k)?;
        let attn = attention(&q, &k, &v, rope)?;
        let out = self.linear2.forward(&cpu::cat_gelu_tanh(&attn, &mlp)?)?;
        xs + m.gate(&out)?
    }
}

#[derive(Debug, Clone)]
struct LastLayer {
    norm: LayerNorm,
    linear: Linear,
    ada_ln_modulation: Linear,
}

impl LastLayer {
    fn forward(&self, xs: &Tensor, vec: &Tensor) -> Result<Tensor> {
        let chunks = self.ada_ln_modulation.forward(&vec.silu()?)?.chunk(2, 1)?;
        let (shift, scale) = (chunks[0].unsqueeze(1)?, chunks[1].unsqueeze(1)?);
        let xs = self
            .norm
            .forward(xs)?
            .broadcast_mul(&(scale + 1.0)?)?
            .broadcast_add(&shift)?;
        self.linear.forward(&xs)
    }
}

#[derive(Debug, Clone)]
pub struct Flux {
    img_in: Linear,
    txt_in: Linear,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    double_blocks: Vec<DoubleStreamBlock>,
    single_blocks: Vec<SingleStreamBlock>,
    final_layer: LastLayer,
}

impl Flux {
    /// Linear weights are read in `storage` dtype, everything else in the builder's dtype
    /// (the compute dtype). `guidance_embed` is true for dev models.
    pub fn load(
        cfg: &FluxConfig,
        guidance_embed: bool,
        storage: DType,
        vb: VarBuilder,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let norm = LayerNorm::new(h, &vb)?;
        let double_blocks = (0..cfg.depth)
            .map(|i| {
                let vb = vb.pp(format!("double_blocks.{i}"));
                Ok(DoubleStreamBlock {
                    img: Stream::load(cfg, "img", storage, &vb)?,
                    txt: Stream::load(cfg, "txt", storage, &vb)?,
                    norm: norm.clone(),
                    num_heads: cfg.num_heads,
                })
            })
            .collect::<Result<_>>()?;
        let single_blocks = (0..cfg.depth_single_blocks)
            .map(|i| {
                let vb = vb.pp(format!("single_blocks.{i}"));
                Ok(SingleStreamBlock {
                    linear1: Linear::load(
                        vb.pp("linear1"),
                        h,
                        3 * h + cfg.mlp_dim(),
                        true,
                        storage,
                    )?,
                    linear2: Linear::load(vb.pp("linear2"), h + cfg.mlp_dim(), h, true, storage)?,
                    qk_norm: QkNorm::load(cfg.head_dim(), vb.pp("norm"))?,
                    norm: norm.clone(),
                    modulation: Modulation::load(h, 1, storage, vb.pp("modulation"))?,
                    hidden_size: h,
                    num_heads: cfg.num_heads,
                })
            })
            .collect::<Result<_>>()?;
        let final_vb = vb.pp("final_layer");
        let final_layer = LastLayer {
            norm,
            linear: Linear::load(final_vb.pp("linear"), h, cfg.in_channels, true, storage)?,
            ada_ln_modulation: Linear::load(
                final_vb.pp("adaLN_modulation.1"),
                h,
                2 * h,
                true,
                storage,
            )?,
        };
        let guidance_in = match guidance_embed {
            true => Some(MlpEmbedder::load(256, h, storage, vb.pp("guidance_in"))?),
            false => None,
        };
        Ok(Self {
            img_in: Linear::load(vb.pp("img_in"), cfg.in_channels, h, true, storage)?,
            txt_in: Linear::load(vb.pp("txt_in"), cfg.context_in_dim, h, true, storage)?,
            time_in: MlpEmbedder::load(256, h, storage, vb.pp("time_in"))?,
            vector_in: MlpEmbedder::load(cfg.vec_in_dim, h, storage, vb.pp("vector_in"))?,
            guidance_in,
            double_blocks,
            single_blocks,
            final_layer,
        })
    }

    /// Predicts the flow (velocity) for packed latents `img` `(batch, image_tokens,
    /// in_channels)` at noise level `timesteps` `(batch,)`, given T5 states `txt` `(batch,
    /// text_tokens, context_in_dim)` and the pooled CLIP vector `y` `(batch, vec_in_dim)`.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        y: &Tensor,
        rope: &Rope,
        timesteps: &Tensor,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dtype = img.dtype();
        let mut vec = self
            .time_in
            .forward(&timestep_embedding(timesteps, 256, dtype)?)?;
        match (&self.guidance_in, guidance) {
            (Some(embedder), Some(guidance)) => {
                vec = (vec + embedder.forward(&timestep_embedding(guidance, 256, dtype)?)?)?
            }
            (Some(_), None) => candle_core::bail!("this model needs a guidance value"),
            (None, _) => {}
        }
        let vec = (vec + self.vector_in.forward(y)?)?;
        let mut txt = self.txt_in.forward(txt)?;
        let mut img = self.img_in.forward(img)?;
        for block in &self.double_blocks {
            (img, txt) = block.forward(&img, &txt, &vec, rope)?;
        }
        let txt_len = txt.dim(1)?;
        let mut joint = Tensor::cat(&[&txt, &img], 1)?;
        for block in &self.single_blocks {
            joint = block.forward(&joint, &vec, rope)?;
        }
        let img = joint.narrow(1, txt_len, joint.dim(1)? - txt_len)?;
        self.final_layer.forward(&img, &vec)
    }
}
