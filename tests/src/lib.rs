//! Test support for Atelier's end-to-end tests.
