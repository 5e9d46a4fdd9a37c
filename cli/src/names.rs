//! Names an operator types (tags, hosts, source names): printed in tables and matched by
//! retention, so a control character (a newline breaks the `snapshots` table) or an endless
//! name is refused before anything is written (exit 2).

/// Longest name accepted, in bytes.
pub const MAX_NAME: usize = 255;

/// Why `s` cannot be a name, if it cannot.
pub fn check(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("it is empty".into());
    }
    if s.len() > MAX_NAME {
        return Err(format!("it is {} bytes long, over {MAX_NAME}", s.len()));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!("it holds the control character {c:?}"));
    }
    Ok(())
}

/// A clap value parser for names.
pub fn parse(s: &str) -> Result<String, String> {
    check(s).map(|()| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(parse("nightly").is_ok());
        assert!(parse("db1.example.com").is_ok());
        assert!(parse("ünïcödé").is_ok());
        assert!(parse("").is_err());
        assert!(parse("a\\nb").is_ok()); // a backslash and an n, not a newline
        assert!(parse("a\nb").is_err());
        assert!(parse("tab\there").is_err());
        assert!(parse(&"x".repeat(255)).is_ok());
        assert!(parse(&"x".repeat(256)).is_err());
    }
}
