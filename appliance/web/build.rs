//! Embeds the webmail's static files: every regular file directly under `ui/` becomes an entry
//! of `UI_FILES` (name, bytes) through `include_bytes!`, so the binary carries the UI and a
//! missing or added file never breaks the build (the UI is written alongside this crate).

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let ui = Path::new(&manifest).join("ui");
    println!("cargo::rerun-if-changed={}", ui.display());
    let mut names: Vec<(String, String)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&ui) {
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
            // Only plain, safe names are served (no hidden or editor files).
            let safe = !name.starts_with('.')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                && !name.ends_with('~');
            if path.is_file() && safe {
                println!("cargo::rerun-if-changed={}", path.display());
                names.push((name, path.display().to_string()));
            }
        }
    }
    names.sort();
    let mut code = String::from("/// The webmail's files (name, bytes), embedded at build time.\n");
    code.push_str("pub(crate) static UI_FILES: &[(&str, &[u8])] = &[\n");
    for (name, path) in &names {
        let _ = writeln!(code, "    ({name:?}, include_bytes!({path:?})),");
    }
    code.push_str("];\n");
    let out = Path::new(&std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into())).join("ui_files.rs");
    if let Err(e) = std::fs::write(&out, code) {
        panic!("cannot write {}: {e}", out.display());
    }
}
