//! Link parameters, fault conditions and their validation.

use serde::{Deserialize, Serialize};

/// Which single-photon estimate feeds the GLLP rate formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecoyMethod {
    /// Vacuum + one weak decoy of intensity `weak_decoy_mu` (Ma, Qi, Zhao, Lo 2005):
    /// `Y1` and `e1` are the analytic lower/upper bounds. What a real device can certify.
    #[default]
    VacuumWeak,
    /// The infinite-decoy limit (Lo, Ma, Chen 2005): `Y1` and `e1` take their true channel
    /// values. An upper bound on what any decoy protocol can reach; `weak_decoy_mu` is unused.
    InfiniteDecoy,
}

/// Physical and protocol parameters of one QKD link.
///
/// `Default` is the GYS experiment (Gobby, Yuan, Shields, APL 84, 3762, 2004) as tabulated by
/// Ma, Qi, Zhao and Lo (PRA 72, 012326, 2005), over 25 km of fibre. Every field can be
/// overridden from a config file; unknown keys are rejected and missing keys take the default.
/// The allowed range of each field is what [`LinkParameters::validate`] enforces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkParameters {
    /// Fibre length between Alice and Bob, km. Allowed: 0 ..= 5000. Default 25 (a metro link,
    /// well inside the GYS reach of ~140 km).
    pub distance_km: f64,
    /// Fibre attenuation α, dB/km. Allowed: 0 ..= 10. Default 0.21 (GYS).
    pub fibre_loss_db_per_km: f64,
    /// Bob's overall detection efficiency η_Bob (optics transmittance × detector efficiency),
    /// probability per photon. Allowed: 0 < η_Bob ≤ 1. Default 0.045 (GYS).
    pub bob_efficiency: f64,
    /// Probability e_detector that a photon reaching Bob hits the wrong detector (optical
    /// misalignment / interferometer visibility). Allowed: 0 ..= 0.5. Default 0.033 (GYS).
    pub detector_error: f64,
    /// Background yield Y0: probability per pulse of a click with no signal photon (dark counts
    /// and stray light of both detectors). Allowed: 0 ..= 0.1. Default 1.7e-6 (GYS).
    pub dark_count_yield: f64,
    /// Error-correction inefficiency f(e) ≥ 1: bits leaked per bit of Shannon limit.
    /// Allowed: 1 ..= 10. Default 1.22 (the value used by Lo-Ma-Chen and Ma et al.).
    pub error_correction_efficiency: f64,
    /// Alice's pulse (clock) rate, Hz. Allowed: 1 ..= 1e11. Default 2e6 (the GYS clock).
    pub pulse_rate_hz: f64,
    /// Mean photon number ν of the weak decoy state, photons/pulse. Allowed: 0 < ν < 1.
    /// Default 0.05 (the weak decoy of Ma et al.'s Fig. 2).
    pub weak_decoy_mu: f64,
    /// Fixed mean photon number μ of the signal state, photons/pulse; `None` optimises μ
    /// numerically for the highest key rate at this distance. Allowed: 0 < μ ≤ 10 and, for the
    /// vacuum+weak method, μ > `weak_decoy_mu`. Default `None`.
    pub signal_mu: Option<f64>,
    /// Basis-sifting factor q: fraction of detections kept after basis reconciliation.
    /// Allowed: 0 < q ≤ 1. Default 0.5 (standard BB84 with unbiased bases).
    pub sifting_factor: f64,
    /// Single-photon estimate used in the rate. Default `vacuum_weak`.
    pub decoy_method: DecoyMethod,
    /// Longest a single block may take to collect its sifted bits, s; a block that would need
    /// longer is abandoned (`aborted`). Bounds the block of a link with no detections.
    /// Allowed: 0 < T ≤ 1e7. Default 86400 (one day).
    pub max_block_duration_s: f64,
}

impl Default for LinkParameters {
    fn default() -> Self {
        Self {
            distance_km: 25.0,
            fibre_loss_db_per_km: 0.21,
            bob_efficiency: 0.045,
            detector_error: 0.033,
            dark_count_yield: 1.7e-6,
            error_correction_efficiency: 1.22,
            pulse_rate_hz: 2.0e6,
            weak_decoy_mu: 0.05,
            signal_mu: None,
            sifting_factor: 0.5,
            decoy_method: DecoyMethod::VacuumWeak,
            max_block_duration_s: 86_400.0,
        }
    }
}

