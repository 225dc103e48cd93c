//! A linear layer whose weight stays in its storage dtype until the matmul.
//!
//! Why not `candle_nn::Linear`: candle has no float8 matmul, so a float8 e4m3 weight has to
//! be widened to the activations' dtype first. Doing that per call, one layer at a time,
//! keeps the transformer at one byte per weight in memory (`Precision::Fp8`), as the
//! majicflus console did with torch's float8 storage.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct Linear {
    /// `(out, in)`, in the storage dtype (F8E4M3, BF16 or F32).
    weight: Tensor,
    /// In the compute dtype.
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` in `storage` dtype and `bias` (if `with_bias`) in the builder's dtype.
    pub fn load(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        with_bias: bool,
        storage: DType,
    ) -> Result<Self> {
        let weight = vb.get_with_hints_dtype(
            (out_dim, in_dim),
            "weight",
            candle_nn::Init::Const(0.),
            storage,
        )?;
        let bias = match with_bias {
            true => Some(vb.get(out_dim, "bias")?),
            false => None,
        };
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let weight = self.weight.to_dtype(xs.dtype())?;
        let (out_dim, in_dim) = weight.dims2()?;
        let mut out_shape = xs.dims().to_vec();
        let rows = xs.elem_count() / in_dim;
        if let Some(last) = out_shape.last_mut() {
            *last = out_dim;
        }
        // One 2-D matmul over all rows is faster than candle's batched broadcast.
        let ys = xs.reshape((rows, in_dim))?.matmul(&weight.t()?)?;
        let ys = match &self.bias {
            Some(bias) => ys.broadcast_add(bias)?,
            None => ys,
        };
        ys.reshape(out_shape)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Device;

    use super::*;

    #[test]
    fn float8_weights_compute_like_their_widened_values() -> Result<()> {
        let dev = Device::Cpu;
        let weight = Tensor::new(&[[0.5f32, -1.0, 2.0], [0.25, 0.125, -4.0]], &dev)?;
        let bias = Tensor::new(&[1.0f32, -1.0], &dev)?;
        let tensors = HashMap::from([
            ("weight".to_string(), weight.to_dtype(DType::F8E4M3)?),
            ("bias".to_string(), bias),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let linear = Linear::load(vb, 3, 2, true, DType::F8E4M3)?;
        assert_eq!(linear.weight.dtype(), DType::F8E4M3);
        let xs = Tensor::new(&[[[1.0f32, 2.0, 3.0]]], &dev)?;
        let ys = linear.forward(&xs)?;
        assert_eq!(ys.dims(), &[1, 1, 2]);
        // These weights are exact in e4m3: [0.5 - 2 + 6 + 1, 0.25 + 0.25 - 12 - 1].
        assert_eq!(ys.flatten_all()?.to_vec1::<f32>()?, vec![5.5, -12.5]);
        Ok(())
    }
}
