//! Atelier's Flux inference: model loading, the generation pipeline and a tiny
//! random-weight checkpoint generator for tests.

pub mod device;
pub mod error;
pub mod model;
pub mod outputs;
pub mod pipeline;
pub mod server;
pub mod tiny;
