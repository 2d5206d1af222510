//! Epoxi: a thread-per-core mail transfer agent.
//!
//! The crate is laid out after the concepts an MTA operator knows:
//! - `smtp/`: the SMTP protocol as I/O-free state machines (server and client), the command
//!   parser, the DATA reader and replies.
//! - `spool/`: the durable, append-only, per-shard message store (records, segments, recovery).
//! - `queue/`: per-destination (site and egress pool) ready queues and the retry schedule.
//! - `delivery`: the outbound SMTP adapter over glommio sockets: walking MX hosts, binding
//!   the egress source, one connection's transactions; `delivery_connect`: the TCP connect
//!   bound to the source's address.
//! - `inbound`: the inbound SMTP adapter over glommio sockets.
//! - `route`: destination lookup: static routes, and sites (MX host sets) for the rest.
//! - `eventlog`: one JSON line per message event, a file per shard.
//! - `webhook/`: event-log lines POSTed to HTTP receivers, from durable cursors over the files.
//! - `config`: the TOML file, command-line overrides and validation.
//! - `shard`: what one core runs, wiring the above together on top of the `shards` runtime.
//! - `tls`: rustls configuration and an I/O-free TLS layer for the adapters.
//! - `dns/`: DNS messages (hickory-proto), MX plans, the cache and the resolver adapter.
//! - `egress`: sources, pools and the rules that pick them, source health, connection slots.
//! - `notices`: delivery status notifications (RFC 3464) for the sender.
//! - `bounce/`: bounce classification: a failed reply's category, by rules (TOML) and RFC 3463.
//! - `oob/`: out-of-band reports (DSNs, ARF) to the report domain: parsed, matched, classified.
//! - `suppression/`: the per-tenant suppression list, owned per recipient domain, kept in redb.
//! - `proxy`: the PROXY protocol header (v1/v2) a load balancer sends first.
//! - `auth`: SMTP AUTH users (hashed passwords) and the failed-attempt limiter.
//! - `dkim/`: DKIM signing (RFC 6376, RFC 8463) as I/O-free pieces: canonicalisation, the
//!   streaming body hash, the signature header, keys; `records`: the DNS records a config
//!   needs (`epoxi dns-records`).
//! - `metrics/`: per-shard counters and histograms, merged at scrape into the Prometheus text,
//!   the dashboard's JSON, and alert rules' decisions.
//! - `admin/`: operations on a running server: the protocol, the merge of the shards' answers,
//!   the reload plan, the admin socket and the CLI's client.
//! - `inject/`: HTTP injection (KumoMTA's `/api/inject/v1`) without I/O: the request, its
//!   templates (minijinja) and the message built per recipient (mail-builder).

pub mod admin;
pub mod alloc;
pub mod auth;
pub mod bounce;
pub mod clients;
pub mod clock;
pub mod config;
pub mod core;
pub mod dashboard;
pub mod deadletter;
pub mod delivery;
pub mod dkim;
pub mod dns;
pub mod egress;
pub mod envelope;
pub mod eventlog;
pub mod events;
pub mod http;
pub mod ids;
pub mod inject;
pub mod logging;
pub mod metrics;
pub mod notices;
pub mod oob;
pub mod outcome;
pub mod proxy;
pub mod queue;
pub mod reception;
pub mod records;
pub mod route;
pub mod settings;
pub mod shaping;
pub mod shard;
pub mod smtp;
pub mod spool;
pub mod suppression;
pub mod tls;
pub mod tlspolicy;
pub mod tlsrpt;
pub mod top;
pub mod webhook;
