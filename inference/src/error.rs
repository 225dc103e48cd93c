//! The crate's one error type, shared by the model layer and the pipeline that drives it, so
//! that the model modules depend on nothing above them.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generation cancelled")]
    Cancelled,
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("invalid model: {0}")]
    InvalidModel(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tensor computation: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("PNG encoding: {0}")]
    Png(#[from] png::EncodingError),
}

impl Error {
    /// A stable, short reason for metrics, events and job status.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Cancelled => "Cancelled",
            Error::InvalidRequest(_) => "InvalidRequest",
            Error::InvalidConfig(_) => "InvalidConfig",
            Error::InvalidModel(_) => "InvalidModel",
            Error::Io { .. } => "Io",
            Error::Tokenizer(_) => "Tokenizer",
            Error::Tensor(_) => "Tensor",
            Error::Png(_) => "Png",
        }
    }
}
