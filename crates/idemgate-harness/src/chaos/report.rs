//! The chaos report: the table on stdout and the self-contained HTML page.

use std::fmt::Write;

use super::{Figures, Sample};
use idemgate_testkit::kill::KillPoint;

/// A row of the report: its name and how to read it off a run.
type Row = (String, Box<dyn Fn(&Figures) -> String>);

/// `n what` for each count that is not zero, joined with commas; `None` if all are zero.
pub(super) fn nonzero<'a>(counts: impl IntoIterator<Item = (u64, &'a str)>) -> Option<String> {
    let listed: Vec<String> = counts
        .into_iter()
        .filter(|&(n, _)| n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    (!listed.is_empty()).then(|| listed.join(", "))
}

/// Rows of faults left out of a report where neither run had any.
const FAULT_ROWS: [&str; 8] = [
    "zombies (SIGSTOP past lease)",
    "completions fenced",
    "store restarts",
    "broker restarts",
    "connection cuts",
    "worker exits (restarted)",
    "publish retries",
    "dead letters",
];

/// The rows of a report on `naive` and `idem`.
fn rows_for(naive: Option<&Figures>, idem: &Figures) -> Vec<Row> {
    rows()
        .into_iter()
        .filter(|(name, f)| {
            !FAULT_ROWS.contains(&name.trim())
                || f(idem) != "0"
                || naive.is_some_and(|n| f(n) != "0")
        })
        .collect()
}

/// Every row of the report.
fn rows() -> Vec<Row> {
    let n = |f: fn(&Figures) -> u64| -> Box<dyn Fn(&Figures) -> String> {
        Box::new(move |x| f(x).to_string())
    };
    let mut rows: Vec<Row> = vec![
        ("events".into(), n(|f| f.events)),
        ("deliveries".into(), n(|f| f.deliveries)),
        ("duplicate deliveries".into(), n(|f| f.duplicate_deliveries)),
        (
            "  of which published twice".into(),
            n(|f| f.published_twice),
        ),
        ("kills (SIGKILL)".into(), n(|f| f.kills)),
    ];
    for p in KillPoint::ALL {
        rows.push((
            format!("  at {}", p.name()),
            Box::new(move |f: &Figures| {
                f.kills_by_point
                    .get(p.name())
                    .copied()
                    .unwrap_or(0)
                    .to_string()
            }),
        ));
    }
    rows.extend([
        ("zombies (SIGSTOP past lease)".into(), n(|f| f.zombies)),
        ("  completions fenced".into(), n(|f| f.zombies_fenced)),
        ("store restarts".into(), n(|f| f.store_restarts)),
        ("broker restarts".into(), n(|f| f.broker_restarts)),
        ("connection cuts".into(), n(|f| f.connection_cuts)),
        ("worker exits (restarted)".into(), n(|f| f.worker_exits)),
        ("publish retries".into(), n(|f| f.publish_retries)),
        ("dead letters".into(), n(|f| f.dead_letters)),
        ("lost effects".into(), n(|f| f.lost)),
        ("effects applied twice".into(), n(|f| f.applied_twice)),
        (
            "  Gate window: effects re-run".into(),
            Box::new(|f: &Figures| {
                if f.mode == "gate" {
                    f.window().to_string()
                } else {
                    "-".into()
                }
            }),
        ),
        ("extra effects (total)".into(), n(|f| f.extra_effects)),
        (
            "balance agrees".into(),
            Box::new(|f: &Figures| if f.balance_ok { "yes" } else { "NO" }.to_owned()),
        ),
        (
            "seconds".into(),
            Box::new(|f: &Figures| format!("{:.1}", f.seconds)),
        ),
    ]);
    rows
}

/// Prints the side-by-side table.
pub(super) fn table(naive: Option<&Figures>, idem: &Figures) {
    let right = format!("idemgate ({})", idem.mode);
    println!();
    println!("{:<30} {:>12} {:>18}", "", "naive", right);
    for (name, f) in rows_for(naive, idem) {
        let left = naive.map(&f).unwrap_or_else(|| "-".into());
        println!("{name:<30} {left:>12} {:>18}", f(idem));
    }
    println!();
    if idem.mode == "gate" {
        let w = idem.window();
        println!(
            "gate window: {w} effects ran again after a kill or a freeze between the effect and \
             its recorded completion ({:.1} per kill or zombie){}.",
            w as f64 / (idem.kills + idem.zombies).max(1) as f64,
            if idem.window_reruns > 0 {
                ", each stopped by its derived key"
            } else {
                ""
            }
        );
    }
    if idem.lost == 0 && idem.applied_twice == 0 {
        let faults = nonzero([
            (idem.kills, "kills"),
            (idem.zombies, "zombies"),
            (
                idem.store_restarts + idem.broker_restarts + idem.connection_cuts,
                "restarts or cuts",
            ),
        ]);
        println!(
            "idemgate: every event's effect applied exactly once, through {} duplicate deliveries{}.",
            idem.duplicate_deliveries,
            faults.map(|f| format!(" and {f}")).unwrap_or_default()
        );
    } else if idem.mode == "gate" && idem.lost == 0 {
        println!(
            "gate mode: {} effects ran twice. Without a derived key the effect outside the store is \
             not covered between the effect and `complete` ({} kills at after-effect, {} zombies): pass \
             `Key::derive(..)` to the external system, or use inbox mode.",
            idem.applied_twice,
            idem.kills_by_point
                .get("after-effect")
                .copied()
                .unwrap_or(0),
            idem.zombies
        );
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Per-second rates between samples: (t, deliveries/s, duplicates/s, effects/s).
fn rates(samples: &[Sample]) -> Vec<(f64, f64, f64, f64)> {
    samples
        .windows(2)
        .filter_map(|w| {
            let dt = w[1].t - w[0].t;
            (dt > 0.0).then(|| {
                #[allow(clippy::cast_precision_loss)]
                let r = |a: u64, b: u64| b.saturating_sub(a) as f64 / dt;
                (
                    w[1].t,
                    r(w[0].deliveries, w[1].deliveries),
                    r(w[0].duplicates, w[1].duplicates),
                    r(w[0].applications, w[1].applications),
                )
            })
        })
        .collect()
}

/// One run's timeline as an inline SVG chart.
fn chart(f: &Figures) -> String {
    let (w, h, pad) = (900.0, 260.0, 40.0);
    let points = rates(&f.timeline);
    let t_max = f.seconds.max(points.last().map_or(1.0, |p| p.0)).max(1.0);
    let y_max = points.iter().map(|p| p.1.max(p.3)).fold(1.0f64, f64::max) * 1.1;
    let x = |t: f64| pad + (w - 2.0 * pad) * t / t_max;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * v / y_max;
    let line = |pick: fn(&(f64, f64, f64, f64)) -> f64| {
        points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.0), y(pick(p))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="11">
<rect x="{pad}" y="{pad}" width="{}" height="{}" fill="#fafafa" stroke="#ccc"/>"##,
        w - 2.0 * pad,
        h - 2.0 * pad
    );
    for (t, what) in &f.fault_log {
        let color = if what.starts_with("SIGKILL") {
            "#d62728"
        } else if what.contains("zombie") {
            "#9467bd"
        } else if what.contains("exited") {
            "#bbbbbb"
        } else {
            "#ff7f0e"
        };
        let _ = write!(
            svg,
            r#"<line x1="{0:.1}" x2="{0:.1}" y1="{pad}" y2="{1:.1}" stroke="{color}" stroke-dasharray="3,2"><title>{2:.1} s: {3}</title></line>"#,
            x(*t),
            h - pad,
            t,
            escape(what)
        );
    }
    let _ = write!(
        svg,
        r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{}"/>
<polyline fill="none" stroke="#2ca02c" stroke-width="1.5" points="{}"/>
<polyline fill="none" stroke="#e377c2" stroke-width="1.5" points="{}"/>
<text x="{pad}" y="{}">0</text><text x="{}" y="{}" text-anchor="end">{t_max:.0} s</text>
<text x="4" y="{}">{y_max:.0}/s</text>
<text x="{pad}" y="14" fill="#1f77b4">deliveries/s</text>
<text x="{}" y="14" fill="#2ca02c">effects applied/s</text>
<text x="{}" y="14" fill="#e377c2">duplicate deliveries/s</text>
<text x="{}" y="14" fill="#d62728">| kill</text>
<text x="{}" y="14" fill="#9467bd">| zombie</text>
<text x="{}" y="14" fill="#ff7f0e">| restart / cut</text>
</svg>"##,
        line(|p| p.1),
        line(|p| p.3),
        line(|p| p.2),
        h - pad + 14.0,
        w - pad,
        h - pad + 14.0,
        pad + 4.0,
        pad + 110.0,
        pad + 240.0,
        pad + 400.0,
        pad + 460.0,
        pad + 540.0,
    );
    svg
}

/// The self-contained HTML report.
pub(super) fn html(title: &str, naive: Option<&Figures>, idem: &Figures) -> String {
    let mut page = String::new();
    let _ = write!(
        page,
        r#"<!doctype html><html><head><meta charset="utf-8"><title>{0}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{padding:2px 12px;border-bottom:1px solid #eee;text-align:right}}
td:first-child{{text-align:left}}.bad{{color:#c00;font-weight:bold}}</style></head><body>
<h1>{0}</h1><table><tr><th></th><th>naive</th><th>idemgate ({1})</th></tr>"#,
        escape(title),
        idem.mode
    );
    for (name, f) in rows_for(naive, idem) {
        let left = naive.map(&f).unwrap_or_else(|| "-".into());
        let right = f(idem);
        let bad = (name.starts_with("lost") || name.contains("twice")) && right != "0";
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td{}>{}</td></tr>",
            escape(name.trim()),
            left,
            if bad { " class=\"bad\"" } else { "" },
            right
        );
    }
    page.push_str("</table>");
    for f in naive.into_iter().chain([idem]) {
        let _ = write!(page, "<h2>Timeline: {}</h2>{}", f.mode, chart(f));
        page.push_str("<details><summary>faults</summary><ul>");
        for (t, what) in &f.fault_log {
            let _ = write!(page, "<li>{t:.1} s: {}</li>", escape(what));
        }
        page.push_str("</ul></details>");
    }
    page.push_str("</body></html>\n");
    page
}
