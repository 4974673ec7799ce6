//! `draw_block` statistics against the model.

use qkd_physics::{Conditions, LinkParameters, draw_block, evaluate_with};
use rand::SeedableRng;
use rand::rngs::StdRng;

struct Moments {
    mean: f64,
    std_err: f64,
}

fn moments(xs: &[f64]) -> Moments {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Moments { mean, std_err: (var / n).sqrt() }
}

/// Mean measured QBER and mean secret bits per sifted bit over many blocks agree with the
/// model within four standard errors of the mean.
fn check_against_model(p: &LinkParameters, c: &Conditions, target: u64, draws: usize, seed: u64) {
    let model = evaluate_with(p, c);
    let secret_per_sifted = model.secret_rate_per_pulse / (p.sifting_factor * model.gain_signal);
    let expected_pulses = (target as f64 / (p.sifting_factor * model.gain_signal)).ceil() as u64;

    let mut rng = StdRng::seed_from_u64(seed);
    let blocks: Vec<_> = (0..draws).map(|_| draw_block(p, c, target, &mut rng)).collect();
    for b in &blocks {
        assert_eq!(b.pulses_sent, expected_pulses);
        assert!((b.duration_s - b.pulses_sent as f64 / p.pulse_rate_hz).abs() < 1e-9);
        assert!(b.error_bits <= b.sifted_bits && b.sifted_bits <= b.detections);
        assert!(b.detections <= b.pulses_sent);
        assert!(b.secret_bits < b.sifted_bits);
        assert_eq!(b.aborted, b.secret_bits == 0);
    }

    let qber = moments(&blocks.iter().map(|b| b.qber).collect::<Vec<_>>());
    let frac =
        moments(&blocks.iter().map(|b| b.secret_bits as f64 / b.sifted_bits as f64).collect::<Vec<_>>());
    let sifted = moments(&blocks.iter().map(|b| b.sifted_bits as f64).collect::<Vec<_>>());

    assert!(
        (qber.mean - model.qber_signal).abs() < 4.0 * qber.std_err,
        "mean QBER {} vs model {} (se {})",
        qber.mean,
        model.qber_signal,
        qber.std_err
    );
    assert!(
        (frac.mean - secret_per_sifted).abs() < 4.0 * frac.std_err,
        "mean secret/sifted {} vs model {} (se {})",
        frac.mean,
        secret_per_sifted,
        frac.std_err
    );
    // Blocks really fluctuate, by about the binomial spread of the error count.
    let qber_sd = qber.std_err * (draws as f64).sqrt();
    let binomial_sd = (model.qber_signal * (1.0 - model.qber_signal) / target as f64).sqrt();
    assert!(qber_sd > 0.8 * binomial_sd && qber_sd < 1.2 * binomial_sd, "{qber_sd} vs {binomial_sd}");
    // The block size is "about" the target: within a fraction of a percent.
    assert!((sifted.mean / target as f64 - 1.0).abs() < 0.002, "mean sifted {}", sifted.mean);
}

#[test]
fn blocks_match_model_at_25_km() {
    check_against_model(&LinkParameters::default(), &Conditions::default(), 100_000, 2000, 1);
}

#[test]
fn blocks_match_model_at_100_km_fixed_mu() {
    let p = LinkParameters { distance_km: 100.0, signal_mu: Some(0.48), ..LinkParameters::default() };
    check_against_model(&p, &Conditions::default(), 1_000_000, 1000, 2);
}

#[test]
fn blocks_match_model_with_some_eavesdropping() {
    let c = Conditions { eavesdrop_fraction: 0.1, ..Conditions::default() };
    check_against_model(&LinkParameters::default(), &c, 100_000, 1000, 3);
}

#[test]
fn same_seed_same_blocks() {
    let p = LinkParameters::default();
    let c = Conditions::default();
    let mut a = StdRng::seed_from_u64(9);
    let mut b = StdRng::seed_from_u64(9);
    for _ in 0..10 {
        assert_eq!(draw_block(&p, &c, 50_000, &mut a), draw_block(&p, &c, 50_000, &mut b));
    }
}

#[test]
fn a_block_that_would_take_too_long_is_abandoned() {
    // 140 km: ~1.1e-5 sifted bits per pulse, so 1e6 bits need ~45 000 s of a 2 MHz clock.
    let p = LinkParameters { distance_km: 140.0, max_block_duration_s: 600.0, ..LinkParameters::default() };
    let mut rng = StdRng::seed_from_u64(4);
    let b = draw_block(&p, &Conditions::default(), 1_000_000, &mut rng);
    assert!(b.aborted);
    assert_eq!(b.secret_bits, 0);
    assert!((b.duration_s - 600.0).abs() < 1e-9);
    assert!(b.sifted_bits > 0 && b.sifted_bits < 1_000_000);
}

#[test]
fn huge_targets_return_without_looping() {
    let p = LinkParameters::default();
    let mut rng = StdRng::seed_from_u64(6);
    let b = draw_block(&p, &Conditions::default(), u64::MAX, &mut rng);
    assert!(b.aborted);
    assert!((b.duration_s - p.max_block_duration_s).abs() < 1e-6);
}
