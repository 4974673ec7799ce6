//! Prints the markdown rate table of `docs/qkd-sim.md` for the default (GYS) link.
//!
//! `cargo run -p qkd-physics --example rate_table`. The doc's table is this output verbatim,
//! and `tests/doc_table.rs` fails if the two drift apart.

use qkd_physics::{DecoyMethod, LinkParameters, max_distance_km, rate_table};

fn main() {
    print!("{}", render());
}

/// The table and the maximum-distance line, as markdown.
pub fn render() -> String {
    let p = LinkParameters::default();
    let max_km = max_distance_km(&p);
    let infinite = LinkParameters { decoy_method: DecoyMethod::InfiniteDecoy, ..p.clone() };
    let mut distances = vec![0.0, 10.0, 25.0, 50.0, 75.0, 100.0, 125.0];
    distances.push(max_km);

    let mut out = String::new();
    out.push_str(
        "| Distance (km) | Fibre loss (dB) | Optimal μ | Q_μ | QBER E_μ | e1^U | Rate (bit/pulse) \
         | Rate (bit/s) | Sifted (bit/s) |\n",
    );
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for m in rate_table(&p, &distances) {
        out.push_str(&format!(
            "| {:.2} | {:.2} | {:.3} | {:.3e} | {:.2} % | {:.2} % | {:.3e} | {} | {} |\n",
            m.distance_km,
            m.channel_loss_db,
            m.mu,
            m.gain_signal,
            100.0 * m.qber_signal,
            100.0 * m.e1_upper,
            m.secret_rate_per_pulse,
            three_significant(m.secret_rate_bps),
            three_significant(m.sifted_rate_bps),
        ));
    }
    out.push('\n');
    out.push_str(&format!(
        "Maximum distance (rate reaches zero, optimal μ): vacuum + weak decoy (ν = {}) {:.2} km; \
         infinite-decoy limit {:.2} km.\n",
        p.weak_decoy_mu,
        max_km,
        max_distance_km(&infinite),
    ));
    out
}

/// Plain decimal with three significant digits (4830, 32.1, 0.000787): readable in a table.
fn three_significant(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let exponent = x.abs().log10().floor() as i32;
    if exponent >= 2 {
        let unit = 10f64.powi(exponent - 2);
        format!("{:.0}", (x / unit).round() * unit)
    } else {
        let decimals = (2 - exponent) as usize;
        format!("{x:.decimals$}")
    }
}
