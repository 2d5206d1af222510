//! The resolver adapter: queries over glommio UDP sockets, TCP when an answer is truncated,
//! several resolvers with failover, the shard's cache, and concurrent lookups of the same name
//! coalesced into one query. Per shard, like everything else.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpStream, UdpSocket};
use hickory_proto::rr::RecordType;
use shards::Notify;

use super::cache::Cache;
use super::message::{build_query, parse_response, Answer};

/// Largest DNS message read over UDP (EDNS-less servers send at most 512; some send more).
const UDP_RESPONSE_MAX: usize = 4096;
/// Largest DNS message accepted over TCP (its 2-byte length prefix allows 65535).
const TCP_RESPONSE_MAX: usize = 65_535;

pub struct ResolverConfig {
    pub servers: Vec<SocketAddr>,
    /// Wait for one answer from one server.
    pub timeout: Duration,
    /// Rounds over all servers before giving up (transient failure).
    pub attempts: u32,
}

type Pending = Rc<(Notify, RefCell<Option<(Answer, bool)>>)>;

pub struct Resolver {
    cfg: ResolverConfig,
    cache: RefCell<Cache>,
    next_id: Cell<u16>,
    inflight: RefCell<HashMap<(String, RecordType), Pending>>,
}

impl Resolver {
    pub fn new(cfg: ResolverConfig, cache: Cache) -> Resolver {
        // A per-process varying start makes ids harder to guess than 0, 1, 2...
        let seed = std::process::id() as u16 ^ (crate::clock::now_ms() as u16);
        Resolver {
            cfg,
            cache: RefCell::new(cache),
            next_id: Cell::new(seed),
            inflight: RefCell::new(HashMap::new()),
        }
    }

    /// The cached answer for `name` and when it expires (Unix ms), without asking anyone.
    pub fn cached(&self, name: &str, rtype: RecordType) -> Option<(Answer, u64)> {
        self.cache
            .borrow()
            .get_until(name, rtype, crate::clock::now_ms())
            .map(|(answer, until)| (answer.clone(), until))
    }

    /// Look `name` up: from the cache, by joining a query already under way, or by asking.
    pub async fn lookup(&self, name: &str, rtype: RecordType) -> Answer {
        self.lookup_secure(name, rtype).await.0
    }

    /// [`Resolver::lookup`], and whether the answer was DNSSEC-secure: the resolver set the AD
    /// bit. DANE (RFC 7672) acts only on secure answers.
    pub async fn lookup_secure(&self, name: &str, rtype: RecordType) -> (Answer, bool) {
        let key = (name.to_ascii_lowercase(), rtype);
        if let Some((answer, ad)) =
            self.cache
                .borrow()
                .get_secure(&key.0, rtype, crate::clock::now_ms())
        {
            return (answer.clone(), ad);
        }
        let joined = self.inflight.borrow().get(&key).cloned();
        if let Some(pending) = joined {
            loop {
                if let Some(answer) = pending.1.borrow().clone() {
                    return answer;
                }
                pending.0.notified().await;
            }
        }
        let pending: Pending = Rc::new((Notify::new(), RefCell::new(None)));
        self.inflight
            .borrow_mut()
            .insert(key.clone(), pending.clone());
        let (answer, ad) = self.ask(&key.0, rtype).await;
        self.cache.borrow_mut().put_secure(
            &key.0,
            rtype,
            answer.clone(),
            ad,
            crate::clock::now_ms(),
        );
        *pending.1.borrow_mut() = Some((answer.clone(), ad));
        self.inflight.borrow_mut().remove(&key);
        pending.0.notify_all();
        (answer, ad)
    }

    async fn ask(&self, name: &str, rtype: RecordType) -> (Answer, bool) {
        let mut last = String::from("no resolver configured");
        for _ in 0..self.cfg.attempts.max(1) {
            for &server in &self.cfg.servers {
                let id = self.next_id.get().wrapping_add(1);
                self.next_id.set(id);
                let query = match build_query(id, name, rtype) {
                    Ok(q) => q,
                    // A name that cannot be a DNS name does not exist.
                    Err(_) => {
                        return (
                            Answer::NxDomain(super::message::NEGATIVE_TTL_DEFAULT_S),
                            false,
                        )
                    }
                };
                match self.udp(server, id, &query, rtype).await {
                    Ok((Answer::Truncated, _)) => match self.tcp(server, id, &query, rtype).await {
                        Ok((Answer::Transient(why), _)) | Err(why) => {
                            last = format!("{server}: {why}")
                        }
                        Ok(answer) => return answer,
                    },
                    Ok((Answer::Transient(why), _)) | Err(why) => last = format!("{server}: {why}"),
                    Ok(answer) => return answer,
                }
            }
        }
        (Answer::Transient(last), false)
    }

