//! f32 kernels for the transformer's hot path in host memory.
//!
//! candle's CPU backend computes GELU and `exp` one element at a time through libm
//! (`tanhf`, `expm1f`, `expf`), and its attention materializes every head's full
//! `(tokens, tokens)` score matrix, a fresh 56 MB allocation per block at 1536 tokens, before
//! a separate softmax pass. Together that was about a quarter of a step's CPU time
//! (docs/benchmarks-inference.md). The kernels here are plain loops over slices that the
//! compiler vectorizes, run on rayon's pool (the one gemm uses, so the two never
//! oversubscribe the cores), and fall back to candle's ops for anything but contiguous-row f32
//! tensors in host memory (a GPU, or another compute dtype).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, D, DType, Device, Layout, Result, Storage, Tensor};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

/// e^x with Cephes' `expf` polynomial (within 2 ulp of libm), written with multiplies, adds
/// and bit operations only so that loops calling it vectorize. Saturates to about 1.2e-38
/// below -87.3 and to about 2.2e38 above 88.3 instead of reaching 0 or infinity.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer that lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let two_to_n =
        f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    (p * r * r + r + 1.0) * two_to_n
}

/// GELU with the tanh approximation (diffusers' `approximate="tanh"`, candle's `gelu`):
/// 0.5 x (1 + tanh(u)) rewritten as x / (1 + e^(-2u)), one `exp` and no cancellation near 0.
#[inline(always)]
fn gelu_tanh_scalar(x: f32) -> f32 {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_TWO_OVER_PI * x * (1.0 + 0.044_715 * x * x);
    x / (1.0 + exp(-2.0 * u))
}

/// `xs[i] = f(xs[i])`, with 8-lane AVX2 vectors where the CPU has them: the default x86-64
/// target only allows 4-lane SSE2, which left the attention's `exp` at about a tenth of its
/// time.
fn map_in_place(xs: &mut [f32], f: impl Fn(f32) -> f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2.
        return unsafe { map_in_place_avx2(xs, f) };
    }
    map_in_place_portable(xs, f);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn map_in_place_avx2(xs: &mut [f32], f: impl Fn(f32) -> f32) {
    map_in_place_portable(xs, f);
}

#[inline(always)]
fn map_in_place_portable(xs: &mut [f32], f: impl Fn(f32) -> f32) {
    for x in xs {
        *x = f(*x);
    }
}

/// `out[i] = f(xs[i])` for an `out` not yet initialized, vectorized like [`map_in_place`].
fn map_into(out: &mut [MaybeUninit<f32>], xs: &[f32], f: impl Fn(f32) -> f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2.
        return unsafe { map_into_avx2(out, xs, f) };
    }
    map_into_portable(out, xs, f);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn map_into_avx2(out: &mut [MaybeUninit<f32>], xs: &[f32], f: impl Fn(f32) -> f32) {
    map_into_portable(out, xs, f);
}

#[inline(always)]
fn map_into_portable(out: &mut [MaybeUninit<f32>], xs: &[f32], f: impl Fn(f32) -> f32) {
    for (o, &x) in out.iter_mut().zip(xs) {
        o.write(f(x));
    }
}

/// A vector of `rows * width` elements whose rows `fill(row index, row)` writes in parallel.
///
/// Not `vec![0.0; n]` and then a parallel fill: calloc hands back memory recycled from the
/// heap (anything under glibc's adaptive mmap threshold, up to 32 MiB) by zeroing it with one
/// serial memset, which the other cores sit out.
///
/// # Safety
///
/// `fill` must write every element of each row it is given.
pub unsafe fn par_rows(
    rows: usize,
    width: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let len = rows * width;
    let mut out = Vec::with_capacity(len);
    if len > 0 {
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(width)
            .enumerate()
            .for_each(|(i, row)| fill(i, row));
    }
    // SAFETY: the rows cover all len elements and the caller's fill wrote each.
    unsafe { out.set_len(len) };
    out
}

