//! The model against the numbers published for the GYS parameter set.
//!
//! Sources (the "MQZL" and "LMC" tags below):
//! * MQZL — X. Ma, B. Qi, Y. Zhao, H.-K. Lo, PRA 72, 012326 (2005), arXiv:quant-ph/0503005.
//! * LMC — H.-K. Lo, X. Ma, K. Chen, PRL 94, 230504 (2005), arXiv:quant-ph/0411004.
//!
//! The primary texts were not readable through our search tools (they index only the first
//! screen of a paper). The MQZL numbers below are as quoted by open-source reproductions of
//! MQZL found with the code search — the two maximal distances by three independent ones,
//! identically — and the model matches them to the stated tolerances (see docs/qkd-sim.md).

use qkd_physics::{
    DecoyMethod, LinkParameters, evaluate, max_distance_km, optimal_mu_closed_form, rate_table,
};

/// MQZL's worked configuration: the optimum μ of their closed form and the weak decoy of
/// their Fig. 2.
fn mqzl(decoy_method: DecoyMethod) -> LinkParameters {
    LinkParameters { signal_mu: Some(0.48), weak_decoy_mu: 0.05, decoy_method, ..LinkParameters::default() }
}

fn infinite(p: &LinkParameters) -> LinkParameters {
    LinkParameters { decoy_method: DecoyMethod::InfiniteDecoy, ..p.clone() }
}

fn close(got: f64, want: f64, tol: f64, what: &str) {
    assert!((got - want).abs() <= tol, "{what}: got {got}, published {want}, tolerance {tol}");
}

#[test]
fn defaults_are_the_gys_table() {
    // MQZL Table I (GYS row) and the f(e) = 1.22, q = 1/2 of LMC/MQZL; GYS clock 2 MHz.
    let p = LinkParameters::default();
    assert_eq!(p.fibre_loss_db_per_km, 0.21);
    assert_eq!(p.detector_error, 0.033);
    assert_eq!(p.dark_count_yield, 1.7e-6);
    assert_eq!(p.bob_efficiency, 0.045);
    assert_eq!(p.error_correction_efficiency, 1.22);
    assert_eq!(p.sifting_factor, 0.5);
    assert_eq!(p.pulse_rate_hz, 2.0e6);
    assert_eq!(p.decoy_method, DecoyMethod::VacuumWeak);
    p.validate().expect("defaults are valid");
}

#[test]
fn vacuum_weak_max_distance_matches_mqzl_fig2() {
    // MQZL Fig. 2: vacuum + weak decoy, μ = 0.48, ν = 0.05 -> maximal secure distance
    // 140.55 km. We get 140.62 km; 0.1 km covers the paper's curve resolution and is well
    // under the 1.5 km gap to the infinite-decoy limit that the test must resolve.
    close(max_distance_km(&mqzl(DecoyMethod::VacuumWeak)), 140.55, 0.1, "vacuum+weak max distance");
}

#[test]
fn infinite_decoy_max_distance_matches_mqzl_fig2_and_lmc() {
    // MQZL Fig. 2 (dashed, infinite decoy states, μ = 0.48): 142.05 km; LMC quote ~142 km
    // for GYS. We get 142.01 km at μ = 0.48.
    close(max_distance_km(&mqzl(DecoyMethod::InfiniteDecoy)), 142.05, 0.1, "infinite-decoy max distance");
    // Optimising μ at every distance can only reach further; by 0.16 km here (142.21 km).
    let optimal = max_distance_km(&infinite(&LinkParameters::default()));
    close(optimal, 142.05, 0.25, "infinite-decoy max distance, optimal μ");
}

#[test]
fn max_distances_are_ordered() {
    let vw_fixed = max_distance_km(&mqzl(DecoyMethod::VacuumWeak));
    let vw_opt = max_distance_km(&LinkParameters::default());
    let inf_fixed = max_distance_km(&mqzl(DecoyMethod::InfiniteDecoy));
    let inf_opt = max_distance_km(&infinite(&LinkParameters::default()));
    // Optimising μ never loses reach; two decoys never beat infinitely many.
    assert!(vw_opt >= vw_fixed - 0.01, "{vw_opt} < {vw_fixed}");
    assert!(inf_opt >= inf_fixed - 0.01, "{inf_opt} < {inf_fixed}");
    assert!(inf_opt > vw_opt && inf_fixed > vw_fixed);
    // MQZL's point: vacuum + weak comes within ~1.5 km of the infinite-decoy limit.
    assert!(inf_fixed - vw_fixed < 2.0);
}

