//! `epoxi top`: a terminal view of the live figures of a running server, the same ones the
//! dashboard page shows, from the same `GET /api/dashboard/v1`, refreshed every second.
//!
//! [`snapshot`] (the answer and the rates between two) and [`view`] (the frame) do no I/O;
//! this module owns the terminal and a polling thread. The terminal is restored on every way
//! out, an error included (ratatui's `init` also restores it on a panic). Without a terminal
//! on standard input and output it refuses to start, with an error saying so, instead of
//! writing escape codes into a pipe.

pub mod snapshot;
pub mod view;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use self::snapshot::Snapshot;
use self::view::View;

/// How often the figures refresh: the endpoint is built to be polled every second or two.
pub const REFRESH: Duration = Duration::from_secs(1);

/// How long one poll may take. Longer than a refresh, so a slow answer is not cut off at
/// once, but bounded, so a hung server shows as an error within seconds.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest answer read. A dashboard answer is a few KiB (20 sites, a row per shard); 4 MiB
/// leaves room for many shards and categories while a wrong URL cannot fill memory.
const SNAPSHOT_BYTES_MAX: u64 = 4 << 20;

/// How long the screen waits for a key between checks for a new snapshot: short enough that
/// a new figure shows at once, long enough to cost nothing.
const TICK: Duration = Duration::from_millis(100);

/// The environment variable read for the token when `--token` is not given (a token on the
/// command line is visible to every user of the machine in the process list).
pub const TOKEN_ENV: &str = "EPOXI_TOKEN";

/// `epoxi top`'s arguments.
#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// The server's HTTP endpoint, e.g. http://127.0.0.1:8000 [default: http.listen of
    /// --config].
    #[arg(long)]
    pub url: Option<String>,
    /// A bearer token with the viewer role [default: $EPOXI_TOKEN; none needed on loopback
    /// when the server has no tokens].
    #[arg(long)]
    pub token: Option<String>,
    /// The server's configuration file, for `http.listen` when --url is not given.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("epoxi top needs a terminal on standard input and output (for figures in a script, use `curl URL/api/dashboard/v1`)")]
    NotATerminal,
    #[error("no URL: give --url, or --config with http.listen set")]
    NoUrl,
    #[error("{0}")]
    Config(String),
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

/// Runs the view until `q`, Esc or Ctrl-C.
pub fn run(args: TopArgs) -> Result<(), TopError> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(TopError::NotATerminal);
    }
    let base = match args.url {
        Some(url) => url,
        None => default_url(args.config)?,
    };
    let url = format!("{}/api/dashboard/v1", base.trim_end_matches('/'));
    let token = args.token.or_else(|| std::env::var(TOKEN_ENV).ok());
    let (tx, rx) = mpsc::sync_channel(1);
    let poll_url = url.clone();
    // The thread ends when it next sends after the screen has gone.
    thread::spawn(move || loop {
        if tx.send(fetch(&poll_url, token.as_deref())).is_err() {
            return;
        }
        thread::sleep(REFRESH);
    });
    let mut terminal = ratatui::try_init()?;
    let mut view = View {
        url,
        ..View::default()
    };
    let result = screen(&mut terminal, &mut view, &rx);
    ratatui::try_restore()?;
    result
}

/// The endpoint `http.listen` of the configuration file names (a wildcard address as
/// loopback, where a server on this machine answers).
fn default_url(config: Option<PathBuf>) -> Result<String, TopError> {
    let config = crate::config::Config::load(config.as_deref())
        .map_err(|e| TopError::Config(e.to_string()))?;
    let mut addr = config.http.listen.ok_or(TopError::NoUrl)?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let scheme = if config.http.tls { "https" } else { "http" };
    Ok(format!("{scheme}://{addr}"))
}

/// Draws and reads keys until the operator quits.
fn screen(
    terminal: &mut ratatui::DefaultTerminal,
    view: &mut View,
    rx: &mpsc::Receiver<Result<Snapshot, String>>,
) -> Result<(), TopError> {
    let mut dirty = true;
    loop {
        while let Ok(polled) = rx.try_recv() {
            match polled {
                Ok(snapshot) => view.update(snapshot),
                Err(why) => view.failed(why),
            }
            dirty = true;
        }
        if dirty {
            terminal.draw(|f| view.draw(f))?;
            dirty = false;
        }
        if event::poll(TICK)? {
            match event::read()? {
                Event::Key(key) if key.kind == KeyEventKind::Press => {
                    let ctrl_c = key.code == KeyCode::Char('c')
                        && key.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
    }
}

/// One poll: the snapshot, or why there is none, in words for the screen's last line.
fn fetch(url: &str, token: Option<&str>) -> Result<Snapshot, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.get(url);
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut answer = request.call().map_err(|e| e.to_string())?;
    let status = answer.status();
    let body = answer
        .body_mut()
        .with_config()
        .limit(SNAPSHOT_BYTES_MAX)
        .read_to_string()
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        let why = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(body);
        return Err(format!("HTTP {}: {why}", status.as_u16()));
    }
    serde_json::from_str(&body).map_err(|e| format!("not a dashboard answer: {e}"))
}
