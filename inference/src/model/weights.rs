//! Reading safetensors files into host tensor maps.
//!
//! Tensors are read one at a time from the memory-mapped files and converted to their host
//! dtype right away, so converting a 24 GB bf16 transformer to float8 never holds both copies.

use std::collections::HashMap;
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

impl SafetensorsFiles {
    pub fn open(paths: &[PathBuf]) -> Result<Self, Error> {
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
        Ok(Self {
            files,
            paths: paths.to_vec(),
        })
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.files.tensors().into_iter().map(|(n, _)| n).collect();
        names.sort();
        names
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
    /// dtype `dtype_of` picks for it.
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
        let mut map = TensorMap::new();
        for name in self.names() {
            let Some(new_name) = select(&name) else {
                continue;
            };
            let tensor = self
                .files
                .load(&name, &Device::Cpu)
                .map_err(|e| file_error(&self.paths, e))?;
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

pub fn byte_size(map: &TensorMap) -> u64 {
    map.values()
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum()
}

/// Paths of a component's files, relative to the model directory.
pub fn paths(model_dir: &Path, files: &[String]) -> Vec<PathBuf> {
    files.iter().map(|f| model_dir.join(f)).collect()
}
