//! The operator's monitoring (`image/monitoring/`): Prometheus accepts the alert rules and their
//! unit tests pass (`promtool`), the Grafana dashboard is a valid dashboard, and against the
//! live two-site demo a real `prometheus` server scrapes kmd and the gateways, every metric the
//! rules and the dashboard query exists there, and cutting the fibre fires `QkdLinkDown`.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qutemail_e2e::{LiveDemo, workspace_bin, workspace_root};

fn monitoring_dir() -> PathBuf {
    workspace_root().join("image/monitoring")
}

fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (apt-get install -y prometheus)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let dir = monitoring_dir();
    let (ok, text) = promtool(&["check", "rules", "alerts.yml"], &dir);
    assert!(ok && text.contains("SUCCESS: 15 rules found"), "{text}");
    let (ok, text) = promtool(&["test", "rules", "alerts.test.yml"], &dir);
    assert!(ok && text.contains("SUCCESS"), "{text}");

    // The unit tests notice a changed threshold: with QkdQberHigh at 8 % the 7 % series no
    // longer fires it.
    let copy = tempfile::tempdir().unwrap();
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let changed = rules.replace("kmd_link_qber_ratio > 0.06", "kmd_link_qber_ratio > 0.08");
    assert_ne!(rules, changed);
    std::fs::write(copy.path().join("alerts.yml"), changed).unwrap();
    std::fs::copy(dir.join("alerts.test.yml"), copy.path().join("alerts.test.yml")).unwrap();
    let (ok, text) = promtool(&["test", "rules", "alerts.test.yml"], copy.path());
    assert!(!ok && text.contains("alertname: QkdQberHigh"), "{text}");
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(monitoring_dir().join("grafana-dashboard.json")).unwrap();
    serde_json::from_str(&text).expect("grafana-dashboard.json is JSON")
}

/// Every PromQL expression of the dashboard's panels and template variables.
fn dashboard_exprs(d: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            // label_values(METRIC, label)
            let inner = q.trim_start_matches("label_values(").split(',').next().unwrap();
            exprs.push(inner.trim().to_owned());
        }
    }
    exprs
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_with_a_query_on_every_panel() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36, "schemaVersion {}", d["schemaVersion"]);
    assert_eq!(d["uid"], "qutemail-site");
    assert!(d["title"].is_string());
    let vars: Vec<&str> =
        d["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(vars, ["datasource", "link"]);
    let mut ids = BTreeSet::new();
    let mut rows = 0;
    for p in d["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id {}", p["id"]);
        let pos = &p["gridPos"];
        assert!(
            pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24,
            "{} is wider than the grid",
            p["title"]
        );
        if p["type"] == "row" {
            rows += 1;
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(!metric_names(expr).is_empty(), "{}: {expr} queries no metric", p["title"]);
        }
    }
    assert_eq!(rows, 5, "QKD links, key pool, HSM and ETSI 014, certificates, mail gateway");
}

/// The metric names a PromQL expression selects: identifiers that are not functions,
/// keywords, label names (in `{...}` or a `by (...)` list), strings, durations or numbers.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const GROUPING: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    const OPERATORS: [&str; 17] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut label_list_next = false;
    let skip_to = |mut i: usize, close: char| {
        let mut quote = None;
        while i < chars.len() {
            match (quote, chars[i]) {
                (Some(_), '\\') => i += 1,
                (Some(q), c) if c == q => quote = None,
                (None, '"' | '\'' | '`') => quote = Some(chars[i]),
                (None, c) if c == close => return i + 1,
                _ => {}
            }
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c == '"' || c == '\'' || c == '`' {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != c {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            i = j + 1;
        } else if c == '(' && label_list_next {
            label_list_next = false;
            i = skip_to(i + 1, ')');
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration (5m, 1e3).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if GROUPING.contains(&word.as_str()) {
                label_list_next = true;
            } else if OPERATORS.contains(&word.as_str()) || next == Some(&'(') {
                // An operator keyword, an aggregation (`sum by (…) (…)`) or a function call.
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, op) (rate(kmd_hsm_operation_duration_seconds_bucket{op!~"a|b"}[$__rate_interval])))"#,
    );
    assert_eq!(names, BTreeSet::from(["kmd_hsm_operation_duration_seconds_bucket".to_owned()]));
    let names = metric_names(
        r#"0 < (kmd_tls_certificate_expiry_timestamp_seconds - time()) < 21 * 86400 and on (instance) up offset 5m"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["kmd_tls_certificate_expiry_timestamp_seconds".to_owned(), "up".to_owned()])
    );
}

/// The `expr:` of every rule in alerts.yml (one line, or a `>-` block below it).
fn alert_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(monitoring_dir().join("alerts.yml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut exprs = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else { continue };
        let value = value.trim();
        if value == ">-" || value == "|" || value == ">" {
            let indent = line.len() - line.trim_start().len();
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            exprs.push(block.join(" "));
        } else {
            exprs.push(value.to_owned());
        }
    }
    exprs
}

/// Kills the Prometheus server when the test ends.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` from `addr` over HTTP/1.0 (the server closes the connection, no chunking);
/// the status and body.
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut conn = TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((status, body))
}

