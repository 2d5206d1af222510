//! Runtime reload: which of freshly loaded settings a running server can take, and which wait
//! for a restart.
//!
//! The new settings were checked exactly as at start ([`crate::config::Config::settle`]). What
//! every shard swaps in place: static routes, the retry policy (`[queue]` backoff and max age,
//! `[[retry]]` rules), the bounce rules, site
//! limits, delivery timeouts and TLS, DKIM signers, AUTH users, the TLS certificate, pool rules
//! (`[[pool_rule]]`, `egress.default_pool`, `egress.tenant_header`, source health knobs),
//! `queue.priority_weights`, the priority and campaign headers and `egress.strip_headers`
//! (for sessions and connections from now on), and
//! the session settings of new inbound connections (`[server]` limits and timeouts, relay
//! networks, each listener's policy), and shaping (`[shaping]`, `[[provider]]`, `[[site]]`,
//! `[[domain]]` limits, rates of sources and tenants, `[[adaptive]]` rules, which count afresh,
//! `[[warmup]]` schedules and a source's warmup). What is bound at start keeps its old value here, and the
//! reply names it as needing a restart:
//! - listener addresses (`server.listen`, `server.implicit_tls_listen`, `[[listener]]`
//!   addresses): sockets are bound once per shard;
//! - `[[source]]` and `[[pool]]`: connection permits are counted across shards by source
//!   index, and ready jobs are keyed by pool index; shards swap one after another, so a changed
//!   index would mean two things at once between them;
//! - `[spool]`, `[log]`, `[shards]`, `queue.messages_max`, `[dns]` and the resolvers, MTA-STS
//!   and DANE switches, the CA bundle and `delivery.port`, `[tls_report]`, `[[domain]]`
//!   spreads: each is built into a running part (spool files, writer threads, executors, the
//!   resolver, the policy agent, the reporter, the recipient → shard map). The TLS reporter
//!   also keeps the host name and DKIM signers it started with;
//! - `[suppression]`: each shard opens its store at start (`oob.*` applies at once).
//! - `[dead_letter]`: each shard opens its store at start (`[notices]`, `[[tenant]]` apply at once).
//!
//! No I/O.

use crate::settings::Settings;

/// The settings to hand to the shards, and what they could not take.
#[derive(Debug)]
pub struct Plan {
    pub settings: Settings,
    /// Config keys that changed but take effect only after a restart.
    pub restart_needed: Vec<&'static str>,
    /// Config keys that changed and are applied now.
    pub applied: Vec<&'static str>,
}

/// What of `new` can replace `old` in a running server.
pub fn plan(old: &Settings, mut new: Settings) -> Plan {
    let mut restart_needed = Vec::new();
    let (o, n) = (&old.config, &mut new.config);

    // Listener addresses. `--listen 127.0.0.1:0` was turned into a port at start: the same
    // flag read again is the same address.
    let listen = if n.server.listen.port() == 0 && n.server.listen.ip() == o.server.listen.ip() {
        o.server.listen
    } else {
        n.server.listen
    };
    if listen != o.server.listen {
        restart_needed.push("server.listen");
    }
    n.server.listen = o.server.listen;
    if new.implicit_tls_listen != old.implicit_tls_listen {
        restart_needed.push("server.implicit_tls_listen");
    }
    new.implicit_tls_listen = old.implicit_tls_listen;
    n.server.implicit_tls_listen = o.server.implicit_tls_listen.clone();
    let addresses = |l: &[crate::config::ListenerEntry]| -> Vec<std::net::SocketAddr> {
        l.iter().map(|e| e.address).collect()
    };
    if addresses(&n.listener) != addresses(&o.listener) {
        // Another set of sockets: the old listeners keep their old policies too.
        restart_needed.push("listener");
        n.listener = o.listener.clone();
    } else {
        // The same sockets: their policies swap, but implicit TLS is how a socket starts.
        for (nl, ol) in n.listener.iter_mut().zip(&o.listener) {
            if nl.implicit_tls != ol.implicit_tls {
                restart_needed.push("listener.implicit_tls");
                nl.implicit_tls = ol.implicit_tls;
            }
        }
    }

    // Sections built into running parts: the old ones stay.
    macro_rules! keep {
        ($key:literal, $($field:tt)+) => {
            if n.$($field)+ != o.$($field)+ {
                restart_needed.push($key);
                n.$($field)+ = o.$($field)+.clone();
            }
        };
    }
    keep!("spool", spool);
    keep!("log", log);
    keep!("shards", shards);
    keep!("queue.messages_max", queue.messages_max);
    keep!("dns", dns);
    keep!("delivery.port", delivery.port);
    keep!("delivery.mta_sts", delivery.mta_sts);
    keep!("delivery.dane", delivery.dane);
    keep!("delivery.mta_sts_https_port", delivery.mta_sts_https_port);
    keep!("tls_report", tls_report);
    keep!("domain", domain);
    if new.shard_count != old.shard_count {
        restart_needed.push("shards.count");
    }
    new.shard_count = old.shard_count;
    if new.resolvers != old.resolvers {
        restart_needed.push("dns.resolvers");
    }
    new.resolvers = old.resolvers.clone();
    // The policy agent holds the trust roots it was started with.
    if new.config.delivery.tls_ca_file != old.config.delivery.tls_ca_file && old.tls_trust.is_some()
    {
        restart_needed.push("delivery.tls_ca_file (MTA-STS, DANE)");
    }
    new.tls_trust = old.tls_trust.clone();

    // Egress: sources and pools are indices shared by every shard (see the module doc).
    let (oe, ne) = (&old.egress, &new.egress);
    if ne.sources != oe.sources || ne.pools != oe.pools {
        restart_needed.push("source, pool");
        new.egress = old.egress.clone();
        new.config.source = old.config.source.clone();
        new.config.pool = old.config.pool.clone();
        new.config.pool_rule = old.config.pool_rule.clone();
        new.config.egress = old.config.egress.clone();
    }

    // The suppression stores are opened at start, with the switch; the reply goes with it.
    if new.config.suppression != old.config.suppression {
        restart_needed.push("suppression");
        new.config.suppression = old.config.suppression.clone();
        new.suppression_reply = old.suppression_reply.clone();
    }

    // The dead-letter store is opened at start (its directory and bounds).
    if new.config.dead_letter != old.config.dead_letter {
        restart_needed.push("dead_letter");
        new.config.dead_letter = old.config.dead_letter.clone();
    }

    // Webhook threads start with the server, over the cursors they own.
    if new.config.webhook != old.config.webhook {
        restart_needed.push("webhook");
        new.config.webhook = old.config.webhook.clone();
        new.webhooks = old.webhooks.clone();
    }

    let applied = changed(&old.config, &new.config);
    Plan {
        settings: new,
        restart_needed,
        applied,
    }
}

