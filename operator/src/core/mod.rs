//! The decision core: pure functions from observed state to decisions, unit-tested without a
//! cluster. The controllers around it only read objects, call these, and write the result.

pub mod admission;
pub mod backoff;
pub mod desired;
pub mod job_index;
pub mod quantity;
pub mod queue;
pub mod scaling;
pub mod webhook_target;