/// A parameter that [`LinkParameters::validate`] or [`Conditions::validate`] rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ParameterError {
    /// A field is NaN, infinite or outside its allowed range.
    #[error("`{field}` = {value} is out of range: allowed {allowed}")]
    OutOfRange {
        /// Name of the offending field, as spelled in the config file.
        field: &'static str,
        /// The rejected value.
        value: f64,
        /// Human-readable allowed range.
        allowed: &'static str,
    },
    /// The vacuum+weak bound needs the signal brighter than the weak decoy.
    #[error(
        "`signal_mu` = {signal_mu} must be greater than `weak_decoy_mu` = {weak_decoy_mu} \
         for the vacuum+weak decoy bound"
    )]
    SignalNotAboveDecoy {
        /// The configured signal intensity.
        signal_mu: f64,
        /// The configured weak-decoy intensity.
        weak_decoy_mu: f64,
    },
}

impl ParameterError {
    /// The config field the error is about (the first one, for cross-field errors).
    pub fn field(&self) -> &'static str {
        match self {
            Self::OutOfRange { field, .. } => field,
            Self::SignalNotAboveDecoy { .. } => "signal_mu",
        }
    }
}

/// Inclusive/exclusive numeric range of one field; one table drives both `validate` and the
/// clamping in `sanitized`, so the two can never disagree.
struct Range {
    field: &'static str,
    lo: f64,
    lo_inclusive: bool,
    hi: f64,
    hi_inclusive: bool,
    text: &'static str,
}

impl Range {
    fn check(&self, value: f64) -> Result<(), ParameterError> {
        let above = if self.lo_inclusive { value >= self.lo } else { value > self.lo };
        let below = if self.hi_inclusive { value <= self.hi } else { value < self.hi };
        // NaN fails both comparisons, so it is rejected here too.
        if above && below {
            Ok(())
        } else {
            Err(ParameterError::OutOfRange { field: self.field, value, allowed: self.text })
        }
    }

    /// Nearest allowed value; NaN becomes `fallback`. Open ends are nudged inwards.
    fn clamp(&self, value: f64, fallback: f64) -> f64 {
        if value.is_nan() {
            return fallback;
        }
        let lo = if self.lo_inclusive { self.lo } else { next_up(self.lo) };
        let hi = if self.hi_inclusive { self.hi } else { next_down(self.hi) };
        value.clamp(lo, hi)
    }
}

/// Smallest step above/below that is still meaningful for the formulas (avoids 0/0).
fn next_up(x: f64) -> f64 {
    x + 1e-12_f64.max(x.abs() * 1e-12)
}

fn next_down(x: f64) -> f64 {
    x - 1e-12_f64.max(x.abs() * 1e-12)
}

const DISTANCE: Range = Range {
    field: "distance_km",
    lo: 0.0,
    lo_inclusive: true,
    hi: 5000.0,
    hi_inclusive: true,
    text: "0 <= distance_km <= 5000",
};
const FIBRE_LOSS: Range = Range {
    field: "fibre_loss_db_per_km",
    lo: 0.0,
    lo_inclusive: true,
    hi: 10.0,
    hi_inclusive: true,
    text: "0 <= fibre_loss_db_per_km <= 10",
};
const BOB_EFFICIENCY: Range = Range {
    field: "bob_efficiency",
    lo: 0.0,
    lo_inclusive: false,
    hi: 1.0,
    hi_inclusive: true,
    text: "0 < bob_efficiency <= 1",
};
const DETECTOR_ERROR: Range = Range {
    field: "detector_error",
    lo: 0.0,
    lo_inclusive: true,
    hi: 0.5,
    hi_inclusive: true,
    text: "0 <= detector_error <= 0.5",
};
const DARK_COUNT_YIELD: Range = Range {
    field: "dark_count_yield",
    lo: 0.0,
    lo_inclusive: true,
    hi: 0.1,
    hi_inclusive: true,
    text: "0 <= dark_count_yield <= 0.1",
};
const EC_EFFICIENCY: Range = Range {
    field: "error_correction_efficiency",
    lo: 1.0,
    lo_inclusive: true,
    hi: 10.0,
    hi_inclusive: true,
    text: "1 <= error_correction_efficiency <= 10",
};
const PULSE_RATE: Range = Range {
    field: "pulse_rate_hz",
    lo: 1.0,
    lo_inclusive: true,
    hi: 1e11,
    hi_inclusive: true,
    text: "1 <= pulse_rate_hz <= 1e11",
};
const WEAK_DECOY: Range = Range {
    field: "weak_decoy_mu",
    lo: 0.0,
    lo_inclusive: false,
    hi: 1.0,
    hi_inclusive: false,
    text: "0 < weak_decoy_mu < 1",
};
const SIGNAL_MU: Range = Range {
    field: "signal_mu",
    lo: 0.0,
    lo_inclusive: false,
    hi: 10.0,
    hi_inclusive: true,
    text: "0 < signal_mu <= 10 (or absent to optimise)",
};
const SIFTING: Range = Range {
    field: "sifting_factor",
    lo: 0.0,
    lo_inclusive: false,
    hi: 1.0,
    hi_inclusive: true,
    text: "0 < sifting_factor <= 1",
};
const MAX_BLOCK_DURATION: Range = Range {
    field: "max_block_duration_s",
    lo: 0.0,
    lo_inclusive: false,
    hi: 1e7,
    hi_inclusive: true,
    text: "0 < max_block_duration_s <= 1e7",
};
const EAVESDROP_FRACTION: Range = Range {
    field: "eavesdrop_fraction",
    lo: 0.0,
    lo_inclusive: true,
    hi: 1.0,
    hi_inclusive: true,
    text: "0 <= eavesdrop_fraction <= 1",
};

