//! `docs/qkd-sim.md` must show exactly what `examples/rate_table.rs` prints.

#[allow(dead_code)] // only `render` is used here; `main` belongs to the example binary
#[path = "../examples/rate_table.rs"]
mod rate_table;

#[test]
fn doc_table_is_current() {
    let doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/qkd-sim.md"));
    let table = rate_table::render();
    assert!(
        doc.contains(&table),
        "docs/qkd-sim.md is stale; regenerate its table with \
         `cargo run -p qkd-physics --example rate_table`:\n{table}"
    );
}
