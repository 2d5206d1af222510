//! The `epoxi` binary: `epoxi serve` runs the MTA.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use epoxi::admin::{Op, Selector, SuppressionOp};
use epoxi::config::{Config, Overrides};
use epoxi::logging::Format;
use epoxi::shard::{self, Answer, Request, Shared};

mod cli;
use cli::tokens::{token, TokenCommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "epoxi", version, about = "Thread-per-core mail transfer agent")]
struct Cli {
    /// Operational log format on stderr.
    #[arg(long, value_enum, default_value_t = Format::Human, global = true)]
    log_format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the MTA: accept mail over SMTP, spool it durably, deliver it.
    Serve(ServeArgs),
    /// Check a configuration file (and flags) and print the settings in effect.
    CheckConfig(CheckArgs),
    /// Add or replace an AUTH user in a users file; the password is read from standard input
    /// (first line), e.g. `printf '%s\n' "$PW" | epoxi passwd --file users alice`.
    Passwd(PasswdArgs),
    /// DKIM keys.
    #[command(subcommand)]
    Dkim(DkimCommand),
    /// Print the SPF, DKIM, DMARC, MTA-STS and TLSRPT records the configuration needs, for
    /// each signing domain.
    DnsRecords(DnsRecordsArgs),
    /// The queue of a running server.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Hold matching mail (no delivery attempts) until resumed or the duration passes.
    Suspend(SuspendArgs),
    /// End a suspension.
    Resume(ResumeArgs),
    /// Bounce matching queued mail, and new matching mail while the directive lasts.
    Bounce(BounceArgs),
    /// Retry now: scheduled mail (all, or matching) becomes due, site backoffs end.
    Flush(FlushArgs),
    /// Send a domain's mail through another egress pool (until reload or restart).
    Rebind(RebindArgs),
    /// Re-inject dead letters (all, or one by id).
    Reinject(ReinjectArgs),
    /// HTTP API bearer tokens (`http.tokens_file`).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Suppression lists.
    #[command(subcommand)]
    Suppression(SuppressionCommand),
    /// Re-read the configuration of the running server (as SIGHUP does).
    Reload(AdminArgs),
    /// Dead letters (messages that failed for good, `dead_letter.enabled`).
    #[command(subcommand)]
    Deadletter(DeadletterCommand),
    /// A live terminal view of a running server (its HTTP endpoint): throughput, queue, sites;
    /// `q` quits.
    Top(epoxi::top::TopArgs),
}

#[derive(Subcommand)]
enum DeadletterCommand {
    /// Print every dead letter, one JSON object a line, oldest first (reads the directory; no
    /// server needed).
    List(DeadletterArgs),
    /// Submit dead letters again (one by reception id, or all) to a running Epoxi over SMTP,
    /// each as a new message to its failed recipients; a dead letter goes once accepted.
    Reinject(DeadletterReinjectArgs),
}

#[derive(clap::Args)]
struct DeadletterReinjectArgs {
    #[command(flatten)]
    where_: DeadletterArgs,
    /// The dead letter's reception id; without it, every one.
    #[arg(long)]
    id: Option<String>,
    /// Epoxi's SMTP listener, e.g. 127.0.0.1:2525.
    #[arg(long)]
    to: SocketAddr,
}

#[derive(clap::Args)]
struct DeadletterArgs {
    /// TOML configuration file, for `dead_letter.dir` and `spool.dir`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Spool directory [default: `spool.dir`]: dead letters are in SPOOL/deadletter unless
    /// `dead_letter.dir` says otherwise.
    #[arg(long)]
    spool: Option<PathBuf>,
}

/// The dead-letter directory the config and flags name.
fn deadletter_dir(args: DeadletterArgs) -> Result<PathBuf, String> {
    let mut config = Config::load(args.config.as_deref()).map_err(|e| e.to_string())?;
    if let Some(spool) = args.spool {
        config.spool.dir = spool;
    }
    Ok(if config.dead_letter.dir.as_os_str().is_empty() {
        config.spool.dir.join("deadletter")
    } else {
        config.dead_letter.dir.clone()
    })
}