/// Data offsets of the rows (last dimension) of `layout`, if each row is contiguous.
fn row_starts(layout: &Layout) -> Option<Vec<usize>> {
    let (&row_len, outer) = layout.dims().split_last()?;
    if row_len > 1 && layout.stride().last() != Some(&1) {
        return None;
    }
    Some(outer.iter().zip(layout.stride()).fold(
        vec![layout.start_offset()],
        |starts, (&dim, &stride)| {
            starts
                .iter()
                .flat_map(|&start| (0..dim).map(move |i| start + i * stride))
                .collect()
        },
    ))
}

/// `xs.gelu()`, vectorized and spread over the cores for f32 in host memory. Takes rows
/// with a stride too and returns a contiguous tensor.
pub fn gelu_tanh(xs: &Tensor) -> Result<Tensor> {
    let (storage, layout) = xs.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(data)), Some(starts), Some(&row_len)) =
        (&*storage, row_starts(layout), layout.dims().last())
    else {
        drop(storage);
        return xs.gelu();
    };
    let no_head = vec![0; starts.len()];
    let out = head_then_gelu_rows((&[], &no_head, 0), (data, &starts, row_len));
    Tensor::from_vec(out, xs.shape(), &Device::Cpu)
}

/// `Tensor::cat(&[head, &xs.gelu()?], D::Minus1)` in one pass over the output: a single
/// block feeds its attention output and its MLP activations side by side to `linear2`, and
/// concatenating them afterwards was a serial copy of that whole input in every block.
pub fn cat_gelu_tanh(head: &Tensor, xs: &Tensor) -> Result<Tensor> {
    let (head_storage, head_layout) = head.storage_and_layout();
    let (storage, layout) = xs.storage_and_layout();
    let same_rows = head.rank() == xs.rank()
        && head.dims().split_last().map(|(_, rows)| rows)
            == xs.dims().split_last().map(|(_, rows)| rows);
    let (
        true,
        Storage::Cpu(CpuStorage::F32(head_data)),
        Storage::Cpu(CpuStorage::F32(data)),
        Some(head_starts),
        Some(starts),
        Some(&head_len),
        Some(&row_len),
    ) = (
        same_rows,
        &*head_storage,
        &*storage,
        row_starts(head_layout),
        row_starts(layout),
        head.dims().last(),
        xs.dims().last(),
    )
    else {
        drop((head_storage, storage));
        return Tensor::cat(&[head, &xs.gelu()?], D::Minus1);
    };
    let out = head_then_gelu_rows(
        (head_data, &head_starts, head_len),
        (data, &starts, row_len),
    );
    let mut shape = xs.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = head_len + row_len;
    }
    Tensor::from_vec(out, shape, &Device::Cpu)
}

/// Rows of `[head row, gelu(xs row)]`, each operand given as (data, row offsets, row length)
/// with as many rows in `head` as in `xs`.
fn head_then_gelu_rows(
    (head, head_starts, head_len): (&[f32], &[usize], usize),
    (xs, starts, row_len): (&[f32], &[usize], usize),
) -> Vec<f32> {
    let fill = |i: usize, out: &mut [MaybeUninit<f32>]| {
        let (out_head, out) = out.split_at_mut(head_len);
        let (h, x) = (head_starts[i], starts[i]);
        map_into(out_head, &head[h..h + head_len], |v| v);
        map_into(out, &xs[x..x + row_len], gelu_tanh_scalar);
    };
    // SAFETY: every row is head_len + row_len wide, and fill writes head_len elements from
    // head and row_len from xs into it.
    unsafe { par_rows(starts.len(), head_len + row_len, fill) }
}

fn f32_host_slice(storage: &Storage, layout: &Layout) -> Option<(usize, usize)> {
    match storage {
        Storage::Cpu(CpuStorage::F32(_)) => layout.contiguous_offsets(),
        _ => None,
    }
}

