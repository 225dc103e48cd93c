//! Atelier's operator: controllers around a Kubernetes-free decision core, and the HTTP API.

pub mod api;
pub mod controllers;
pub mod core;
pub mod endpoints;
pub mod pod_token;
pub mod telemetry;
