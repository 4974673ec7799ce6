//! `qutemail-promtext`: the Prometheus text exposition format (0.0.4) read into [`Sample`]s.
//!
//! kmd publishes its links and key pools only as metrics; `kmd status`, the web admin console
//! and `qutemailctl links` read that page with this one parser. Comment, `# HELP` and `# TYPE`
//! lines are skipped, as are lines that do not parse (a scraper takes what it can). Label values
//! may hold any character, including `{`, `}`, `,` and the escapes `\\`, `\"` and `\n`.

#![deny(missing_docs)]

use std::collections::BTreeMap;

/// One sample: metric name (with `_total`, `_bucket`, ... suffixes as exposed), labels, value.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels, by name.
    pub labels: BTreeMap<String, String>,
    /// Value (`NaN`, `+Inf` and `-Inf` as Prometheus writes them).
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, or `""` when the sample has no such label (as in PromQL).
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }

    /// Whether every `(label, value)` in `want` matches.
    pub fn has_labels(&self, want: &[(&str, &str)]) -> bool {
        want.iter().all(|(k, v)| self.label(k) == *v)
    }
}

/// Parses a page of text exposition. The optional timestamp after a value is ignored.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// The samples named `name`.
pub fn find<'a>(samples: &'a [Sample], name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
    samples.iter().filter(move |s| s.name == name)
}

/// The value of the first sample named `name` whose labels match `want`.
pub fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    find(samples, name).find(|s| s.has_labels(want)).map(|s| s.value)
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let (labels, rest) = match line[name_end..].strip_prefix('{') {
        Some(inside) => parse_labels(inside)?,
        None => (BTreeMap::new(), &line[name_end..]),
    };
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample { name: name.to_owned(), labels, value })
}

/// Parses `name="value",...}` and returns the labels and what follows the `}`.
fn parse_labels(mut rest: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        rest = rest.trim_start().trim_start_matches(',').trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, tail) = rest.split_once('=')?;
        let tail = tail.trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = tail.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()? {
                    (_, 'n') => value.push('\n'),
                    (_, other) => value.push(other),
                },
                (i, '"') => break i + 1,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        rest = &tail[end..];
    }
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        t => t.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kmd_page_parses_into_names_labels_and_values() {
        let page = "# HELP kmd_keys_available Keys kmd can hand out.\n\
            # TYPE kmd_keys_available gauge\n\
            kmd_keys_available{link=\"a-b\"} 42\n\
            kmd_hsm_healthy 1\n\
            kmd_device_link_state{link=\"a-b\",state=\"up\"} 1 1732600000000\n\
            kmd_link_qber_ratio{ link = \"a-b\" , } 2.5e-2\n\
            http_duration_bucket{le=\"+Inf\"} +Inf\n";
        let samples = parse(page);
        assert_eq!(samples.len(), 5);
        assert_eq!(value(&samples, "kmd_keys_available", &[("link", "a-b")]), Some(42.0));
        assert_eq!(value(&samples, "kmd_hsm_healthy", &[]), Some(1.0));
        let state = find(&samples, "kmd_device_link_state").next().unwrap();
        assert_eq!((state.label("state"), state.value), ("up", 1.0), "the timestamp is not the value");
        assert_eq!(value(&samples, "kmd_link_qber_ratio", &[("link", "a-b")]), Some(0.025));
        assert_eq!(samples[4].label("le"), "+Inf");
        assert!(samples[4].value.is_infinite());
        assert_eq!(state.label("missing"), "");
    }

    #[test]
    fn label_values_keep_escapes_braces_and_commas() {
        let samples = parse(
            "m{a=\"x\\\"y\",b=\"1\\\\2\\n3\",c=\"{},=\"} 7\n\
             m{d=\"}\"} 8\n",
        );
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].label("a"), "x\"y");
        assert_eq!(samples[0].label("b"), "1\\2\n3");
        assert_eq!(samples[0].label("c"), "{},=");
        assert_eq!((samples[1].label("d"), samples[1].value), ("}", 8.0));
    }

    #[test]
    fn malformed_lines_are_skipped_not_guessed() {
        let samples = parse(
            "garbage line\n\
             m{a=\"unterminated} 1\n\
             m{a=x} 1\n\
             m 12abc\n\
             m\n\
             {a=\"b\"} 1\n\
             ok 3\n",
        );
        assert_eq!(samples, vec![Sample { name: "ok".into(), labels: BTreeMap::new(), value: 3.0 }]);
    }
}
