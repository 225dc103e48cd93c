//! Model components and their loading from the real checkpoint layouts.

pub(crate) mod attention;
pub(crate) mod cpu;
pub mod flux;
pub mod flux_keys;
pub mod image;
pub mod linear;
pub mod manifest;
pub mod noise;
pub mod rope;
pub mod schedule;
pub mod spiece;
pub mod text;
pub mod vae;
pub mod vae_keys;
pub mod weights;

/// The largest absolute difference between two tensors of one shape, for tests against
/// candle's own ops.
#[cfg(test)]
pub(crate) fn max_abs_diff(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> candle_core::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}
