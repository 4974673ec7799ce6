//! Random per-block statistics drawn around the asymptotic model.

use rand::Rng;
use rand_distr::{Binomial, Distribution};
use serde::Serialize;

use crate::model::{BACKGROUND_ERROR, binary_entropy, operating_point};
use crate::params::{Conditions, LinkParameters};

/// What one privacy-amplification block of a simulated device produced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BlockStatistics {
    /// Signal pulses Alice sent for this block.
    pub pulses_sent: u64,
    /// Pulses Bob detected (raw key bits).
    pub detections: u64,
    /// Detections kept after basis sifting.
    pub sifted_bits: u64,
    /// Sifted bits on which Alice and Bob disagree.
    pub error_bits: u64,
    /// Measured QBER `error_bits / sifted_bits`; 1/2 if there are no sifted bits.
    pub qber: f64,
    /// Secret bits distilled from the block; 0 when `aborted`.
    pub secret_bits: u64,
    /// Time the block took: `pulses_sent / pulse_rate_hz`, s.
    pub duration_s: f64,
    /// No key was distilled: the rate formula at the measured QBER is not positive (QBER too
    /// high, e.g. a cut fibre or an eavesdropper), or the block would take longer than
    /// `max_block_duration_s` and was abandoned.
    pub aborted: bool,
}

/// Draws one block of about `sifted_bits_target` sifted bits around the model.
///
/// How a block is drawn (O(1): three binomial draws, no per-pulse loop):
/// 1. Operating point from [`crate::evaluate_with`]: Q_μ, E_μ, Q1^L, e1^U at the model's μ.
/// 2. Pulses n = ⌈target / (q Q_μ)⌉, the expected number to reach the target. If that exceeds
///    `max_block_duration_s × pulse_rate_hz` (or is infinite because nothing is ever detected)
///    the block runs for exactly that cap and is abandoned.
/// 3. Detections D ~ Binomial(n, Q_μ); sifted S ~ Binomial(D, q); errors K ~ Binomial(S, E_μ).
///    This is exactly the per-pulse process, since pulses are independent.
/// 4. Measured QBER Ê = K/S. Secret bits = ⌊S · (Ω [1 − H2(e1^U)] − f H2(Ê))⌋ with
///    Ω = Q1^L/Q_μ, i.e. the model's rate per sifted bit with the block's measured error rate
///    in the error-correction term. The single-photon terms keep their asymptotic decoy values
///    (decoy pulses are not simulated; asymptotically they are a vanishing fraction).
/// 5. `aborted` when that is not positive, the block timed out, or it yields no secret bit.
///
/// A zero target gives an empty, aborted block. Parameters are clamped as in `evaluate`, so
/// this never panics, divides by zero or loops.
pub fn draw_block<R: Rng + ?Sized>(
    p: &LinkParameters,
    c: &Conditions,
    sifted_bits_target: u64,
    rng: &mut R,
) -> BlockStatistics {
    let (p, op) = operating_point(p, c);
    if sifted_bits_target == 0 {
        return BlockStatistics {
            pulses_sent: 0,
            detections: 0,
            sifted_bits: 0,
            error_bits: 0,
            qber: BACKGROUND_ERROR,
            secret_bits: 0,
            duration_s: 0.0,
            aborted: true,
        };
    }

    let sifted_per_pulse = p.sifting_factor * op.q_mu;
    // At least one pulse; the product is ≤ 1e18 by the validated ranges, well inside u64.
    let cap_f = (p.max_block_duration_s * p.pulse_rate_hz).floor().max(1.0);
    let wanted = (sifted_bits_target as f64 / sifted_per_pulse).ceil();
    // NaN cannot arise (sifted_per_pulse ≥ 0, target ≥ 1) but would also mean "never".
    let timed_out = wanted.is_nan() || wanted > cap_f;
    let pulses = if timed_out { cap_f } else { wanted.max(1.0) } as u64;

    let detections = binomial(pulses, op.q_mu, rng);
    let sifted_bits = binomial(detections, p.sifting_factor, rng);
    let error_bits = binomial(sifted_bits, op.e_mu, rng);

    let qber = if sifted_bits > 0 { error_bits as f64 / sifted_bits as f64 } else { BACKGROUND_ERROR };
    let single_photon_fraction = if op.q_mu > 0.0 { op.q1 / op.q_mu } else { 0.0 };
    let secret_fraction = single_photon_fraction * (1.0 - binary_entropy(op.e1))
        - p.error_correction_efficiency * binary_entropy(qber);
    let secret_bits = if timed_out || secret_fraction.is_nan() || secret_fraction <= 0.0 {
        0
    } else {
        (sifted_bits as f64 * secret_fraction).floor() as u64
    };

    BlockStatistics {
        pulses_sent: pulses,
        detections,
        sifted_bits,
        error_bits,
        qber,
        secret_bits,
        duration_s: pulses as f64 / p.pulse_rate_hz,
        aborted: secret_bits == 0,
    }
}

/// Binomial(n, p) draw; the parameters are valid by construction, and if they ever were not
/// the mean is returned rather than panicking.
fn binomial<R: Rng + ?Sized>(n: u64, p: f64, rng: &mut R) -> u64 {
    match Binomial::new(n, p) {
        Ok(dist) => dist.sample(rng),
        Err(_) => (n as f64 * p.clamp(0.0, 1.0)).round() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn zero_target_is_empty() {
        let mut rng = StdRng::seed_from_u64(1);
        let b = draw_block(&LinkParameters::default(), &Conditions::default(), 0, &mut rng);
        assert_eq!(b.pulses_sent, 0);
        assert!(b.aborted);
    }

    #[test]
    fn no_clicks_at_all_times_out() {
        // Cut fibre and no background: nothing is ever detected.
        let p =
            LinkParameters { dark_count_yield: 0.0, max_block_duration_s: 10.0, ..LinkParameters::default() };
        let c = Conditions { fibre_cut: true, ..Conditions::default() };
        let mut rng = StdRng::seed_from_u64(2);
        let b = draw_block(&p, &c, 1_000_000, &mut rng);
        assert!(b.aborted);
        assert_eq!(b.detections, 0);
        assert_eq!(b.secret_bits, 0);
        assert!((b.duration_s - 10.0).abs() < 1e-9);
        assert_eq!(b.qber, 0.5);
    }
}