/// Rows of queries one attention task handles. gemm repacks a head's k and v for every block,
/// which costs less the larger the block; 128 rows ran about 7% faster than 64 and within 3%
/// of 256 and 384 on one core at 1536 tokens, while still giving 12 blocks to spread over the
/// cores.
const QUERY_BLOCK: usize = 128;

/// Softmax attention `softmax(q kᵀ * scale) v` over `(batch, heads, tokens, head_dim)`
/// tensors, returned as `(batch, tokens, heads * head_dim)` (heads merged). `None` unless all
/// three are f32 in host memory.
///
/// Each task takes one block of queries through all heads: scores for the block, softmax in
/// place, times v straight into the task's rows of the output. No score matrix larger than a
/// block is ever allocated, and the heads are merged without a transpose copy.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Option<Tensor>> {
    if !q.device().is_cpu() || q.dtype() != DType::F32 {
        return Ok(None);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (batch, heads, tokens, head_dim) = q.dims4()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (
        Storage::Cpu(CpuStorage::F32(q_data)),
        Storage::Cpu(CpuStorage::F32(k_data)),
        Storage::Cpu(CpuStorage::F32(v_data)),
        Some((q0, _)),
        Some((k0, _)),
        Some((v0, _)),
    ) = (
        &*qs,
        &*ks,
        &*vs,
        f32_host_slice(&qs, ql),
        f32_host_slice(&ks, kl),
        f32_host_slice(&vs, vl),
    )
    else {
        return Ok(None);
    };
    let (q_data, k_data, v_data) = (&q_data[q0..], &k_data[k0..], &v_data[v0..]);
    let width = heads * head_dim;
    let mut out = vec![0f32; batch * tokens * width];
    if tokens == 0 || width == 0 {
        return Tensor::from_vec(out, (batch, tokens, width), &Device::Cpu).map(Some);
    }
    for (b, out) in out.chunks_mut(tokens * width).enumerate() {
        out.par_chunks_mut(QUERY_BLOCK * width)
            .enumerate()
            .for_each_init(
                || vec![0f32; QUERY_BLOCK * tokens],
                |scores, (block, out)| {
                    let rows = out.len() / width;
                    let first = block * QUERY_BLOCK;
                    for h in 0..heads {
                        let head = (b * heads + h) * tokens * head_dim;
                        let q = &q_data[head + first * head_dim..head + (first + rows) * head_dim];
                        let k = &k_data[head..head + tokens * head_dim];
                        let v = &v_data[head..head + tokens * head_dim];
                        attend(
                            q,
                            k,
                            v,
                            scale,
                            &mut scores[..rows * tokens],
                            out,
                            h,
                            head_dim,
                        );
                    }
                },
            );
    }
    drop((qs, ks, vs));
    Tensor::from_vec(out, (batch, tokens, width), &Device::Cpu).map(Some)
}

