//! Atelier custom resources.
