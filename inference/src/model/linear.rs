//! A linear layer whose weight stays in its storage dtype until the matmul.
//!
//! Why not `candle_nn::Linear`: candle has no float8 matmul, so a float8 e4m3 weight has to
//! be widened to the activations' dtype first. Doing that per call, one layer at a time,
//! keeps the transformer at one byte per weight in memory (`Precision::Fp8`), as the
//! majicflus console did with torch's float8 storage.
//!
//! With f32 activations in host memory the layer calls gemm itself ([`Linear::forward_on_host`])
//! rather than going through candle's matmul: the weight is widened a slab at a time into a
//! reused buffer instead of into a fresh full-size f32 tensor per call, and the bias is written
//! into the output before the matmul accumulates onto it instead of being added in a second
//! pass over a second output tensor.

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use candle_nn::VarBuilder;
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use crate::model::cpu;

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

/// Weight elements widened per slab: 16 MiB of f32, every weight of the bench model in one
/// slab, FLUX.1's in slabs of 1365 output features or more. Slabs keep the scratch buffer
/// bounded whatever the layer; more than about a thousand output features per slab keeps
/// gemm's repacking of the activations for each slab under a percent of the matmul.
const SLAB_ELEMENTS: usize = 4 << 20;

thread_local! {
    /// Reused across calls, so widening writes into memory that is already mapped rather than
    /// faulting in (and zeroing) fresh pages for every layer of every step.
    static SLAB: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Calls `matmul(slab, first_row)` for consecutive slabs of whole rows of `weight` (rows of
/// `in_dim` elements), widened to f32 with `widen`.
fn by_widened_slabs<T: Copy + Sync>(
    weight: &[T],
    in_dim: usize,
    widen: impl Fn(T) -> f32 + Sync,
    mut matmul: impl FnMut(&[f32], usize),
) {
    // Widening is bound by memory bandwidth, which one core does not saturate; split it so
    // that the other cores do not sit idle in between two matmuls.
    const PIECE: usize = 1 << 16;
    let rows_per_slab = (SLAB_ELEMENTS / in_dim).max(1);
    SLAB.with_borrow_mut(|slab| {
        for (i, rows) in weight.chunks(rows_per_slab * in_dim).enumerate() {
            slab.resize(rows.len(), 0.0);
            slab.par_chunks_mut(PIECE)
                .zip(rows.par_chunks(PIECE))
                .for_each(|(slab, rows)| {
                    for (s, &w) in slab.iter_mut().zip(rows) {
                        *s = widen(w);
                    }
                });
            matmul(slab, i * rows_per_slab);
        }
    });
}

/// `ys[:, first..first + n] (+)= x · wᵀ` for `x` `(rows, in_dim)`, `w` `(n, in_dim)` and `ys`
/// `(rows, out_dim)`, all row-major; `accumulate` adds onto `ys` (holding the bias) instead of
/// overwriting it.
fn matmul_transposed(
    x: &[f32],
    w: &[f32],
    ys: &mut [f32],
    (in_dim, out_dim): (usize, usize),
    first: usize,
    accumulate: bool,
) {
    let rows = x.len() / in_dim;
    let n = w.len() / in_dim;
    assert!(
        x.len() == rows * in_dim
            && w.len() == n * in_dim
            && ys.len() == rows * out_dim
            && first + n <= out_dim,
        "matmul_transposed: shapes do not match"
    );
    let threads = candle_core::utils::get_num_threads();
    let parallelism = match threads {
        1 => Parallelism::None,
        _ => Parallelism::Rayon(threads),
    };
    // SAFETY: the assert above keeps every access in bounds: x is rows x in_dim (row stride
    // in_dim), w read as its transpose in_dim x n (column stride in_dim), and the destination
    // columns first..first + n of rows rows of out_dim elements.
    unsafe {
        gemm(
            rows,
            n,
            in_dim,
            ys.as_mut_ptr().add(first),
            1,
            out_dim as isize,
            accumulate,
            x.as_ptr(),
            1,
            in_dim as isize,
            w.as_ptr(),
            in_dim as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
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
        if let Some(ys) = self.forward_on_host(xs)? {
            return Ok(ys);
        }
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

    /// `forward` for f32 activations in host memory, `None` for anything else (a GPU, another
    /// compute dtype, a non-contiguous weight).
    fn forward_on_host(&self, xs: &Tensor) -> Result<Option<Tensor>> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        if xs.dtype() != DType::F32 || !xs.device().is_cpu() || in_dim == 0 || out_dim == 0 {
            return Ok(None);
        }
        let xs = xs.contiguous()?;
        let rows = xs.elem_count() / in_dim;
        let mut out_shape = xs.dims().to_vec();
        if let Some(last) = out_shape.last_mut() {
            *last = out_dim;
        }
        let (x_storage, x_layout) = xs.storage_and_layout();
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(x)), Some((x0, x1)), Some((w0, w1))) = (
            &*x_storage,
            x_layout.contiguous_offsets(),
            w_layout.contiguous_offsets(),
        ) else {
            return Ok(None);
        };
        let x = &x[x0..x1];
        let mut ys = match &self.bias {
            None => vec![0f32; rows * out_dim],
            Some(bias) => {
                let (b_storage, b_layout) = bias.storage_and_layout();
                let (Storage::Cpu(CpuStorage::F32(b)), Some((b0, b1))) =
                    (&*b_storage, b_layout.contiguous_offsets())
                else {
                    return Ok(None);
                };
                let bias = &b[b0..b1];
                if bias.len() != out_dim {
                    candle_core::bail!("bias of {} for {out_dim} outputs", bias.len());
                }
                let fill = |_, row: &mut [std::mem::MaybeUninit<f32>]| {
                    for (y, &b) in row.iter_mut().zip(bias) {
                        y.write(b);
                    }
                };
                // SAFETY: every row is out_dim wide, as many elements as the bias copied in.
                unsafe { cpu::par_rows(rows, out_dim, fill) }
            }
        };
        let accumulate = self.bias.is_some();
        let dims = (in_dim, out_dim);
        match &*w_storage {
            Storage::Cpu(CpuStorage::F32(w)) => {
                matmul_transposed(x, &w[w0..w1], &mut ys, dims, 0, accumulate)
            }
            Storage::Cpu(CpuStorage::BF16(w)) => {
                // bf16 is the top half of an f32.
                by_widened_slabs(
                    &w[w0..w1],
                    in_dim,
                    |v| f32::from_bits(u32::from(v.to_bits()) << 16),
                    |slab, first| matmul_transposed(x, slab, &mut ys, dims, first, accumulate),
                )
            }
            Storage::Cpu(CpuStorage::F8E4M3(w)) => by_widened_slabs(
                &w[w0..w1],
                in_dim,
                |v| E4M3_TO_F32[usize::from(v.to_bits())],
                |slab, first| matmul_transposed(x, slab, &mut ys, dims, first, accumulate),
            ),
            _ => return Ok(None),
        }
        drop((x_storage, w_storage));
        Tensor::from_vec(ys, out_shape, &Device::Cpu).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::max_abs_diff;
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

    /// A Linear loaded from random `dtype` weights and f32 bias (seeds `seed` and `seed + 1`),
    /// with the weight and bias it was loaded from.
    fn random_linear(
        seed: u64,
        in_dim: usize,
        out_dim: usize,
        dtype: DType,
    ) -> Result<(Linear, Tensor, Tensor)> {
        let dev = Device::Cpu;
        let weight = Tensor::from_vec(
            standard_normal(seed, out_dim * in_dim),
            (out_dim, in_dim),
            &dev,
        )?
        .to_dtype(dtype)?;
        let bias = Tensor::from_vec(standard_normal(seed + 1, out_dim), out_dim, &dev)?;
        let tensors = HashMap::from([
            ("weight".to_string(), weight.clone()),
            ("bias".to_string(), bias.clone()),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let linear = Linear::load(vb, in_dim, out_dim, true, dtype)?;
        Ok((linear, weight, bias))
    }

    #[test]
    fn bf16_forward_in_several_slabs_matches_candles_matmul() -> Result<()> {
        // 4096 inputs make 1024 output features per slab: 1100 outputs take two slabs.
        let (rows, in_dim, out_dim) = (3, 4096, 1100);
        let (linear, weight, bias) = random_linear(4, in_dim, out_dim, DType::BF16)?;
        let xs = Tensor::from_vec(
            standard_normal(6, rows * in_dim),
            (rows, in_dim),
            &Device::Cpu,
        )?;
        let ours = linear.forward(&xs)?;
        let candle = xs
            .matmul(&weight.to_dtype(DType::F32)?.t()?)?
            .broadcast_add(&bias)?;
        let diff = max_abs_diff(&ours, &candle)?;
        // Sums of 4096 products of about unit size: f32 rounding in a different order.
        assert!(diff < 1e-3, "max abs diff {diff}");
        Ok(())
    }

    #[test]
    fn float8_forward_equals_widening_with_candle_then_matmul() -> Result<()> {
        let (rows, in_dim, out_dim) = (10, 48, 24);
        let (linear, weight, bias) = random_linear(1, in_dim, out_dim, DType::F8E4M3)?;
        let xs = Tensor::from_vec(
            standard_normal(3, rows * in_dim),
            (2, rows / 2, in_dim),
            &Device::Cpu,
        )?;
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
