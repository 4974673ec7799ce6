//! Load and crashes across two real kmd processes on one simulated link: hundreds of concurrent
//! `enc_keys` at both sites at once never hand out a key ID twice, and every key handed out at
//! one site is fetched once at the other; `kill -9` of either kmd in the middle of such load,
//! then a restart, loses no key that was delivered for encryption and serves none twice.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{Daemon, Ready, Site, fast_link, free_port, sae_client, site_config};
use etsi014::client::{Etsi014Client, Etsi014Error};

/// Concurrent requests per site and burst.
const CONCURRENT: usize = 200;

struct TwoSites {
    site_a: Site,
    site_b: Site,
    config_a: std::path::PathBuf,
    config_b: std::path::PathBuf,
    ca_pem: String,
}

fn two_sites(alice: &str, bob: &str) -> TwoSites {
    let site_a = Site::new();
    let site_b = Site::new();
    let ca_pem = site_a.ca.ca_pem();
    std::fs::write(&site_b.ca_cert, &ca_pem).unwrap();
    site_a.ca.server(&["localhost", "127.0.0.1"]).unwrap().write(site_b.path(), "kmd").unwrap();
    site_a.ca.client("KME-B").unwrap().write(site_b.path(), "peer").unwrap();
    let (peer_a, peer_b) = (free_port(), free_port());
    let config_a = site_a
        .write_config(&site_config(&site_a, "KME-A", "KME-B", "A-mail", "B-mail", alice, peer_a, peer_b));
    let config_b =
        site_b.write_config(&site_config(&site_b, "KME-B", "KME-A", "B-mail", "A-mail", bob, peer_b, peer_a));
    TwoSites { site_a, site_b, config_a, config_b, ca_pem }
}

/// Waits until `client` (master) sees at least `keys` keys for `slave`.
async fn wait_for_keys(client: &Etsi014Client, slave: &str, keys: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(s) = client.status(slave).await
            && s.stored_key_count >= keys
        {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: fewer than {keys} keys after 180 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `n` concurrent single-key `enc_keys`; returns the keys handed out and how many requests failed.
async fn burst(client: &Etsi014Client, slave: &str, n: usize) -> (Vec<(String, Vec<u8>)>, usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let client = client.clone();
        let slave = slave.to_owned();
        tasks.spawn(async move { client.enc_keys(&slave, 1, None).await });
    }
    let (mut keys, mut failed) = (Vec::new(), 0);
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(c) => keys.extend(c.keys.into_iter().map(|k| (k.key_id, k.key.as_bytes().to_vec()))),
            Err(e) => {
                if failed == 0 {
                    eprintln!("first failed request: {e}");
                }
                failed += 1
            }
        }
    }
    (keys, failed)
}

/// Fetches every key at the slave's kmd, concurrently, and checks the bytes; then checks a
/// second fetch is refused.
async fn fetch_all_once(slave_client: &Etsi014Client, master: &str, keys: &[(String, Vec<u8>)], what: &str) {
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in keys.chunks(10) {
        let client = slave_client.clone();
        let master = master.to_owned();
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
            (chunk.clone(), client.dec_keys(&master, &ids).await)
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (chunk, answer) = r.unwrap();
        let got = answer.unwrap_or_else(|e| panic!("{what}: dec_keys failed: {e}"));
        let by_id: HashMap<&str, &[u8]> =
            got.keys.iter().map(|k| (k.key_id.as_str(), k.key.as_bytes())).collect();
        for (id, bytes) in &chunk {
            assert_eq!(
                by_id.get(id.as_str()).copied(),
                Some(bytes.as_slice()),
                "{what}: key {id} differs or missing"
            );
        }
        let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
        let again = slave_client.dec_keys(master, &ids).await;
        assert_eq!(
            again.as_ref().err().and_then(Etsi014Error::status),
            Some(400),
            "{what}: second fetch {again:?}"
        );
    }
}

fn assert_unique(keys: &[(String, Vec<u8>)], seen: &mut HashSet<String>, what: &str) {
    for (id, _) in keys {
        assert!(seen.insert(id.clone()), "{what}: key ID {id} handed out twice");
    }
}

