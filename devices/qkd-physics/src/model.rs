//! The asymptotic decoy-state BB84 model: channel, decoy bounds, GLLP rate, μ optimisation.

use serde::Serialize;

use crate::params::{Conditions, DecoyMethod, LinkParameters, MAX_DISTANCE_KM};

/// Error rate e0 of a background click: a dark count is a coin flip (Lo-Ma-Chen).
pub const BACKGROUND_ERROR: f64 = 0.5;

/// Error probability of a detection caused by an intercepted-and-resent photon, in the basis
/// Alice and Bob keep. Eve guesses the basis: wrong half the time (Bob's bit is then random,
/// 1/2 error), right half the time (Bob then sees only his own misalignment e_d). This is the
/// textbook 25 % of a full intercept-resend attack, plus e_d/2 for the receiver's own optics.
pub fn intercept_resend_error(detector_error: f64) -> f64 {
    0.25 + 0.5 * detector_error
}

/// Upper end of the numerical μ search, photons/pulse. The optimum of every rate in this
/// model is at most 1 (Ma et al.'s closed form tends to 1 as e_d → 0), so 2 leaves margin.
const MU_SEARCH_MAX: f64 = 2.0;
/// Coarse grid before the golden-section refinement; guards against a non-unimodal rate.
const MU_GRID_POINTS: u32 = 40;
/// Golden-section stops when the μ bracket is this narrow; the rate is flat to ~1e-14 there.
const MU_TOLERANCE: f64 = 1e-7;
/// `max_distance_km` bisects until the bracket is this narrow, km.
const DISTANCE_TOLERANCE_KM: f64 = 0.01;

/// The model's prediction for one link: what `qkd-sim` reports and draws blocks from.
///
/// Rates per pulse are per pulse sent by Alice; rates per second multiply by `pulse_rate_hz`.
/// Under [`DecoyMethod::InfiniteDecoy`] the three single-photon fields hold the true channel
/// values rather than bounds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ModelPoint {
    /// Fibre length, km.
    pub distance_km: f64,
    /// Overall transmittance η = η_Bob · 10^(−αL/10) (fibre and Bob), probability per photon;
    /// 0 when the fibre is cut.
    pub transmittance: f64,
    /// Fibre attenuation α·L, dB (Bob's efficiency not included); +∞ when the fibre is cut
    /// (serde_json writes that as `null`).
    pub channel_loss_db: f64,
    /// Signal mean photon number μ used (optimised or fixed), photons/pulse.
    pub mu: f64,
    /// Weak-decoy mean photon number ν, photons/pulse.
    pub nu: f64,
    /// Signal gain Q_μ: detection probability per signal pulse.
    pub gain_signal: f64,
    /// Signal QBER E_μ: error probability per sifted signal bit.
    pub qber_signal: f64,
    /// Decoy gain Q_ν: detection probability per decoy pulse.
    pub gain_decoy: f64,
    /// Decoy QBER E_ν: error probability per sifted decoy bit.
    pub qber_decoy: f64,
    /// Lower bound Y1^L on the single-photon yield (probability per single-photon pulse).
    pub y1_lower: f64,
    /// Upper bound e1^U on the single-photon error rate, capped at 1/2.
    pub e1_upper: f64,
    /// Lower bound Q1^L = Y1^L μ e^(−μ) on the single-photon gain, per signal pulse.
    pub q1_lower: f64,
    /// Secret key rate R, bits per pulse sent; 0 where the formula goes negative.
    pub secret_rate_per_pulse: f64,
    /// Secret key rate, bits/s.
    pub secret_rate_bps: f64,
    /// Sifted key rate q·Q_μ·rate, bits/s.
    pub sifted_rate_bps: f64,
    /// Detection (raw key) rate Q_μ·rate, detections/s.
    pub raw_rate_bps: f64,
}

