//! Files: a snapshot's partitions and directories, browsed through the file-level restore
//! readers, and files downloaded from them, streamed, each chunk verified as always. And the
//! exports of a snapshot, with the command lines that use them.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use sbk_diskfs::{lookup, Filesystem, Kind, Node};
use sbk_engine::{parse_part_path, EngineError};
use sbk_store::SnapshotId;

use super::{bytes, csrf_field, enc, layout, short, Page, PageError};
use crate::auth::Caller;
use crate::exports::Export;
use crate::pages::snapshots::{repo, snapshot};
use crate::repos::{OpenFiles, Opened, Snap};
use crate::App;

/// Entries a directory page lists at most.
const LISTED: usize = 5000;
/// Bytes read from a file at once while it is sent.
const PIECE: usize = 1 << 20;

fn fs_error(path: &str, e: sbk_diskfs::FsError) -> PageError {
    match EngineError::from_fs(path, e) {
        e @ EngineError::NoSuchFile { .. } => PageError::not_found(e.to_string()),
        e => PageError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: e.to_string(),
        },
    }
}

/// A name from a filesystem as it can be shown and put in a link.
fn shown(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// A path of a snapshot's filesystem, looked up: the open disk (kept, pinned), the filesystem,
/// the node, and the path inside the partition.
struct Found {
    open: Arc<OpenFiles>,
    fs: Box<dyn Filesystem>,
    node: Node,
    part: u32,
    inner: String,
}

/// Looks `path` (`PART:PATH`) up in snapshot `s` of `opened`.
fn find(opened: &Opened, s: &Snap, path: &str) -> Result<Found, PageError> {
    let open = opened.files(s.id).map_err(|e| PageError {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        message: e,
    })?;
    let (part, inner) = parse_part_path(path).map_err(PageError::bad)?;
    let fs = open.files.filesystem(part).map_err(|e| PageError {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        message: e.to_string(),
    })?;
    let node = lookup(fs.as_ref(), inner.as_bytes(), true).map_err(|e| fs_error(&inner, e))?;
    Ok(Found {
        open,
        fs,
        node,
        part,
        inner,
    })
}

/// The files page: the partitions (`path` empty), or a directory, or a file's details.
pub fn page(app: &App, caller: &Caller, n: usize, spec: &str, path: &str) -> Page {
    let (_, opened) = repo(app, n)?;
    let s = snapshot(&opened, spec)?;
    let id = s.id.to_hex();
    let base = format!("/r/{n}/snap/{id}");
    let title = format!(
        "Files of {} ({} at {})",
        short(&s.id),
        s.source,
        super::time(s.time_ns)
    );
    if path.is_empty() {
        // A disk sbk cannot read files from (no partition table, no filesystem it knows) is
        // what this snapshot is, not a failure of the console: said on the page.
        let open = match opened.files(s.id) {
            Ok(o) => o,
            Err(e) => {
                return Ok(layout(
                    caller,
                    &title,
                    html! {
                        p { a href=(base) { "← snapshot" } }
                        p.error { "No files to browse: " (e) }
                        p.muted { "The whole disk is still there: start an export on the snapshot's page, or use sbk serve or sbk restore." }
                    },
                ))
            }
        };
        let files = &open.files;
        let parts = files.partitions();
        return Ok(layout(
            caller,
            &title,
            html! {
                p { a href=(base) { "← snapshot" } " · partition table: " (files.table().kind.name()) }
                table.files {
                    thead { tr { th { "Partition" } th { "Filesystem" } th { "Label" } th { "Start" } th { "Size" } } }
                    tbody {
                        @for p in parts {
                            tr {
                                td { @if p.filesystem.to_string() != "unknown" && !p.partition.extended {
                                        a href=(format!("{base}/files?path={}", enc(&format!("{}:/", p.partition.number)))) { (p.partition.number) }
                                    } @else { (p.partition.number) } }
                                td { (p.filesystem) }
                                td { (p.label) }
                                td { (p.partition.start) }
                                td { (bytes(p.partition.size)) }
                            }
                        }
                    }
                }
            },
        ));
    }
    let Found {
        fs,
        node,
        part,
        inner,
        ..
    } = find(&opened, &s, path)?;
    let crumbs = crumbs(&base, part, &inner);
    if node.kind != Kind::Dir {
        return Ok(layout(
            caller,
            &title,
            html! {
                (crumbs)
                dl.figures {
                    div { dt { "Kind" } dd { (node.kind.name()) } }
                    div { dt { "Size" } dd { (bytes(node.size)) } }
                    div { dt { "Modified" } dd { (super::time(node.mtime.secs.saturating_mul(1_000_000_000))) } }
                    div { dt { "Mode" } dd { (format!("{:o}", node.perm)) " " (node.uid) ":" (node.gid) } }
                }
                @if node.kind == Kind::File {
                    p { a.button download href=(format!("{base}/download?path={}", enc(path))) { "Download" } }
                }
            },
        ));
    }
    let mut entries = fs.read_dir(&node).map_err(|e| fs_error(&inner, e))?;
    entries.sort_by(|a, b| {
        (a.node.kind != Kind::Dir, &a.name).cmp(&(b.node.kind != Kind::Dir, &b.name))
    });
    let total = entries.len();
    let dir = if inner.ends_with('/') {
        inner.clone()
    } else {
        format!("{inner}/")
    };
    Ok(layout(
        caller,
        &title,
        html! {
            (crumbs)
            table.files {
                thead { tr { th { "Name" } th { "Kind" } th { "Size" } th { "Modified" } th { "Mode" } th {} } }
                tbody {
                    @for e in entries.iter().take(LISTED) {
                        @let name = shown(&e.name);
                        @let child = format!("{part}:{dir}{name}");
                        tr {
                            td { a href=(format!("{base}/files?path={}", enc(&child))) { (name) @if e.node.kind == Kind::Dir { "/" } } }
                            td { (e.node.kind.name()) }
                            td { @if e.node.kind == Kind::File { (bytes(e.node.size)) } }
                            td { (super::time(e.node.mtime.secs.saturating_mul(1_000_000_000))) }
                            td { (format!("{:o}", e.node.perm)) }
                            td { @if e.node.kind == Kind::File { a download href=(format!("{base}/download?path={}", enc(&child))) { "download" } } }
                        }
                    }
                }
            }
            @if total > LISTED { p.muted { (total - LISTED) " more entries not listed (sbk ls lists them all)" } }
        },
    ))
}

/// Links to each directory above `inner`.
fn crumbs(base: &str, part: u32, inner: &str) -> Markup {
    let mut at = String::new();
    let steps: Vec<(String, &str)> = inner
        .split('/')
        .filter(|c| !c.is_empty())
        .map(|c| {
            at.push('/');
            at.push_str(c);
            (
                format!("{base}/files?path={}", enc(&format!("{part}:{at}"))),
                c,
            )
        })
        .collect();
    html! {
        p.crumbs {
            a href=(format!("{base}/files")) { "partitions" } " / "
            a href=(format!("{base}/files?path={}", enc(&format!("{part}:/")))) { (part) ":" }
            @for (href, c) in steps {
                " / " a href=(href) { (c) }
            }
        }
    }
}

/// A download: the file's bytes, streamed as they are read and verified. The length is sent
/// first, so a transfer that a damaged chunk cuts short is an incomplete one to any client
/// (the connection is closed mid-body), never a shorter file that looks whole.
pub async fn download(app: Arc<App>, n: usize, spec: String, path: String) -> Response {
    let (meta_tx, meta_rx) = tokio::sync::oneshot::channel::<Result<(u64, String), PageError>>();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let spawned = std::thread::Builder::new()
        .name("sbk-console-download".into())
        .spawn(move || send_file(&app, n, &spec, &path, meta_tx, tx));
    if let Err(e) = spawned {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    let (size, name) = match meta_rx.await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return (e.status, format!("{}\n", e.message)).into_response(),
        Err(_) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the file reader failed\n",
            )
                .into_response()
        }
    };
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename*=UTF-8''{}", enc(&name))) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}

