//! Logging setup shared by both subcommands: JSON lines, filtered by `RUST_LOG`.

use tracing_subscriber::EnvFilter;

/// Target of audit events (`login`, `generate`, `cancel`, `quota_reset`, denials), so that they
/// can be routed and retained apart from operational logs.
pub const AUDIT_TARGET: &str = "audit";

pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .init();
}
