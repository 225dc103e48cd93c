//! A streaming safetensors writer for seeded random weights.
//!
//! The header (names, dtypes, shapes, offsets) is known before any value exists, so it is
//! written first; then each tensor's bytes follow in chunks of [`CHUNK`] values generated,
//! converted and written in turn. A 24 GB transformer is written with a few MB of memory.
//!
//! Values belong to a *drawn* tensor (a BFL-named tensor of one component): value `i` is
//! element `i % CHUNK` of chunk `i / CHUNK`, and each chunk has its own seed. A file tensor
//! holds one or more element ranges of a drawn tensor, so a diffusers tensor that is a row
//! slice of a fused BFL tensor holds exactly the BFL tensor's values.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::Path;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Error;
use crate::model::noise;
use crate::model::weights;

/// Values per generated chunk (1 MiB of f32).
pub const CHUNK: usize = 1 << 18;

/// Seeded N(offset, std²) values of one drawn tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Draw {
    seed: u64,
    offset: f32,
    std: f32,
}

impl Draw {
    /// Norm gains around 1, biases small, weights scaled by fan-in so that activations keep
    /// unit scale through the random layers and the outputs stay finite and varied.
    pub fn new(seed: u64, component: &str, name: &str, shape: &[usize]) -> Self {
        let (offset, std) = match shape.len() {
            0 | 1 if name.ends_with(".bias") => (0.0, 0.02),
            0 | 1 => (1.0, 0.1),
            _ => (
                0.0,
                1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt(),
            ),
        };
        Self {
            seed: noise::named_seed(seed, &format!("{component}/{name}")),
            offset,
            std,
        }
    }

    /// The standard deviation of the values, for choosing a float8 scale.
    pub fn std(&self) -> f32 {
        self.std
    }

    /// The first `len` values of chunk `index` (a prefix of the same stream whatever `len`,
    /// so small tensors do not pay for whole chunks).
    fn chunk(&self, index: usize, len: usize) -> Vec<f32> {
        let seed = noise::named_seed(self.seed, &index.to_string());
        noise::standard_normal(seed, len)
            .into_iter()
            .map(|v| self.offset + self.std * v)
            .collect()
    }

    /// Values `range` of the drawn tensor, in f32 (for tests and small tensors).
    pub fn values(&self, range: Range<usize>) -> Vec<f32> {
        pieces(std::slice::from_ref(&range))
            .flat_map(|(chunk, within)| self.chunk(chunk, within.end)[within].to_vec())
            .collect()
    }
}

/// What one tensor of a file holds.
#[derive(Debug, Clone)]
pub enum Content {
    /// Element ranges of a drawn tensor, concatenated, each value divided by `divisor` (the
    /// float8 scale of scaled checkpoints, 1 otherwise).
    Drawn {
        draw: Draw,
        ranges: Vec<Range<usize>>,
        divisor: f32,
    },
    /// Every element the same value (scales, markers).
    Constant(f32),
}

#[derive(Debug, Clone)]
pub struct FileTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub content: Content,
}

impl FileTensor {
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn byte_len(&self) -> usize {
        self.elem_count() * self.dtype.size_in_bytes()
    }
}

/// `(chunk index, range within the chunk)` covering `ranges` in order.
fn pieces(ranges: &[Range<usize>]) -> impl Iterator<Item = (usize, Range<usize>)> + '_ {
    ranges.iter().flat_map(|range| {
        let (first, last) = (range.start / CHUNK, range.end.div_ceil(CHUNK));
        (first..last).map(move |chunk| {
            let base = chunk * CHUNK;
            let start = range.start.max(base) - base;
            let end = range.end.min(base + CHUNK) - base;
            (chunk, start..end)
        })
    })
}

fn dtype_name(dtype: DType) -> Result<&'static str, Error> {
    match dtype {
        DType::F32 => Ok("F32"),
        DType::BF16 => Ok("BF16"),
        DType::F16 => Ok("F16"),
        DType::F8E4M3 => Ok("F8_E4M3"),
        other => Err(Error::InvalidModel(format!(
            "synthetic weights cannot be written as {other:?}"
        ))),
    }
}

/// Little-endian bytes of f32 values converted to `dtype` (float8 saturating, as the loader).
fn encode(values: Vec<f32>, dtype: DType) -> Result<Vec<u8>, Error> {
    let len = values.len();
    let tensor = weights::to_host_dtype(Tensor::from_vec(values, len, &Device::Cpu)?, dtype)?;
    let (storage, _) = tensor.storage_and_layout();
    let bytes = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Storage::Cpu(CpuStorage::BF16(v)) => {
            v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
        }
        Storage::Cpu(CpuStorage::F16(v)) => {
            v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
        }
        Storage::Cpu(CpuStorage::F8E4M3(v)) => v.iter().map(|x| x.to_bits()).collect(),
        _ => return Err(Error::InvalidModel(format!("cannot encode {dtype:?}"))),
    };
    Ok(bytes)
}