/// Largest distance `validate` accepts, km; also the search limit of `max_distance_km`.
pub(crate) const MAX_DISTANCE_KM: f64 = 5000.0;

impl LinkParameters {
    /// Checks every field against its documented range. The error names the field.
    pub fn validate(&self) -> Result<(), ParameterError> {
        DISTANCE.check(self.distance_km)?;
        FIBRE_LOSS.check(self.fibre_loss_db_per_km)?;
        BOB_EFFICIENCY.check(self.bob_efficiency)?;
        DETECTOR_ERROR.check(self.detector_error)?;
        DARK_COUNT_YIELD.check(self.dark_count_yield)?;
        EC_EFFICIENCY.check(self.error_correction_efficiency)?;
        PULSE_RATE.check(self.pulse_rate_hz)?;
        WEAK_DECOY.check(self.weak_decoy_mu)?;
        SIFTING.check(self.sifting_factor)?;
        MAX_BLOCK_DURATION.check(self.max_block_duration_s)?;
        if let Some(mu) = self.signal_mu {
            SIGNAL_MU.check(mu)?;
            if self.decoy_method == DecoyMethod::VacuumWeak && mu <= self.weak_decoy_mu {
                return Err(ParameterError::SignalNotAboveDecoy {
                    signal_mu: mu,
                    weak_decoy_mu: self.weak_decoy_mu,
                });
            }
        }
        Ok(())
    }

    /// A copy with every field forced into its allowed range (NaN → default), so the model
    /// functions stay total: they never panic and never return NaN, whatever they are given.
    pub(crate) fn sanitized(&self) -> Self {
        let d = Self::default();
        let weak_decoy_mu = WEAK_DECOY.clamp(self.weak_decoy_mu, d.weak_decoy_mu);
        let signal_mu = self.signal_mu.map(|mu| {
            let mu = SIGNAL_MU.clamp(mu, 0.5);
            if self.decoy_method == DecoyMethod::VacuumWeak {
                // Keep μ a visible step above ν; at μ = ν the bound is 0/0.
                mu.max(weak_decoy_mu * 1.001 + 1e-9)
            } else {
                mu
            }
        });
        Self {
            distance_km: DISTANCE.clamp(self.distance_km, d.distance_km),
            fibre_loss_db_per_km: FIBRE_LOSS.clamp(self.fibre_loss_db_per_km, d.fibre_loss_db_per_km),
            bob_efficiency: BOB_EFFICIENCY.clamp(self.bob_efficiency, d.bob_efficiency),
            detector_error: DETECTOR_ERROR.clamp(self.detector_error, d.detector_error),
            dark_count_yield: DARK_COUNT_YIELD.clamp(self.dark_count_yield, d.dark_count_yield),
            error_correction_efficiency: EC_EFFICIENCY
                .clamp(self.error_correction_efficiency, d.error_correction_efficiency),
            pulse_rate_hz: PULSE_RATE.clamp(self.pulse_rate_hz, d.pulse_rate_hz),
            weak_decoy_mu,
            signal_mu,
            sifting_factor: SIFTING.clamp(self.sifting_factor, d.sifting_factor),
            decoy_method: self.decoy_method,
            max_block_duration_s: MAX_BLOCK_DURATION.clamp(self.max_block_duration_s, d.max_block_duration_s),
        }
    }
}

/// Faults applied to a link on top of its [`LinkParameters`]. `Default` is a healthy link.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Conditions {
    /// The fibre is cut: no signal light reaches Bob (η = 0); only background clicks remain,
    /// so the QBER goes to 1/2 and no key can be made.
    pub fibre_cut: bool,
    /// Fraction of pulses (signal and decoy alike) on which Eve performs intercept-resend in a
    /// random basis, 0 ..= 1. Gains are unchanged; errors rise (see the crate docs).
    pub eavesdrop_fraction: f64,
}

impl Conditions {
    /// Checks `eavesdrop_fraction` is in 0 ..= 1.
    pub fn validate(&self) -> Result<(), ParameterError> {
        EAVESDROP_FRACTION.check(self.eavesdrop_fraction)
    }

    pub(crate) fn sanitized(&self) -> Self {
        Self {
            fibre_cut: self.fibre_cut,
            eavesdrop_fraction: EAVESDROP_FRACTION.clamp(self.eavesdrop_fraction, 0.0),
        }
    }
}
