//! Atelier's Flux inference: model loading, the generation pipeline and a tiny
//! random-weight checkpoint generator for tests.

pub mod model;
pub mod pipeline;
pub mod tiny;
pub mod outputs;
pub mod server;
