//! The HTTP server of an inference pod (`serve`) and of a tenant's history (`serve-outputs`).

pub mod jobs;
pub mod metrics;
pub mod warm;
