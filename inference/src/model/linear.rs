//! A linear layer whose weight stays in its storage dtype until the matmul.
//!
//! Why not `candle_nn::Linear`: candle has no float8 matmul, so a float8 e4m3 weight has to
//! be widened to the activations' dtype first. Doing that per call, one layer at a time,
//! keeps the transformer at one byte per weight in memory (`Precision::Fp8`), as the
//! majicflus console did with torch's float8 storage.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use candle_nn::VarBuilder;

/// f32 value of every float8 e4m3 bit pattern. candle's CPU cast converts each element
/// through f16 in software (the `float8` crate), which made widening the fp8 transformer cost
/// more per step than the bf16 one; a table lookup per byte takes about 16x less CPU time
/// (docs/benchmarks-inference.md).
static E4M3_TO_F32: [f32; 256] = {
    let mut table = [0.0; 256];
    let mut bits = 0;
    while bits < 256 {
        table[bits] = e4m3_to_f32(bits as u8);
        bits += 1;
    }
    table
};

/// Decodes e4m3 as specified by OCP FP8 (`float8_e4m3fn`): exponent bias 7, subnormals,
/// no infinities, NaN only at S.1111.111.
const fn e4m3_to_f32(bits: u8) -> f32 {
    let exponent = (bits >> 3) & 0xf;
    let mantissa = bits & 0x7;
    let magnitude = match (exponent, mantissa) {
        (0xf, 0x7) => f32::NAN,
        // Subnormal: mantissa * 2^-9, exact in f32.
        (0, _) => mantissa as f32 / 512.0,
        // Rebias the exponent from 7 to 127 and left-align the 3 mantissa bits.
        _ => f32::from_bits(((exponent as u32 + 120) << 23) | ((mantissa as u32) << 20)),
    };
    f32::from_bits(magnitude.to_bits() | (((bits >> 7) as u32) << 31))
}

/// `weight` widened to f32 through [`E4M3_TO_F32`], if it is a contiguous float8 tensor in
/// host memory; on a GPU candle's cast is a kernel and needs no help.
fn widen_e4m3_on_host(weight: &Tensor) -> Result<Option<Tensor>> {
    let (storage, layout) = weight.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F8E4M3(data)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let widened: Vec<f32> = data[start..end]
        .iter()
        .map(|v| E4M3_TO_F32[usize::from(v.to_bits())])
        .collect();
    Tensor::from_vec(widened, layout.shape(), &Device::Cpu).map(Some)
}

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
        let weight = self.widened_weight(xs.dtype())?;
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

    fn widened_weight(&self, dtype: DType) -> Result<Tensor> {
        if dtype == DType::F32
            && let Some(weight) = widen_e4m3_on_host(&self.weight)?
        {
            return Ok(weight);
        }
        self.weight.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::noise::standard_normal;

    fn every_e4m3_bit_pattern() -> Result<Tensor> {
        let bytes: Vec<u8> = (0..=255).collect();
        Tensor::from_raw_buffer(&bytes, DType::F8E4M3, &[256], &Device::Cpu)
    }

    #[test]
    fn table_matches_candles_conversion_for_every_bit_pattern() -> Result<()> {
        let candle = every_e4m3_bit_pattern()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        for (bits, (&ours, theirs)) in E4M3_TO_F32.iter().zip(candle).enumerate() {
            match theirs.is_nan() {
                true => assert!(ours.is_nan(), "{bits:#04x}: {ours} is not NaN"),
                // Bits, not ==, so that -0.0 must stay -0.0.
                false => assert_eq!(
                    ours.to_bits(),
                    theirs.to_bits(),
                    "{bits:#04x}: {ours} vs {theirs}"
                ),
            }
        }
        assert_eq!(E4M3_TO_F32.iter().filter(|v| v.is_nan()).count(), 2);
        assert_eq!(
            (E4M3_TO_F32[0x7e], E4M3_TO_F32[0x01]),
            (448.0, 2f32.powi(-9))
        );
        Ok(())
    }

    #[test]
    fn widening_on_the_host_uses_the_table() -> Result<()> {
        let widened =
            widen_e4m3_on_host(&every_e4m3_bit_pattern()?)?.expect("a host float8 tensor");
        let widened = widened.to_vec1::<f32>()?;
        for (ours, table) in widened.iter().zip(E4M3_TO_F32) {
            assert!(ours.to_bits() == table.to_bits() || (ours.is_nan() && table.is_nan()));
        }
        let bf16 = Tensor::zeros(4, DType::BF16, &Device::Cpu)?;
        assert!(widen_e4m3_on_host(&bf16)?.is_none());
        Ok(())
    }

    #[test]
    fn float8_forward_equals_widening_with_candle_then_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, in_dim, out_dim) = (10, 48, 24);
        let weight = Tensor::from_vec(
            standard_normal(1, out_dim * in_dim),
            (out_dim, in_dim),
            &dev,
        )?
        .to_dtype(DType::F8E4M3)?;
        let bias = Tensor::from_vec(standard_normal(2, out_dim), out_dim, &dev)?;
        let xs = Tensor::from_vec(
            standard_normal(3, rows * in_dim),
            (2, rows / 2, in_dim),
            &dev,
        )?;
        let tensors = HashMap::from([
            ("weight".to_string(), weight.clone()),
            ("bias".to_string(), bias.clone()),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let linear = Linear::load(vb, in_dim, out_dim, true, DType::F8E4M3)?;
        let ours = linear.forward(&xs)?;
        // The forward pass before the table: candle's cast, then the same 2-D matmul.
        let before = xs
            .reshape((rows, in_dim))?
            .matmul(&weight.to_dtype(DType::F32)?.t()?)?
            .broadcast_add(&bias)?
            .reshape((2, rows / 2, out_dim))?;
        assert_eq!(ours.dims(), before.dims());
        let (ours, before) = (
            ours.flatten_all()?.to_vec1::<f32>()?,
            before.flatten_all()?.to_vec1::<f32>()?,
        );
        assert!(
            ours.iter()
                .zip(&before)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        Ok(())
    }

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