/// The dead letters, one JSON line each; unreadable ones are named on stderr.
fn deadletter_list(args: DeadletterArgs) -> Result<String, String> {
    let dir = deadletter_dir(args)?;
    let (found, bad) = epoxi::deadletter::list(&dir).map_err(|e| e.to_string())?;
    for e in bad {
        eprintln!("epoxi deadletter list: {e}");
    }
    let mut out = String::new();
    for f in found {
        let l = &f.letter;
        let line = serde_json::json!({
            "reception_id": l.reception_id,
            "shard": l.shard,
            "sender": l.sender,
            "tenant": l.tenant,
            "received_ms": l.received_ms,
            "final_ms": l.final_ms,
            "recipients": l.recipients.iter().map(|r| serde_json::json!({
                "address": r.address,
                "outcome": r.outcome,
                "code": r.code,
                "enhanced": r.enhanced,
                "bounce_category": r.bounce_category,
            })).collect::<Vec<_>>(),
            "bytes": f.bytes,
            "json": f.json,
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    Ok(out)
}

/// Where the running server's admin socket is.
#[derive(clap::Args, Clone)]
struct AdminArgs {
    /// The server's spool directory (its admin socket is DIR/admin.sock) [default: ./spool].
    #[arg(long)]
    spool: Option<PathBuf>,
    /// The admin socket itself, instead of --spool.
    #[arg(long, conflicts_with = "spool")]
    admin: Option<PathBuf>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
    /// Use the HTTP admin API at this URL (e.g. http://127.0.0.1:8000) instead of the socket.
    #[arg(long, conflicts_with_all = ["spool", "admin"])]
    url: Option<String>,
    /// The bearer token for --url (or EPOXI_TOKEN).
    #[arg(long, env = "EPOXI_TOKEN", hide_env_values = true, requires = "url")]
    token: Option<String>,
    /// With --url https://...: accept the server's certificate unchecked (self-signed).
    #[arg(long, requires = "url")]
    insecure: bool,
}

impl AdminArgs {
    fn socket(&self) -> PathBuf {
        if let Some(path) = &self.admin {
            return path.clone();
        }
        let spool = self
            .spool
            .clone()
            .unwrap_or_else(|| Config::default().spool.dir);
        epoxi::admin::socket::path(&spool)
    }
}

/// Which messages an operation is about: exactly one of these.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct SelectorArgs {
    #[arg(long)]
    domain: Option<String>,
    #[arg(long)]
    site: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    campaign: Option<String>,
    /// A reception id or queue id.
    #[arg(long)]
    id: Option<String>,
}

impl SelectorArgs {
    fn selector(self) -> Option<Selector> {
        let SelectorArgs {
            domain,
            site,
            tenant,
            campaign,
            id,
        } = self;
        domain
            .map(|d| Selector::Domain(d.to_ascii_lowercase()))
            .or(site.map(Selector::Site))
            .or(tenant.map(Selector::Tenant))
            .or(campaign.map(Selector::Campaign))
            .or(id.map(Selector::Id))
    }
}

/// The same, all optional (flush everything when none is given).
#[derive(clap::Args)]
#[group(required = false, multiple = false)]
struct OptionalSelectorArgs {
    #[arg(long)]
    domain: Option<String>,
    #[arg(long)]
    site: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    campaign: Option<String>,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Per site and per tenant: ready, scheduled, in flight, oldest age, suspensions.
    Summary(AdminArgs),
    /// The messages matching a selector.
    Inspect {
        #[command(flatten)]
        selector: SelectorArgs,
        /// At most this many messages.
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(clap::Args)]
struct SuspendArgs {
    #[command(flatten)]
    selector: SelectorArgs,
    /// How long: 30s, 10m, 1h, 2d [default: until resumed].
    #[arg(long, value_parser = epoxi::admin::render::parse_duration)]
    duration: Option<u64>,
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args)]
struct ResumeArgs {
    #[command(flatten)]
    selector: SelectorArgs,
    #[command(flatten)]
    admin: AdminArgs,
}

/// `bounce` takes a domain, tenant or campaign (not a site or one message).
#[derive(clap::Args)]
#[group(id = "bounce_selector", required = true, multiple = false)]
struct BounceSelector {
    #[arg(long)]
    domain: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    campaign: Option<String>,
}

#[derive(clap::Args)]
struct BounceArgs {
    #[command(flatten)]
    selector: BounceSelector,
    #[arg(long)]
    reason: Option<String>,
    /// How long new matching mail is bounced too: 30s, 10m, 1h, 2d [default: 5m].
    #[arg(long, value_parser = epoxi::admin::render::parse_duration)]
    duration: Option<u64>,
    /// Send delivery status notifications to the senders, as for any bounce.
    #[arg(long)]
    notify: bool,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args)]
struct FlushArgs {
    #[command(flatten)]
    selector: OptionalSelectorArgs,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args)]
