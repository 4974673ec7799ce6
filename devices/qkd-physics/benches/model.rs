//! Cost of the calls `qkd-sim` makes per block: the model (with and without the μ search)
//! and a full block draw.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use qkd_physics::{Conditions, LinkParameters, draw_block, evaluate, max_distance_km};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn bench_model(c: &mut Criterion) {
    let optimised = LinkParameters::default();
    let fixed = LinkParameters { signal_mu: Some(0.48), ..LinkParameters::default() };
    c.bench_function("evaluate/optimal_mu", |b| b.iter(|| evaluate(black_box(&optimised))));
    c.bench_function("evaluate/fixed_mu", |b| b.iter(|| evaluate(black_box(&fixed))));
    c.bench_function("max_distance_km", |b| b.iter(|| max_distance_km(black_box(&optimised))));

    let healthy = Conditions::default();
    let mut rng = StdRng::seed_from_u64(7);
    c.bench_function("draw_block/1e6_sifted", |b| {
        b.iter(|| draw_block(black_box(&optimised), &healthy, black_box(1_000_000), &mut rng))
    });
    let cut = Conditions { fibre_cut: true, ..Conditions::default() };
    c.bench_function("draw_block/fibre_cut", |b| {
        b.iter(|| draw_block(black_box(&optimised), &cut, black_box(1_000_000), &mut rng))
    });
}

criterion_group!(benches, bench_model);
criterion_main!(benches);
