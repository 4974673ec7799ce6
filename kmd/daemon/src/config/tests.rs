use super::*;

const FILE: &str = "/etc/qutemail/kmd.toml";

/// A complete, valid configuration; tests change one thing in it.
const GOOD: &str = r#"
[site]
kme_id = "KME-A"
name = "Site A"

[hsm]
module_path = "/usr/lib/softhsm/libsofthsm2.so"
token = { label = "qutemail" }
pin = { file = "/run/credentials/kmd.service/hsm-pin" }
wrapping_key_label = "qutemail-kek-v1"

[store]
path = "/var/lib/qutemail/kmd/keys.db"

[[link]]
id = "A-B"
peer_kme_id = "KME-B"
peer_url = "https://kmd.b.example:8444"
device = { serial = { path = "/dev/ttyUSB0", baud_rate = 921600 } }

[link.pool]
max_blocks = 5000
low_water = 100
high_water = 400

[etsi014]
listen = "127.0.0.1:8443"
server_cert = "tls/kmd.pem"
server_key = "tls/kmd.key"
client_ca = "tls/sae-ca.pem"

[[sae]]
sae_id = "A-mail"
common_name = "A-mail"
links = ["A-B"]

[[sae]]
sae_id = "A-web"
certificate_sha256 = "AB:CD:ef:01:23:45:67:89:AB:CD:ef:01:23:45:67:89:AB:CD:ef:01:23:45:67:89:AB:CD:ef:01:23:45:67:89"
links = ["A-B"]

[peer]
listen = "0.0.0.0:8444"
ca_cert = "/etc/qutemail/peer-ca.pem"
server_cert = "/etc/qutemail/kmd-peer-server.pem"
server_key = "/etc/qutemail/kmd-peer-server.key"
client_cert = "/etc/qutemail/kmd-peer-client.pem"
client_key = "/etc/qutemail/kmd-peer-client.key"

[metrics]
listen = "127.0.0.1:9464"

[log]
level = "info,kmd=debug"
format = "json"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(FILE))
}

fn err(text: &str) -> String {
    parse(text).expect_err("must be rejected").to_string()
}

#[test]
fn good_configuration_parses_with_defaults_and_resolved_paths() {
    let c = parse(GOOD).expect("valid");
    assert_eq!(c.site.kme_id, "KME-A");
    assert_eq!(c.links.len(), 1);
    assert_eq!(c.links[0].pool, PoolLimits { max_blocks: 5000, low_water: 100, high_water: 400 });
    let DeviceConfig::Serial(s) = &c.links[0].device else { panic!("serial device") };
    assert_eq!(s.baud_rate, 921_600);
    assert_eq!(s.ping_interval_ms, 1000, "the driver's defaults apply");
    assert_eq!(c.etsi014.server_cert, Path::new("/etc/qutemail/tls/kmd.pem"), "relative to the file");
    assert_eq!(c.etsi014.key_size, 256);
    assert_eq!(c.etsi014.max_key_per_request, 128);
    assert_eq!(c.metrics.listen, "127.0.0.1:9464".parse().unwrap());
    assert_eq!(c.log.format, Some(LogFormat::Json));
    let summary = c.summary();
    assert!(summary.contains("A-mail (CN \"A-mail\"); links: A-B"), "{summary}");
    assert!(summary.contains("abcdef0123456789"), "{summary}");
    assert!(!summary.contains("hsm-pin\n") || summary.contains("PIN from file"), "{summary}");
}

#[test]
fn minimal_configuration_takes_defaults() {
    let text = r#"
        [site]
        kme_id = "K"
        [hsm]
        module_path = "/m.so"
        token = { label = "t" }
        pin = { env = "KMD_HSM_PIN" }
        wrapping_key_label = "kek"
        [store]
        path = "/tmp/k.db"
        [etsi014]
        server_cert = "/c.pem"
        server_key = "/c.key"
        client_ca = "/ca.pem"
    "#;
    let c = parse(text).expect("valid");
    assert_eq!(c.etsi014.listen, "127.0.0.1:8443".parse().unwrap());
    assert!(c.metrics.enabled);
    assert_eq!(c.metrics.listen, "127.0.0.1:9464".parse().unwrap());
    assert_eq!(c.log.level, "info");
    assert!(c.peer.is_none() && c.links.is_empty() && c.saes.is_empty());
}