/// The safetensors header: JSON padded with spaces to a multiple of 8 bytes, after its
/// little-endian u64 length.
fn header(tensors: &[FileTensor], metadata: &serde_json::Value) -> Result<Vec<u8>, Error> {
    let mut json = serde_json::Map::new();
    json.insert("__metadata__".into(), metadata.clone());
    let mut offset = 0;
    for tensor in tensors {
        let end = offset + tensor.byte_len();
        let entry = serde_json::json!({
            "dtype": dtype_name(tensor.dtype)?,
            "shape": tensor.shape,
            "data_offsets": [offset, end],
        });
        if json.insert(tensor.name.clone(), entry).is_some() {
            return Err(Error::InvalidModel(format!(
                "tensor {} written twice",
                tensor.name
            )));
        }
        offset = end;
    }
    let mut text = serde_json::to_vec(&json).map_err(|e| Error::InvalidModel(e.to_string()))?;
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    Ok(out)
}

/// Writes `tensors` to `path` in the order given, generating their values chunk by chunk
/// (chunks of one batch in parallel). Returns the bytes written.
pub fn write_safetensors(
    path: &Path,
    tensors: &[FileTensor],
    metadata: &serde_json::Value,
) -> Result<u64, Error> {
    let io_error = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io_error)?);
    let head = header(tensors, metadata)?;
    file.write_all(&head).map_err(io_error)?;
    let batch = 2 * rayon::current_num_threads();
    for tensor in tensors {
        match &tensor.content {
            Content::Constant(value) => {
                file.write_all(&encode(vec![*value; tensor.elem_count()], tensor.dtype)?)
                    .map_err(io_error)?;
            }
            Content::Drawn {
                draw,
                ranges,
                divisor,
            } => {
                let drawn: usize = ranges.iter().map(|r| r.len()).sum();
                if drawn != tensor.elem_count() {
                    return Err(Error::InvalidModel(format!(
                        "{}: {drawn} values drawn for shape {:?}",
                        tensor.name, tensor.shape
                    )));
                }
                let pieces: Vec<_> = pieces(ranges).collect();
                for batch in pieces.chunks(batch) {
                    let encoded: Vec<Vec<u8>> = batch
                        .par_iter()
                        .map(|(chunk, within)| {
                            let values = draw.chunk(*chunk, within.end)[within.clone()]
                                .iter()
                                .map(|v| v / divisor)
                                .collect();
                            encode(values, tensor.dtype)
                        })
                        .collect::<Result<_, _>>()?;
                    for bytes in encoded {
                        file.write_all(&bytes).map_err(io_error)?;
                    }
                }
            }
        }
    }
    file.flush().map_err(io_error)?;
    Ok(head.len() as u64 + tensors.iter().map(|t| t.byte_len() as u64).sum::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drawn(name: &str, shape: Vec<usize>, dtype: DType, ranges: Vec<Range<usize>>) -> FileTensor {
        FileTensor {
            name: name.into(),
            dtype,
            content: Content::Drawn {
                draw: Draw::new(3, "test", "w.weight", &[CHUNK, 3]),
                ranges,
                divisor: 1.0,
            },
            shape,
        }
    }

    /// What candle reads back is what the draw gives, across chunk boundaries and in each
    /// dtype, and a slice of a drawn tensor holds that slice's values.
    #[test]
    fn candle_reads_back_the_drawn_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let whole = 0..3 * CHUNK;
        let slice = CHUNK - 5..2 * CHUNK + 7;
        let tensors = [
            drawn("whole", vec![CHUNK, 3], DType::F32, vec![whole.clone()]),
            drawn("slice", vec![slice.len()], DType::BF16, vec![slice.clone()]),
            drawn("two", vec![2, 4], DType::F8E4M3, vec![0..4, 10..14]),
            FileTensor {
                name: "scale".into(),
                dtype: DType::F32,
                shape: vec![],
                content: Content::Constant(0.25),
            },
        ];
        let written =
            write_safetensors(&path, &tensors, &serde_json::json!({"format": "pt"})).unwrap();
        assert_eq!(written, std::fs::metadata(&path).unwrap().len());
        let read = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let draw = Draw::new(3, "test", "w.weight", &[CHUNK, 3]);
        let expect = |range: Range<usize>, dtype: DType| {
            let values = draw.values(range);
            let len = values.len();
            weights::to_host_dtype(Tensor::from_vec(values, len, &Device::Cpu).unwrap(), dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let got = |name: &str| {
            read[name]
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(read["whole"].dims(), &[CHUNK, 3]);
        assert_eq!(got("whole"), expect(whole, DType::F32));
        assert_eq!(got("slice"), expect(slice, DType::BF16));
        let mut two = expect(0..4, DType::F8E4M3);
        two.extend(expect(10..14, DType::F8E4M3));
        assert_eq!(got("two"), two);
        assert_eq!(read["scale"].to_scalar::<f32>().unwrap(), 0.25);
    }

    #[test]
    fn a_count_that_does_not_fill_the_shape_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = [drawn(
            "short",
            vec![10],
            DType::F32,
            std::iter::once(0..9).collect(),
        )];
        let err =
            write_safetensors(&dir.path().join("x"), &tensors, &serde_json::json!({})).unwrap_err();
        assert!(err.to_string().contains("short"), "{err}");
    }
}