/// Binary Shannon entropy H2(x) = −x log2 x − (1−x) log2(1−x), bits.
///
/// Arguments outside [0, 1] are clamped (H2 = 0 at both ends); NaN gives NaN.
pub fn binary_entropy(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    let x = x.clamp(0.0, 1.0);
    if x == 0.0 || x == 1.0 {
        return 0.0;
    }
    -x * x.log2() - (1.0 - x) * (1.0 - x).log2()
}

/// Ma et al.'s closed-form optimal signal intensity: the root of
/// (1 − μ) e^(−μ) = f H2(e_d) / (1 − H2(e_d)).
///
/// It maximises the infinite-decoy rate in the long-distance limit (η ≪ 1, Y0 → 0), where
/// R ∝ η μ [e^(−μ)(1 − H2(e_d)) − f H2(e_d)]. GYS values give 0.48 (f = 1.22) and 0.54
/// (f = 1). Returns 0 when no μ gives key (the right-hand side is ≥ 1) and 1 when e_d = 0.
pub fn optimal_mu_closed_form(detector_error: f64, error_correction_efficiency: f64) -> f64 {
    let h = binary_entropy(detector_error.clamp(0.0, 0.5));
    let f = if error_correction_efficiency.is_nan() { 1.0 } else { error_correction_efficiency.max(0.0) };
    let target = if h >= 1.0 { f64::INFINITY } else { f * h / (1.0 - h) };
    if target >= 1.0 {
        return 0.0;
    }
    // (1 − μ) e^(−μ) falls monotonically from 1 to 0 on [0, 1]: plain bisection.
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if (1.0 - mid) * (-mid).exp() > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Everything the rate formula needs at one signal intensity.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Eval {
    pub mu: f64,
    pub q_mu: f64,
    pub e_mu: f64,
    pub q_nu: f64,
    pub e_nu: f64,
    pub y1: f64,
    pub e1: f64,
    pub q1: f64,
    /// Unclamped rate per pulse; negative beyond the maximum distance.
    pub rate: f64,
}

/// A link at one distance under one set of conditions, with parameters already sanitised.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Channel {
    pub eta: f64,
    y0: f64,
    /// Error probability of a detection caused by signal light (misalignment and Eve).
    e_signal: f64,
    f: f64,
    q: f64,
    nu: f64,
    method: DecoyMethod,
}

impl Channel {
    pub(crate) fn new(p: &LinkParameters, c: &Conditions) -> Self {
        let eta = if c.fibre_cut {
            0.0
        } else {
            p.bob_efficiency * 10f64.powf(-p.fibre_loss_db_per_km * p.distance_km / 10.0)
        };
        let f_eve = c.eavesdrop_fraction;
        let e_signal = (1.0 - f_eve) * p.detector_error + f_eve * intercept_resend_error(p.detector_error);
        Self {
            eta,
            y0: p.dark_count_yield,
            e_signal,
            f: p.error_correction_efficiency,
            q: p.sifting_factor,
            nu: p.weak_decoy_mu,
            method: p.decoy_method,
        }
    }

    /// Gain Q and QBER E of a coherent state of mean `mu` (Lo-Ma-Chen):
    /// Q = Y0 + 1 − e^(−ημ), E·Q = e0 Y0 + e (1 − e^(−ημ)).
    fn gain(&self, mu: f64) -> (f64, f64) {
        // 1 − e^(−x) without cancellation at the tiny ημ of long links.
        let signal_click = -(-self.eta * mu).exp_m1();
        // Q can exceed 1 only for absurd Y0 and η together; it is a probability.
        let q = (self.y0 + signal_click).min(1.0);
        let errors = BACKGROUND_ERROR * self.y0 + self.e_signal * signal_click;
        let e = if q > 0.0 {
            (errors / q).clamp(0.0, BACKGROUND_ERROR)
        } else {
            // No clicks at all: nothing is learned, report a coin flip.
            BACKGROUND_ERROR
        };
        (q, e)
    }

