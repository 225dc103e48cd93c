//! Noise levels (sigmas) of the Euler sampler, from 1 (pure noise) down to 0 (image).
//!
//! The transformer takes `t = sigma` (it scales by 1000 itself), so the sigmas are also the
//! timesteps.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Schedule {
    /// BFL's FLUX.1-dev schedule: a resolution-dependent shift `mu`, interpolated linearly
    /// between `base_shift` at 256 image tokens and `max_shift` at 4096.
    FluxDynamicShift {
        #[serde(default = "default_base_shift")]
        base_shift: f64,
        #[serde(default = "default_max_shift")]
        max_shift: f64,
    },
    /// A constant shift as in DiffSynth-Studio's `FlowMatchScheduler` (shift 3.0 by default
    /// there, which majicflus was published with): sigmas spaced linearly from 1 to
    /// `sigma_min`, shifted by `shift * s / (1 + (shift - 1) * s)`, then a final step to 0.
    Shift {
        shift: f64,
        #[serde(default = "default_sigma_min")]
        sigma_min: f64,
    },
}

fn default_base_shift() -> f64 {
    0.5
}

fn default_max_shift() -> f64 {
    1.15
}

fn default_sigma_min() -> f64 {
    0.003 / 1.002
}

impl Schedule {
    /// `steps + 1` decreasing sigmas ending in 0; `image_tokens` is the packed latent length
    /// (width/16 * height/16).
    pub fn sigmas(&self, steps: u32, image_tokens: usize) -> Vec<f64> {
        let n = steps as usize;
        let mut sigmas: Vec<f64> = match *self {
            Schedule::FluxDynamicShift {
                base_shift,
                max_shift,
            } => {
                let slope = (max_shift - base_shift) / (4096.0 - 256.0);
                let mu = base_shift + slope * (image_tokens as f64 - 256.0);
                (0..n)
                    .map(|i| 1.0 - i as f64 / n as f64)
                    .map(|t| mu.exp() / (mu.exp() + (1.0 / t - 1.0)))
                    .collect()
            }
            Schedule::Shift { shift, sigma_min } => (0..n)
                .map(|i| match n {
                    1 => 1.0,
                    _ => 1.0 + (sigma_min - 1.0) * i as f64 / (n - 1) as f64,
                })
                .map(|s| shift * s / (1.0 + (shift - 1.0) * s))
                .collect(),
        };
        sigmas.push(0.0);
        sigmas
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(actual: &[f64], expected: &[f64]) {
        assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
        for (a, e) in actual.iter().zip(expected) {
            assert!((a - e).abs() < 1e-6, "{actual:?} vs {expected:?}");
        }
    }

    #[test]
    fn dynamic_shift_matches_candle_reference() {
        let schedule = Schedule::FluxDynamicShift {
            base_shift: 0.5,
            max_shift: 1.15,
        };
        let reference =
            candle_transformers::models::flux::sampling::get_schedule(4, Some((1024, 0.5, 1.15)));
        assert_close(&schedule.sigmas(4, 1024), &reference);
    }

    #[test]
    fn constant_shift_of_three() {
        let schedule = Schedule::Shift {
            shift: 3.0,
            sigma_min: 0.0,
        };
        // linspace(1, 0, 3) = [1, .5, 0] -> 3s / (1 + 2s) = [1, .75, 0], then the final 0.
        assert_close(&schedule.sigmas(3, 256), &[1.0, 0.75, 0.0, 0.0]);
    }

    #[test]
    fn single_step_goes_from_noise_to_image() {
        for schedule in [
            Schedule::Shift {
                shift: 3.0,
                sigma_min: default_sigma_min(),
            },
            Schedule::FluxDynamicShift {
                base_shift: 0.5,
                max_shift: 1.15,
            },
        ] {
            assert_close(&schedule.sigmas(1, 256), &[1.0, 0.0]);
        }
    }

    #[test]
    fn manifest_syntax() {
        let shift: Schedule = serde_json::from_str(r#"{"kind": "shift", "shift": 3.0}"#).unwrap();
        assert_eq!(
            shift,
            Schedule::Shift {
                shift: 3.0,
                sigma_min: default_sigma_min()
            }
        );
        let dynamic: Schedule = serde_json::from_str(r#"{"kind": "flux-dynamic-shift"}"#).unwrap();
        assert_eq!(
            dynamic,
            Schedule::FluxDynamicShift {
                base_shift: 0.5,
                max_shift: 1.15
            }
        );
    }
}