#[test]
fn hundreds_of_concurrent_requests_at_both_sites_hand_out_each_key_once() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let _guard = runtime.enter();
    let sim = qkd_sim::Simulator::start(fast_link(), None).unwrap();
    let s = two_sites(sim.pty_path(qkd_sim::End::Alice), sim.pty_path(qkd_sim::End::Bob));
    let mut kmd_a = Daemon::start(&s.site_a, &s.config_a, None);
    let mut kmd_b = Daemon::start(&s.site_b, &s.config_b, None);
    let (ready_a, ready_b): (Ready, Ready) = (kmd_a.wait_ready(), kmd_b.wait_ready());
    let a_mail = sae_client(&s.site_a, &s.ca_pem, ready_a.etsi014, "A-mail");
    let b_mail = sae_client(&s.site_a, &s.ca_pem, ready_b.etsi014, "B-mail");

    runtime.block_on(async {
        wait_for_keys(&a_mail, "B-mail", CONCURRENT as u64, "A").await;
        wait_for_keys(&b_mail, "A-mail", CONCURRENT as u64, "B").await;
        // Both sites at once.
        let ((keys_a, failed_a), (keys_b, failed_b)) =
            tokio::join!(burst(&a_mail, "B-mail", CONCURRENT), burst(&b_mail, "A-mail", CONCURRENT));
        let mut seen = HashSet::new();
        assert_unique(&keys_a, &mut seen, "A");
        assert_unique(&keys_b, &mut seen, "B");
        // The pool held enough for every request: each one got its key.
        assert_eq!((keys_a.len(), failed_a), (CONCURRENT, 0), "A");
        assert_eq!((keys_b.len(), failed_b), (CONCURRENT, 0), "B");
        fetch_all_once(&b_mail, "A-mail", &keys_a, "A's keys at B").await;
        fetch_all_once(&a_mail, "B-mail", &keys_b, "B's keys at A").await;
    });
    assert!(kmd_a.stop().success());
    assert!(kmd_b.stop().success());
    drop(sim);
}

#[test]
fn kill_9_under_load_loses_no_delivered_key_and_serves_none_twice() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let _guard = runtime.enter();
    let sim = qkd_sim::Simulator::start(fast_link(), None).unwrap();
    let s = two_sites(sim.pty_path(qkd_sim::End::Alice), sim.pty_path(qkd_sim::End::Bob));
    let mut kmd_a = Daemon::start(&s.site_a, &s.config_a, None);
    let mut kmd_b = Daemon::start(&s.site_b, &s.config_b, None);
    let (mut ready_a, mut ready_b) = (kmd_a.wait_ready(), kmd_b.wait_ready());
    let mut seen = HashSet::new();

    for victim in ["A", "B"] {
        let a_mail = sae_client(&s.site_a, &s.ca_pem, ready_a.etsi014, "A-mail");
        let delivered = runtime.block_on(async {
            wait_for_keys(&a_mail, "B-mail", CONCURRENT as u64, "A").await;
            // Load at A; kill -9 the victim while it runs.
            let load = burst(&a_mail, "B-mail", CONCURRENT);
            let kill = async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let daemon = if victim == "A" { &kmd_a } else { &kmd_b };
                daemon.signal(nix::sys::signal::Signal::SIGKILL);
            };
            let ((keys, failed), ()) = tokio::join!(load, kill);
            assert!(failed > 0, "kill -9 of {victim} came after the whole burst: nothing was interrupted");
            keys
        });
        assert_unique(&delivered, &mut seen, &format!("burst with {victim} killed"));
        let _ = (if victim == "A" { &mut kmd_a } else { &mut kmd_b }).wait_exit(Duration::from_secs(10));

        // Restart the victim with the same store and token.
        if victim == "A" {
            kmd_a = Daemon::start(&s.site_a, &s.config_a, None);
            ready_a = kmd_a.wait_ready();
        } else {
            kmd_b = Daemon::start(&s.site_b, &s.config_b, None);
            ready_b = kmd_b.wait_ready();
        }
        let a_mail = sae_client(&s.site_a, &s.ca_pem, ready_a.etsi014, "A-mail");
        let b_mail = sae_client(&s.site_a, &s.ca_pem, ready_b.etsi014, "B-mail");
        runtime.block_on(async {
            // Every key A's SAE got before the crash is at B, once.
            fetch_all_once(
                &b_mail,
                "A-mail",
                &delivered,
                &format!("keys delivered before kill -9 of {victim}"),
            )
            .await;
            // New keys after the restart never repeat an ID handed out before.
            wait_for_keys(&a_mail, "B-mail", 20, "A after restart").await;
            let (more, _) = burst(&a_mail, "B-mail", 20).await;
            assert!(!more.is_empty(), "no key after restarting {victim}");
            assert_unique(&more, &mut seen, &format!("after restarting {victim}"));
            fetch_all_once(&b_mail, "A-mail", &more, &format!("keys after restarting {victim}")).await;
        });
    }
    assert!(kmd_a.stop().success());
    assert!(kmd_b.stop().success());
    drop(sim);
}
