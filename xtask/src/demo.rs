//! `cargo xtask demo`: two sites joined by a simulated QKD link.
//!
//! The demo runs `qkd-sim` and, for each site, a real `kmd` process on that site's end of the
//! link (its own SoftHSM token, SQLite store and configuration), with one demo PKI for the
//! ETSI 014 listeners, the peer channel and the SAEs. `state.json` describes it (README.md).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use etsi014::client::{ClientOptions, ClientTlsConfig, Etsi014Client};
use serde::Serialize;

use crate::system;

const SIM_CONFIG: &str = include_str!("../demo/qkd-sim.toml");
const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TOKEN_LABEL: &str = "qutemail-demo";
const USER_PIN: &str = "demo-user-pin-4711";
const SO_PIN: &str = "demo-so-pin-0815";
const BAUD_RATE: u32 = 4_000_000;

/// Kills the demo's child processes however the demo ends (kmds first, then the simulator).
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (name, child) in self.0.iter_mut().rev() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("demo: stopped {name}");
        }
    }
}

/// What `state.json` says about the demo. Field names are a contract (see README.md).
#[derive(Serialize)]
struct DemoState {
    version: u32,
    state_dir: PathBuf,
    link: LinkState,
    sites: HashMap<&'static str, SiteState>,
}

#[derive(Serialize)]
struct LinkState {
    id: String,
    simulator_pid: u32,
    control_socket: PathBuf,
    simulator_config: PathBuf,
}

#[derive(Serialize)]
struct SiteState {
    name: &'static str,
    domain: &'static str,
    kme_id: &'static str,
    etsi014_url: String,
    ca_cert: PathBuf,
    saes: Vec<SaeState>,
    metrics_url: String,
    kmd_pid: u32,
    kmd_config: PathBuf,
    qkd_device: DeviceState,
    hsm: HsmState,
    gateway: GatewayState,
    users: Vec<UserState>,
    /// The site's webmail and REST API.
    web: WebState,
}

/// The site's web side (`[web]` of the gateway): webmail, admin console and REST API.
#[derive(Serialize)]
struct WebState {
    /// e.g. `https://127.0.0.1:8443/`.
    url: String,
    /// CA certificate that verifies the web server's certificate.
    tls_ca: PathBuf,
}

/// The site's mail gateway (`qutemail serve`).
#[derive(Serialize)]
struct GatewayState {
    config: PathBuf,
    pid: u32,
    site_card: PathBuf,
    tls_ca: PathBuf,
    smtp_mx: String,
    smtp_submission: String,
    pop3: String,
    pop3s: String,
    imap: String,
    imaps: String,
    /// The gateway's Prometheus metrics, e.g. `http://127.0.0.1:9471/metrics`.
    metrics: String,
}

/// A demo mail account.
#[derive(Serialize)]
struct UserState {
    address: &'static str,
    password: &'static str,
}

/// The site's SoftHSM token (kmd's, and the gateway's).
#[derive(Serialize)]
struct HsmState {
    module_path: &'static str,
    softhsm2_conf: PathBuf,
    token_label: &'static str,
    pin_file: PathBuf,
}

#[derive(Serialize, Clone)]
struct SaeState {
    sae_id: String,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Serialize)]
struct DeviceState {
    pty: String,
    device_id: String,
    role: &'static str,
    baud_rate: u32,
}