#[test]
fn unknown_key_names_file_line_column_and_key() {
    let text = GOOD.replace("low_water = 100", "low_water = 100\nlow_watermark = 3");
    let e = err(&text);
    let line = text.lines().position(|l| l.starts_with("low_watermark")).unwrap() + 1;
    assert!(e.starts_with(&format!("{FILE}:{line}:1: ")), "{e}");
    assert!(e.contains("link[0].pool"), "{e}");
    assert!(e.contains("low_watermark"), "{e}");
}

#[test]
fn unknown_key_in_driver_table_and_section() {
    let text = GOOD.replace("baud_rate = 921600", "baud_rate = 921600, parity = \"even\"");
    let e = err(&text);
    assert!(e.contains("parity"), "{e}");
    assert!(e.contains("link[0].device.serial"), "{e}");
    let text = GOOD.replace("[metrics]", "[metrics]\nport = 1");
    let e = err(&text);
    assert!(e.contains("metrics.port: unknown field `port`"), "{e}");
    let text = format!("{GOOD}\n[extra]\nx = 1\n");
    let e = err(&text);
    assert!(e.contains("extra"), "{e}");
}

#[test]
fn wrong_type_names_the_key() {
    let text = GOOD.replace("high_water = 400", "high_water = \"many\"");
    let e = err(&text);
    let line = text.lines().position(|l| l.starts_with("high_water")).unwrap() + 1;
    assert!(e.starts_with(&format!("{FILE}:{line}:")), "{e}");
    assert!(e.contains("link[0].pool.high_water"), "{e}");
}

#[test]
fn syntax_error_is_located() {
    let e = err("[site]\nkme_id = \"K\"\nname = \n");
    assert!(e.starts_with(&format!("{FILE}:3:")), "{e}");
    assert!(e.contains("TOML syntax"), "{e}");
}

#[test]
fn water_marks_are_checked_with_the_key_named() {
    let text =
        GOOD.replace("low_water = 100", "low_water = 900").replace("high_water = 400", "high_water = 500");
    let e = err(&text);
    assert!(e.contains("[link.pool] low_water (900) must be below high_water (500) (link \"A-B\")"), "{e}");
    let line = text.lines().position(|l| l.starts_with("low_water")).unwrap() + 1;
    assert!(e.starts_with(&format!("{FILE}:{line}:")), "located at the key: {e}");
    let text = GOOD.replace("max_blocks = 5000", "max_blocks = 300");
    assert!(err(&text).contains("high_water (400) must not exceed max_blocks (300)"));
}

#[test]
fn every_problem_is_reported() {
    let text = GOOD
        .replace("low_water = 100", "low_water = 900")
        .replace("links = [\"A-B\"]\n\n[[sae]]", "links = [\"A-C\"]\n\n[[sae]]")
        .replace("[etsi014]\n", "[etsi014]\nkey_size = 100\n");
    let e = err(&text);
    assert!(e.contains("low_water (900)"), "{e}");
    assert!(e.contains("links names \"A-C\""), "{e}");
    assert!(e.contains("key_size (100) must be a positive multiple of 8"), "{e}");
    assert_eq!(e.lines().count(), 3, "{e}");
    assert!(e.lines().all(|l| l.starts_with(FILE)), "{e}");
}

#[test]
fn inline_pin_is_refused_without_echoing_it() {
    for pin in [
        "pin = \"4711-secret\"",
        "pin = 4711",
        "pin = { value = \"4711-secret\" }",
        "pin = { env = \"4711\" }",
        "pin = { env = 4711 }",
        "pin = { file = \"4711-secret\" }",
    ] {
        let text = GOOD.replace("pin = { file = \"/run/credentials/kmd.service/hsm-pin\" }", pin);
        let e = err(&text);
        assert!(e.contains("[hsm] pin"), "{pin}: {e}");
        assert!(e.contains("never accepted"), "{pin}: {e}");
        assert!(!e.contains("4711"), "the PIN was echoed for {pin}: {e}");
        let line = text.lines().position(|l| l.starts_with("pin =")).unwrap() + 1;
        assert!(e.starts_with(&format!("{FILE}:{line}:")), "{e}");
    }
    let text = GOOD
        .replace("pin = { file = \"/run/credentials/kmd.service/hsm-pin\" }", "pin = { env = \"KMD_PIN\" }");
    parse(&text).expect("a variable name is fine");
}

#[test]
fn inline_private_key_is_refused() {
    let text =
        GOOD.replace("server_key = \"tls/kmd.key\"", "server_key = \"-----BEGIN PRIVATE KEY-----\\nMIIB\"");
    let e = err(&text);
    assert!(e.contains("[etsi014] server_key holds PEM text"), "{e}");
    assert!(!e.contains("MIIB"), "{e}");
}