/// Reads the file on a thread of its own (its reads block): first its size and name, then its
/// bytes; a read that fails ends the stream with that error.
fn send_file(
    app: &App,
    n: usize,
    spec: &str,
    path: &str,
    meta: tokio::sync::oneshot::Sender<Result<(u64, String), PageError>>,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let found = (|| {
        let (_, opened) = repo(app, n)?;
        let s = snapshot(&opened, spec)?;
        let found = find(&opened, &s, path)?;
        if found.node.kind != Kind::File {
            return Err(PageError::bad(format!(
                "{path} is a {}, not a file",
                found.node.kind.name()
            )));
        }
        Ok(found)
    })();
    // The open disk (and its pin) stays with this thread until the last byte is sent.
    let Found {
        open: _open,
        fs,
        node,
        inner,
        ..
    } = match found {
        Ok(f) => f,
        Err(e) => {
            let _ = meta.send(Err(e));
            return;
        }
    };
    let name = inner.rsplit('/').next().unwrap_or("file").to_owned();
    let data = match fs.open(&node) {
        Ok(d) => d,
        Err(e) => {
            let _ = meta.send(Err(fs_error(path, e)));
            return;
        }
    };
    if meta.send(Ok((node.size, name))).is_err() {
        return;
    }
    let mut at = 0u64;
    while at < node.size {
        let mut buf = vec![0u8; PIECE.min((node.size - at) as usize)];
        let piece = match data.read_at(at, &mut buf) {
            Ok(0) => Err(std::io::Error::other(format!(
                "{path}: the file ends at byte {at}, before its size"
            ))),
            Ok(got) => {
                buf.truncate(got);
                at += got as u64;
                Ok(Bytes::from(buf))
            }
            Err(e) => {
                eprintln!("sbk console: download of {path} stopped at byte {at}: {e}");
                Err(std::io::Error::other(e.to_string()))
            }
        };
        let failed = piece.is_err();
        if tx.blocking_send(piece).is_err() || failed {
            return;
        }
    }
}

