//! Parameter validation, config parsing, and totality of the model on bad input.

use qkd_physics::{
    Conditions, DecoyMethod, LinkParameters, ParameterError, draw_block, evaluate_with, max_distance_km,
    rate_table,
};
use rand::SeedableRng;
use rand::rngs::StdRng;

type Setter = fn(&mut LinkParameters, f64);

/// Every numeric field, with a setter and values just outside its allowed range.
fn fields() -> Vec<(&'static str, Setter, Vec<f64>)> {
    vec![
        ("distance_km", |p, v| p.distance_km = v, vec![-1.0, 5000.1]),
        ("fibre_loss_db_per_km", |p, v| p.fibre_loss_db_per_km = v, vec![-0.01, 10.5]),
        ("bob_efficiency", |p, v| p.bob_efficiency = v, vec![0.0, 1.01]),
        ("detector_error", |p, v| p.detector_error = v, vec![-0.1, 0.51]),
        ("dark_count_yield", |p, v| p.dark_count_yield = v, vec![-1e-9, 0.2]),
        ("error_correction_efficiency", |p, v| p.error_correction_efficiency = v, vec![0.99, 11.0]),
        ("pulse_rate_hz", |p, v| p.pulse_rate_hz = v, vec![0.0, 2e11]),
        ("weak_decoy_mu", |p, v| p.weak_decoy_mu = v, vec![0.0, 1.0]),
        ("signal_mu", |p, v| p.signal_mu = Some(v), vec![0.0, 10.5]),
        ("sifting_factor", |p, v| p.sifting_factor = v, vec![0.0, 1.5]),
        ("max_block_duration_s", |p, v| p.max_block_duration_s = v, vec![0.0, 2e7]),
    ]
}

#[test]
fn errors_name_the_field() {
    for (name, set, bad) in fields() {
        for v in bad.into_iter().chain([f64::NAN, f64::INFINITY, f64::NEG_INFINITY]) {
            let mut p = LinkParameters::default();
            set(&mut p, v);
            let err = p.validate().expect_err(&format!("{name} = {v} accepted"));
            assert_eq!(err.field(), name);
            let msg = err.to_string();
            assert!(msg.contains(name) && msg.contains("allowed"), "{msg}");
        }
    }
}

#[test]
fn boundary_values_are_accepted() {
    let ok = [
        ("distance_km", 0.0),
        ("distance_km", 5000.0),
        ("detector_error", 0.5),
        ("dark_count_yield", 0.0),
        ("error_correction_efficiency", 1.0),
        ("bob_efficiency", 1.0),
        ("sifting_factor", 1.0),
    ];
    for (name, v) in ok {
        let mut p = LinkParameters::default();
        let (_, set, _) = fields().into_iter().find(|f| f.0 == name).expect("known field");
        set(&mut p, v);
        p.validate().unwrap_or_else(|e| panic!("{name} = {v}: {e}"));
    }
}

#[test]
fn signal_must_exceed_decoy_for_vacuum_weak_only() {
    let mut p = LinkParameters { signal_mu: Some(0.04), weak_decoy_mu: 0.05, ..LinkParameters::default() };
    let err = p.validate().expect_err("μ below ν accepted");
    assert!(matches!(err, ParameterError::SignalNotAboveDecoy { .. }));
    let msg = err.to_string();
    assert!(msg.contains("signal_mu") && msg.contains("weak_decoy_mu"), "{msg}");
    // The infinite-decoy limit does not use ν.
    p.decoy_method = DecoyMethod::InfiniteDecoy;
    p.validate().expect("ν is irrelevant to the infinite-decoy limit");
}

#[test]
fn conditions_validation_names_the_field() {
    Conditions::default().validate().expect("healthy link is valid");
    for v in [-0.1, 1.1, f64::NAN] {
        let c = Conditions { eavesdrop_fraction: v, ..Conditions::default() };
        assert_eq!(c.validate().expect_err("accepted").field(), "eavesdrop_fraction");
    }
}

#[test]
fn config_parsing_defaults_and_rejects_unknown_keys() {
    let p: LinkParameters =
        serde_json::from_str(r#"{"distance_km": 80, "decoy_method": "infinite_decoy"}"#).expect("parses");
    assert_eq!(p.distance_km, 80.0);
    assert_eq!(p.decoy_method, DecoyMethod::InfiniteDecoy);
    assert_eq!(p.fibre_loss_db_per_km, 0.21);
    assert_eq!(p.signal_mu, None);

    let p: LinkParameters = serde_json::from_str(r#"{"signal_mu": 0.5}"#).expect("parses");
    assert_eq!(p.signal_mu, Some(0.5));

    let err = serde_json::from_str::<LinkParameters>(r#"{"distance": 80}"#).expect_err("typo accepted");
    assert!(err.to_string().contains("unknown field"), "{err}");
    assert!(serde_json::from_str::<Conditions>(r#"{"eve": 0.5}"#).is_err());

    let round: LinkParameters =
        serde_json::from_str(&serde_json::to_string(&LinkParameters::default()).expect("serialises"))
            .expect("round trip");
    assert_eq!(round, LinkParameters::default());
}

#[test]
fn model_is_total_on_garbage_input() {
    let weird = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, 0.0, 1e-300, 1e300];
    let mut rng = StdRng::seed_from_u64(13);
    for (name, set, _) in fields() {
        for &v in &weird {
            for method in [DecoyMethod::VacuumWeak, DecoyMethod::InfiniteDecoy] {
                let mut p = LinkParameters { decoy_method: method, ..LinkParameters::default() };
                set(&mut p, v);
                for c in [Conditions::default(), Conditions { fibre_cut: true, eavesdrop_fraction: v }] {
                    let m = evaluate_with(&p, &c);
                    let values = [
                        m.distance_km,
                        m.transmittance,
                        m.mu,
                        m.nu,
                        m.gain_signal,
                        m.qber_signal,
                        m.gain_decoy,
                        m.qber_decoy,
                        m.y1_lower,
                        m.e1_upper,
                        m.q1_lower,
                        m.secret_rate_per_pulse,
                        m.secret_rate_bps,
                        m.sifted_rate_bps,
                        m.raw_rate_bps,
                    ];
                    assert!(values.iter().all(|x| x.is_finite()), "{name} = {v}: {m:?}");
                    assert!(m.secret_rate_per_pulse >= 0.0);
                    assert!((0.0..=0.5).contains(&m.qber_signal));
                    let b = draw_block(&p, &c, 10_000, &mut rng);
                    assert!(b.qber.is_finite() && b.duration_s.is_finite(), "{name} = {v}: {b:?}");
                }
                assert!(max_distance_km(&p).is_finite());
            }
        }
    }
    assert!(
        rate_table(&LinkParameters::default(), &[f64::NAN, -5.0, 1e9])
            .iter()
            .all(|m| m.distance_km.is_finite())
    );
}