/// One site's fixed facts.
struct SiteSpec {
    name: &'static str,
    end: &'static str,
    role: &'static str,
    domain: &'static str,
    kme_id: &'static str,
    peer: usize,
    saes: [&'static str; 2],
    etsi_port: u16,
    metrics_port: u16,
    peer_port: u16,
    mx_port: u16,
    submission_port: u16,
    pop3_port: u16,
    pop3s_port: u16,
    imap_port: u16,
    imaps_port: u16,
    gateway_metrics_port: u16,
    web_port: u16,
    user: (&'static str, &'static str),
}

const SITES: [SiteSpec; 2] = [
    SiteSpec {
        name: "A",
        end: "alice",
        role: "transmitter",
        domain: "a.qutemail.test",
        kme_id: "KME-A",
        peer: 1,
        saes: ["A-mail", "A-app"],
        etsi_port: 8441,
        metrics_port: 9461,
        peer_port: 8451,
        mx_port: 2525,
        submission_port: 5870,
        pop3_port: 1100,
        pop3s_port: 9950,
        imap_port: 1430,
        imaps_port: 9930,
        gateway_metrics_port: 9471,
        web_port: 8443,
        user: ("alice@a.qutemail.test", "alice-demo-password"),
    },
    SiteSpec {
        name: "B",
        end: "bob",
        role: "receiver",
        domain: "b.qutemail.test",
        kme_id: "KME-B",
        peer: 0,
        saes: ["B-mail", "B-app"],
        etsi_port: 8442,
        metrics_port: 9462,
        peer_port: 8452,
        mx_port: 2526,
        submission_port: 5871,
        pop3_port: 1101,
        pop3s_port: 9951,
        imap_port: 1431,
        imaps_port: 9931,
        gateway_metrics_port: 9472,
        web_port: 8444,
        user: ("bob@b.qutemail.test", "bob-demo-password"),
    },
];

pub fn run(state_dir: Option<PathBuf>, release: bool, check: bool) -> anyhow::Result<()> {
    let profile = if release { "release" } else { "debug" };
    let mut build = system::cargo();
    build.args(["build", "--quiet", "-p", "qkd-sim", "-p", "kmd", "-p", "qutemail-gateway"]);
    if release {
        build.arg("--release");
    }
    if !build.status().context("running cargo build")?.success() {
        bail!("building the demo's binaries failed");
    }
    if !Path::new(SOFTHSM_MODULE).is_file() {
        if !system::is_root() {
            bail!(
                "SoftHSM2 is not installed ({SOFTHSM_MODULE} is missing): run `apt-get install -y softhsm2` as root"
            );
        }
        system::ensure_packages(&[("softhsm2", "the demo's kmd keeps its wrapping key in SoftHSM")], true)?;
        if !Path::new(SOFTHSM_MODULE).is_file() {
            bail!("{SOFTHSM_MODULE} is still missing after installing softhsm2");
        }
    }
    for s in &SITES {
        for port in [
            s.etsi_port,
            s.metrics_port,
            s.peer_port,
            s.mx_port,
            s.submission_port,
            s.pop3_port,
            s.pop3s_port,
            s.gateway_metrics_port,
            s.web_port,
        ] {
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                bail!("site {}: port 127.0.0.1:{port} is busy (is another demo running?)", s.name);
            }
        }
    }
    let bin = system::target_dir(profile);
    let dir = match state_dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("qutemail-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(dir.join("logs")).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let _ = std::fs::remove_file(dir.join("state.json"));

    // PKI: one demo CA signs the kmd server certificates, the peer certificates and the SAEs.
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki)?;
    let ca = etsi014::pki::Ca::new("QuteMail demo CA")?;
    let ca_pem = ca.ca_pem();
    let ca_cert = pki.join("ca.pem");
    std::fs::write(&ca_cert, &ca_pem)?;
    let mut saes: Vec<Vec<SaeState>> = Vec::new();
    for s in &SITES {
        ca.server(&["localhost", "127.0.0.1"])?.write(&pki, &format!("kmd-{}", s.name))?;
        ca.client(s.kme_id)?.write(&pki, &format!("peer-{}", s.name))?;
        ca.server(&["localhost", "127.0.0.1", s.domain])?.write(&pki, &format!("mail-{}", s.name))?;
        let mut list = Vec::new();
        for sae in s.saes {
            ca.client(sae)?.write(&pki, sae)?;
            list.push(SaeState {
                sae_id: sae.to_string(),
                cert: pki.join(format!("{sae}.pem")),
                key: pki.join(format!("{sae}.key")),
            });
        }
        saes.push(list);
    }