/// The keys that differ between the running settings and the ones to apply.
fn changed(o: &crate::config::Config, n: &crate::config::Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |key: &'static str, differs: bool| {
        if differs {
            out.push(key);
        }
    };
    check("route", n.route != o.route);
    check("queue", n.queue != o.queue);
    check("retry", n.retry != o.retry);
    check("delivery", n.delivery != o.delivery);
    check("server", n.server != o.server);
    check("listener", n.listener != o.listener);
    check("site", n.site != o.site);
    check("bounce", n.bounce != o.bounce);
    check("dkim", n.dkim != o.dkim);
    check("pool_rule", n.pool_rule != o.pool_rule);
    check("egress", n.egress != o.egress);
    // Read by reception and the core as each report or delivery comes: applies at once.
    check("oob", n.oob != o.oob);
    // Read when each notice is decided.
    check("notices", n.notices != o.notices);
    check("tenant", n.tenant != o.tenant);
    // Shaping: limits are looked up again per site (the memo starts over), adaptive rules
    // count afresh, warmup caps apply to the next message.
    check("shaping", n.shaping != o.shaping);
    check("provider", n.provider != o.provider);
    check("domain", n.domain != o.domain);
    check("adaptive", n.adaptive != o.adaptive);
    check("warmup", n.warmup != o.warmup);
    check("source (rates, warmup)", n.source != o.source);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    fn settle(text: &str) -> Settings {
        let overrides = Overrides {
            resolvers: vec!["127.0.0.1:53".into()],
            ..Overrides::default()
        };
        Config::parse(text)
            .expect("parse")
            .settle(overrides)
            .expect("settle")
    }

    #[test]
    fn routes_and_retries_apply_listeners_and_pools_wait() {
        let old = settle(
            "[server]\nlisten = \"127.0.0.1:2525\"\n[[source]]\nname = \"a\"\n\
             [[route]]\ndomain = \"*.test\"\ntarget = \"127.0.0.1:1\"\n",
        );
        let new = settle(
            "[server]\nlisten = \"127.0.0.1:2526\"\n[queue]\nretry_base_ms = 5\n\
             [[source]]\nname = \"b\"\n[[route]]\ndomain = \"*.test\"\ntarget = \"127.0.0.1:2\"\n",
        );
        let plan = plan(&old, new);
        assert_eq!(plan.settings.config.server.listen, old.config.server.listen);
        assert!(plan.restart_needed.contains(&"server.listen"), "{plan:?}");
        assert!(plan.restart_needed.contains(&"source, pool"), "{plan:?}");
        assert_eq!(plan.settings.egress.sources, old.egress.sources);
        assert!(plan.applied.contains(&"route"), "{:?}", plan.applied);
        assert!(plan.applied.contains(&"queue"), "{:?}", plan.applied);
        assert_eq!(plan.settings.config.queue.retry_base_ms, 5);
        assert_eq!(plan.settings.config.route[0].target, "127.0.0.1:2");
    }

    #[test]
    fn port_zero_read_again_is_the_port_picked_at_start() {
        let mut old = settle("[server]\nlisten = \"127.0.0.1:0\"\n");
        old.config.server.listen = "127.0.0.1:40000".parse().expect("addr");
        let plan = plan(&old, settle("[server]\nlisten = \"127.0.0.1:0\"\n"));
        assert!(plan.restart_needed.is_empty(), "{plan:?}");
        assert!(plan.applied.is_empty(), "{:?}", plan.applied);
        assert_eq!(plan.settings.config.server.listen.port(), 40000);
    }
}
