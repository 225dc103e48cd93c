//! Rotary position embedding of FLUX.1: tables computed once per generation on the host in
//! f64 (as BFL does in float64), held and applied in f32 on every device.

use candle_core::{DType, Device, Result, Tensor};

use crate::model::flux::FluxConfig;

/// Rotary cos/sin tables for one token sequence (text tokens first, then image tokens),
/// each `(tokens, head_dim / 2)`, in f32 on every device.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Text tokens sit at position (0, 0, 0); image token (row, col) at (0, row, col).
    pub fn new(
        cfg: &FluxConfig,
        txt_tokens: usize,
        (rows, cols): (usize, usize),
        device: &Device,
    ) -> Result<Self> {
        let positions = std::iter::repeat_n([0, 0, 0], txt_tokens)
            .chain((0..rows).flat_map(|r| (0..cols).map(move |c| [0, r, c])));
        let half = cfg.head_dim() / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for position in positions {
            for (&pos, &axis_dim) in position.iter().zip(&cfg.axes_dim) {
                for j in (0..axis_dim).step_by(2) {
                    let freq = (cfg.theta as f64).powf(-(j as f64) / axis_dim as f64);
                    let angle = pos as f64 * freq;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let tokens = txt_tokens + rows * cols;
        let table = |values: Vec<f32>| {
            Tensor::from_vec(values, (tokens, half), &Device::Cpu)?.to_device(device)
        };
        Ok(Self {
            cos: table(cos)?,
            sin: table(sin)?,
        })
    }

    /// Rotates in f32 and returns to the input's dtype, as diffusers' `apply_rotary_emb`
    /// does: in bf16, the angles of far image positions would lose most of their digits.
    pub(crate) fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        let rotated = candle_nn::rotary_emb::rope_i(
            &xs.to_dtype(DType::F32)?.contiguous()?,
            &self.cos,
            &self.sin,
        )?;
        rotated.to_dtype(xs.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;
    use crate::model::noise::standard_normal;

    #[test]
    fn rotary_embedding_rotates_in_f32_and_keeps_the_inputs_dtype() -> Result<()> {
        let cfg = FluxConfig {
            hidden_size: 32,
            num_heads: 2,
            axes_dim: vec![4, 6, 6],
            ..FluxConfig::default()
        };
        let rope = Rope::new(&cfg, 3, (40, 40), &Device::Cpu)?;
        assert_eq!(rope.cos.dtype(), DType::F32);
        let q = Tensor::from_vec(
            standard_normal(1, 2 * (3 + 40 * 40) * 16),
            (1, 2, 3 + 40 * 40, 16),
            &Device::Cpu,
        )?;
        let q_bf16 = q.to_dtype(DType::BF16)?;
        let reference = rope.apply(&q_bf16.to_dtype(DType::F32)?)?;
        let ours = rope.apply(&q_bf16)?;
        assert_eq!(ours.dtype(), DType::BF16);
        // What a bf16 device computed before: tables and products in bf16.
        let all_bf16 = candle_nn::rotary_emb::rope_i(
            &q_bf16,
            &rope.cos.to_dtype(DType::BF16)?,
            &rope.sin.to_dtype(DType::BF16)?,
        )?;
        let error = |t: &Tensor| max_abs_diff(&t.to_dtype(DType::F32)?, &reference);
        let (ours, all_bf16) = (error(&ours)?, error(&all_bf16)?);
        // Ours rounds once, at the output.
        assert!(ours < all_bf16, "f32 rotation {ours} vs bf16 {all_bf16}");
        Ok(())
    }
}
