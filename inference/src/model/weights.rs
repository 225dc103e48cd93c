//! Reading safetensors files into host tensor maps.
//!
//! Tensors are read one at a time from the memory-mapped files and converted to their host
//! dtype right away, so converting a 24 GB bf16 transformer to float8 never holds both copies.
//!
//! A component is one file, several shards, or the `*.safetensors.index.json` that lists
//! shards as diffusers and transformers publish them. "Scaled fp8" files (ComfyUI's
//! `scaled_fp8` layout) store `X.weight` in float8 and `X.scale_weight`, an f32 scalar: the
//! weight is `X.weight * X.scale_weight`, applied here when widening. Their `X.scale_input`
//! only sets the range in which an fp8 matmul quantizes the input (ComfyUI's non-fp8 path
//! computes `linear(input, weight * scale_weight)` and ignores it), so it is dropped, as is
//! the empty `scaled_fp8` marker.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::Error;

/// Named tensors of one model component.
pub type TensorMap = HashMap<String, Tensor>;

/// One or more safetensors files (shards) opened together.
pub struct SafetensorsFiles {
    files: MmapedSafetensors,
    paths: Vec<PathBuf>,
}

/// The index of sharded weights (`weight_map`: tensor name to shard file).
#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

const INDEX_SUFFIX: &str = ".index.json";
const SCALE_WEIGHT: &str = ".scale_weight";
const SCALE_INPUT: &str = ".scale_input";
const SCALED_FP8_MARKER: &str = "scaled_fp8";

/// Each index file with what it promises.
type Indexes = Vec<(PathBuf, ShardIndex)>;

/// Replaces each index file by the shards it names (relative to the index), and returns the
/// indexes, to check the shards against.
fn expand_indexes(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, Indexes), Error> {
    let mut files = Vec::new();
    let mut indexes = Vec::new();
    for path in paths {
        if !path.to_string_lossy().ends_with(INDEX_SUFFIX) {
            files.push(path.clone());
            continue;
        }
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let index: ShardIndex = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidModel(format!("{}: {e}", path.display())))?;
        let dir = path.parent().unwrap_or(Path::new(""));
        let shards: BTreeSet<&String> = index.weight_map.values().collect();
        files.extend(shards.into_iter().map(|shard| dir.join(shard)));
        indexes.push((path.clone(), index));
    }
    Ok((files, indexes))
}

