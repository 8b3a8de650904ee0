//! The Grafana dashboard in `docs/grafana/` queries only metrics the code emits.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `idemgate_…` names that follow a `counter!(`, `gauge!(` or `histogram!(` in the crates'
/// sources.
fn emitted() -> BTreeSet<String> {
    let mut files = Vec::new();
    for krate in std::fs::read_dir(root().join("crates")).unwrap() {
        let src = krate.unwrap().path().join("src");
        if src.is_dir() {
            sources(&src, &mut files);
        }
    }
    let mut names = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for mac in ["counter!(", "gauge!(", "histogram!("] {
            for (at, _) in text.match_indices(mac) {
                let rest = text[at + mac.len()..].trim_start();
                if let Some(name) = rest
                    .strip_prefix('"')
                    .and_then(|r| r.split('"').next())
                    .filter(|n| n.starts_with("idemgate_"))
                {
                    names.insert(name.to_owned());
                }
            }
        }
    }
    names
}

/// The metric names in a PromQL expression: identifiers that start with `idemgate_`.
fn queried(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("idemgate_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.push(name);
    }
    out
}

#[test]
fn every_dashboard_query_names_an_emitted_metric() {
    let emitted = emitted();
    // the consumer's, the Gate's and the HTTP layer's are there, or the scan found nothing
    for must in [
        "idemgate_consumer_total",
        "idemgate_gate_total",
        "idemgate_http_total",
    ] {
        assert!(
            emitted.contains(must),
            "the scan missed {must}: {emitted:?}"
        );
    }
    let text = std::fs::read_to_string(root().join("docs/grafana/idemgate.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = dash["panels"].as_array().expect("the dashboard has panels");
    assert!(!panels.is_empty());
    let mut used = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("a panel has targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("a target has a PromQL expr");
            let names = queried(expr);
            assert!(!names.is_empty(), "{expr:?} queries no idemgate metric");
            for name in names {
                // the Prometheus exporter renders a histogram as a summary: `_sum`, `_count`
                let base = name
                    .strip_suffix("_sum")
                    .or_else(|| name.strip_suffix("_count"))
                    .unwrap_or(&name);
                assert!(
                    emitted.contains(&name) || emitted.contains(base),
                    "panel {} queries {name}, which no code emits (emitted: {emitted:?})",
                    panel["title"]
                );
                used.insert(base.to_owned());
            }
        }
    }
    // and every metric the code emits has a panel
    let unshown: Vec<_> = emitted.difference(&used).collect();
    assert!(unshown.is_empty(), "metrics without a panel: {unshown:?}");
}
