//! Softmax attention that scales with the number of tokens.
//!
//! With f32 activations in host memory the fused kernel of `model/cpu.rs` runs; everywhere
//! else (a GPU, bf16 on the CPU) queries go through candle's ops a block at a time, so the
//! score tensor never grows with tokens² (24 x 4608² scores are 1 GB in bf16 at 1024²) and no
//! kernel indexes past 32 bits at 2048².

use candle_core::{D, Result, Tensor};

use crate::model::cpu;

/// Softmax attention over `(batch, heads, tokens, head_dim)`, heads merged in the output.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    if let Some(merged) = cpu::attention(q, k, v, scale as f32)? {
        return Ok(merged);
    }
    let (batch, heads, tokens, _) = q.dims4()?;
    let block_rows = (SCORES_PER_BLOCK / (batch * heads * tokens).max(1)).max(1);
    blocked_attention(q, k, v, scale, block_rows)
}

/// Score elements of one query block of [`blocked_attention`]: 256 MiB in bf16, and far below
/// the 2^31 elements where candle's softmax kernel's 32-bit index overflows (one full score
/// tensor of 24 heads at 2048² has 6.9e9).
const SCORES_PER_BLOCK: usize = 1 << 27;

/// Softmax attention of blocks of `block_rows` queries at a time, heads merged in the output:
/// the same math as one softmax over the whole score tensor (each query's row is complete in
/// its block), with score memory bounded by the block instead of growing with tokens².
fn blocked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    block_rows: usize,
) -> Result<Tensor> {
    let tokens = q.dim(2)?;
    let (k_t, v) = (k.t()?, v.contiguous()?);
    let blocks = (0..tokens)
        .step_by(block_rows)
        .map(|start| {
            let q = q.narrow(2, start, block_rows.min(tokens - start))?;
            let weights = candle_nn::ops::softmax_last_dim(&(q.matmul(&k_t)? * scale)?)?;
            weights.matmul(&v)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&blocks, 2)?.transpose(1, 2)?.flatten_from(2)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::model::max_abs_diff;
    use crate::model::noise::standard_normal;

    /// q, k, v of `(batch, heads, tokens, head_dim)` from seeds 1-3, in `dtype`.
    fn qkv(dims: (usize, usize, usize, usize), dtype: DType) -> Result<[Tensor; 3]> {
        let n = dims.0 * dims.1 * dims.2 * dims.3;
        let random = |seed| Tensor::from_vec(standard_normal(seed, n), dims, &Device::Cpu);
        Ok([
            random(1)?.to_dtype(dtype)?,
            random(2)?.to_dtype(dtype)?,
            random(3)?.to_dtype(dtype)?,
        ])
    }

    /// One softmax over the whole score tensor, as the GPU path computed before query blocks.
    fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let weights = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
        weights
            .matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .flatten_from(2)
    }

    #[test]
    fn query_blocks_compute_the_same_attention_as_one_softmax() -> Result<()> {
        // 37 tokens in blocks of 8: four full blocks and a partial one.
        let dims = (2, 3, 37, 16);
        let scale = 0.25;
        for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
            let [q, k, v] = qkv(dims, dtype)?;
            let naive = naive_attention(&q, &k, &v, scale)?.to_dtype(DType::F32)?;
            let blocked = blocked_attention(&q, &k, &v, scale, 8)?;
            assert_eq!(blocked.dims(), &[2, 37, 48]);
            assert_eq!(blocked.dtype(), dtype);
            let diff = max_abs_diff(&blocked.to_dtype(DType::F32)?, &naive)?;
            assert!(diff <= tolerance, "{dtype:?}: max abs diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn blocks_bound_the_scores_at_2048_squared() {
        // 2048² pixels: 128 x 128 latent patches and 512 text tokens, 24 heads.
        let (heads, tokens) = (24, 128 * 128 + 512);
        let block_rows = SCORES_PER_BLOCK / (heads * tokens);
        assert!(block_rows >= 64, "{block_rows} query rows per block");
        assert!((heads * tokens * block_rows) < i32::MAX as usize);
        assert!((heads * tokens * tokens) > i32::MAX as usize);
    }
}
