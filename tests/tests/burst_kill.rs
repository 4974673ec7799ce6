//! Issue 5's crash promise with every part real (the two-site demo: qkd-sim, two kmds, SoftHSM,
//! two `qutemail serve` gateways). Alice at A submits a burst of 1,000 numbered messages to Bob
//! at B with Python's smtplib (STARTTLS + AUTH, several connections at once). In the middle of
//! the burst one gateway is killed with SIGKILL and started again the way the demo starts it
//! (same binary, same configuration, same token). Once A's queue is empty, Bob's INBOX (read
//! over IMAP) holds every message that got a 250 at A, nothing that was refused or never sent,
//! and the sampled messages byte for byte as they were submitted. Each arrives exactly once:
//! when a gateway dies between B storing a message and A recording the delivery, A re-seals the
//! retry under new QKD keys and B recognises the repeat by its verified sender site and bound
//! Message-ID (`qutemail_gateway_peer_repeated_deliveries_total` counts them).
//!
//! First B is killed (A's queue keeps the messages and retries), then A (its queue resumes
//! after the restart).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qutemail_e2e::{DemoGateway, LiveDemo, python, wait_for, workspace_root};

/// The burst the issue names.
const MESSAGES: usize = 1000;
/// SMTP connections submitting at once.
const CONNECTIONS: usize = 8;
/// The gateway is killed once this many messages were accepted.
const KILL_AFTER: usize = 300;

/// What the submitting client saw, per message number.
#[derive(Debug, Default)]
struct Outcomes {
    accepted: BTreeSet<usize>,
    in_doubt: BTreeSet<usize>,
    refused: BTreeMap<usize, String>,
}

fn outcomes(dir: &Path) -> Outcomes {
    let mut o = Outcomes::default();
    for line in std::fs::read_to_string(dir.join("progress")).unwrap_or_default().lines() {
        let mut words = line.splitn(2, ' ');
        let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse().ok()), words.next()) else {
            continue;
        };
        match what {
            "accepted" => o.accepted.insert(n),
            "in-doubt" => o.in_doubt.insert(n),
            refused => o.refused.insert(n, refused.to_owned()).is_none(),
        };
    }
    o
}

/// Starts the burst from Alice at A to Bob at B; returns the client process.
fn start_burst(a: &serde_json::Value, b: &serde_json::Value, run: &str, dir: &Path) -> Child {
    Command::new(python())
        .arg(workspace_root().join("tests/clients/burst_submit.py"))
        .arg(a["gateway"]["smtp_submission"].as_str().unwrap())
        .arg(a["gateway"]["tls_ca"].as_str().unwrap())
        .arg(a["users"][0]["address"].as_str().unwrap())
        .arg(a["users"][0]["password"].as_str().unwrap())
        .arg(a["users"][0]["address"].as_str().unwrap())
        .arg(b["users"][0]["address"].as_str().unwrap())
        .arg(MESSAGES.to_string())
        .arg(CONNECTIONS.to_string())
        .arg(run)
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (QUTEMAIL_PYTHON)")
}