    /// Single-photon yield and error rate: vacuum+weak bounds or infinite-decoy truth.
    fn single_photon(&self, mu: f64, q_mu: f64, q_nu: f64, e_nu: f64) -> (f64, f64) {
        match self.method {
            DecoyMethod::VacuumWeak => vacuum_weak_bounds(mu, self.nu, q_mu, q_nu, e_nu, self.y0),
            DecoyMethod::InfiniteDecoy => {
                // Y1 = Y0 + η and e1 Y1 = e0 Y0 + e η (Lo-Ma-Chen with i = 1).
                let y1 = self.y0 + self.eta;
                let e1 = if y1 > 0.0 {
                    ((BACKGROUND_ERROR * self.y0 + self.e_signal * self.eta) / y1)
                        .clamp(0.0, BACKGROUND_ERROR)
                } else {
                    BACKGROUND_ERROR
                };
                (y1, e1)
            }
        }
    }

    pub(crate) fn eval(&self, mu: f64) -> Eval {
        let (q_mu, e_mu) = self.gain(mu);
        let (q_nu, e_nu) = self.gain(self.nu);
        let (y1, e1) = self.single_photon(mu, q_mu, q_nu, e_nu);
        let q1 = y1 * mu * (-mu).exp();
        // GLLP: R = q { −Q_μ f H2(E_μ) + Q1 [1 − H2(e1)] }.
        let rate = self.q * (-q_mu * self.f * binary_entropy(e_mu) + q1 * (1.0 - binary_entropy(e1)));
        Eval { mu, q_mu, e_mu, q_nu, e_nu, y1, e1, q1, rate }
    }

    /// The μ that maximises the rate: a coarse grid, then golden-section search around the
    /// best grid cell. The rate is unimodal in μ for every parameter set we have tried, but
    /// the grid makes a wrong local maximum impossible at grid resolution.
    fn optimal(&self) -> Eval {
        // The vacuum+weak bound needs μ > ν; cell centres never touch the open end.
        let lo = match self.method {
            DecoyMethod::VacuumWeak => self.nu,
            DecoyMethod::InfiniteDecoy => 0.0,
        };
        let hi = MU_SEARCH_MAX;
        let step = (hi - lo) / f64::from(MU_GRID_POINTS);
        let mut best = self.eval(lo + 0.5 * step);
        let mut best_i = 0_u32;
        for i in 1..MU_GRID_POINTS {
            let e = self.eval(lo + (f64::from(i) + 0.5) * step);
            if e.rate > best.rate {
                best = e;
                best_i = i;
            }
        }
        let centre = lo + (f64::from(best_i) + 0.5) * step;
        let mut a = (centre - step).max(lo + 1e-3 * step);
        let mut b = (centre + step).min(hi);
        let inv_phi = 0.5 * (5f64.sqrt() - 1.0);
        let mut x1 = b - inv_phi * (b - a);
        let mut x2 = a + inv_phi * (b - a);
        let mut e1 = self.eval(x1);
        let mut e2 = self.eval(x2);
        while b - a > MU_TOLERANCE {
            if e1.rate >= e2.rate {
                b = x2;
                x2 = x1;
                e2 = e1;
                x1 = b - inv_phi * (b - a);
                e1 = self.eval(x1);
            } else {
                a = x1;
                x1 = x2;
                e1 = e2;
                x2 = a + inv_phi * (b - a);
                e2 = self.eval(x2);
            }
        }
        [e1, e2].into_iter().fold(best, |acc, e| if e.rate > acc.rate { e } else { acc })
    }
}

