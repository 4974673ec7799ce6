//! Distance dependence and the two fault models: fibre cut and intercept-resend.

use qkd_physics::{
    Conditions, DecoyMethod, LinkParameters, draw_block, evaluate, evaluate_with, max_distance_km,
    max_distance_km_with, rate_table,
};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn eve(fraction: f64) -> Conditions {
    Conditions { eavesdrop_fraction: fraction, ..Conditions::default() }
}

#[test]
fn rate_falls_and_qber_rises_with_distance() {
    for method in [DecoyMethod::VacuumWeak, DecoyMethod::InfiniteDecoy] {
        let p = LinkParameters { decoy_method: method, ..LinkParameters::default() };
        let distances: Vec<f64> = (0..=30).map(|i| 5.0 * f64::from(i)).collect();
        let table = rate_table(&p, &distances);
        for w in table.windows(2) {
            assert!(w[1].transmittance < w[0].transmittance);
            assert!(w[1].gain_signal < w[0].gain_signal);
            assert!(w[1].qber_signal >= w[0].qber_signal);
            assert!(
                w[1].secret_rate_per_pulse <= w[0].secret_rate_per_pulse,
                "{method:?}: rate rises from {} to {} km",
                w[0].distance_km,
                w[1].distance_km
            );
            if w[0].secret_rate_per_pulse > 0.0 {
                assert!(w[1].secret_rate_per_pulse < w[0].secret_rate_per_pulse);
            }
        }
        // Past the maximum distance the device makes no key.
        let beyond = evaluate(&LinkParameters { distance_km: max_distance_km(&p) + 1.0, ..p.clone() });
        assert_eq!(beyond.secret_rate_per_pulse, 0.0);
        assert_eq!(beyond.secret_rate_bps, 0.0);
    }
}

#[test]
fn rates_per_second_are_consistent() {
    let m = evaluate(&LinkParameters::default());
    let rate = LinkParameters::default().pulse_rate_hz;
    assert!((m.secret_rate_bps - m.secret_rate_per_pulse * rate).abs() < 1e-9);
    assert!((m.raw_rate_bps - m.gain_signal * rate).abs() < 1e-9);
    assert!((m.sifted_rate_bps - 0.5 * m.raw_rate_bps).abs() < 1e-9);
    assert!(m.secret_rate_bps < m.sifted_rate_bps);
    assert!((m.channel_loss_db - 0.21 * 25.0).abs() < 1e-12);
    assert!((m.q1_lower - m.y1_lower * m.mu * (-m.mu).exp()).abs() < 1e-18);
}

#[test]
fn intercept_resend_on_every_pulse_of_a_perfect_channel_gives_25_percent() {
    // The textbook intercept-resend figure: Eve measures every pulse in a random basis and
    // resends; on an otherwise perfect channel Bob's sifted key has 25 % errors.
    let perfect = LinkParameters { detector_error: 0.0, dark_count_yield: 0.0, ..LinkParameters::default() };
    let m = evaluate_with(&perfect, &eve(1.0));
    assert!((m.qber_signal - 0.25).abs() < 1e-12, "{}", m.qber_signal);
    assert!((m.qber_decoy - 0.25).abs() < 1e-12, "{}", m.qber_decoy);
    assert_eq!(m.secret_rate_per_pulse, 0.0);
    // Eve on a fraction f of pulses: E = f/4.
    let m = evaluate_with(&perfect, &eve(0.2));
    assert!((m.qber_signal - 0.05).abs() < 1e-12);
}

#[test]
fn eavesdropping_raises_errors_not_gains_and_kills_the_rate() {
    let p = LinkParameters::default();
    let healthy = evaluate(&p);
    let mut last = healthy;
    for i in 1..=20 {
        let m = evaluate_with(&p, &eve(0.05 * f64::from(i)));
        assert_eq!(m.gain_signal, healthy.gain_signal, "gains are the model's");
        assert_eq!(m.gain_decoy, healthy.gain_decoy);
        assert!(m.qber_signal > last.qber_signal);
        assert!(m.qber_decoy > last.qber_decoy);
        // The decoy estimate sees Eve: the certified single-photon error rises.
        assert!(m.e1_upper > last.e1_upper || m.e1_upper == 0.5);
        assert!(m.secret_rate_per_pulse <= last.secret_rate_per_pulse);
        last = m;
    }
    assert_eq!(last.secret_rate_per_pulse, 0.0);

    // The fraction at which the key rate reaches zero (bisection on f).
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    while hi - lo > 1e-4 {
        let mid = 0.5 * (lo + hi);
        if evaluate_with(&p, &eve(mid)).secret_rate_per_pulse > 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    // At 25 km (QBER 3.3 %) the link tolerates Eve on about an eighth of the pulses: the
    // rate dies once the QBER, 3.3 % + f (25 % + e_d/2 − e_d), reaches about 6 %.
    assert!(lo > 0.10 && lo < 0.15, "threshold fraction {lo}");
    let at = evaluate_with(&p, &eve(hi));
    assert!(at.qber_signal > 0.055 && at.qber_signal < 0.07, "QBER at threshold {}", at.qber_signal);

    // Blocks abort past the threshold and do not below it.
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..50 {
        let b = draw_block(&p, &eve((hi + 0.05).min(1.0)), 100_000, &mut rng);
        assert!(b.aborted && b.secret_bits == 0, "{b:?}");
        let b = draw_block(&p, &eve(0.5 * lo), 100_000, &mut rng);
        assert!(!b.aborted && b.secret_bits > 0, "{b:?}");
    }

    // And Eve shortens the reach of the link.
    assert!(max_distance_km_with(&p, &eve(0.05)) < max_distance_km(&p));
    // At the 25 km threshold fraction the reach shrinks to those 25 km; full Eve leaves none.
    let reach = max_distance_km_with(&p, &eve(hi));
    assert!(reach > 20.0 && reach <= p.distance_km + 0.01, "reach {reach}");
    assert_eq!(max_distance_km_with(&p, &eve(1.0)), 0.0);
}

#[test]
fn fibre_cut_leaves_only_background() {
    for method in [DecoyMethod::VacuumWeak, DecoyMethod::InfiniteDecoy] {
        let p = LinkParameters { decoy_method: method, ..LinkParameters::default() };
        let cut = Conditions { fibre_cut: true, ..Conditions::default() };
        let m = evaluate_with(&p, &cut);
        assert_eq!(m.transmittance, 0.0);
        assert!(m.channel_loss_db.is_infinite());
        assert!((m.gain_signal - p.dark_count_yield).abs() < 1e-18);
        assert!((m.qber_signal - 0.5).abs() < 1e-12);
        assert_eq!(m.secret_rate_per_pulse, 0.0);
        assert_eq!(m.secret_rate_bps, 0.0);

        let mut rng = StdRng::seed_from_u64(5);
        let b = draw_block(&p, &cut, 100_000, &mut rng);
        assert!(b.aborted && b.secret_bits == 0);
        // QBER of pure background: 1/2 within 4 binomial standard errors.
        let se = (0.25 / b.sifted_bits as f64).sqrt();
        assert!((b.qber - 0.5).abs() < 4.0 * se, "qber {}", b.qber);
        // The block lasts as long as the background needs to fill it (about 16 h at GYS Y0),
        // within the one-day cap, and is computed instantly.
        let expected_s = (100_000.0 / (0.5 * p.dark_count_yield)).ceil() / p.pulse_rate_hz;
        assert!((b.duration_s - expected_s).abs() < 1e-6, "{}", b.duration_s);
        assert!(b.duration_s <= p.max_block_duration_s);
    }
}
