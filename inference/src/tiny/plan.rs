//! What each synthetic file holds: key sets recorded from candle-transformers' own (upstream)
//! models, and the per-layout plans (names, dtypes, shapes, value sources) the streaming
//! writer writes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::error::Error;
use crate::model::flux_keys;
use crate::model::vae_keys;
use crate::tiny::writer::{self, Content, Draw, FileTensor};

/// Names and shapes of a component's tensors, sorted by name.
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// Records the name and shape of every tensor a model asks for. It hands out stride-0
/// broadcasts of one zero, so recording FLUX.1-dev's 12 B parameters allocates nothing.
struct ShapeRecorder {
    shapes: Arc<Mutex<Shapes>>,
}

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.shapes
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?
            .insert(name.to_string(), shape.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("synthetic weights need a shape for {name}")
    }

    /// Claims every tensor, so that loaders probing for optional names (T5's `shared`
    /// embedding) take the first layout they try, which is HF's.
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The tensors `build` asks for.
pub fn record(build: impl FnOnce(VarBuilder) -> candle_core::Result<()>) -> Result<Shapes, Error> {
    let shapes = Arc::new(Mutex::new(Shapes::new()));
    let backend = ShapeRecorder {
        shapes: shapes.clone(),
    };
    build(VarBuilder::from_backend(
        Box::new(backend),
        DType::F32,
        Device::Cpu,
    ))?;
    let shapes = shapes
        .lock()
        .map_err(|_| Error::InvalidModel("poisoned".into()))?
        .clone();
    Ok(shapes)
}

fn is_linear_weight(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name.ends_with(".weight")
}

/// A power-of-two float8 scale that puts 8 standard deviations under e4m3's 448, so that
/// multiplying back is exact and few weights fall into e4m3's subnormals.
fn fp8_scale(std: f32) -> f32 {
    (8.0 * std / 448.0).log2().ceil().exp2()
}

/// Plain tensors of one component: each whole drawn tensor, in the dtype `dtype_of` picks.
pub fn plain(
    seed: u64,
    component: &str,
    shapes: &Shapes,
    dtype_of: impl Fn(&str, &[usize]) -> DType,
) -> Vec<FileTensor> {
    shapes
        .iter()
        .map(|(name, shape)| FileTensor {
            name: name.clone(),
            dtype: dtype_of(name, shape),
            shape: shape.clone(),
            content: Content::Drawn {
                draw: Draw::new(seed, component, name, shape),
                ranges: std::iter::once(0..shape.iter().product()).collect(),
                divisor: 1.0,
            },
        })
        .collect()
}