#[test]
fn sae_recognition_rules() {
    let text = GOOD.replace("common_name = \"A-mail\"\n", "");
    assert!(err(&text).contains("give certificate_sha256 and/or common_name"));
    let text = GOOD.replace("certificate_sha256 = \"AB:CD", "certificate_sha256 = \"ZZ:CD");
    assert!(err(&text).contains("certificate_sha256 must be 64 hex digits"));
    let text = GOOD.replace("sae_id = \"A-web\"", "sae_id = \"A-mail\"");
    assert!(err(&text).contains("sae_id is used by another [[sae]]"));
    // A CN alone is the SAE ID (the key service reads it from the certificate).
    let text = GOOD.replace("common_name = \"A-mail\"", "common_name = \"mail-gateway\"");
    assert!(err(&text).contains("common_name \"mail-gateway\" alone must equal sae_id"), "{}", err(&text));
}

#[test]
fn links_need_a_peer_section_and_distinct_ids() {
    let start = GOOD.find("[peer]").unwrap();
    let end = GOOD.find("[metrics]").unwrap();
    let text = format!("{}{}", &GOOD[..start], &GOOD[end..]);
    assert!(err(&text).contains("[peer] is required"));
    let text = GOOD.replace("peer_kme_id = \"KME-B\"", "peer_kme_id = \"KME-A\"");
    assert!(err(&text).contains("is this site's own [site] kme_id"));
    let text =
        GOOD.replace("peer_url = \"https://kmd.b.example:8444\"", "peer_url = \"http://kmd.b.example\"");
    assert!(err(&text).contains("must start with https://"));
}

#[test]
fn etsi_limits_are_consistent() {
    let text = GOOD.replace("[etsi014]\n", "[etsi014]\nmin_key_size = 512\n");
    assert!(err(&text).contains("min_key_size (512) must not exceed key_size (256)"));
    let text = GOOD.replace("[etsi014]\n", "[etsi014]\nmax_key_per_request = 0\n");
    assert!(err(&text).contains("max_key_per_request (0) must be in 1..=1024"));
}

#[test]
fn listeners_must_not_clash() {
    let text = GOOD.replace("listen = \"127.0.0.1:9464\"", "listen = \"127.0.0.1:8443\"");
    assert!(err(&text).contains("[metrics] listen 127.0.0.1:8443 clashes with [etsi014] listen"));
    let text = GOOD.replace("listen = \"127.0.0.1:9464\"", "listen = \"127.0.0.1:8444\"");
    assert!(err(&text).contains("clashes with [peer] listen"), "0.0.0.0 overlaps every address");
}

#[test]
fn kme_device_tables_use_the_driver_type() {
    let text = GOOD.replace(
        "device = { serial = { path = \"/dev/ttyUSB0\", baud_rate = 921600 } }",
        "device = { kme = { base_url = \"https://kme.example\", ca_cert = \"ca.pem\", client_cert = \"c.pem\", \
         client_key = \"c.key\", sae_id = \"kmd-A\", peer_sae_id = \"kmd-B\", role = \"master\", key_size_bits = 12 } }",
    );
    let e = err(&text);
    assert!(e.contains("device.kme.key_size_bits (12) must be a positive multiple of 8"), "{e}");
    let text = text.replace("key_size_bits = 12", "key_size_bits = 256");
    let c = parse(&text).expect("valid");
    let DeviceConfig::Kme(k) = &c.links[0].device else { panic!("kme") };
    assert_eq!(k.client_key, Path::new("/etc/qutemail/c.key"));
    let text = text.replace("role = \"master\"", "role = \"boss\"");
    assert!(err(&text).contains("role"));
}

#[test]
fn peer_protocol_keys_have_defaults_and_checks() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.links[0].assigned_key_ttl_s, 86_400);
    assert_eq!(c.links[0].history_retention_days, 30);
    assert_eq!(c.links[0].unconfirmed_grace_s, 600);
    assert_eq!(c.peer.as_ref().unwrap().request_timeout_ms, 2000);
    let text = GOOD.replace("peer_url = \"https://kmd.b.example:8444\"", "peer_url = \"https://kmd.b.example:8444\"\npeer_certificate_sha256 = \"12\"\nhistory_retention_days = 0");
    let e = err(&text);
    assert!(e.contains("peer_certificate_sha256 must be 64 hex digits"), "{e}");
    assert!(e.contains("history_retention_days must be at least 1"), "{e}");
}

