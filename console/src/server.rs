//! The server: where it listens (loopback TCP by default, a Unix socket, or a remote address
//! only with `--allow-remote` and TLS), its connections, and how it starts and stops.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::auth::Auth;
use crate::repos::{JobSpec, Repo, RepoSpec};
use crate::routes::router;
use crate::App;

/// How long a client may take to send a request's headers (slow clients hold a connection).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the kernel's backlog (file descriptors are finite).
const MAX_CONNECTIONS: usize = 256;
/// How long a closed repository's last reference (a page still being made, a count) may take
/// to go before the console stops anyway, leaving its pin lock to expire.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Why the console cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The options ask for something unsafe or impossible (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The token file can be read by others (exit 19).
    #[error("{0}")]
    Exposed(String),
    /// Listening or serving failed.
    #[error("{0}")]
    Io(String),
}

/// Where the console listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket, made mode 0600.
    Unix(PathBuf),
}

/// The certificate chain and key of `--tls-cert` and `--tls-key` (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// A console's settings.
pub struct Config {
    /// Where it listens.
    pub listen: Listen,
    /// TLS, when given.
    pub tls: Option<TlsFiles>,
    /// The token (required on TCP).
    pub token: Option<String>,
    /// Whether a non-loopback address is allowed (then with TLS only).
    pub allow_remote: bool,
    /// Whether exports may be started.
    pub allow_exports: bool,
    /// How old a source's newest snapshot may be before it stands out.
    pub stale_after: Duration,
    /// The repositories.
    pub repos: Vec<RepoSpec>,
    /// The jobs.
    pub jobs: Vec<JobSpec>,
}