/// The exports of snapshot `id` of repository `n` with their command lines, and the button
/// that starts one.
pub fn exports_of(
    app: &App,
    caller: &Caller,
    n: usize,
    id: &SnapshotId,
    exports: &[Arc<Export>],
) -> Markup {
    html! {
        @for e in exports { (export_card(caller, e)) }
        @if app.allow_exports {
            form method="post" action="/exports" {
                (csrf_field(caller))
                input type="hidden" name="repo" value=(n);
                input type="hidden" name="snapshot" value=(id.to_hex());
                button.start type="submit" { "Start an NBD export" }
                span.muted { " read-only, on a Unix socket only the console's user can open, pinned against prune while in use" }
            }
        } @else {
            p.muted { "Exports are off: start the console with --allow-exports to serve snapshots over NBD from here (or run sbk serve)." }
        }
    }
}

/// One export: where it is, how to use it, and its stop button.
pub fn export_card(caller: &Caller, e: &Export) -> Markup {
    let uri = e.uri();
    html! {
        section.card.export data-uri=(uri) {
            h3 { "Export " (e.n) ": " code.uri { (uri) } }
            p.muted { "Snapshot " (e.snapshot) ", started " (super::time(e.started.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64))) }
            pre.commands {
                "# what is on it\nnbdinfo " (uri) "\n"
                "# copy the whole disk out\nnbdcopy --progress " (uri) " restored.raw\n"
                "qemu-img convert -p -O qcow2 " (uri) " restored.qcow2\n"
                "# boot from the backup at once (writes go to the overlay)\n"
                "qemu-img create -f qcow2 -b " (uri) " -F raw overlay.qcow2\n"
                "qemu-system-x86_64 -m 2048 -drive file=overlay.qcow2,format=qcow2\n"
                "# or serve it to other machines yourself: sbk serve (loopback or a socket; --allow-remote)"
            }
            form method="post" action=(format!("/exports/{}/stop", e.n)) {
                (csrf_field(caller))
                button.stop type="submit" { "Stop export" }
            }
        }
    }
}

/// The exports page: every running export.
pub fn exports_page(app: &App, caller: &Caller) -> Page {
    let all = app.exports.all();
    Ok(layout(
        caller,
        "Exports",
        html! {
            @if all.is_empty() { p.muted { "No export runs. Start one from a snapshot's page." } }
            @for e in &all {
                p { a href=(format!("/r/{}/snap/{}", e.repo, e.snapshot.to_hex())) { "snapshot " (short(&e.snapshot)) } " in " (app.repos[e.repo].spec.location) }
                (export_card(caller, e))
            }
        },
    ))
}