#[test]
fn log_level_is_validated() {
    let text = GOOD.replace("level = \"info,kmd=debug\"", "level = \"kmd=loud\"");
    assert!(err(&text).contains("[log] level"));
}

#[test]
fn key_lookup_helpers() {
    let text = "[a]\nb = 1\n[[c]]\nd = { e = 2 }\n[[c]]\nd = { e = 3 }\n";
    let doc = DeTable::parse(text).unwrap();
    let offset = text.rfind("3").unwrap();
    assert_eq!(key_at(doc.get_ref(), offset).as_deref(), Some("c[1].d.e"));
    assert_eq!(span_of(doc.get_ref(), "c[1].d.e").map(|o| line_col(text, o)), Some((6, 7)));
    assert_eq!(span_of(doc.get_ref(), "a.zzz").map(|o| line_col(text, o)), Some((1, 2)));
    assert_eq!(parse_fingerprint(&"ab".repeat(32)), Some([0xab; 32]));
    assert!(parse_fingerprint("ab").is_none());
    assert!(is_env_name("KMD_PIN") && is_env_name("_x1") && !is_env_name("1x") && !is_env_name("a-b"));
}

/// Every key of every table (as serde knows them: the "expected one of" list of an unknown-key
/// error) has a row in its section of docs/kmd-config.md.
#[test]
fn every_key_is_documented() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/kmd-config.md")).unwrap();
    let section = |heading: &str| {
        let start = doc.find(heading).unwrap_or_else(|| panic!("no section {heading}"));
        let rest = &doc[start + heading.len()..];
        let end = rest.find("\n#").unwrap_or(rest.len());
        rest[..end].to_owned()
    };
    let serial = "device = { serial = { path = \"/dev/ttyUSB0\", baud_rate = 921600 } }";
    let kme = "device = { kme = { base_url = \"https://k\", ca_cert = \"a\", client_cert = \"b\", client_key = \"c\", \
               sae_id = \"s\", peer_sae_id = \"p\", role = \"slave\", zz_unknown = 1 } }";
    let cases: Vec<(&str, String)> = vec![
        ("## `[site]`", GOOD.replace("name = \"Site A\"", "name = \"Site A\"\nzz_unknown = 1")),
        ("## `[hsm]`", GOOD.replace("wrapping_key_label", "zz_unknown = 1\nwrapping_key_label")),
        ("## `[store]`", GOOD.replace("[store]\n", "[store]\nzz_unknown = 1\n")),
        ("## `[[link]]`", GOOD.replace("id = \"A-B\"", "id = \"A-B\"\nzz_unknown = 1")),
        ("### `[link.pool]`", GOOD.replace("max_blocks = 5000", "max_blocks = 5000\nzz_unknown = 1")),
        ("### `device = { serial", GOOD.replace("baud_rate = 921600", "baud_rate = 921600, zz_unknown = 1")),
        ("### `device = { kme", GOOD.replace(serial, kme)),
        ("## `[etsi014]`", GOOD.replace("[etsi014]\n", "[etsi014]\nzz_unknown = 1\n")),
        ("## `[[sae]]`", GOOD.replace("sae_id = \"A-mail\"", "sae_id = \"A-mail\"\nzz_unknown = 1")),
        ("## `[peer]`", GOOD.replace("[peer]\n", "[peer]\nzz_unknown = 1\n")),
        ("## `[metrics]`", GOOD.replace("[metrics]\n", "[metrics]\nzz_unknown = 1\n")),
        ("## `[log]`", GOOD.replace("[log]\n", "[log]\nzz_unknown = 1\n")),
    ];
    let top = format!("zz_unknown = 1\n{GOOD}");
    let top_keys = expected_keys(&err(&top));
    assert_eq!(top_keys.len(), 9, "{top_keys:?}");
    for (heading, text) in cases {
        let e = err(&text);
        let keys = expected_keys(&e);
        assert!(!keys.is_empty(), "{heading}: no key list in {e}");
        let body = section(heading);
        for key in keys {
            assert!(body.contains(&format!("| `{key}` |")), "{heading}: key `{key}` is not documented");
        }
    }
    for key in top_keys {
        let table = if matches!(key.as_str(), "link" | "sae") {
            format!("`[[{key}]]`")
        } else {
            format!("`[{key}]`")
        };
        assert!(doc.contains(&format!("## {table}")), "no section for {table}");
    }
}

fn expected_keys(message: &str) -> Vec<String> {
    let Some(list) = message.split("expected ").nth(1) else { return Vec::new() };
    list.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}