fn api(prometheus: &Prometheus, path: &str) -> serde_json::Value {
    let (status, body) = http_get(&prometheus.addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(status, 200, "GET {path}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "{v}");
    v["data"].clone()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `prometheus` on a free port, scraping `kmd` and `gateway` targets every second and
/// evaluating alerts.yml every second.
fn start_prometheus(kmd: &[String], gateway: &[String]) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(monitoring_dir().join("alerts.yml"), dir.path().join("alerts.yml")).unwrap();
    let quoted = |t: &[String]| t.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(", ");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: ['{rules}']\n\
         scrape_configs:\n  - job_name: qutemail-kmd\n    static_configs: [{{targets: [{kmd}]}}]\n\
         \x20 - job_name: qutemail-gateway\n    static_configs: [{{targets: [{gateway}]}}]\n",
        rules = dir.path().join("alerts.yml").display(),
        kmd = quoted(kmd),
        gateway = quoted(gateway),
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    // A port that was free a moment ago; Prometheus cannot report a port it picked itself.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus (apt-get install -y prometheus)");
    let mut prometheus = Prometheus { child, addr, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = http_get(&prometheus.addr, "/-/ready") {
            return prometheus;
        }
        if let Ok(Some(status)) = prometheus.child.try_wait() {
            let log =
                std::fs::read_to_string(prometheus._dir.path().join("prometheus.log")).unwrap_or_default();
            panic!("prometheus exited ({status}):\n{log}");
        }
        assert!(Instant::now() < deadline, "prometheus not ready within 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Names in a Prometheus text exposition: every sample's, and every declared family's (with
/// the series names a histogram or summary expands to), so a labelled family without samples
/// yet still counts.
fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
            names.insert(name.to_owned());
            if kind == "histogram" || kind == "summary" {
                for suffix in ["_bucket", "_count", "_sum"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// The metric families an exporter declares in its crate documentation table
/// (`//! | `name` | type | …`), with the series names a histogram expands to.
fn declared_names(source: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(source).unwrap();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(row) = line.strip_prefix("//! | `") else { continue };
        let Some((name, rest)) = row.split_once('`') else { continue };
        let kind = rest.trim_start_matches(" |").split('|').next().unwrap_or("").trim();
        names.insert(name.to_owned());
        if kind == "histogram" {
            for suffix in ["_bucket", "_count", "_sum"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// `host:port` of a `http://host:port/metrics` URL.
fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").split('/').next().unwrap().to_owned()
}

#[test]
fn against_the_live_demo_every_queried_metric_exists_and_a_fibre_cut_fires_qkd_link_down() {
    let demo = LiveDemo::start();
    let mut kmd = Vec::new();
    let mut gateway = Vec::new();
    for site in ["A", "B"] {
        let s = demo.site(site);
        kmd.push(host_port(s["metrics_url"].as_str().unwrap()));
        let g = s["gateway"]["metrics"]
            .as_str()
            .unwrap_or_else(|| panic!("no gateway metrics URL in state.json: {s}"));
        gateway.push(host_port(g));
    }
    let prometheus = start_prometheus(&kmd, &gateway);

    // Every target answers (`up` == 1 through Prometheus' eyes).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let targets = api(&prometheus, "/api/v1/targets");
        let active = targets["activeTargets"].as_array().unwrap();
        if active.len() == 4 && active.iter().all(|t| t["health"] == "up") {
            break;
        }
        assert!(Instant::now() < deadline, "targets not all up within 60 s: {targets}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Every metric the rules and the dashboard query is exposed by the demo's daemons (or is
    // Prometheus' own `up`).
    let mut known: BTreeSet<String> = api(&prometheus, "/api/v1/label/__name__/values")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    for target in kmd.iter().chain(&gateway) {
        let (status, body) = http_get(target, "/metrics").unwrap();
        assert_eq!(status, 200, "{target}/metrics");
        known.extend(exposed_names(&body));
    }
    // Every alert's metric is in the live scrape. A dashboard panel may also chart a labelled
    // family that has no series until its event happens (a bounced message, a device alarm:
    // prometheus-client exports nothing for an empty family); such a name must then be one
    // the exporter declares in its metric table.
    let mut declared = declared_names(&workspace_root().join("kmd/daemon/src/metrics.rs"));
    declared.extend(declared_names(&workspace_root().join("appliance/telemetry/src/lib.rs")));
    let mut missing = Vec::new();
    for expr in alert_exprs() {
        for name in metric_names(&expr) {
            if !known.contains(&name) {
                missing.push(format!("alert: {name} (in {expr})"));
            }
        }
    }
    let mut not_yet_exported = BTreeSet::new();
    for expr in dashboard_exprs(&dashboard()) {
        for name in metric_names(&expr) {
            if known.contains(&name) {
                continue;
            }
            if declared.contains(&name) {
                not_yet_exported.insert(name);
            } else {
                missing.push(format!("dashboard: {name} (in {expr})"));
            }
        }
    }
    assert!(missing.is_empty(), "metrics not exposed by the demo:\n{}", missing.join("\n"));
    println!("declared, no series yet in the idle demo: {not_yet_exported:?}");
    assert!(known.contains("kmd_tls_certificate_expiry_timestamp_seconds"), "kmd exports certificate expiry");

    // The link is up before the cut (so the alert below is the cut's doing).
    let query = percent_encode(r#"kmd_device_link_state{state="up"} == 1"#);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let up = api(&prometheus, &format!("/api/v1/query?query={query}"));
        if up["result"].as_array().unwrap().len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the demo's link is not up at both sites within 120 s: {up}");
        std::thread::sleep(Duration::from_millis(500));
    }

    let socket = demo.state["link"]["control_socket"].as_str().unwrap().to_owned();
    let qkd_sim = workspace_bin("qkd-sim", "qkd-sim");
    let ctl = |state: &str| {
        let out =
            Command::new(&qkd_sim).args(["ctl", "--socket", &socket, "fibre-cut", state]).output().unwrap();
        assert!(
            out.status.success(),
            "qkd-sim ctl fibre-cut {state}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ctl("on");
    let cut = Instant::now();
    let firing = loop {
        let alerts = api(&prometheus, "/api/v1/alerts");
        let firing: Vec<serde_json::Value> = alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["labels"]["alertname"] == "QkdLinkDown" && a["state"] == "firing")
            .cloned()
            .collect();
        if !firing.is_empty() {
            break firing;
        }
        if cut.elapsed() > Duration::from_secs(120) {
            ctl("off");
            panic!("QkdLinkDown not firing 120 s after the fibre cut: {alerts}");
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    println!("QkdLinkDown firing {:.0} s after the fibre cut: {firing:?}", cut.elapsed().as_secs_f64());
    ctl("off");
    let link = demo.state["link"]["id"].as_str().unwrap();
    assert!(
        firing.iter().all(|a| a["labels"]["link"] == link && a["labels"]["severity"] == "critical"),
        "{firing:?}"
    );
    let instances: BTreeSet<&str> =
        firing.iter().map(|a| a["labels"]["instance"].as_str().unwrap()).collect();
    assert!(instances.iter().all(|i| kmd.iter().any(|k| k == i)), "{instances:?} are kmd targets {kmd:?}");
    drop(prometheus);
    drop(demo);
}
