//! Output files on a tenant's volume.
//!
//! Layout: `<root>/<safe-user>/<yyyymmdd_HHMMSS>_<seed>_<job8>[_<n>].png` plus a `.json`
//! metadata file next to each PNG. Both the inference server (writing) and `serve-outputs`
//! (listing, reading) go through this module, so the user → directory mapping and the file-name
//! pattern exist exactly once.
//!
//! Writes are atomic and never clobber: data goes to a hidden temp file in the same directory,
//! is fsynced, then hard-linked to its final name (`link` fails with `EEXIST` instead of
//! replacing, unlike `rename`), and the directory is fsynced. A reader therefore sees either no
//! file or the complete file, and an existing image is never overwritten.

mod list;
mod names;
mod write;

use std::io;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

pub use list::{
    DEFAULT_LIST_LIMIT, ListedImage, Listing, MAX_LIST_LIMIT, list_images, read_output,
};
pub use names::{FileKind, output_stem, parse_file_name, safe_user_dir};
pub use write::{find_job_outputs, write_job_outputs};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid user name: {0}")]
    InvalidUser(&'static str),
    #[error("invalid output file name")]
    InvalidFileName,
    #[error("no such output file")]
    NotFound,
    #[error("output file {0} already exists")]
    AlreadyExists(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// What is known about a job when its images are written; recorded in every metadata file.
#[derive(Debug, Clone)]
pub struct JobInfo<'a> {
    pub job_id: &'a str,
    pub user: &'a str,
    pub prompt: &'a str,
    pub steps: u32,
    pub guidance: f32,
    pub model: &'a str,
    pub created_at: Timestamp,
}

/// One encoded image of a job.
#[derive(Debug, Clone, Copy)]
pub struct ImageData<'a> {
    pub png: &'a [u8],
    pub width: u32,
    pub height: u32,
    pub seed: u64,
}

/// The `.json` file written next to each PNG.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageMetadata {
    pub prompt: String,
    pub seed: u64,
    pub steps: u32,
    pub guidance: f32,
    pub width: u32,
    pub height: u32,
    pub model: String,
    pub user: String,
    pub job_id: String,
    /// Position of the image in its job's batch (0 for the first).
    pub index: u32,
    pub created_at: Timestamp,
    pub sha256: String,
}

/// A written image, with paths relative to the outputs root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputFile {
    pub path: String,
    pub metadata_path: String,
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
}

#[cfg(test)]
mod test_support {
    use super::*;

    pub fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    pub fn job<'a>(user: &'a str, id: &'a str, created: &str) -> JobInfo<'a> {
        JobInfo {
            job_id: id,
            user,
            prompt: "a red fox",
            steps: 4,
            guidance: 3.5,
            model: "tiny",
            created_at: ts(created),
        }
    }

    pub fn image(png: &[u8]) -> ImageData<'_> {
        ImageData {
            png,
            width: 256,
            height: 256,
            seed: 42,
        }
    }
}