/// Reads the token from the first line of `path`: the file must be readable by its owner only
/// (as a key file), and the token at least 16 characters.
pub fn read_token(path: &Path) -> Result<String, ConsoleError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        ConsoleError::Usage(format!(
            "cannot read the token file {}: {e}",
            path.display()
        ))
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ConsoleError::Exposed(format!(
            "the token file {} has mode {mode:04o}: others could read the token that opens every backed-up file; chmod 600 it",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConsoleError::Usage(format!(
            "cannot read the token file {}: {e}",
            path.display()
        ))
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.chars().count() < 16 {
        return Err(ConsoleError::Usage(format!(
            "the token in {} is shorter than 16 characters; make one with: head -c 32 /dev/urandom | base64 > {}",
            path.display(),
            path.display()
        )));
    }
    Ok(token)
}

/// Stops a running console (from a signal handler's thread, say).
#[derive(Clone)]
pub struct Stopper(tokio::sync::watch::Sender<bool>);

impl Stopper {
    /// Stops accepting, stops the exports and returns from [`Console::run`].
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

enum Bound {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// A console, bound to its address and ready to run.
pub struct Console {
    app: Arc<App>,
    bound: Bound,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: (Stopper, tokio::sync::watch::Receiver<bool>),
    place: String,
}

impl Console {
    /// Checks the settings, binds the address and opens every repository (one that fails is
    /// shown with its error, and tried again later).
    pub fn bind(config: Config) -> Result<Console, ConsoleError> {
        if let Listen::Tcp(addr) = &config.listen {
            if !addr.ip().is_loopback() && !config.allow_remote {
                return Err(ConsoleError::Usage(format!(
                    "--listen {addr} is not a loopback address: anyone who reaches it could try to log in and download backed-up files; add --allow-remote (which also needs --tls-cert and --tls-key), or put the console behind a reverse proxy"
                )));
            }
            if config.allow_remote && config.tls.is_none() {
                return Err(ConsoleError::Usage(
                    "--allow-remote needs TLS (--tls-cert and --tls-key): the token and every downloaded file would cross the network in clear".into(),
                ));
            }
            if config.token.is_none() {
                return Err(ConsoleError::Usage(
                    "--token-file is required on a TCP address, loopback included: any local user could otherwise download every backed-up file".into(),
                ));
            }
        }
        if matches!(config.listen, Listen::Unix(_)) && (config.tls.is_some() || config.allow_remote)
        {
            return Err(ConsoleError::Usage(
                "--tls-cert, --tls-key and --allow-remote are for --listen; a Unix socket is reached on this host only".into(),
            ));
        }
        let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
        let (bound, place) = match &config.listen {
            Listen::Tcp(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .map_err(|e| ConsoleError::Usage(format!("cannot listen on {addr}: {e}")))?;
                let at = l
                    .local_addr()
                    .map_err(|e| ConsoleError::Io(e.to_string()))?;
                let scheme = if tls.is_some() { "https" } else { "http" };
                (Bound::Tcp(l), format!("{scheme}://{at}/"))
            }
            Listen::Unix(path) => {
                // Made owner-only from the start: on a socket without a token its mode is the
                // only protection, and a connection made before a chmod would stay open. The
                // umask is the process's, set for the bind alone, before any thread of ours
                // creates files.
                let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
                let bound = std::os::unix::net::UnixListener::bind(path);
                rustix::process::umask(old);
                let l = bound.map_err(|e| {
                    ConsoleError::Usage(format!("cannot listen on {}: {e}", path.display()))
                })?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| ConsoleError::Io(format!("{}: {e}", path.display())))?;
                (
                    Bound::Unix(l, path.clone()),
                    format!("unix:{}", path.display()),
                )
            }
        };
        let repos: Vec<Repo> = config
            .repos
            .into_iter()
            .enumerate()
            .map(|(n, spec)| Repo::new(n, spec))
            .collect();
        // Each repository opened and its snapshots listed before the first page is asked for
        // (10^4 manifests take a moment to load the first time).
        for r in &repos {
            match r.open() {
                Ok(o) => drop(o.catalog()),
                Err(e) => eprintln!("sbk console: {}: {e}", r.spec.location),
            }
        }
        // The exports' sockets: a folder of their own, 0700, removed when the console stops.
        let runtime = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let sockets = tempfile::Builder::new()
            .prefix("sbk-console-")
            .tempdir_in(&runtime)
            .map_err(|e| ConsoleError::Io(format!("{}: {e}", runtime.display())))?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        Ok(Console {
            app: Arc::new(App {
                repos,
                jobs: config.jobs,
                auth: Auth::new(config.token, tls.is_some()),
                exports: crate::exports::Exports::new(sockets.path()),
                _sockets: sockets,
                allow_exports: config.allow_exports,
                stale_after: config.stale_after,
            }),
            bound,
            tls,
            stop: (Stopper(tx), rx),
            place,
        })
    }

    /// Where it listens, as a URL (`http://127.0.0.1:8080/`, `unix:/run/sbk.sock`).
    pub fn place(&self) -> &str {
        &self.place
    }

    /// What stops it.
    pub fn stopper(&self) -> Stopper {
        self.stop.0.clone()
    }

    /// Serves until stopped; then stops every export and closes the repositories.
    pub fn run(self) -> Result<(), ConsoleError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sbk-console")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| ConsoleError::Io(e.to_string()))?;
        let app = self.app.clone();
        let router = router(app.clone());
        let mut stop = self.stop.1.clone();
        let tls = self.tls.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let served = rt.block_on(async move {
            match self.bound {
                Bound::Tcp(l) => {
                    l.set_nonblocking(true)?;
                    let l = tokio::net::TcpListener::from_std(l)?;
                    while let Some(((stream, _), permit)) =
                        next_connection(&slots, &mut stop, || l.accept()).await
                    {
                        let _ = stream.set_nodelay(true);
                        let router = router.clone();
                        let acceptor = tls.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            match acceptor {
                                // A handshake that fails or stalls (a plain HTTP client, a
                                // scanner) ends that connection only.
                                Some(acceptor) => {
                                    let shake = acceptor.accept(stream);
                                    if let Ok(Ok(s)) =
                                        tokio::time::timeout(HEADER_TIMEOUT, shake).await
                                    {
                                        connection(s, router).await;
                                    }
                                }
                                None => connection(stream, router).await,
                            }
                        });
                    }
                }
                Bound::Unix(l, path) => {
                    l.set_nonblocking(true)?;
                    let l = tokio::net::UnixListener::from_std(l)?;
                    while let Some(((stream, _), permit)) =
                        next_connection(&slots, &mut stop, || l.accept()).await
                    {
                        let router = router.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            connection(stream, router).await
                        });
                    }
                    let _ = std::fs::remove_file(path);
                }
            }
            Ok::<(), std::io::Error>(())
        });
        // Connections still open are cut: the process is stopping.
        rt.shutdown_timeout(Duration::from_secs(2));
        app.exports.stop_all();
        let closed: Vec<_> = app
            .repos
            .iter()
            .filter_map(|r| r.close().map(|o| (r, o)))
            .collect();
        // Each repository's pin lock goes with its last reference: wait a little for pages
        // still being made and a count under way, so that the lock is removed, not left to
        // expire.
        let until = std::time::Instant::now() + CLOSE_WAIT;
        for (r, o) in closed {
            while Arc::strong_count(&o) > 1 && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            if Arc::strong_count(&o) > 1 {
                eprintln!(
                    "sbk console: {}: still in use as it stops; its pin lock is left to expire (it blocks nothing)",
                    r.spec.location
                );
            }
        }
        served.map_err(|e| ConsoleError::Io(e.to_string()))
    }
}

/// The next connection and its slot (one of [`MAX_CONNECTIONS`]), once a slot is free; `None`
/// once the console stops. A failed accept (out of file descriptors, say) is waited out, not
/// spun on.
async fn next_connection<S, F>(
    slots: &Arc<tokio::sync::Semaphore>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    mut accept: impl FnMut() -> F,
) -> Option<(S, tokio::sync::OwnedSemaphorePermit)>
where
    F: std::future::Future<Output = std::io::Result<S>>,
{
    let permit = tokio::select! {
        p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        _ = stop.changed() => return None,
    };
    loop {
        tokio::select! {
            got = accept() => match got {
                Ok(s) => return Some((s, permit)),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            },
            _ = stop.changed() => return None,
        }
    }
}

/// Serves HTTP/1.1 on one connection.
async fn connection<S>(stream: S, router: Router)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// The TLS acceptor of `--tls-cert` and `--tls-key`, on ring.
fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, ConsoleError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ConsoleError::Usage(format!("--tls-cert {}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(ConsoleError::Usage(format!(
            "--tls-cert {}: no certificate in it",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| ConsoleError::Usage(format!("--tls-key {}: {e}", files.key.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ConsoleError::Usage(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| ConsoleError::Usage(format!("--tls-cert/--tls-key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
