//! `--metrics-file PATH`: Prometheus text-format metrics for node_exporter's textfile collector,
//! written atomically (a temporary file, fsynced, renamed), so the collector never reads half a
//! file. Each run replaces the file; the last-success time of a source whose run failed is
//! carried over from the previous file, so an alert on its age keeps working.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// One metric family: its help, and its samples as (labels, value).
struct Family {
    help: &'static str,
    samples: Vec<(String, f64)>,
}

/// Metrics being gathered for one file.
#[derive(Default)]
pub struct Metrics {
    families: BTreeMap<&'static str, Family>,
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `{k="v",...}` for `labels`.
pub fn labels(labels: &[(&str, &str)]) -> String {
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Metrics {
    /// Adds a gauge sample.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, labels: &str, value: f64) {
        self.families
            .entry(name)
            .or_insert(Family {
                help,
                samples: Vec::new(),
            })
            .samples
            .push((labels.to_owned(), value));
    }

    /// Carries over, from the file at `path`, the samples of `name` whose labels are in `keep`
    /// and that this run did not set.
    pub fn carry_over(
        &mut self,
        path: &Path,
        name: &'static str,
        help: &'static str,
        keep: &[String],
    ) {
        let Ok(old) = std::fs::read_to_string(path) else {
            return;
        };
        for line in old.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let set = self
                .families
                .get(name)
                .is_some_and(|f| f.samples.iter().any(|(l, _)| l == labels));
            if keep.iter().any(|k| k == labels) && !set {
                self.gauge(name, help, labels, value);
            }
        }
    }

    /// The text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, f) in &self.families {
            out.push_str(&format!("# HELP {name} {}\n# TYPE {name} gauge\n", f.help));
            for (labels, value) in &f.samples {
                out.push_str(&format!("{name}{labels} {value}\n"));
            }
        }
        out
    }

    /// Writes the file atomically: temporary name, fsync, rename.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("prom.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(self.render().as_bytes())?;
        f.sync_all()?;
        // The collector reads whole files: the rename makes the new one appear at once.
        std::fs::rename(&tmp, path)
    }
}

/// Seconds since the Unix epoch, now.
pub fn now() -> f64 {
    sbk_store::unix_now_ns() as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_grouped_and_labels_escaped() {
        let mut m = Metrics::default();
        m.gauge("sbk_a", "A.", &labels(&[("source", "x\"y\\z\nw")]), 1.0);
        m.gauge("sbk_b", "B.", &labels(&[("source", "s")]), 2.5);
        m.gauge("sbk_a", "A.", &labels(&[("source", "t")]), 3.0);
        let text = m.render();
        assert_eq!(
            text,
            "# HELP sbk_a A.\n# TYPE sbk_a gauge\nsbk_a{source=\"x\\\"y\\\\z\\nw\"} 1\nsbk_a{source=\"t\"} 3\n# HELP sbk_b B.\n# TYPE sbk_b gauge\nsbk_b{source=\"s\"} 2.5\n"
        );
    }

    #[test]
    fn the_last_success_of_a_failed_source_is_carried_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sbk.prom");
        let mut first = Metrics::default();
        let (a, b) = (labels(&[("source", "a")]), labels(&[("source", "b")]));
        first.gauge("sbk_t", "T.", &a, 100.0);
        first.gauge("sbk_t", "T.", &b, 100.0);
        first.write(&path).unwrap();
        let mut second = Metrics::default();
        second.gauge("sbk_t", "T.", &a, 200.0);
        second.carry_over(&path, "sbk_t", "T.", &[a.clone(), b.clone()]);
        let text = second.render();
        assert!(text.contains("sbk_t{source=\"a\"} 200\n"), "{text}");
        assert!(text.contains("sbk_t{source=\"b\"} 100\n"), "{text}");
        assert!(!text.contains("sbk_t{source=\"a\"} 100"), "{text}");
    }
}
