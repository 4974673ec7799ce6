//! The Yocto layer `yocto/meta-qutemail`: oelint-adv (PyPI, offline) finds nothing in any recipe,
//! the generated crate lists match Cargo.lock, and the recipes install the units that exist in
//! `image/systemd/` (the same files the Debian image ships).
//!
//! oelint-adv comes from tests/python-requirements.txt (`QUTEMAIL_PYTHON`, the venv of
//! `cargo xtask test`). The only suppressions are inline `# nooelint:` comments in the layer,
//! each with its reason beside it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qutemail_e2e::workspace_root;

/// The Yocto release the layer targets (conf/layer.conf, LAYERSERIES_COMPAT).
const RELEASE: &str = "scarthgap";

fn python() -> String {
    std::env::var("QUTEMAIL_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn layer() -> PathBuf {
    workspace_root().join("yocto/meta-qutemail")
}

fn files_with_extension(dir: &Path, extensions: &[&str], out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_with_extension(&path, extensions, out);
        } else if path.extension().is_some_and(|e| extensions.iter().any(|x| e == *x)) {
            out.push(path);
        }
    }
}

fn recipes() -> Vec<PathBuf> {
    let mut found = Vec::new();
    files_with_extension(&layer(), &["bb", "bbappend"], &mut found);
    found.sort();
    found
}

fn oelint(dir: &Path, files: &[PathBuf]) -> Output {
    let out = Command::new(python())
        .args(["-m", "oelint_adv", "--release", RELEASE, "--quiet", "--relpaths", "--jobs", "1"])
        .args(files)
        .current_dir(dir)
        .output()
        .expect("running python -m oelint_adv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named oelint_adv"),
        "oelint-adv is not installed for {}: pip install -r tests/python-requirements.txt, or run \
         `cargo xtask test` (QUTEMAIL_PYTHON points at its venv)",
        python()
    );
    out
}

#[test]
fn oelint_adv_finds_nothing_in_any_recipe_of_the_layer() {
    let recipes = recipes();
    let names: Vec<String> =
        recipes.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for wanted in ["kmd_git.bb", "qutemail-gateway_git.bb", "qkd-sim_git.bb", "qutemail-image.bb"] {
        assert!(names.iter().any(|n| n == wanted), "{wanted} missing from the layer: {names:?}");
    }
    let out = oelint(&layer(), &recipes);
    let findings =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && findings.trim().is_empty(), "oelint-adv on {names:?}:\n{findings}");
}

/// The lint above is only worth something if oelint-adv reports a bad recipe: one without a
/// license and with its variables out of order is reported.
#[test]
fn oelint_adv_reports_a_recipe_that_breaks_the_style_guide() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("broken_1.0.bb");
    std::fs::write(&recipe, "inherit cargo\nSUMMARY = \"no license, inherit before the metadata\"\n")
        .unwrap();
    let out = oelint(dir.path(), &[recipe]);
    let findings =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "oelint-adv accepted a recipe without a license:\n{findings}");
    assert!(findings.contains("oelint.var.mandatoryvar.LICENSE"), "{findings}");
}

#[test]
fn the_committed_crate_lists_match_cargo_lock() {
    let out = Command::new(python())
        .arg(workspace_root().join("yocto/scripts/gen-crates-inc"))
        .arg("--check")
        .output()
        .expect("running yocto/scripts/gen-crates-inc --check");
    assert!(
        out.status.success(),
        "the recipes' *-crates.inc are out of date with Cargo.lock; run yocto/scripts/gen-crates-inc:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every crate of the lock file is fetched: the list is not empty, and has its checksums.
    let inc = std::fs::read_to_string(layer().join("recipes-qutemail/kmd/kmd-crates.inc")).unwrap();
    let lock = std::fs::read_to_string(workspace_root().join("Cargo.lock")).unwrap();
    let from_crates_io =
        lock.matches("source = \"registry+https://github.com/rust-lang/crates.io-index\"").count();
    assert!(from_crates_io > 100, "{from_crates_io}");
    assert_eq!(inc.matches("crate://crates.io/").count(), from_crates_io);
    assert_eq!(inc.matches(".sha256sum] = \"").count(), from_crates_io);
}

#[test]
fn the_recipes_install_every_unit_of_image_systemd_and_nothing_else() {
    let mut recipe_text = String::new();
    let mut files = Vec::new();
    files_with_extension(&layer(), &["bb", "inc"], &mut files);
    for f in files.iter().filter(|f| !f.to_string_lossy().ends_with("-crates.inc")) {
        recipe_text.push_str(&std::fs::read_to_string(f).unwrap());
    }
    // The gateway's sockets are installed in a loop over GATEWAY_SOCKETS.
    let sockets_line =
        recipe_text.lines().find(|l| l.starts_with("GATEWAY_SOCKETS = ")).expect("GATEWAY_SOCKETS");
    let sockets: Vec<&str> = sockets_line.split('"').nth(1).unwrap().split_whitespace().collect();
    let units_dir = workspace_root().join("image/systemd");
    let mut units: Vec<String> = std::fs::read_dir(&units_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service") || n.ends_with(".socket"))
        .collect();
    units.sort();
    assert!(units.iter().any(|u| u == "qutemail-kmd.service"), "{units:?}");
    for unit in &units {
        let by_loop = unit
            .strip_prefix("qutemail-gateway-")
            .and_then(|s| s.strip_suffix(".socket"))
            .is_some_and(|s| sockets.contains(&s));
        assert!(
            by_loop || recipe_text.contains(&format!("image/systemd/{unit}")),
            "no recipe installs image/systemd/{unit}"
        );
    }
    for s in &sockets {
        assert!(
            units_dir.join(format!("qutemail-gateway-{s}.socket")).is_file(),
            "GATEWAY_SOCKETS names {s}, no unit"
        );
    }
    // Every other file the recipes take from image/systemd/ exists (names built from a loop
    // variable, the sockets, were checked above).
    for reference in recipe_text.split("${S}/image/systemd/").skip(1) {
        let name: String = reference.chars().take_while(|c| !c.is_whitespace() && *c != '$').collect();
        if !name.is_empty() && !reference[name.len()..].starts_with('$') {
            assert!(
                units_dir.join(&name).is_file(),
                "a recipe installs image/systemd/{name}, which does not exist"
            );
        }
    }
}
