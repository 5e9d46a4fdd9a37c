//! What shops that run Prometheus get: the alert rules and the Grafana dashboard in contrib/,
//! checked by promtool (from Debian's prometheus package, which scripts/test.sh installs) and
//! held to the metric names sbk really writes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib")
        .join(path)
}

/// The metric names a text-format file holds.
fn names(path: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

/// The `sbk_…` metric names a rules or dashboard file refers to.
fn referenced(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("sbk_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        out.insert(name);
        rest = &rest[at + 4..];
    }
    out
}

#[test]
fn alert_rules_and_dashboard_check_and_use_the_metrics_sbk_writes() {
    let rules = contrib("prometheus/sbk-alerts.yml");
    // promtool where it is installed (always under CI=true); the names are checked anyway.
    let promtool = have_tool("promtool");
    for args in [
        vec!["check", "rules", rules.to_str().unwrap()],
        vec!["test", "rules", "sbk-alerts.test.yml"],
    ]
    .into_iter()
    .filter(|_| promtool)
    {
        let o = Command::new("promtool")
            .args(&args)
            .current_dir(contrib("prometheus"))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    // Every metric the rules and the dashboard name, one of the commands really writes.
    let env = Env::new();
    let img = env.path("img");
    std::fs::write(&img, random(1 << 20, 3)).unwrap();
    let mut written = BTreeSet::new();
    for (cmd, file) in [
        (vec!["backup", img.to_str().unwrap()], "backup.prom"),
        (vec!["verify"], "verify.prom"),
        (vec!["prune"], "prune.prom"),
    ] {
        let f = env.path(file);
        let r = env.run(&[&cmd[..], &["--metrics-file", f.to_str().unwrap()]].concat());
        assert_eq!(r.code, 0, "{cmd:?}: {}", r.stderr);
        written.extend(names(&f));
    }
    let job = env.path("night.toml");
    std::fs::write(
        &job,
        format!(
            "repository = \"{}\"\npassword_env = \"JOB_PASS\"\nmetrics_file = \"{}\"\n\n[[source]]\nname = \"disk\"\npath = \"{}\"\n",
            env.repo.display(),
            env.path("job.prom").display(),
            img.display()
        ),
    )
    .unwrap();
    let r = Run::from_output(
        sbk()
            .env("SBK_CACHE_DIR", env.cache())
            .env("JOB_PASS", PASSWORD)
            .args(["run", job.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    written.extend(names(&env.path("job.prom")));

    let dashboard = contrib("grafana/sbk-dashboard.json");
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard).unwrap()).unwrap();
    for panel in parsed["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(
            targets.iter().all(|t| t["expr"].as_str().is_some()),
            "{panel}"
        );
    }
    for file in [&rules, &dashboard] {
        let names = referenced(file);
        assert!(names.len() >= 4, "{}: {names:?}", file.display());
        for n in &names {
            assert!(
                written.contains(n),
                "{} names {n}, which no command writes (they write {written:?})",
                file.display()
            );
        }
    }
}