#[test]
fn rate_per_pulse_at_0_50_100_km() {
    // LMC Fig. 1 and MQZL Fig. 2 give the rate only as log-scale curves, with no table. The
    // expected values here are LMC Eq. (1) with the MQZL bounds evaluated independently of
    // this crate (a separate double-precision script, GYS inputs, μ = 0.48, ν = 0.05); the
    // 0 km infinite-decoy value, 2.555e-3 bit/pulse, is also the figure quoted by independent
    // reproductions of MQZL. Tolerance 1e-4 relative: a formula slip fails, rounding passes.
    let expected = [
        // (km, vacuum + weak, infinite decoy), bits per pulse
        (0.0, 2.414_245e-3, 2.554_588e-3),
        (50.0, 2.096_250e-4, 2.225_961e-4),
        (100.0, 1.602_005e-5, 1.718_444e-5),
    ];
    let distances: Vec<f64> = expected.iter().map(|e| e.0).collect();
    let vw = rate_table(&mqzl(DecoyMethod::VacuumWeak), &distances);
    let inf = rate_table(&mqzl(DecoyMethod::InfiniteDecoy), &distances);
    for ((d, want_vw, want_inf), (got_vw, got_inf)) in expected.iter().zip(vw.iter().zip(&inf)) {
        let rel_vw = (got_vw.secret_rate_per_pulse / want_vw - 1.0).abs();
        let rel_inf = (got_inf.secret_rate_per_pulse / want_inf - 1.0).abs();
        assert!(rel_vw < 1e-4, "vacuum+weak at {d} km: {}", got_vw.secret_rate_per_pulse);
        assert!(rel_inf < 1e-4, "infinite decoy at {d} km: {}", got_inf.secret_rate_per_pulse);
        // MQZL: the two-decoy protocol stays close to the infinite-decoy limit (within ~7 %
        // up to 100 km).
        assert!(got_vw.secret_rate_per_pulse < got_inf.secret_rate_per_pulse);
        assert!(got_vw.secret_rate_per_pulse > 0.9 * got_inf.secret_rate_per_pulse);
    }
}

#[test]
fn rate_is_linear_in_transmittance() {
    // LMC's central result: with decoys the rate scales as O(η), not O(η²) as without.
    // Between 25 and 75 km (before dark counts matter) the log-log slope is ~1.
    let p = LinkParameters::default();
    let pts = rate_table(&p, &[25.0, 75.0]);
    let slope = (pts[1].secret_rate_per_pulse / pts[0].secret_rate_per_pulse).ln()
        / (pts[1].transmittance / pts[0].transmittance).ln();
    assert!((slope - 1.0).abs() < 0.05, "log-log slope {slope}");
}

#[test]
fn optimal_mu_matches_mqzl() {
    // MQZL Sec. 3.1: the closed-form optimum for GYS is μ = 0.48 with f = 1.22 and 0.54 at
    // the Shannon limit f = 1 (two decimals printed).
    close(optimal_mu_closed_form(0.033, 1.22), 0.48, 0.005, "closed-form μ, f = 1.22");
    close(optimal_mu_closed_form(0.033, 1.0), 0.54, 0.005, "closed-form μ, f = 1");

    // The numerical optimum of the full asymptotic (infinite-decoy) rate sits at ≈ 0.48
    // wherever dark counts are negligible.
    let inf = infinite(&LinkParameters::default());
    for m in rate_table(&inf, &[0.0, 25.0, 50.0, 75.0, 100.0]) {
        close(m.mu, 0.48, 0.01, &format!("infinite-decoy optimal μ at {} km", m.distance_km));
    }
    // With only two decoys the bound is looser at high μ, so the optimum is slightly lower.
    for m in rate_table(&LinkParameters::default(), &[0.0, 50.0, 100.0]) {
        assert!(m.mu > 0.43 && m.mu < 0.48, "vacuum+weak optimal μ {} at {} km", m.mu, m.distance_km);
    }
}

#[test]
fn decoy_bound_tightness_at_40_km_matches_mqzl_fig1() {
    // MQZL Fig. 1 at 40 km, ν/μ = 25 % (μ = 0.48, ν = 0.12): the vacuum + weak Y1 bound is
    // 3.5 % below the true single-photon yield and e1 16.8 % above the true error rate.
    let p = LinkParameters { distance_km: 40.0, weak_decoy_mu: 0.12, ..mqzl(DecoyMethod::VacuumWeak) };
    let bound = evaluate(&p);
    let truth = evaluate(&infinite(&p));
    let y1_dev = 100.0 * (truth.y1_lower - bound.y1_lower) / truth.y1_lower;
    let e1_dev = 100.0 * (bound.e1_upper - truth.e1_upper) / truth.e1_upper;
    close(y1_dev, 3.5, 0.05, "Y1 deviation (%)");
    close(e1_dev, 16.8, 0.05, "e1 deviation (%)");
}

#[test]
fn optimal_rate_beats_any_fixed_mu() {
    let p = LinkParameters::default();
    for d in [0.0, 50.0, 120.0] {
        let best = evaluate(&LinkParameters { distance_km: d, ..p.clone() });
        for mu in [0.1, 0.3, 0.48, 0.6, 0.9] {
            let fixed = evaluate(&LinkParameters { distance_km: d, signal_mu: Some(mu), ..p.clone() });
            assert!(
                best.secret_rate_per_pulse >= fixed.secret_rate_per_pulse * (1.0 - 1e-9),
                "μ = {mu} beats the optimum at {d} km"
            );
        }
    }
}