    async fn udp(
        &self,
        server: SocketAddr,
        id: u16,
        query: &[u8],
        rtype: RecordType,
    ) -> Result<(Answer, bool), String> {
        let bind = if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        socket
            .send_to(query, server)
            .await
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + self.cfg.timeout;
        let mut buf = vec![0u8; UDP_RESPONSE_MAX];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timed out".into());
            }
            socket
                .set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            let (n, from) = socket
                .recv_from(&mut buf)
                .await
                .map_err(|e| e.to_string())?;
            // Only the server we asked, answering our id: anything else is ignored, not trusted.
            if from != server {
                continue;
            }
            if let Ok(answer) = parse_response(id, &buf[..n], rtype) {
                return Ok(answer);
            }
        }
    }

    async fn tcp(
        &self,
        server: SocketAddr,
        id: u16,
        query: &[u8],
        rtype: RecordType,
    ) -> Result<(Answer, bool), String> {
        let mut stream = TcpStream::connect_timeout(server, self.cfg.timeout)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(self.cfg.timeout))
            .map_err(|e| e.to_string())?;
        let mut framed = (query.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(query);
        stream.write_all(&framed).await.map_err(|e| e.to_string())?;
        let mut len = [0u8; 2];
        stream
            .read_exact(&mut len)
            .await
            .map_err(|e| e.to_string())?;
        let len = usize::from(u16::from_be_bytes(len)).min(TCP_RESPONSE_MAX);
        let mut buf = vec![0u8; len];
        stream
            .read_exact(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        parse_response(id, &buf, rtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::rdata::MX;
    use hickory_proto::rr::{Name, RData, Record};
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A tiny authoritative server on loopback: MX for example.test, truncated over UDP (full
    /// over TCP) for big.test, SERVFAIL for broken.test. Counts the UDP queries it gets.
    fn dns_server() -> (SocketAddr, Arc<AtomicUsize>) {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let addr = udp.local_addr().expect("addr");
        let tcp = std::net::TcpListener::bind(addr).expect("tcp on the same port");
        let queries = Arc::new(AtomicUsize::new(0));
        let counted = queries.clone();
        udp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                counted.fetch_add(1, Ordering::SeqCst);
                // Slow enough that concurrent lookups overlap.
                std::thread::sleep(Duration::from_millis(30));
                let _ = udp.send_to(&answer(&buf[..n], true), from);
            }
        });
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = tcp.accept() {
                let mut len = [0u8; 2];
                if s.read_exact(&mut len).is_ok() {
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if s.read_exact(&mut q).is_ok() {
                        let a = answer(&q, false);
                        let _ = s.write_all(&(a.len() as u16).to_be_bytes());
                        let _ = s.write_all(&a);
                    }
                }
            }
        });
        (addr, queries)
    }

    fn answer(query: &[u8], udp: bool) -> Vec<u8> {
        let q = Message::from_vec(query).expect("query");
        let name = q.queries()[0].name().clone();
        let mut r = Message::new();
        r.set_id(q.id())
            .set_message_type(MessageType::Response)
            .add_query(q.queries()[0].clone());
        match name.to_ascii().as_str() {
            "broken.test." => {
                r.set_response_code(ResponseCode::ServFail);
            }
            "big.test." if udp => {
                r.set_truncated(true);
            }
            _ => {
                let mx = MX::new(10, Name::from_ascii("mx.example.test.").expect("name"));
                r.add_answer(Record::from_rdata(name, 300, RData::MX(mx)));
            }
        }
        r.to_vec().expect("encode")
    }

    fn run<F: std::future::Future<Output = ()> + 'static>(f: F) {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(256 << 10)
            .make()
            .expect("executor")
            .run(f);
    }

    #[test]
    fn cache_coalescing_failover_truncation_and_servfail() {
        let (server, queries) = dns_server();
        let dead = std::net::UdpSocket::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        run(async move {
            let resolver = Rc::new(Resolver::new(
                ResolverConfig {
                    servers: vec![dead, server],
                    timeout: Duration::from_millis(300),
                    attempts: 1,
                },
                Cache::new(1, 3600, 1000),
            ));
            // The first server never answers: the second one does.
            let want = Answer::Mx(vec![(10, "mx.example.test".into())], 300);
            assert_eq!(resolver.lookup("example.test", RecordType::MX).await, want);
            assert_eq!(queries.load(Ordering::SeqCst), 1);
            // Cached: no new query.
            assert_eq!(resolver.lookup("EXAMPLE.test", RecordType::MX).await, want);
            assert_eq!(queries.load(Ordering::SeqCst), 1);
            // Five concurrent lookups of a new name: one query.
            let tasks: Vec<_> = (0..5)
                .map(|_| {
                    let r = resolver.clone();
                    glommio::spawn_local(
                        async move { r.lookup("other.test", RecordType::MX).await },
                    )
                })
                .collect();
            for t in tasks {
                assert!(matches!(t.await, Answer::Mx(..)));
            }
            assert_eq!(queries.load(Ordering::SeqCst), 2, "coalesced");
            // Truncated over UDP: asked again over TCP.
            assert!(matches!(
                resolver.lookup("big.test", RecordType::MX).await,
                Answer::Mx(..)
            ));
            // SERVFAIL everywhere: transient, and not cached.
            assert!(matches!(
                resolver.lookup("broken.test", RecordType::MX).await,
                Answer::Transient(_)
            ));
            let before = queries.load(Ordering::SeqCst);
            resolver.lookup("broken.test", RecordType::MX).await;
            assert!(
                queries.load(Ordering::SeqCst) > before,
                "failures are asked again"
            );
        });
    }
}
