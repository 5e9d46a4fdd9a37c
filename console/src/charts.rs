//! Charts drawn on the server as inline SVG: no script, no file from elsewhere.

use maud::{html, Markup};

use crate::pages::bytes;

/// A coordinate to one decimal: enough for a chart, and short in the page.
fn c(x: f64) -> String {
    format!("{x:.1}")
}

/// Width and height of a full chart, in SVG units (it scales to its box).
const W: f64 = 640.0;
const H: f64 = 160.0;
/// Room for the axis labels.
const PAD: f64 = 28.0;

/// A bar chart of byte counts, one bar per labelled value (days, say), each with its figure as
/// a tooltip; the largest value is written at the top of the axis.
pub fn bars(title: &str, values: &[(String, u64)]) -> Markup {
    let max = values.iter().map(|v| v.1).max().unwrap_or(0).max(1);
    let n = values.len().max(1) as f64;
    let slot = (W - PAD) / n;
    html! {
        svg.chart viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(title) {
            title { (title) }
            line x1=(PAD) y1=(H - PAD) x2=(W) y2=(H - PAD) class="axis" {}
            text x="0" y="12" class="tick" { (bytes(max)) }
            text x="0" y=(H - PAD) class="tick" { "0" }
            @for (i, (label, v)) in values.iter().enumerate() {
                @let h = (H - PAD - 16.0) * (*v as f64) / (max as f64);
                rect x=(c(PAD + slot * i as f64 + 1.0)) y=(c(H - PAD - h)) width=(c((slot - 2.0).max(1.0))) height=(c(h)) class="bar" {
                    title { (label) ": " (bytes(*v)) }
                }
            }
            @if let (Some(first), Some(last)) = (values.first(), values.last()) {
                text x=(PAD) y=(H - 8.0) class="tick" { (first.0) }
                text x=(W) y=(H - 8.0) class="tick end" { (last.0) }
            }
        }
    }
}

/// A line of byte counts over time: (seconds since the epoch, value) points, oldest first.
pub fn line(title: &str, points: &[(i64, u64)]) -> Markup {
    if points.is_empty() {
        return html! { p.muted { "No measurements yet." } };
    }
    let max = points.iter().map(|p| p.1).max().unwrap_or(0).max(1);
    let (t0, t1) = (points[0].0, points[points.len() - 1].0);
    let span = (t1 - t0).max(1) as f64;
    let xy = |(t, v): &(i64, u64)| {
        (
            PAD + (W - PAD - 4.0) * ((t - t0) as f64 / span),
            H - PAD - (H - PAD - 16.0) * (*v as f64) / (max as f64),
        )
    };
    let path: Vec<String> = points
        .iter()
        .map(|p| {
            let (x, y) = xy(p);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    html! {
        svg.chart viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(title) {
            title { (title) }
            line x1=(PAD) y1=(H - PAD) x2=(W) y2=(H - PAD) class="axis" {}
            text x="0" y="12" class="tick" { (bytes(max)) }
            polyline points=(path.join(" ")) class="line" {}
            @for p in points {
                @let (x, y) = xy(p);
                circle cx=(c(x)) cy=(c(y)) r="3" class="dot" {
                    title { (crate::pages::time(p.0.saturating_mul(1_000_000_000))) ": " (bytes(p.1)) }
                }
            }
            text x=(PAD) y=(H - 8.0) class="tick" { (crate::pages::day(t0)) }
            text x=(W) y=(H - 8.0) class="tick end" { (crate::pages::day(t1)) }
        }
    }
}

/// A sparkline of values (sizes of a source's snapshots, oldest first).
pub fn sparkline(values: &[u64]) -> Markup {
    let (w, h) = (120.0, 24.0);
    let max = values.iter().copied().max().unwrap_or(0).max(1) as f64;
    let min = values.iter().copied().min().unwrap_or(0) as f64;
    let range = (max - min).max(1.0);
    let step = w / (values.len().max(2) - 1) as f64;
    let pts: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1}",
                i as f64 * step,
                h - 2.0 - (h - 4.0) * ((*v as f64 - min) / range)
            )
        })
        .collect();
    html! {
        svg.spark viewBox=(format!("0 0 {w} {h}")) role="img" aria-label="sizes of the newest snapshots" {
            polyline points=(pts.join(" ")) class="line" {}
        }
    }
}

/// A timeline of snapshots: one mark per snapshot at its time, taller for more new bytes;
/// (seconds, new bytes, label) per snapshot, oldest first.
pub fn timeline(points: &[(i64, u64, String)]) -> Markup {
    if points.is_empty() {
        return html! {};
    }
    let (t0, t1) = (points[0].0, points[points.len() - 1].0);
    let span = (t1 - t0).max(1) as f64;
    let max = points.iter().map(|p| p.1).max().unwrap_or(0).max(1) as f64;
    // Wider than the other charts: it spans the page, and its labels keep their size.
    let (w, h) = (1200.0, 90.0);
    html! {
        svg.chart viewBox=(format!("0 0 {w} {h}")) role="img" aria-label="snapshots over time" {
            title { "snapshots over time; taller marks wrote more new bytes" }
            line x1="4" y1=(h - 24.0) x2=(w - 4.0) y2=(h - 24.0) class="axis" {}
            @for (t, new, label) in points {
                @let x = 4.0 + (w - 8.0) * ((t - t0) as f64 / span);
                @let y = (h - 24.0) - 4.0 - 52.0 * ((*new as f64) / max).sqrt();
                line x1=(c(x)) y1=(h - 24.0) x2=(c(x)) y2=(c(y)) class="mark" {
                    title { (label) ", " (bytes(*new)) " new" }
                }
            }
            text x="4" y=(h - 6.0) class="tick" { (crate::pages::day(t0)) }
            text x=(w - 4.0) y=(h - 6.0) class="tick end" { (crate::pages::day(t1)) }
        }
    }
}