    // SoftHSM tokens, one per site.
    for s in &SITES {
        let hsm = dir.join("hsm").join(s.name);
        let tokens = hsm.join("tokens");
        let _ = std::fs::remove_dir_all(&hsm);
        std::fs::create_dir_all(&tokens)?;
        std::fs::create_dir_all(dir.join("store").join(s.name))?;
        let conf = hsm.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )?;
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", TOKEN_LABEL, "--pin", USER_PIN, "--so-pin", SO_PIN])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .context("running softhsm2-util (apt-get install -y softhsm2)")?;
        if !out.status.success() {
            bail!("softhsm2-util --init-token failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        write_private(&hsm.join("pin"), &format!("{USER_PIN}\n"))?;
    }

    let sim_config = dir.join("qkd-sim.toml");
    std::fs::write(&sim_config, SIM_CONFIG)?;
    let control_socket = dir.join("qkd-sim.sock");
    let sim_state = dir.join("qkd-sim.json");
    let _ = std::fs::remove_file(&sim_state);
    let log = std::fs::File::create(dir.join("logs/qkd-sim.log"))?;
    let sim = Command::new(bin.join("qkd-sim"))
        .arg("run")
        .arg("--config")
        .arg(&sim_config)
        .arg("--control-socket")
        .arg(&control_socket)
        .arg("--state-file")
        .arg(&sim_state)
        .args(["--print-every", "0"])
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .context("starting qkd-sim")?;
    let simulator_pid = sim.id();
    let mut children = Children(vec![("qkd-sim".into(), sim)]);

    let sim_info: serde_json::Value = wait_for_json(&sim_state, Duration::from_secs(30))?;
    let pty = |end: &str| sim_info[end]["pty"].as_str().unwrap_or_default().to_string();
    let device_id = |end: &str| sim_info[end]["device_id"].as_str().unwrap_or_default().to_string();

    let mut pids = Vec::new();
    let mut configs = Vec::new();
    for s in &SITES {
        let peer = &SITES[s.peer];
        let config = dir.join(format!("kmd-{}.toml", s.name));
        std::fs::write(
            &config,
            kmd_config(&dir, s, peer, &pty(s.end), sim_info["link_id"].as_str().unwrap_or("link-a-b")),
        )?;
        let log = std::fs::File::create(dir.join(format!("logs/kmd-{}.log", s.name)))?;
        let child = Command::new(bin.join("kmd"))
            .arg("--config")
            .arg(&config)
            .env("SOFTHSM2_CONF", dir.join("hsm").join(s.name).join("softhsm2.conf"))
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting kmd {}", s.name))?;
        pids.push(child.id());
        configs.push(config);
        children.0.push((format!("kmd {}", s.name), child));
    }

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(async {
        let mut clients = Vec::new();
        for (s, list) in SITES.iter().zip(&saes) {
            let tls = ClientTlsConfig::from_files(&ca_cert, &list[0].cert, &list[0].key)?;
            let options = ClientOptions { timeout: Duration::from_secs(5), ..ClientOptions::default() };
            clients.push(Etsi014Client::with_options(&format!("https://127.0.0.1:{}", s.etsi_port), tls, options)?);
        }
        let started = Instant::now();
        loop {
            let mut ready = true;
            for (i, (s, client)) in SITES.iter().zip(&clients).enumerate() {
                if let Some(Ok(status)) = children.0.get_mut(i + 1).map(|(_, c)| c.try_wait())
                    && let Some(status) = status
                {
                    bail!("kmd {} exited ({status}); see {}/logs/kmd-{}.log", s.name, dir.display(), s.name);
                }
                match client.status(SITES[s.peer].saes[0]).await {
                    Ok(st) if s.name != "A" || st.stored_key_count > 0 => {}
                    _ => ready = false,
                }
            }
            if ready {
                break;
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("the kmds were not ready with keys within 120 s; see {}/logs", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let gateway_pids = start_gateways(&dir, &bin, &mut children)?;
        let site_state = |i: usize| {
            let s = &SITES[i];
            SiteState {
                name: s.name,
                domain: s.domain,
                kme_id: s.kme_id,
                etsi014_url: format!("https://127.0.0.1:{}", s.etsi_port),
                ca_cert: ca_cert.clone(),
                saes: saes[i].clone(),
                metrics_url: format!("http://127.0.0.1:{}/metrics", s.metrics_port),
                kmd_pid: pids[i],
                kmd_config: configs[i].clone(),
                qkd_device: DeviceState { pty: pty(s.end), device_id: device_id(s.end), role: s.role, baud_rate: BAUD_RATE },
                hsm: HsmState {
                    module_path: SOFTHSM_MODULE,
                    softhsm2_conf: dir.join("hsm").join(s.name).join("softhsm2.conf"),
                    token_label: TOKEN_LABEL,
                    pin_file: dir.join("hsm").join(s.name).join("pin"),
                },
                gateway: GatewayState {
                    config: dir.join(format!("qutemail-{}.toml", s.name)),
                    pid: gateway_pids[i],
                    site_card: dir.join("cards").join(format!("{}.json", s.domain)),
                    tls_ca: ca_cert.clone(),
                    smtp_mx: format!("127.0.0.1:{}", s.mx_port),
                    smtp_submission: format!("127.0.0.1:{}", s.submission_port),
                    pop3: format!("127.0.0.1:{}", s.pop3_port),
                    pop3s: format!("127.0.0.1:{}", s.pop3s_port),
                    imap: format!("127.0.0.1:{}", s.imap_port),
                    imaps: format!("127.0.0.1:{}", s.imaps_port),
                    metrics: format!("http://127.0.0.1:{}/metrics", s.gateway_metrics_port),
                },
                users: vec![UserState { address: s.user.0, password: s.user.1 }],
                web: WebState { url: format!("https://127.0.0.1:{}/", s.web_port), tls_ca: ca_cert.clone() },
            }
        };
        let state = DemoState {
            version: 1,
            state_dir: dir.clone(),
            link: LinkState {
                id: sim_info["link_id"].as_str().unwrap_or_default().to_string(),
                simulator_pid,
                control_socket: control_socket.clone(),
                simulator_config: sim_config.clone(),
            },
            sites: HashMap::from([("A", site_state(0)), ("B", site_state(1))]),
        };
        write_atomically(&dir.join("state.json"), &serde_json::to_vec_pretty(&state)?)?;
        println!("QuteMail demo is up. State: {}", dir.join("state.json").display());
        println!("  QKD link {}: site A on {}, site B on {}", state.link.id, pty("alice"), pty("bob"));
        for spec in &SITES {
            let s = &state.sites[spec.name];
            println!("  site {}: kmd {} (pid {}) ETSI 014 at {}, metrics {}", s.name, s.kme_id, s.kmd_pid, s.etsi014_url, s.metrics_url);
            println!("  site {}: mail gateway (pid {}) SMTP MX {}, submission {} (STARTTLS), POP3 {} (STLS) / {} (TLS), IMAP {} (STARTTLS) / {} (TLS); user {} / {}",
                s.name, s.gateway.pid, s.gateway.smtp_mx, s.gateway.smtp_submission, s.gateway.pop3, s.gateway.pop3s,
                s.gateway.imap, s.gateway.imaps, s.users[0].address, s.users[0].password);
            println!("  site {}: webmail and REST API at {} (admin {}; CA {})", s.name, s.web.url, s.users[0].address, s.web.tls_ca.display());
        }
        println!("  Faults: {} ctl --socket {} fibre-cut on|off | eavesdrop 0.2 | noise both --flip-rate 0.001 | reboot alice",
            bin.join("qkd-sim").display(), control_socket.display());
        if check {
            return Ok(());
        }
        println!("Press Ctrl-C to stop.");
        let printer = async {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                let mut parts = Vec::new();
                for (s, client) in SITES.iter().zip(&clients) {
                    let keys = match client.status(SITES[s.peer].saes[0]).await {
                        Ok(st) => st.stored_key_count.to_string(),
                        Err(_) => "?".into(),
                    };
                    let (link, qber) = link_from_metrics(s.metrics_port);
                    parts.push(format!("site {}: keys {:>5} link {:<12} QBER {}", s.name, keys, link, qber));
                }
                println!("{}", parts.join(" | "));
            }
        };
        tokio::select! {
            () = printer => Ok(()),
            r = tokio::signal::ctrl_c() => r.map_err(Into::into),
        }
    });
    drop(rt);
    drop(children);
    result
}

/// The gateway configuration of site `s` (docs/gateway-config.md); `peer_card` once known.
fn gateway_config(dir: &Path, s: &SiteSpec, peer_card: Option<&Path>) -> String {
    let pki = dir.join("pki");
    let hsm = dir.join("hsm").join(s.name);
    let mail = dir.join("mail").join(s.name);
    let mut text = format!(
        r#"[site]
domain = "{domain}"
site_keys = "{mail}/site-keys.json"

[kmd]
etsi014_url = "https://127.0.0.1:{etsi}"
sae_id = "{sae}"
ca_cert = "{pki}/ca.pem"
client_cert = "{pki}/{sae}.pem"
client_key = "{pki}/{sae}.key"

[hsm]
module_path = "{SOFTHSM_MODULE}"
token = {{ label = "{TOKEN_LABEL}" }}
pin = {{ file = "{pin}" }}
wrapping_key_label = "qutemail-demo-gateway-kek"

[store]
sqlite = "{mail}/mail.sqlite"
blob_dir = "{mail}/blobs"

[tls]
cert = "{pki}/mail-{name}.pem"
key = "{pki}/mail-{name}.key"

[smtp]
hostname = "{domain}"
mx_listen = "127.0.0.1:{mx}"
submission_listen = "127.0.0.1:{sub}"

[pop3]
listen = "127.0.0.1:{pop3}"
tls_listen = "127.0.0.1:{pop3s}"

[imap]
listen = "127.0.0.1:{imap}"
tls_listen = "127.0.0.1:{imaps}"

[queue.retry]
delays_s = [5, 15, 60, 300]

# The demo's domains have no DNS: SPF/DKIM/DMARC checks of internet mail (on by default) would
# make plain mail to the MX wait with 451. Sealed mail from the peer site is checked by its
# certificate either way.
[mail_auth]
check = false

[metrics]
listen = "127.0.0.1:{gateway_metrics}"

[web]
listen = "127.0.0.1:{web}"
signup = true
admins = ["{user}"]
kmd_metrics_url = "http://127.0.0.1:{kmd_metrics}/metrics"
"#,
        domain = s.domain,
        mail = mail.display(),
        etsi = s.etsi_port,
        sae = s.saes[0],
        pki = pki.display(),
        pin = hsm.join("pin").display(),
        name = s.name,
        mx = s.mx_port,
        sub = s.submission_port,
        pop3 = s.pop3_port,
        pop3s = s.pop3s_port,
        imap = s.imap_port,
        imaps = s.imaps_port,
        gateway_metrics = s.gateway_metrics_port,
        web = s.web_port,
        user = s.user.0,
        kmd_metrics = s.metrics_port,
    );
    if let Some(card) = peer_card {
        let peer = &SITES[s.peer];
        text.push_str(&format!(
            r#"
[[peer]]
domain = "{}"
sae_id = "{}"
kme_id = "{}"
site_card = "{}"
smtp = "127.0.0.1:{}"
ca_cert = "{}/ca.pem"
"#,
            peer.domain,
            peer.saes[0],
            peer.kme_id,
            card.display(),
            peer.mx_port,
            pki.display()
        ));
    }
    text
}

/// Creates each site's gateway (site keys, the peer's card, the demo user) and starts
/// `qutemail serve`; returns their PIDs once both listen.
fn start_gateways(dir: &Path, bin: &Path, children: &mut Children) -> anyhow::Result<Vec<u32>> {
    let qutemail = bin.join("qutemail");
    let qutemailctl = bin.join("qutemailctl");
    let cards = dir.join("cards");
    std::fs::create_dir_all(&cards)?;
    let run = |s: &SiteSpec, args: &[&str], stdin: Option<&str>| -> anyhow::Result<()> {
        // Accounts are the operator tool's; `--config` may follow the first word in both.
        let mut cmd = Command::new(if args[0] == "users" { &qutemailctl } else { &qutemail });
        cmd.arg(args[0])
            .arg("--config")
            .arg(dir.join(format!("qutemail-{}.toml", s.name)))
            .args(&args[1..])
            .env("SOFTHSM2_CONF", dir.join("hsm").join(s.name).join("softhsm2.conf"))
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("running qutemail {}", args[0]))?;
        if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
            std::io::Write::write_all(&mut input, text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "qutemail {} (site {}) failed: {}",
                args.join(" "),
                s.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    for s in &SITES {
        std::fs::create_dir_all(dir.join("mail").join(s.name))?;
        std::fs::write(dir.join(format!("qutemail-{}.toml", s.name)), gateway_config(dir, s, None))?;
        let card = cards.join(format!("{}.json", s.domain));
        run(s, &["site-card", "--out", &card.display().to_string()], None)?;
    }
    let mut pids = Vec::new();
    for s in &SITES {
        let peer_card = cards.join(format!("{}.json", SITES[s.peer].domain));
        std::fs::write(
            dir.join(format!("qutemail-{}.toml", s.name)),
            gateway_config(dir, s, Some(&peer_card)),
        )?;
        let listed = Command::new(&qutemailctl)
            .args(["users", "list", "--config"])
            .arg(dir.join(format!("qutemail-{}.toml", s.name)))
            .env("SOFTHSM2_CONF", dir.join("hsm").join(s.name).join("softhsm2.conf"))
            .output()?;
        if !String::from_utf8_lossy(&listed.stdout).contains(s.user.0) {
            run(s, &["users", "add", s.user.0], Some(&format!("{}\n", s.user.1)))?;
        }
        let log = std::fs::File::create(dir.join(format!("logs/qutemail-{}.log", s.name)))?;
        let child = Command::new(&qutemail)
            .args(["serve", "--config"])
            .arg(dir.join(format!("qutemail-{}.toml", s.name)))
            .env("SOFTHSM2_CONF", dir.join("hsm").join(s.name).join("softhsm2.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the gateway of site {}", s.name))?;
        pids.push(child.id());
        children.0.push((format!("gateway {}", s.name), child));
    }
    let started = Instant::now();
    for s in &SITES {
        for port in [
            s.mx_port,
            s.submission_port,
            s.pop3_port,
            s.pop3s_port,
            s.imap_port,
            s.imaps_port,
            s.gateway_metrics_port,
            s.web_port,
        ] {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if started.elapsed() > Duration::from_secs(60) {
                    bail!(
                        "the gateway of site {} does not listen on {port}; see {}/logs/qutemail-{}.log",
                        s.name,
                        dir.display(),
                        s.name
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(pids)
}

/// kmd's configuration for site `s` (see docs/kmd-config.md); every path is absolute.
fn kmd_config(dir: &Path, s: &SiteSpec, peer: &SiteSpec, pty: &str, link_id: &str) -> String {
    let pki = dir.join("pki");
    let pki = pki.display();
    let hsm = dir.join("hsm").join(s.name);
    let saes: String = s
        .saes
        .iter()
        .map(|sae| {
            format!("[[sae]]\nsae_id = \"{sae}\"\ncommon_name = \"{sae}\"\nlinks = [\"{link_id}\"]\n\n")
        })
        .collect();
    format!(
        r#"[site]
kme_id = "{kme_id}"
name = "Site {name} ({domain})"

[hsm]
module_path = "{SOFTHSM_MODULE}"
token = {{ label = "{TOKEN_LABEL}" }}
pin = {{ file = "{pin}" }}
wrapping_key_label = "qutemail-demo-kek"
pool_size = 2

[store]
path = "{store}/keys.db"

[etsi014]
listen = "127.0.0.1:{etsi_port}"
server_cert = "{pki}/kmd-{name}.pem"
server_key = "{pki}/kmd-{name}.key"
client_ca = "{pki}/ca.pem"

{saes}[metrics]
listen = "127.0.0.1:{metrics_port}"

[log]
level = "info"
format = "text"

[[link]]
id = "{link_id}"
peer_kme_id = "{peer_kme_id}"
peer_url = "https://localhost:{peer_peer_port}"
peer_sae_ids = ["{p0}", "{p1}"]
device = {{ serial = {{ path = "{pty}", baud_rate = {BAUD_RATE} }} }}

[link.pool]
max_blocks = 2048
low_water = 256
high_water = 1024

[peer]
listen = "127.0.0.1:{peer_port}"
ca_cert = "{pki}/ca.pem"
server_cert = "{pki}/kmd-{name}.pem"
server_key = "{pki}/kmd-{name}.key"
client_cert = "{pki}/peer-{name}.pem"
client_key = "{pki}/peer-{name}.key"
"#,
        kme_id = s.kme_id,
        name = s.name,
        domain = s.domain,
        pin = hsm.join("pin").display(),
        store = dir.join("store").join(s.name).display(),
        etsi_port = s.etsi_port,
        metrics_port = s.metrics_port,
        peer_port = s.peer_port,
        peer_kme_id = peer.kme_id,
        peer_peer_port = peer.peer_port,
        p0 = peer.saes[0],
        p1 = peer.saes[1],
    )
}

/// The link state and QBER from kmd's `/metrics` (plain HTTP): ("?", "?") if unreadable.
fn link_from_metrics(port: u16) -> (String, String) {
    let text = (|| -> std::io::Result<String> {
        let mut conn = TcpStream::connect(("127.0.0.1", port))?;
        conn.set_read_timeout(Some(Duration::from_secs(1)))?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        conn.read_to_string(&mut body)?;
        Ok(body)
    })()
    .unwrap_or_default();
    let mut link = "?".to_string();
    let mut qber = "?".to_string();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("kmd_device_link_state{")
            && line.ends_with(" 1")
            && let Some(state) = rest.split("state=\"").nth(1).and_then(|r| r.split('"').next())
        {
            link = state.to_string();
        }
        if line.starts_with("kmd_link_qber_ratio{")
            && let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
        {
            qber = format!("{:.2}%", v * 100.0);
        }
    }
    (link, qber)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn wait_for_json(path: &Path, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let start = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(path)
            && let Ok(v) = serde_json::from_slice(&bytes)
        {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("{} did not appear within {:?}", path.display(), timeout);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
