//! Asymptotic decoy-state BB84 link model for the QuteMail device simulator (`qkd-sim`).
//!
//! The crate reproduces the published model of a weak-coherent-pulse BB84 link with decoy
//! states and nothing else, so that every number the simulator shows can be traced to a paper:
//!
//! * H.-K. Lo, X. Ma, K. Chen, "Decoy State Quantum Key Distribution", PRL 94, 230504 (2005),
//!   arXiv:quant-ph/0411004 — channel model and the GLLP key rate.
//! * X. Ma, B. Qi, Y. Zhao, H.-K. Lo, "Practical decoy state for quantum key distribution",
//!   PRA 72, 012326 (2005), arXiv:quant-ph/0503005 — the vacuum + weak decoy bounds, the GYS
//!   parameter set and the published figures this crate is tested against.
//! * C. Gobby, Z. L. Yuan, A. J. Shields, "Quantum key distribution over 122 km of standard
//!   telecom fiber", APL 84, 3762 (2004) — the "GYS" hardware the defaults describe.
//!
//! # Model
//!
//! Channel (fibre of length L, loss α dB/km, receiver efficiency η_Bob):
//! η = η_Bob · 10^(−αL/10); an i-photon pulse is detected with yield Y_i = Y0 + 1 − (1−η)^i.
//! For a phase-randomised coherent state of mean μ the gain and QBER are
//! Q_μ = Y0 + 1 − e^(−ημ) and E_μ Q_μ = e0 Y0 + e_d (1 − e^(−ημ)), with e0 = 1/2.
//!
//! Single-photon estimates ([`DecoyMethod`]):
//! * vacuum + weak decoy (default, Ma et al.):
//!   Y1^L = μ/(μν − ν²) · (Q_ν e^ν − Q_μ e^μ ν²/μ² − (μ² − ν²)/μ² · Y0),
//!   e1^U = (E_ν Q_ν e^ν − e0 Y0)/(Y1^L ν), Q1^L = Y1^L μ e^(−μ);
//! * infinite decoy (Lo-Ma-Chen's upper limit): Y1 = Y0 + η, e1 = (e0 Y0 + e_d η)/Y1.
//!
//! Key rate per pulse (GLLP, as in Lo-Ma-Chen, with q = 1/2 for BB84):
//! R = q { −Q_μ f H2(E_μ) + Q1 [1 − H2(e1)] }. μ is optimised numerically unless fixed.
//!
//! Faults ([`Conditions`]): a cut fibre sets η = 0 (only background clicks, QBER 1/2). An
//! intercept-resend eavesdropper on a fraction f of pulses leaves the gains unchanged and gives
//! each detection of an intercepted pulse the error probability 1/4 + e_d/2 instead of e_d
//! (see [`intercept_resend_error`]), for signal and decoy pulses alike, so E_μ, E_ν and the
//! certified e1^U all rise and the rate falls to zero.
//!
//! Blocks ([`draw_block`]) draw pulse, detection, sifting and error counts around the model and
//! size the secret key with the rate formula at the block's measured QBER.
//!
//! The defaults reproduce Ma et al.'s maximal distances for GYS: 140.55 km for vacuum + weak
//! (μ = 0.48, ν = 0.05) and 142.05 km for infinite decoy; see `tests/published.rs`.
//!
//! ```
//! use qkd_physics::{LinkParameters, evaluate, max_distance_km};
//!
//! let p = LinkParameters { distance_km: 50.0, ..LinkParameters::default() };
//! let point = evaluate(&p);
//! assert!(point.secret_rate_bps > 300.0 && point.qber_signal < 0.04);
//! assert!((max_distance_km(&p) - 141.0).abs() < 0.5);
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod block;
mod model;
mod params;

pub use block::{BlockStatistics, draw_block};
pub use model::{
    BACKGROUND_ERROR, ModelPoint, binary_entropy, evaluate, evaluate_with, intercept_resend_error,
    max_distance_km, max_distance_km_with, optimal_mu_closed_form, rate_table,
};
pub use params::{Conditions, DecoyMethod, LinkParameters, ParameterError};