/// One head of one query block: `q` `(rows, head_dim)`, `k` and `v` `(tokens, head_dim)`,
/// all row-major; writes head `h` of `out` `(rows, heads * head_dim)`.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
    h: usize,
    head_dim: usize,
) {
    let rows = q.len() / head_dim;
    let tokens = k.len() / head_dim;
    let width = out.len() / rows;
    // SAFETY: every pointer/stride pair stays inside its slice: q is rows x head_dim, k and v
    // tokens x head_dim (k read transposed), scores rows x tokens, and out rows x width with
    // head h's columns h * head_dim .. (h + 1) * head_dim <= width.
    unsafe {
        gemm(
            rows,
            tokens,
            head_dim,
            scores.as_mut_ptr(),
            1,
            tokens as isize,
            false,
            q.as_ptr(),
            1,
            head_dim as isize,
            k.as_ptr(),
            head_dim as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
    let mut inverse_sums = Vec::with_capacity(rows);
    for row in scores.chunks_exact_mut(tokens) {
        let max = lanes_max(row);
        map_in_place(row, |s| exp(s - max));
        inverse_sums.push(1.0 / lanes_sum(row));
    }
    // SAFETY: as above.
    unsafe {
        gemm(
            rows,
            head_dim,
            tokens,
            out.as_mut_ptr().add(h * head_dim),
            1,
            width as isize,
            false,
            scores.as_ptr(),
            1,
            tokens as isize,
            v.as_ptr(),
            1,
            head_dim as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
    // Normalizing the head_dim outputs costs less than normalizing the tokens probabilities.
    for (row, inverse_sum) in out.chunks_exact_mut(width).zip(inverse_sums) {
        for o in &mut row[h * head_dim..(h + 1) * head_dim] {
            *o *= inverse_sum;
        }
    }
}

/// Eight independent accumulators, because a single one forces the additions into sequence
/// (float addition is not associative) and so keeps the loop scalar.
const LANES: usize = 8;

fn lanes_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = a.max(x);
        }
    }
    tail.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

fn lanes_sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    tail.iter().chain(&acc).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;
    use crate::model::noise::standard_normal;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        for i in -8700..=8820 {
            let x = i as f32 / 100.0 + 0.003;
            let (ours, libm) = (exp(x), x.exp());
            let ulp = (libm.to_bits() as i64 - ours.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}): {ours} vs {libm}, {ulp} ulp");
        }
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1.3e-38);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn gelu_and_cat_gelu_match_candles_on_contiguous_and_strided_rows() -> Result<()> {
        let dev = Device::Cpu;
        let mut values = standard_normal(5, 6 * 40);
        values.extend([0.0, -0.0, 1e-30, -12.0, 12.0, -100.0, 100.0, 3.0]);
        let xs = Tensor::from_vec(values, (2, 31, 4), &dev)?.affine(3.0, 0.0)?;
        let strided = xs.narrow(D::Minus1, 1, 2)?;
        for xs in [&xs, &strided] {
            let ours = gelu_tanh(xs)?;
            assert!(ours.is_contiguous());
            assert_eq!(ours.dims(), xs.dims());
            let ours = ours.flatten_all()?.to_vec1::<f32>()?;
            let candle = xs.gelu()?.flatten_all()?.to_vec1::<f32>()?;
            for (a, b) in ours.iter().zip(&candle) {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
        let head = xs.narrow(D::Minus1, 0, 1)?;
        let ours = cat_gelu_tanh(&head, &strided)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let candle = Tensor::cat(&[&head, &strided.gelu()?], D::Minus1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (a, b) in ours.iter().zip(&candle) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        assert_eq!(
            gelu_tanh(&Tensor::zeros((2, 3), DType::BF16, &dev)?)?.dtype(),
            DType::BF16
        );
        Ok(())
    }

    #[test]
    fn attention_matches_candles_ops() -> Result<()> {
        let dev = Device::Cpu;
        // 150 tokens: two full query blocks and a partial one.
        let (batch, heads, tokens, head_dim) = (2, 3, 150, 16);
        let n = batch * heads * tokens * head_dim;
        let qkv = |seed| {
            Tensor::from_vec(
                standard_normal(seed, n),
                (batch, heads, tokens, head_dim),
                &dev,
            )?
            .affine(2.0, 0.0)
        };
        let (q, k, v) = (qkv(1)?, qkv(2)?, qkv(3)?);
        let scale = 0.25;
        let ours = attention(&q, &k, &v, scale)?.expect("f32 host tensors");
        let weights = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale as f64)?)?;
        let candle = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .flatten_from(2)?
            .contiguous()?;
        assert_eq!(ours.dims(), &[batch, tokens, heads * head_dim]);
        let diff = max_abs_diff(&ours, &candle)?;
        assert!(diff < 1e-5, "max abs diff {diff}");
        let bf16 = q.to_dtype(DType::BF16)?;
        assert!(attention(&bf16, &bf16, &bf16, scale)?.is_none());
        Ok(())
    }
}
