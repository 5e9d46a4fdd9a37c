//! Where passwords come from, as restic users know it: `SBK_PASSWORD`, `--password-file FILE`
//! (`SBK_PASSWORD_FILE`), `--password-command CMD` (`SBK_PASSWORD_COMMAND`), else a prompt
//! without echo when standard input is a terminal. With none of them: a clear error, never a
//! hang. New passwords (init, `key add`, `key passwd`): `SBK_NEW_PASSWORD`,
//! `--new-password-file FILE`, or a prompt asked twice.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::Command;

use sbk_store::{Credential, KeyFile, StoreError};

/// The password options of the command line.
#[derive(Debug, Clone, Default)]
pub struct PasswordSource {
    /// `--password-file` / `SBK_PASSWORD_FILE`.
    pub file: Option<PathBuf>,
    /// `--password-command` / `SBK_PASSWORD_COMMAND`.
    pub command: Option<String>,
    /// The variable that holds the password itself [default: `SBK_PASSWORD`; empty: none, for
    /// a job file that names a file or a command, which its environment must not override].
    pub env: Option<String>,
    /// `--key-file` / `SBK_KEY_FILE`: before any password.
    pub key_file: Option<PathBuf>,
}

/// The first line of `text`, without its line end (a password file or command's output).
fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").to_owned()
}

/// The first line of the password file `file`; `what` names it in the error.
fn read_first_line(file: &std::path::Path, what: &str) -> Result<String, StoreError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        StoreError::NoPassword(format!("cannot read the {what} {}: {e}", file.display()))
    })?;
    Ok(first_line(&text))
}

impl PasswordSource {
    /// What opens the repository: the key file when one is given, else the password.
    pub fn credential(&self) -> Result<Credential, StoreError> {
        match &self.key_file {
            Some(path) => KeyFile::load(path).map(Credential::KeyFile),
            None => self.get().map(Credential::Password),
        }
    }

    /// The password of the repository.
    pub fn get(&self) -> Result<String, StoreError> {
        let var = self.env.as_deref().unwrap_or("SBK_PASSWORD");
        if let Some(p) = Some(var)
            .filter(|v| !v.is_empty())
            .and_then(|v| std::env::var(v).ok())
        {
            return Ok(p);
        }
        if let Some(file) = &self.file {
            return read_first_line(file, "password file");
        }
        if let Some(cmd) = &self.command {
            let out = Command::new("sh")
                .arg("-c")
                .arg(cmd)
                // Never the image: `sbk backup -` reads its source from our standard input.
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .output()
                .map_err(|e| {
                    StoreError::NoPassword(format!("cannot run the password command: {e}"))
                })?;
            if !out.status.success() {
                return Err(StoreError::NoPassword(format!(
                    "the password command failed ({})",
                    out.status
                )));
            }
            return Ok(first_line(&String::from_utf8_lossy(&out.stdout)));
        }
        if std::io::stdin().is_terminal() {
            return rpassword::prompt_password("repository password: ").map_err(|e| {
                StoreError::NoPassword(format!("cannot read it from the terminal: {e}"))
            });
        }
        Err(StoreError::NoPassword(
            "the repository is encrypted and no password was given".into(),
        ))
    }

    /// A new password (for a new repository or a new key): `SBK_NEW_PASSWORD`, `new_file`, or
    /// asked twice on the terminal.
    pub fn new_password(new_file: Option<&PathBuf>) -> Result<String, StoreError> {
        let password = match (std::env::var("SBK_NEW_PASSWORD"), new_file) {
            (Ok(p), _) => p,
            (Err(_), Some(file)) => read_first_line(file, "new password file")?,
            (Err(_), None) if std::io::stdin().is_terminal() => {
                let read = |prompt| {
                    rpassword::prompt_password(prompt).map_err(|e| {
                        StoreError::NoPassword(format!("cannot read it from the terminal: {e}"))
                    })
                };
                let a = read("new password: ")?;
                if read("new password again: ")? != a {
                    return Err(StoreError::NoPassword("the two passwords differ".into()));
                }
                a
            }
            (Err(_), None) => return Err(StoreError::NoPassword(
                "no new password given (SBK_NEW_PASSWORD, --new-password-file FILE, or a terminal)"
                    .into(),
            )),
        };
        refuse_empty(password)
    }
}

/// A new password, unless it is empty: an empty password protects nothing.
pub fn refuse_empty(password: String) -> Result<String, StoreError> {
    if password.is_empty() {
        return Err(StoreError::NoPassword(
            "an empty password protects nothing".into(),
        ));
    }
    Ok(password)
}