/// Bob's INBOX at B over IMAP: how many copies of each of this run's markers it holds.
fn markers_at_b(b: &serde_json::Value, run: &str, dir: &Path) -> BTreeMap<usize, u64> {
    let out = Command::new(python())
        .arg(workspace_root().join("tests/clients/imap_markers.py"))
        .arg(b["gateway"]["imap"].as_str().unwrap())
        .arg(b["gateway"]["tls_ca"].as_str().unwrap())
        .arg(b["users"][0]["address"].as_str().unwrap())
        .arg(b["users"][0]["password"].as_str().unwrap())
        .arg(run)
        .arg(dir)
        .output()
        .expect("python3");
    assert!(out.status.success(), "imaplib: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["markers"].as_object().unwrap().iter().map(|(n, c)| (n.parse().unwrap(), c.as_u64().unwrap())).collect()
}

/// One burst with `victim` killed mid-way and restarted; checks exactly-once delivery.
fn burst_with_a_kill(demo: &LiveDemo, gateways: &mut [DemoGateway; 2], victim: usize, run: &str) {
    let dir = demo.dir.path().join(format!("burst-{run}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (gateways[0].site.clone(), gateways[1].site.clone());
    let started = Instant::now();
    let mut burst = start_burst(&a, &b, run, &dir);
    wait_for("the first accepted messages", Duration::from_secs(240), || {
        outcomes(&dir).accepted.len() >= KILL_AFTER
    });
    let name = if victim == 0 { "A" } else { "B" };
    gateways[victim].kill_hard();
    eprintln!(
        "burst {run}: gateway {name} killed after {:?} ({} accepted)",
        started.elapsed(),
        outcomes(&dir).accepted.len()
    );
    gateways[victim].restart(&demo.dir.path().join("logs").join(format!("qutemail-{name}.restarted.log")));
    eprintln!("burst {run}: gateway {name} back after {:?}", started.elapsed());

    let status = burst.wait().unwrap();
    let mut report = String::new();
    std::io::Read::read_to_string(burst.stdout.as_mut().unwrap(), &mut report).unwrap();
    let mut errors = String::new();
    std::io::Read::read_to_string(burst.stderr.as_mut().unwrap(), &mut errors).unwrap();
    assert!(status.success(), "the burst client failed: {errors}");
    let submitted = started.elapsed();
    let seen = outcomes(&dir);
    assert_eq!(
        seen.accepted.len() + seen.in_doubt.len() + seen.refused.len(),
        MESSAGES,
        "every message has an outcome: {report}"
    );
    assert!(seen.refused.is_empty(), "refused at submission: {:?}", seen.refused);

    wait_for("A's queue to empty", Duration::from_secs(300), || {
        gateways[0].qutemailctl(&["queue", "list"]).contains("the queue is empty")
    });
    let delivered = started.elapsed();
    let at_b = markers_at_b(&b, run, &dir);
    let missing: Vec<usize> = seen.accepted.iter().copied().filter(|n| !at_b.contains_key(n)).collect();
    let duplicated: Vec<(usize, u64)> = at_b.iter().filter(|(_, c)| **c > 1).map(|(n, c)| (*n, *c)).collect();
    let extra: Vec<usize> =
        at_b.keys().copied().filter(|n| !seen.accepted.contains(n) && !seen.in_doubt.contains(n)).collect();
    eprintln!(
        "burst {run} (kill {name}): {report} submitted in {submitted:?}, all at B after {delivered:?}; \
         {} accepted, {} in doubt ({} of them delivered), at B {} distinct",
        seen.accepted.len(),
        seen.in_doubt.len(),
        seen.in_doubt.iter().filter(|n| at_b.contains_key(n)).count(),
        at_b.len()
    );
    assert!(missing.is_empty(), "accepted with 250 but lost: {missing:?}");
    assert!(duplicated.is_empty(), "delivered more than once (message, copies): {duplicated:?}");
    assert!(extra.is_empty(), "delivered but never accepted or attempted: {extra:?}");
    // Byte for byte: Bob's copy ends with exactly what Alice's client sent.
    let mut compared = 0;
    for n in seen.accepted.iter().filter(|n| *n % 50 == 0) {
        let sent = std::fs::read(dir.join(format!("sent-{n}.eml"))).unwrap();
        let got = std::fs::read(dir.join(format!("got-{n}.eml"))).unwrap();
        assert!(got.ends_with(&sent), "message {n} at B is not the message submitted");
        assert!(got.starts_with(b"X-QKD-Secure: True\r\n"), "message {n} was quantum-secured");
        compared += 1;
    }
    assert!(compared > 0, "no sampled message to compare");
}

#[test]
fn a_burst_survives_kill_9_of_either_gateway_exactly_once() {
    // Built first, without the demo's start-up limit: on a busy machine the build alone can
    // take longer than that.
    let built = qutemail_e2e::cargo()
        .args(["build", "--quiet", "-p", "xtask", "-p", "qkd-sim", "-p", "kmd", "-p", "qutemail-gateway"])
        .status()
        .expect("cargo build");
    assert!(built.success(), "building the demo failed");
    let demo = LiveDemo::start();
    let mut gateways = [DemoGateway::of(&demo, "A"), DemoGateway::of(&demo, "B")];
    let stamp = format!(
        "{:x}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
    );
    burst_with_a_kill(&demo, &mut gateways, 1, &format!("{stamp}b"));
    burst_with_a_kill(&demo, &mut gateways, 0, &format!("{stamp}a"));
    drop(gateways);
    let (status, out) = demo.stop();
    assert!(status.success() || status.code() == Some(130), "demo: {out}");
}
