//! Schemathesis (a third-party, property-based API tester) against the live API: every
//! operation of the served OpenAPI document is called with generated good and bad input, over
//! HTTPS, authenticated as an admin, and must answer as documented.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use qutemail_hsm::testing::isolated;
use qutemail_store::Backend;

#[test]
fn schemathesis_finds_the_api_as_documented() {
    isolated("schemathesis_finds_the_api_as_documented", &[TOKEN], |env| {
        let python = std::env::var("QUTEMAIL_PYTHON").expect(
            "QUTEMAIL_PYTHON must name a Python with the packages of tests/python-requirements.txt \
             (`cargo xtask test` sets it)",
        );
        runtime().block_on(async {
            let s = Site::start(env, Backend::Sqlite).await;
            let (token, _) = s.login("alice", PASSWORD).await;
            let ca = s.dir.join("ca.pem");
            let url = format!("https://127.0.0.1:{}/api/openapi.json", s.addr.port());
            let mut st = std::process::Command::new(&python);
            st.args(["-m", "schemathesis.cli", "run", &url])
                .args(["--header", &format!("Authorization: Bearer {token}")])
                .args(["--tls-verify", ca.to_str().unwrap()])
                .args(["--checks", "all"])
                // positive_data_acceptance: the schema types every field but cannot express the
                // semantic rules (an address that exists, a user name that is free, a password
                // policy, an upload id that is the caller's), so valid-by-schema input is
                // rightly refused with a documented 4xx.
                .args(["--exclude-checks", "positive_data_acceptance"])
                // Logout and password change would end the session the run authenticates with;
                // their behaviour is covered by tests/api.rs.
                .args(["--exclude-path", "/api/auth/logout/", "--exclude-path", "/api/auth/password/"])
                .args(["--max-examples", "15", "--workers", "1", "--seed", "7", "--no-color"])
                .args(["--request-timeout", "30", "--generation-deterministic"])
                .env("SCHEMATHESIS_HOOKS", "")
                .current_dir(&s.dir);
            // The server keeps serving on the runtime while schemathesis runs on this thread pool.
            let out = tokio::task::spawn_blocking(move || st.output())
                .await
                .unwrap()
                .expect("running schemathesis");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            println!("{stdout}");
            eprintln!("{stderr}");
            assert!(out.status.success(), "schemathesis found operations that do not answer as documented");
            assert!(stdout.contains("passed"), "schemathesis ran no operation");
        })
    });
}
