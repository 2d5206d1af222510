//! `epoxi-loadgen`: load for an SMTP MTA and a sink to measure what comes out of it.
//!
//! `inject` sends messages over reused, pipelined SMTP connections and reports counts and
//! end-of-data latency; `sink` accepts, counts and discards; `dns` serves a static zone of MX
//! and address records, so mail can take the MX path. All end with one JSON line on stdout
//! that scripts parse, and say everything else on stderr.

// The workspace denies `unwrap` outside tests; a test that unwraps is asserting.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use clap::{Parser, Subcommand};

mod client;
mod dns;
mod inject;
mod message;
mod reply_mix;
mod server;
mod sink;
mod smart;
mod smtp_line;
mod stats;
mod throttle;
mod zone;

// inject and sink allocate a little per message on many threads at once.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "epoxi-loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send messages to an SMTP server and report what it answered.
    Inject(inject::InjectArgs),
    /// Accept, count and discard messages, then report.
    Sink(sink::SinkArgs),
    /// Answer DNS queries from a static zone (MX, A, AAAA) until a signal, then report.
    Dns(dns::DnsArgs),
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Inject(args) => inject::run(args),
        Command::Sink(args) => sink::run(args),
        Command::Dns(args) => dns::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with its causes: scripts and CI logs want the reason, not a backtrace.
            eprintln!("epoxi-loadgen: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
