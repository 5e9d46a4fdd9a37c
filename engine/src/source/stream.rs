//! Sources read once, front to back, that cannot seek: standard input (`sbk backup -`) and the
//! standard output of a command (`--source-command`), for `rbd export pool/vm@snap -`, `ssh host
//! dd if=/dev/sdb bs=4M`, `qemu-img dd`. Their size is what was read; a pipe cut short looks like
//! a smaller disk, so a command's exit status decides whether what it gave is the whole disk.

use std::fmt;
use std::io::{self, Read};
use std::process::{Child, ChildStdout, Command, Stdio};

/// Where a backup reads a source from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A block device, a disk-image file or an NBD URI.
    Path(std::path::PathBuf),
    /// Standard input, read once to its end.
    Stdin,
    /// The standard output of `sh -c COMMAND`, read once to its end; the source fails when the
    /// command exits non-zero.
    Command(String),
}

impl From<std::path::PathBuf> for SourceSpec {
    fn from(p: std::path::PathBuf) -> Self {
        SourceSpec::Path(p)
    }
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceSpec::Path(p) => write!(f, "{}", p.display()),
            SourceSpec::Stdin => f.write_str("standard input"),
            SourceSpec::Command(c) => write!(f, "the output of `{c}`"),
        }
    }
}

/// A stream being read, with the command that writes it, if any.
pub(super) struct Stream {
    reader: Box<dyn Read + Send>,
    /// A read found the end: what was read is the whole stream (a backup that stopped reading
    /// early must not take what it read for the whole disk).
    ended: bool,
    /// The command's process, until it was waited for.
    child: Option<Child>,
}

impl Stream {
    /// Standard input (the process's descriptor 0, unbuffered: reads go straight into the
    /// segment buffers).
    pub(super) fn stdin() -> Stream {
        Stream {
            reader: Box::new(io::stdin()),
            ended: false,
            child: None,
        }
    }

    /// Starts `sh -c command`, its standard output piped to us, its standard error the
    /// operator's (so its own messages reach them), its standard input empty, and none of the
    /// repository passwords sbk was given in its environment (as `sbk run` hides them from hooks).
    pub(super) fn command(command: &str) -> io::Result<Stream> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .env_remove("SBK_PASSWORD")
            .env_remove("SBK_FROM_PASSWORD")
            .env_remove("SBK_NEW_PASSWORD")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let out: ChildStdout = child.stdout.take().expect("stdout was piped");
        Ok(Stream {
            reader: Box::new(out),
            ended: false,
            child: Some(child),
        })
    }

    /// Fills `buf` to its end, or to the end of the stream: returns the bytes read, fewer than
    /// `buf.len()` only at the end.
    pub(super) fn fill(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.reader.read(&mut buf[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if done < buf.len() {
            self.ended = true;
        }
        Ok(done)
    }

    /// After the end of the stream: waits for the command and returns its exit status when it
    /// failed (`None` for standard input, or a command that exited 0). A stream not read to its
    /// end is an error: the reading stopped early, and what was read is not the whole disk.
    pub(super) fn finish(&mut self) -> io::Result<Option<String>> {
        if !self.ended {
            return Err(io::Error::other(
                "the stream was not read to its end (the backup stopped reading early)",
            ));
        }
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let status = child.wait()?;
        Ok((!status.success()).then(|| status.to_string()))
    }
}

impl Drop for Stream {
    /// A backup that fails before the end stops the command rather than leave it writing into
    /// a pipe nobody reads (and a zombie behind).
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