/// Vacuum + weak decoy bounds of Ma, Qi, Zhao, Lo (2005):
/// Y1^L = μ/(μν − ν²) · (Q_ν e^ν − Q_μ e^μ ν²/μ² − (μ² − ν²)/μ² · Y0),
/// e1^U = (E_ν Q_ν e^ν − e0 Y0)/(Y1^L ν).
/// A non-positive Y1^L certifies nothing: the bound is then Y1 = 0, e1 = 1/2.
fn vacuum_weak_bounds(mu: f64, nu: f64, q_mu: f64, q_nu: f64, e_nu: f64, y0: f64) -> (f64, f64) {
    let y1 = mu / (mu * nu - nu * nu)
        * (q_nu * nu.exp() - q_mu * mu.exp() * nu * nu / (mu * mu) - (mu * mu - nu * nu) / (mu * mu) * y0);
    if y1.is_nan() || y1 <= 0.0 || y1.is_infinite() {
        return (0.0, BACKGROUND_ERROR);
    }
    let e1 = (e_nu * q_nu * nu.exp() - BACKGROUND_ERROR * y0) / (y1 * nu);
    // An upper bound above 1/2 says no more than 1/2 does (1 − H2 is symmetric).
    let e1 = if e1.is_nan() { BACKGROUND_ERROR } else { e1.clamp(0.0, BACKGROUND_ERROR) };
    (y1, e1)
}

/// Sanitised parameters and the operating point under `c`: shared with `draw_block`.
///
/// μ is chosen for the healthy link (fixed, or optimal without faults) and kept under faults:
/// the device is configured for its link and does not know Eve or a cut is there.
pub(crate) fn operating_point(p: &LinkParameters, c: &Conditions) -> (LinkParameters, Eval) {
    let p = p.sanitized();
    let c = c.sanitized();
    let mu = match p.signal_mu {
        Some(mu) => mu,
        None => Channel::new(&p, &Conditions::default()).optimal().mu,
    };
    let eval = Channel::new(&p, &c).eval(mu);
    (p, eval)
}

/// The model on a healthy link: optimal μ unless `p.signal_mu` is set.
///
/// Never fails: out-of-range fields are clamped to their allowed range (NaN → default). Call
/// [`LinkParameters::validate`] first to reject a bad configuration instead.
pub fn evaluate(p: &LinkParameters) -> ModelPoint {
    evaluate_with(p, &Conditions::default())
}

/// The model under faults (fibre cut, intercept-resend eavesdropping), at the μ of the
/// healthy link: faults change what the link delivers, not how Alice is configured.
pub fn evaluate_with(p: &LinkParameters, c: &Conditions) -> ModelPoint {
    let (p, e) = operating_point(p, c);
    let c = c.sanitized();
    let ch = Channel::new(&p, &c);
    let rate = e.rate.max(0.0);
    ModelPoint {
        distance_km: p.distance_km,
        transmittance: ch.eta,
        channel_loss_db: if c.fibre_cut { f64::INFINITY } else { p.fibre_loss_db_per_km * p.distance_km },
        mu: e.mu,
        nu: p.weak_decoy_mu,
        gain_signal: e.q_mu,
        qber_signal: e.e_mu,
        gain_decoy: e.q_nu,
        qber_decoy: e.e_nu,
        y1_lower: e.y1,
        e1_upper: e.e1,
        q1_lower: e.q1,
        secret_rate_per_pulse: rate,
        secret_rate_bps: rate * p.pulse_rate_hz,
        sifted_rate_bps: p.sifting_factor * e.q_mu * p.pulse_rate_hz,
        raw_rate_bps: e.q_mu * p.pulse_rate_hz,
    }
}

/// [`evaluate`] at each of `distances` (km), other parameters from `p`.
/// Distances outside 0 ..= 5000 km are clamped into it.
pub fn rate_table(p: &LinkParameters, distances: &[f64]) -> Vec<ModelPoint> {
    distances
        .iter()
        .map(|&d| {
            let mut at = p.clone();
            at.distance_km = d;
            evaluate(&at)
        })
        .collect()
}

/// Distance at which the healthy link's rate (optimal μ unless `signal_mu` is set) reaches
/// zero, km, by bisection to 0.01 km. `p.distance_km` is ignored.
///
/// Returns 0 if no key can be made even at 0 km, and 5000 (the largest allowed distance) if
/// the rate is still positive there, e.g. with lossless fibre.
pub fn max_distance_km(p: &LinkParameters) -> f64 {
    max_distance_km_with(p, &Conditions::default())
}