/// The BFL transformer as ComfyUI's "scaled fp8" files hold it: linear weights in e4m3
/// divided by a per-tensor `scale_weight`, an f32 `scale_input` of 1 beside each, and the
/// empty `scaled_fp8` marker; other tensors in bf16.
pub fn scaled_fp8(seed: u64, shapes: &Shapes) -> Vec<FileTensor> {
    let scalar = |name: String, value: f32| FileTensor {
        name,
        dtype: DType::F32,
        shape: vec![],
        content: Content::Constant(value),
    };
    let mut tensors = vec![FileTensor {
        name: "scaled_fp8".into(),
        dtype: DType::F8E4M3,
        shape: vec![0],
        content: Content::Constant(0.0),
    }];
    for (name, shape) in shapes {
        let draw = Draw::new(seed, "transformer", name, shape);
        let module = name.strip_suffix(".weight");
        let (dtype, divisor) = match (is_linear_weight(name, shape), module) {
            (true, Some(module)) => {
                let scale = fp8_scale(draw.std());
                tensors.push(scalar(format!("{module}.scale_weight"), scale));
                tensors.push(scalar(format!("{module}.scale_input"), 1.0));
                (DType::F8E4M3, scale)
            }
            _ => (DType::BF16, 1.0),
        };
        tensors.push(FileTensor {
            name: name.clone(),
            dtype,
            shape: shape.clone(),
            content: Content::Drawn {
                draw,
                ranges: std::iter::once(0..shape.iter().product()).collect(),
                divisor,
            },
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    tensors
}

/// The transformer in diffusers' layout: each tensor rows of a BFL tensor, same values.
pub fn diffusers_transformer(
    seed: u64,
    shapes: &Shapes,
    hidden_size: usize,
    dtype_of: impl Fn(&str, &[usize]) -> DType,
) -> Result<Vec<FileTensor>, Error> {
    let rows: Vec<(String, usize)> = shapes.iter().map(|(n, s)| (n.clone(), s[0])).collect();
    let mut tensors: Vec<FileTensor> = flux_keys::diffusers_parts(&rows, hidden_size)?
        .into_iter()
        .map(|part| {
            let bfl_shape = &shapes[&part.bfl];
            let row_len: usize = bfl_shape[1..].iter().product();
            let mut shape = bfl_shape.clone();
            shape[0] = part.rows.iter().map(|r| r.len()).sum();
            FileTensor {
                dtype: dtype_of(&part.name, &shape),
                name: part.name,
                content: Content::Drawn {
                    draw: Draw::new(seed, "transformer", &part.bfl, bfl_shape),
                    ranges: part
                        .rows
                        .iter()
                        .map(|r| r.start * row_len..r.end * row_len)
                        .collect(),
                    divisor: 1.0,
                },
                shape,
            }
        })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tensors)
}

/// The autoencoder in diffusers' layout (same values as `ae.safetensors`).
pub fn diffusers_vae(
    seed: u64,
    shapes: &Shapes,
    levels: usize,
    res_blocks: usize,
    dtype: DType,
) -> Result<Vec<FileTensor>, Error> {
    let mut tensors = plain(seed, "vae", shapes, |_, _| dtype);
    for tensor in &mut tensors {
        let (name, shape) =
            vae_keys::bfl_to_diffusers_name(&tensor.name, &tensor.shape, levels, res_blocks)?;
        tensor.name = name;
        tensor.shape = shape;
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tensors)
}

/// Writes `tensors` as one file `<stem>.safetensors` when they fit in `max_shard_bytes`,
/// else as `<stem>-0000N-of-0000M.safetensors` shards (filled in order, as diffusers and
/// transformers shard) plus `<stem>.safetensors.index.json`. Returns the file a loader
/// should be given, relative to `dir`.
pub fn write_sharded(
    dir: &Path,
    stem: &str,
    tensors: &[FileTensor],
    max_shard_bytes: u64,
) -> Result<String, Error> {
    let metadata = serde_json::json!({"format": "pt"});
    let mut shards: Vec<Vec<FileTensor>> = vec![Vec::new()];
    let mut shard_bytes = 0u64;
    for tensor in tensors {
        let bytes = tensor.byte_len() as u64;
        if shard_bytes > 0 && shard_bytes + bytes > max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        shards.last_mut().expect("one shard").push(tensor.clone());
    }
    if shards.len() == 1 {
        let file = format!("{stem}.safetensors");
        writer::write_safetensors(&dir.join(&file), tensors, &metadata)?;
        return Ok(file);
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("{stem}-{:05}-of-{count:05}.safetensors", i + 1);
        writer::write_safetensors(&dir.join(&file), shard, &metadata)?;
        for tensor in shard {
            weight_map.insert(tensor.name.clone(), file.clone().into());
        }
    }
    let total: u64 = tensors.iter().map(|t| t.byte_len() as u64).sum();
    let index = format!("{stem}.safetensors.index.json");
    crate::tiny::write_json(
        &dir.join(&index),
        &serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    )?;
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_scales_are_powers_of_two_that_fit_eight_sigmas() {
        for std in [0.001f32, 0.018, 0.1, 1.0] {
            let scale = fp8_scale(std);
            assert_eq!(scale.log2().fract(), 0.0, "{scale}");
            assert!(
                8.0 * std / scale <= 448.0 && 16.0 * std / scale > 448.0,
                "{std}"
            );
        }
    }
}
