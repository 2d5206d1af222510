//! Per-client state that must hold across shards: connections per client IP and failed AUTH
//! attempts. The kernel spreads a client's connections over the shards (SO_REUSEPORT), so a
//! limit kept per shard would be the limit times the shard count. Each client address has one
//! owner shard ([`owner_of`], a stable hash) that keeps its counts; the other shards ask it
//! over the mesh when a connection opens, closes, or tries AUTH. Once per connection or per
//! AUTH attempt, never per message.
//!
//! I/O-free: the owner's tables, fed requests, returning answers.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::auth::AuthLimiter;

/// Client addresses tracked at most per shard for connection counts; entries go at zero, so
/// only a flood of concurrent connections from that many addresses reaches it. Past it, new
/// addresses are let in (and counted only once a slot frees): refusing unknown clients would
/// let a flood lock everyone out.
const CLIENTS_MAX: usize = 1 << 20;

/// The shard that owns `ip`'s counts, among `shards`.
pub fn owner_of(ip: IpAddr, shards: usize) -> usize {
    // IPv4-mapped IPv6 clients are the same client as their IPv4 form.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let text = ip.to_string();
    shards::hash::jump_hash(shards::hash::domain_hash(&text), shards.max(1))
}

/// The limits a connection is checked against: process-wide per client address, and per
/// client address on one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpLimits {
    pub listener: u16,
    pub ip_max: u32,
    pub listener_ip_max: u32,
}

pub struct Clients {
    by_ip: HashMap<IpAddr, u32>,
    by_listener: HashMap<(u16, IpAddr), u32>,
    auth: AuthLimiter,
}

impl Clients {
    pub fn new(auth_failures_max: u32, auth_window_ms: u64) -> Clients {
        Clients {
            by_ip: HashMap::new(),
            by_listener: HashMap::new(),
            auth: AuthLimiter::new(auth_failures_max, auth_window_ms),
        }
    }

    /// A connection from `ip` opens: true if it is within the limits (and is now counted).
    pub fn connect(&mut self, ip: IpAddr, limits: IpLimits) -> bool {
        let all = self.by_ip.get(&ip).copied().unwrap_or(0);
        let here = self
            .by_listener
            .get(&(limits.listener, ip))
            .copied()
            .unwrap_or(0);
        if all >= limits.ip_max || here >= limits.listener_ip_max {
            return false;
        }
        if self.by_ip.len() >= CLIENTS_MAX && all == 0 {
            return true;
        }
        *self.by_ip.entry(ip).or_insert(0) += 1;
        *self.by_listener.entry((limits.listener, ip)).or_insert(0) += 1;
        true
    }

    /// A connection counted by [`Clients::connect`] closed.
    pub fn disconnect(&mut self, ip: IpAddr, listener: u16) {
        release(&mut self.by_ip, &ip);
        release(&mut self.by_listener, &(listener, ip));
    }

    pub fn connections(&self, ip: IpAddr) -> u32 {
        self.by_ip.get(&ip).copied().unwrap_or(0)
    }

    /// May `ip` try to authenticate at `now_ms`?
    pub fn auth_allowed(&self, ip: IpAddr, now_ms: u64) -> bool {
        self.auth.allowed(ip, now_ms)
    }

    pub fn auth_result(&mut self, ip: IpAddr, ok: bool, now_ms: u64) {
        if ok {
            self.auth.succeeded(ip);
        } else {
            self.auth.failed(ip, now_ms);
        }
    }
}

/// Take one from `key`'s count, removing it at zero so the map stays small.
fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: IpLimits = IpLimits {
        listener: 0,
        ip_max: 2,
        listener_ip_max: 3,
    };

    #[test]
    fn connections_per_ip_hold_across_listeners() {
        let mut c = Clients::new(3, 1000);
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        assert!(c.connect(ip, L));
        assert!(c.connect(ip, IpLimits { listener: 1, ..L }));
        assert!(!c.connect(ip, L), "two in all");
        c.disconnect(ip, 1);
        assert!(c.connect(ip, L));
        let per_listener = IpLimits {
            listener: 2,
            ip_max: 10,
            listener_ip_max: 1,
        };
        let other: IpAddr = "192.0.2.8".parse().expect("ip");
        assert!(c.connect(other, per_listener));
        assert!(!c.connect(other, per_listener));
        c.disconnect(other, 2);
        assert_eq!(c.connections(other), 0);
    }

    #[test]
    fn auth_failures_count_per_address() {
        let mut c = Clients::new(2, 1000);
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        c.auth_result(ip, false, 0);
        assert!(c.auth_allowed(ip, 1));
        c.auth_result(ip, false, 1);
        assert!(!c.auth_allowed(ip, 2));
        assert!(c.auth_allowed(ip, 1001), "the window passes");
    }

    #[test]
    fn mapped_addresses_have_the_same_owner() {
        let v4: IpAddr = "192.0.2.7".parse().expect("ip");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        for n in 1..8 {
            assert_eq!(owner_of(v4, n), owner_of(mapped, n));
        }
    }
}