impl SafetensorsFiles {
    /// Opens safetensors files or shard indexes. With an index, every tensor it lists must be
    /// in the shards and every tensor of the shards must be listed: an error names the first
    /// that is not.
    pub fn open(paths: &[PathBuf]) -> Result<Self, Error> {
        let (paths, indexes) = expand_indexes(paths)?;
        let paths = paths.as_slice();
        for path in paths {
            if !path.is_file() {
                return Err(Error::InvalidModel(format!(
                    "{}: no such file",
                    path.display()
                )));
            }
        }
        // SAFETY: the files are read-only model weights that nothing modifies while loaded;
        // every tensor is copied out before the map is dropped.
        let files = unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| file_error(paths, e))?;
        let opened = Self {
            files,
            paths: paths.to_vec(),
        };
        let names: BTreeSet<String> = opened.names().into_iter().collect();
        for (path, index) in &indexes {
            let listed: BTreeSet<&String> = index.weight_map.keys().collect();
            if let Some(missing) = listed.iter().find(|name| !names.contains(**name)) {
                return Err(Error::InvalidModel(format!(
                    "{}: tensor {missing} is missing from shard {}",
                    path.display(),
                    index.weight_map[*missing]
                )));
            }
            if let Some(unlisted) = names.iter().find(|name| !listed.contains(name)) {
                return Err(Error::InvalidModel(format!(
                    "{}: tensor {unlisted} is in the shards but not in the index",
                    path.display()
                )));
            }
        }
        Ok(opened)
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.files.tensors().into_iter().map(|(n, _)| n).collect();
        names.sort();
        names
    }

    fn load(&self, name: &str) -> Result<Tensor, Error> {
        self.files
            .load(name, &Device::Cpu)
            .map_err(|e| file_error(&self.paths, e))
    }

    /// The dtype of the largest tensor (the one that says the file's precision), `None` for
    /// an empty file or a dtype candle does not know.
    pub fn largest_tensor_dtype(&self) -> Option<DType> {
        let tensors = self.files.tensors();
        let (_, largest) = tensors
            .iter()
            .max_by_key(|(_, view)| view.shape().iter().product::<usize>())?;
        DType::try_from(largest.dtype()).ok()
    }

    /// Reads the tensors whose name `select` maps to a new name, converting each to the
    /// dtype `dtype_of` picks for it; float8 weights with a `scale_weight` are multiplied by
    /// it on the way (see the module doc).
    pub fn read(
        &self,
        select: impl Fn(&str) -> Option<String>,
        dtype_of: impl Fn(&str, &Tensor) -> DType,
    ) -> Result<TensorMap, Error> {
        self.read_to(&Device::Cpu, select, dtype_of)
    }

    /// [`Self::read`] onto `device`, one tensor at a time, so that loading onto a GPU holds
    /// one tensor in host memory at a time rather than the whole component.
    pub fn read_to(
        &self,
        device: &Device,
        select: impl Fn(&str) -> Option<String>,
        dtype_of: impl Fn(&str, &Tensor) -> DType,
    ) -> Result<TensorMap, Error> {
        let names = self.names();
        let mut map = TensorMap::new();
        for name in &names {
            if name.ends_with(SCALE_WEIGHT) || name.ends_with(SCALE_INPUT) {
                let weight = format!("{}.weight", name.rsplit_once('.').map_or("", |(m, _)| m));
                if names.binary_search(&weight).is_err() {
                    return Err(Error::InvalidModel(format!("{name}: no {weight} to scale")));
                }
                continue;
            }
            let Some(new_name) = select(name) else {
                continue;
            };
            if new_name == SCALED_FP8_MARKER {
                continue;
            }
            let tensor = self.load(name)?;
            let scale_name = name
                .strip_suffix(".weight")
                .map(|module| format!("{module}{SCALE_WEIGHT}"))
                .filter(|scale| names.binary_search(scale).is_ok());
            let tensor = match scale_name {
                Some(scale_name) => {
                    apply_weight_scale(tensor, &self.load(&scale_name)?, &scale_name)?
                }
                None => tensor,
            };
            let dtype = dtype_of(&new_name, &tensor);
            map.insert(new_name, to_host_dtype(tensor, dtype)?.to_device(device)?);
        }
        Ok(map)
    }
}

fn file_error(paths: &[PathBuf], e: candle_core::Error) -> Error {
    let names: Vec<_> = paths.iter().map(|p| p.display().to_string()).collect();
    Error::InvalidModel(format!("{}: {e}", names.join(", ")))
}

/// Converts with float8 saturation: values beyond e4m3's ±448 are clamped rather than
/// turned into NaN.
pub fn to_host_dtype(tensor: Tensor, dtype: DType) -> Result<Tensor, Error> {
    if tensor.dtype() == dtype {
        return Ok(tensor);
    }
    let tensor = match dtype {
        DType::F8E4M3 => tensor.to_dtype(DType::F32)?.clamp(-448f32, 448f32)?,
        _ => tensor,
    };
    Ok(tensor.to_dtype(dtype)?)
}

/// `weight * scale` in f32. Only one scale per tensor is a form ComfyUI writes and this
/// applies; any other shape is refused with the scale's name.
fn apply_weight_scale(weight: Tensor, scale: &Tensor, scale_name: &str) -> Result<Tensor, Error> {
    if scale.elem_count() != 1 {
        return Err(Error::InvalidModel(format!(
            "{scale_name}: scale of shape {:?} is not supported (only one scale per tensor)",
            scale.dims()
        )));
    }
    let scale = scale
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?[0];
    Ok((weight.to_dtype(DType::F32)? * f64::from(scale))?)
}

pub fn byte_size(map: &TensorMap) -> u64 {
    map.values()
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum()
}

/// Paths of a component's files, relative to the model directory.
pub fn paths(model_dir: &Path, files: &[String]) -> Vec<PathBuf> {
    files.iter().map(|f| model_dir.join(f)).collect()
}