struct RebindArgs {
    #[arg(long)]
    domain: String,
    /// An egress pool name (`[[pool]]`).
    #[arg(long)]
    pool: String,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args)]
struct ReinjectArgs {
    #[arg(long)]
    id: Option<String>,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Subcommand)]
enum SuppressionCommand {
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    Add {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        address: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    Remove {
        #[arg(long)]
        tenant: Option<String>,
        address: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// The operation a command asks for, where to send it, and whether to print it as tables;
/// `Err`: not an operation on a running server. `Ok(None)`: no selector (clap's argument
/// groups require one, so only a bug gets there).
fn admin_op(command: Command) -> Result<Option<(Op, AdminArgs, bool)>, Box<Command>> {
    let operation = matches!(
        command,
        Command::Queue(_)
            | Command::Suspend(_)
            | Command::Resume(_)
            | Command::Bounce(_)
            | Command::Flush(_)
            | Command::Rebind(_)
            | Command::Reinject(_)
            | Command::Suppression(_)
            | Command::Reload(_)
    );
    if !operation {
        return Err(Box::new(command));
    }
    Ok(admin_request(command))
}

fn admin_request(command: Command) -> Option<(Op, AdminArgs, bool)> {
    Some(match command {
        Command::Queue(QueueCommand::Summary(admin)) => (Op::Summary, admin, true),
        Command::Queue(QueueCommand::Inspect {
            selector,
            limit,
            admin,
        }) => (
            Op::Inspect {
                selector: selector.selector()?,
                limit,
            },
            admin,
            false,
        ),
        Command::Suspend(a) => (
            Op::Suspend {
                selector: a.selector.selector()?,
                duration_s: a.duration,
                reason: a.reason,
            },
            a.admin,
            false,
        ),
        Command::Resume(a) => (
            Op::Resume {
                selector: a.selector.selector()?,
            },
            a.admin,
            false,
        ),
        Command::Bounce(a) => {
            let BounceSelector {
                domain,
                tenant,
                campaign,
            } = a.selector;
            let selector = domain
                .map(|d| Selector::Domain(d.to_ascii_lowercase()))
                .or(tenant.map(Selector::Tenant))
                .or(campaign.map(Selector::Campaign))?;
            (
                Op::Bounce {
                    selector,
                    duration_s: a.duration,
                    reason: a.reason,
                    notify: a.notify,
                },
                a.admin,
                false,
            )
        }
        Command::Flush(a) => {
            let OptionalSelectorArgs {
                domain,
                site,
                tenant,
                campaign,
            } = a.selector;
            let selector = domain
                .map(|d| Selector::Domain(d.to_ascii_lowercase()))
                .or(site.map(Selector::Site))
                .or(tenant.map(Selector::Tenant))
                .or(campaign.map(Selector::Campaign));
            (Op::Flush { selector }, a.admin, false)
        }
        Command::Rebind(a) => (
            Op::Rebind {
                domain: a.domain.to_ascii_lowercase(),
                pool: a.pool,
            },
            a.admin,
            false,
        ),
        Command::Reinject(a) => (Op::Reinject { id: a.id }, a.admin, false),
        Command::Suppression(SuppressionCommand::List {
            tenant,
            limit,
            admin,
        }) => (
            Op::Suppression(SuppressionOp::List { tenant, limit }),
            admin,
            false,
        ),
        Command::Suppression(SuppressionCommand::Add {
            tenant,
            reason,
            address,
            admin,
        }) => (
            Op::Suppression(SuppressionOp::Add {
                tenant,
                rcpt: address,
                reason,
            }),
            admin,
            false,
        ),
        Command::Suppression(SuppressionCommand::Remove {
            tenant,
            address,
            admin,
        }) => (
            Op::Suppression(SuppressionOp::Remove {
                tenant,
                rcpt: address,
            }),
            admin,
            false,
        ),
        Command::Reload(admin) => (Op::Reload, admin, false),
        _ => return None,
    })
}

/// Send `op` to the server and print its answer: as JSON, or (a summary) as tables. Fails
/// when the server cannot be reached or the answer has an `error`.
fn operate(op: &Op, admin: &AdminArgs, table: bool) -> ExitCode {
    let answer = match &admin.url {
        Some(url) => epoxi::admin::client::HttpTarget {
            url: url.clone(),
            token: admin.token.clone(),
            insecure: admin.insecure,
        }
        .request(op)
        .map_err(|e| e.to_string()),
        None => epoxi::admin::client::request(&admin.socket(), op).map_err(|e| e.to_string()),
    };
    let answer = match answer {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("epoxi {}: {e}", op.name());
            return ExitCode::from(2);
        }
    };
    if table && !admin.json {
        print!("{}", epoxi::admin::render::summary(&answer));
    } else {
        let text = serde_json::to_string_pretty(&answer).unwrap_or_else(|_| answer.to_string());
        println!("{text}");
    }
    match answer.get("error") {
        Some(error) => {
            let text = error
                .as_str()
                .map_or_else(|| error.to_string(), str::to_owned);
            eprintln!("epoxi {}: {text}", op.name());
            ExitCode::FAILURE
        }
        None => ExitCode::SUCCESS,
    }
}

#[derive(Subcommand)]
enum DkimCommand {
    /// Make a key: writes the PKCS#8 PEM private key (mode 0600) and prints the DNS TXT
    /// record to publish.
    Keygen(KeygenArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KeyAlgorithm {
    Rsa,
    Ed25519,
}

#[derive(clap::Args)]
struct KeygenArgs {
    #[arg(long)]
    domain: String,
    #[arg(long)]
    selector: String,
    #[arg(long, value_enum, default_value_t = KeyAlgorithm::Rsa)]
    algorithm: KeyAlgorithm,
    /// RSA key size: 1024 to 4096 (2048 and up recommended, RFC 8301).
    #[arg(long, default_value_t = epoxi::dkim::keygen::RSA_BITS_DEFAULT)]
    bits: usize,
    /// Where to write the key [default: SELECTOR.DOMAIN.key]; an existing file is kept.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct DnsRecordsArgs {
    /// TOML configuration file (its `[[dkim]]` tables and keys).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn keygen(args: KeygenArgs) -> Result<String, String> {
    use epoxi::dkim::keygen::{dkim_record, generate, KeyKind};
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let kind = match args.algorithm {
        KeyAlgorithm::Rsa => KeyKind::Rsa { bits: args.bits },
        KeyAlgorithm::Ed25519 => KeyKind::Ed25519,
    };
    let (pem, key) = generate(kind).map_err(|e| e.to_string())?;
    let path = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("{}.{}.key", args.selector, args.domain)));
    // create_new: never overwrite a key that may be published already.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!(
        "wrote {} ({}, {} bits); publish:",
        path.display(),
        key.algorithm().tag(),
        key.bits()
    );
    Ok(dkim_record(
        &args.domain.to_ascii_lowercase(),
        &args.selector,
        &key,
    ))
}

fn dns_records(args: DnsRecordsArgs) -> Result<String, String> {
    let config = Config::load(args.config.as_deref()).map_err(|e| e.to_string())?;
    let settings = config
        .settle(Overrides::default())
        .map_err(|e| e.to_string())?;
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(epoxi::records::dns_records(&settings, now_s))
}

#[derive(clap::Args)]
struct PasswdArgs {
    /// Users file to create or update (written atomically, mode 0600).
    #[arg(long)]
    file: PathBuf,
    /// Remove the user instead of setting a password.
    #[arg(long)]
    delete: bool,
    /// PBKDF2 iterations for the new hash.
    #[arg(long, default_value_t = epoxi::auth::ITERATIONS_DEFAULT)]
    iterations: u32,
    /// The user name (as given in AUTH).
    user: String,
}

fn passwd(args: PasswdArgs) -> Result<String, String> {
    let mut users = if args.file.exists() {
        epoxi::auth::Users::load(&args.file).map_err(|e| e.to_string())?
    } else {
        epoxi::auth::Users::default()
    };
    if args.delete {
        if !users.remove(&args.user) {
            return Err(format!(
                "no user `{}` in {}",
                args.user,
                args.file.display()
            ));
        }
        users.save(&args.file).map_err(|e| e.to_string())?;
        return Ok(format!("removed `{}`", args.user));
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password: {e}"))?;
    let password = line.trim_end_matches(['\r', '\n']);
    users
        .set(&args.user, password, args.iterations)
        .map_err(|e| e.to_string())?;
    users.save(&args.file).map_err(|e| e.to_string())?;
    Ok(format!(
        "set password for `{}` in {}",
        args.user,
        args.file.display()
    ))
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file; without one, the embedded defaults apply.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to accept SMTP on [default: 127.0.0.1:2525].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Spool directory [default: ./spool].
    #[arg(long)]
    spool: Option<PathBuf>,
    /// Event log directory [default: ./log].
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Number of shards (one per core) [default: every online CPU].
    #[arg(long)]
    shards: Option<usize>,
    /// Static route GLOB=HOST:PORT, e.g. '*.test=127.0.0.1:2526'. Repeatable; first match wins.
    #[arg(long = "route", value_name = "GLOB=HOST:PORT")]
    routes: Vec<String>,
    /// DNS resolver IP or IP:PORT, replacing `dns.resolvers` and /etc/resolv.conf. Repeatable;
    /// tried in order.
    #[arg(long = "resolver", value_name = "IP:PORT")]
    resolvers: Vec<String>,
    /// Port of MX hosts [default: 25]; for tests and smart hosts.
    #[arg(long, value_name = "PORT")]
    delivery_port: Option<u16>,
    /// Serve the HTTP API, metrics and dashboard here (`http.listen`), e.g. 127.0.0.1:8000.
    #[arg(long, value_name = "ADDR")]
    http: Option<std::net::SocketAddr>,
}

/// Where the settings come from: the file and the flags, kept so a reload reads them again.
#[derive(Clone)]
struct Source {
    config: Option<PathBuf>,
    overrides: Overrides,
}

impl Source {
    fn of(args: ServeArgs) -> Source {
        Source {
            config: args.config,
            overrides: Overrides {
                listen: args.listen,
                spool: args.spool,
                log_dir: args.log_dir,
                shards: args.shards,
                routes: args.routes,
                resolvers: args.resolvers,
                delivery_port: args.delivery_port,
                http: args.http,
            },
        }
    }

    /// Load and check the settings, as at start and on every reload.
    fn settle(&self) -> Result<epoxi::settings::Settings, String> {
        let config = Config::load(self.config.as_deref()).map_err(|e| e.to_string())?;
        config
            .settle(self.overrides.clone())
            .map_err(|e| e.to_string())
    }
}

/// `epoxi check-config`: the configuration, or with `--site` the effective limits of one site.
#[derive(clap::Args)]
struct CheckArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Print the effective limits of the site with these MX hosts (comma-separated), and the
    /// layer each value comes from, instead of the whole configuration.
    #[arg(long, value_name = "HOSTS")]
    site: Option<String>,
    /// ... for mail to this recipient domain (a `[[domain]]` with limits is a site of its own).
    #[arg(long, requires = "site")]
    domain: Option<String>,
    /// ... from this egress source (its `[[site]] source = ...` overrides).
    #[arg(long, requires = "site")]
    source: Option<String>,
}

/// The `check-config --site` table.
fn effective_limits(
    settings: &epoxi::settings::Settings,
    site: &str,
    domain: Option<&str>,
    source_name: Option<&str>,
) -> String {
    use std::fmt::Write;
    let hosts: Vec<String> = site
        .split(',')
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .collect();
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let domain = domain.map(str::to_ascii_lowercase);
    let sources = &settings.egress.sources;
    let source = source_name.map(|name| sources.iter().position(|s| s.name == name));
    let mut out = String::new();
    if let Some(None) = source {
        let _ = writeln!(out, "no source named `{}`", source_name.unwrap_or(""));
        return out;
    }
    let source = source.flatten().map(|s| s as u16);
    let (provider, rows) = settings.shaping.explain(&hosts, domain.as_deref(), source);
    let _ = writeln!(
        out,
        "site {} (provider {provider}){}{}",
        hosts.join(","),
        domain
            .as_deref()
            .map(|d| format!(", domain {d}"))
            .unwrap_or_default(),
        source_name
            .map(|s| format!(", source {s}"))
            .unwrap_or_default(),
    );
    for r in rows {
        let _ = writeln!(out, "  {:<28} {:<20} {}", r.key, r.value, r.origin);
    }
    if let Some(s) = source {
        if let Some(rate) = settings.shaping.source_rate(usize::from(s)) {
            let _ = writeln!(
                out,
                "  {:<28} {:<20} source",
                "source message_rate",
                rate.to_string()
            );
        }
    }
    out
}

fn settle(args: ServeArgs) -> Result<epoxi::settings::Settings, String> {
    Source::of(args).settle()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    epoxi::logging::init(cli.log_format);
    let command = match admin_op(cli.command) {
        Ok(Some((op, admin, table))) => return operate(&op, &admin, table),
        Ok(None) => {
            eprintln!("epoxi: say which messages: --domain, --site, --tenant, --campaign or --id");
            return ExitCode::from(2);
        }
        Err(command) => *command,
    };
    match command {
        Command::CheckConfig(CheckArgs {
            serve,
            site,
            domain,
            source,
        }) => match settle(serve) {
            Ok(settings) if site.is_some() => {
                let site = site.unwrap_or_default();
                print!(
                    "{}",
                    effective_limits(&settings, &site, domain.as_deref(), source.as_deref())
                );
                ExitCode::SUCCESS
            }
            Ok(settings) => {
                println!("{settings:#?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("epoxi: {e}");
                ExitCode::from(2)
            }
        },
        Command::Dkim(DkimCommand::Keygen(args)) => match keygen(args) {
            Ok(record) => {
                println!("{record}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("epoxi dkim keygen: {e}");
                ExitCode::FAILURE
            }
        },
        Command::DnsRecords(args) => match dns_records(args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("epoxi dns-records: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Deadletter(DeadletterCommand::List(args)) => match deadletter_list(args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("epoxi deadletter list: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Deadletter(DeadletterCommand::Reinject(args)) => {
            let report = deadletter_dir(args.where_).and_then(|dir| {
                epoxi::deadletter::reinject_over_smtp(&dir, args.id.as_deref(), args.to)
                    .map_err(|e| e.to_string())
            });
            match report {
                Ok(report) => {
                    println!("{}", serde_json::to_string(&report).unwrap_or_default());
                    if report.failed.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("epoxi deadletter reinject: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token(command) => token(command),
        Command::Top(args) => match epoxi::top::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("epoxi top: {e}");
                ExitCode::from(2)
            }
        },
        Command::Passwd(args) => match passwd(args) {
            Ok(done) => {
                eprintln!("epoxi: {done}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("epoxi: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve(args) => {
            let source = Source::of(args);
            match source.settle().and_then(|settings| serve(settings, source)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::from(2)
                }
            }
        }
        // Operations on a running server were sent above.
        _ => ExitCode::from(2),
    }
}

/// SIGHUP: reload, as `epoxi reload` does, and say how it went on stderr.
fn sighup_reload(path: &std::path::Path) {
    tracing::info!("SIGHUP: reloading the configuration");
    match epoxi::admin::client::request(path, &Op::Reload) {
        // The server logs the outcome itself (applied, restart needed, or refused).
        Ok(_) => {}
        Err(e) => tracing::error!("SIGHUP: reload failed: {e}"),
    }
}

/// A shard recovers only its own spool directory. Starting with fewer shards than a spool was
/// written with would strand the mail of the missing shards, so refuse, and say how to fix it.
fn check_spool_shards(dir: &std::path::Path, count: usize) -> Result<(), String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(index) = name.to_str().and_then(|n| n.strip_prefix("shard-")) else {
            continue;
        };
        let Ok(index) = index.parse::<usize>() else {
            continue;
        };
        let has_segments = std::fs::read_dir(entry.path())
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            })
            .unwrap_or(false);
        if index >= count && has_segments {
            return Err(format!(
                "spool {} holds queued mail of shard {index}, but only {count} shards are \
                 configured: start with --shards {} (or more) to deliver it",
                dir.display(),
                index + 1
            ));
        }
    }
    Ok(())
}

fn serve(mut settings: epoxi::settings::Settings, source: Source) -> Result<(), String> {
    // Port 0 means "any free port": pick it once here so every shard binds the same one.
    if settings.config.server.listen.port() == 0 {
        let probe = std::net::TcpListener::bind(settings.config.server.listen)
            .map_err(|e| format!("cannot bind {}: {e}", settings.config.server.listen))?;
        settings.config.server.listen = probe.local_addr().map_err(|e| e.to_string())?;
    }
    if let Some(http) = settings.config.http.listen.filter(|a| a.port() == 0) {
        let probe = std::net::TcpListener::bind(http)
            .map_err(|e| format!("http: cannot bind {http}: {e}"))?;
        settings.config.http.listen = Some(probe.local_addr().map_err(|e| e.to_string())?);
    }
    check_spool_shards(&settings.config.spool.dir, settings.shard_count)?;
    // The admin socket first: a second server on this spool is refused here, before it
    // touches the spool. Bound before any shard starts (see `admin::socket`).
    let admin_path = epoxi::admin::socket::path(&settings.config.spool.dir);
    let admin_listener = epoxi::admin::socket::bind(&admin_path).map_err(|e| e.to_string())?;
    let (accept_end, shard_end) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| format!("admin socket: cannot make the hand-over pair: {e}"))?;
    std::thread::Builder::new()
        .name("admin-accept".into())
        .spawn(move || epoxi::admin::socket::accept_loop(admin_listener, accept_end))
        .map_err(|e| format!("admin socket: cannot start its thread: {e}"))?;
    let stop = shards::Stop::new();
    // Signals are taken by a thread of their own (not in a handler): SIGTERM and SIGINT
    // trigger the stop broadcast every shard awaits; SIGHUP asks the server for a reload over
    // its own admin socket, so a reload takes one path whoever asks.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let signal_handle = signals.handle();
    {
        let stop = stop.clone();
        let admin_path = admin_path.clone();
        std::thread::spawn(move || {
            for signal in signals.forever() {
                if signal == signal_hook::consts::SIGHUP {
                    let path = admin_path.clone();
                    // Its own thread: a slow reload must not hold up a SIGTERM.
                    std::thread::spawn(move || sighup_reload(&path));
                    continue;
                }
                tracing::info!("stopping: finishing in-flight work");
                stop.trigger();
                return;
            }
        });
    }
    let sh = &settings.config.shards;
    let runtime = shards::RuntimeConfig {
        shards: settings.shard_count,
        pin: sh.pin,
        io_memory_bytes: sh.io_memory_bytes,
        ring_depth: sh.ring_depth,
        spin_before_park_us: sh.spin_before_park_us,
        mesh_capacity: sh.mesh_capacity,
    };
    let count = settings.shard_count;
    let listen = settings.config.server.listen;
    let (listening, listened) = crossbeam::channel::bounded::<usize>(count);
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let http = settings.config.http.listen;
    {
        let stop = stop.clone();
        let ready = ready.clone();
        std::thread::spawn(move || {
            // Announce readiness once every shard listens (tests and scripts wait for this
            // line); a shard that fails to start stops the others instead.
            for _ in 0..count {
                if listened.recv().is_err() {
                    return;
                }
            }
            if !stop.is_triggered() {
                ready.store(true, std::sync::atomic::Ordering::Release);
                if let Some(http) = http {
                    // Before the line below: whoever waits for it can read this one too.
                    tracing::info!("http api on {http}");
                }
                tracing::info!("listening on {listen} with {count} shards");
            }
        });
    }
    // Webhooks read the log files the shards write, on threads of their own.
    let webhooks = epoxi::webhook::Webhooks::start(
        &settings.webhooks,
        &settings.config.log.dir,
        settings.shard_count,
    )
    .map_err(|e| e.to_string())?;
    let reloader: shard::admin::Reloader = Arc::new(move || source.settle());
    let shared = Shared {
        settings: Arc::new(settings),
        stop: stop.clone(),
        listening,
        admin: Some(Arc::new(std::sync::Mutex::new(Some(shard_end)))),
        reloader: Some(reloader),
        ready,
    };
    let results = shards::run::<shards::Wire<Request, Answer>, _, _, _>(&runtime, move |s| {
        let shared = shared.clone();
        async move {
            let stop = shared.stop.clone();
            let result = shard::run(s, shared).await;
            if result.is_err() {
                // One shard failing to start stops the others: a partial MTA would silently
                // own no spool for some domains.
                stop.trigger();
            }
            result
        }
    })
    .map_err(|e| e.to_string())?;
    // The shards have flushed their logs: the webhooks get a moment to send the last lines.
    webhooks.stop();
    signal_handle.close();
    // Ours (bound above): a clean stop leaves no socket behind.
    if let Err(e) = std::fs::remove_file(&admin_path) {
        tracing::warn!("cannot remove {}: {e}", admin_path.display());
    }
    let errors: Vec<String> = results
        .into_iter()
        .filter_map(Result::err)
        .map(|e| e.to_string())
        .collect();
    if errors.is_empty() {
        tracing::info!("stopped cleanly");
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}