/// [`max_distance_km`] under faults: e.g. how far a link still makes key with Eve present.
pub fn max_distance_km_with(p: &LinkParameters, c: &Conditions) -> f64 {
    let mut at = p.sanitized();
    let rate_at = |at: &mut LinkParameters, d: f64| {
        at.distance_km = d;
        operating_point(at, c).1.rate
    };
    let at_zero = rate_at(&mut at, 0.0);
    if at_zero.is_nan() || at_zero <= 0.0 {
        return 0.0;
    }
    // Bracket the zero by doubling, then bisect; both loops are bounded.
    let (mut lo, mut hi) = (0.0_f64, 10.0_f64);
    while rate_at(&mut at, hi) > 0.0 {
        if hi >= MAX_DISTANCE_KM {
            return MAX_DISTANCE_KM;
        }
        lo = hi;
        hi = (2.0 * hi).min(MAX_DISTANCE_KM);
    }
    while hi - lo > DISTANCE_TOLERANCE_KM {
        let mid = 0.5 * (lo + hi);
        if rate_at(&mut at, mid) > 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_known_values() {
        assert_eq!(binary_entropy(0.0), 0.0);
        assert_eq!(binary_entropy(1.0), 0.0);
        assert!((binary_entropy(0.5) - 1.0).abs() < 1e-15);
        assert!((binary_entropy(0.11) - 0.4999).abs() < 1e-3);
        assert!((binary_entropy(0.2) - binary_entropy(0.8)).abs() < 1e-15);
        assert_eq!(binary_entropy(-3.0), 0.0);
        assert!(binary_entropy(f64::NAN).is_nan());
    }

    /// The closed-form gain is the Poisson average of Y_i = Y0 + 1 − (1−η)^i, and E·Q the
    /// average of e_i Y_i: checks the two formulas are the same model (Lo-Ma-Chen).
    #[test]
    fn gain_is_poisson_average_of_yields() {
        let p = LinkParameters::default();
        let ch = Channel::new(&p, &Conditions::default());
        let mu: f64 = 0.48;
        let (q, e) = ch.gain(mu);
        let (mut q_sum, mut eq_sum, mut weight) = (0.0, 0.0, (-mu).exp());
        for i in 0..60 {
            if i > 0 {
                weight *= mu / f64::from(i);
            }
            let eta_i = 1.0 - (1.0 - ch.eta).powi(i);
            q_sum += weight * (p.dark_count_yield + eta_i);
            eq_sum += weight * (0.5 * p.dark_count_yield + p.detector_error * eta_i);
        }
        assert!((q - q_sum).abs() < 1e-15, "{q} vs {q_sum}");
        assert!((e * q - eq_sum).abs() < 1e-15);
    }

    #[test]
    fn vacuum_weak_bounds_sandwich_the_truth() {
        let p = LinkParameters::default();
        for d in [0.0, 40.0, 100.0, 140.0] {
            let at = LinkParameters { distance_km: d, ..p.clone() };
            let ch = Channel::new(&at, &Conditions::default());
            let e = ch.eval(0.48);
            let y1_true = at.dark_count_yield + ch.eta;
            let e1_true = (0.5 * at.dark_count_yield + at.detector_error * ch.eta) / y1_true;
            assert!(e.y1 <= y1_true && e.y1 > 0.9 * y1_true, "Y1 at {d} km");
            assert!(e.e1 >= e1_true, "e1 at {d} km");
        }
    }

    #[test]
    fn closed_form_mu_limits() {
        assert_eq!(optimal_mu_closed_form(0.5, 1.22), 0.0);
        assert!((optimal_mu_closed_form(0.0, 1.22) - 1.0).abs() < 1e-9);
        assert!(optimal_mu_closed_form(f64::NAN, f64::NAN).is_finite());
    }
}
