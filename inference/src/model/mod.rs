//! Model components and their loading from the real checkpoint layouts.

pub(crate) mod cpu;
pub mod flux;
pub mod flux_keys;
pub mod image;
pub mod linear;
pub mod manifest;
pub mod noise;
pub mod schedule;
pub mod text;
pub mod vae;
pub mod weights;
