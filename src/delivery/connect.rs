//! Outbound TCP connections from an egress source's own address, connected by io_uring.
//!
//! glommio 0.9 connects only sockets it creates itself, and it gives no way to bind those
//! first. Its `UdpSocket::connect`, though, submits an io_uring connect (IORING_OP_CONNECT)
//! on whatever descriptor the socket wraps, and the kernel's connect does not mind that the
//! socket behind it is TCP. So we make and bind the TCP socket ourselves, wrap a duplicate of
//! its descriptor as a glommio `UdpSocket` only to issue that connect, and hand the original
//! to glommio as the `TcpStream`. The two descriptors name one socket, so connecting through
//! either connects both. The connect waits in the kernel (no polling from here), raced
//! against a glommio timer.
//!
//! Invariants: each descriptor has exactly one owner at every step (a socket2 `Socket`,
//! std's `TcpStream`, a glommio socket), so an error, a timeout or a dropped future closes
//! all of them. Dropping glommio's connect future cancels the request in the kernel
//! (`Source`'s drop submits IORING_OP_ASYNC_CANCEL); the kernel keeps its own reference to
//! the socket until that completes, which holds no descriptor of ours.

use std::io::{self, ErrorKind};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::io::AsRawFd;
use std::time::Duration;

use glommio::net::{TcpStream, UdpSocket};
use glommio::GlommioError;
use socket2::{Domain, Protocol, Socket, Type};

/// Why no connection was made from the source address.
#[derive(Debug, thiserror::Error)]
pub enum BoundConnectError {
    /// No socket bound to `local` could be made: the address is not on this machine
    /// (`AddrNotAvailable`), its family differs from the destination's (`InvalidInput`), or
    /// the process is out of descriptors. Trying other destinations from it will not help.
    #[error("cannot bind source address {local}: {source}")]
    Bind {
        local: IpAddr,
        #[source]
        source: io::Error,
    },
    /// The connect itself failed, with the kernel's error kind kept: `ConnectionRefused` and
    /// `ConnectionReset` mean the remote end answered; `TimedOut` (including our own
    /// timeout) and the unreachable kinds mean it may be the source's path.
    #[error("{0}")]
    Connect(io::Error),
}

/// Connect to `remote` from local address `local` (port chosen by the kernel at connect time:
/// IP_BIND_ADDRESS_NO_PORT), within `timeout`, with an io_uring connect — no polling loop.
///
/// A zero `timeout` gives up at once (glommio's own `connect_timeout` rejects it instead).
pub async fn connect_bound(
    local: IpAddr,
    remote: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, BoundConnectError> {
    let bind_error = |source| BoundConnectError::Bind { local, source };
    let socket = bound_socket(local, remote).map_err(bind_error)?;
    let connector = UdpSocket::from(for_glommio(socket.try_clone().map_err(bind_error)?));
    let connected = glommio::timer::timeout(timeout, connector.connect(remote)).await;
    // The duplicate only carried the connect; closing it leaves the socket to `socket`.
    drop(connector);
    match connected {
        // glommio expects the blocking mode its own sockets have (it never sets O_NONBLOCK:
        // io_uring does not need it), which is the mode `Socket::new` gave this one.
        Ok(()) => Ok(TcpStream::from(for_glommio(socket))),
        Err(GlommioError::TimedOut(_)) => Err(BoundConnectError::Connect(io::Error::new(
            ErrorKind::TimedOut,
            format!("no connection within {} ms", timeout.as_millis()),
        ))),
        Err(e) => Err(BoundConnectError::Connect(e.into())),
    }
}

/// A blocking TCP socket bound to `local`, its port left for connect to choose (so one source
/// address can hold many connections, as long as each 4-tuple is unique).
fn bound_socket(local: IpAddr, remote: SocketAddr) -> io::Result<Socket> {
    if local.is_ipv4() != remote.is_ipv4() {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!("source and destination ({remote}) address families differ"),
        ));
    }
    let socket = Socket::new(
        Domain::for_address(remote),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    set_bind_address_no_port(&socket)?;
    socket.bind(&SocketAddr::new(local, 0).into())?;
    Ok(socket)
}

/// Without IP_BIND_ADDRESS_NO_PORT, bind would reserve an ephemeral port for the source
/// address alone, and a busy source would run out of ports at ~28 000 connections in all
/// instead of per destination. Neither socket2 nor rustix wraps this option, hence libc.
/// It is an IPPROTO_IP option, and Linux honours it on IPv6 sockets as well.
fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: plain setsockopt(2) on a descriptor `socket` owns and keeps open for the call,
    // with a pointer to a live c_int and its exact size; it transfers no ownership.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// glommio 0.9 takes sockets as socket2 0.4's `Socket`. std's `TcpStream` owns a descriptor
/// in both socket2 versions' eyes, so it moves one across without `unsafe`; it does not
/// check the socket's kind, which is what lets the duplicate become a glommio `UdpSocket`.
fn for_glommio(socket: Socket) -> glommio_socket2::Socket {
    glommio_socket2::Socket::from(std::net::TcpStream::from(socket))
}

/// Why one address did not give a usable session.
pub(super) enum Refusal {
    /// The source's address cannot be bound: no point trying other hosts from it.
    Bind(String),
    /// No TCP connection (refused, unreachable, timed out).
    Connect(ConnectError),
    /// Connected, but the greeting, EHLO or TLS failed.
    Session(String),
}

/// Why a TCP connection was not made.
pub(super) struct ConnectError {
    pub(super) why: String,
    /// The remote end answered (refused or reset): the source's path works, the host is the
    /// problem. Timeouts and unreachable networks may be the source's fault.
    pub(super) remote_answered: bool,
}

impl From<std::io::Error> for ConnectError {
    fn from(e: std::io::Error) -> ConnectError {
        ConnectError {
            remote_answered: matches!(
                e.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
            ),
            why: e.to_string(),
        }
    }
}

/// Connect from `source` to `addr`: bound to the source's address when it has one.
pub(super) async fn connect_from(
    addr: SocketAddr,
    source: &crate::egress::Source,
    timeout: Duration,
) -> Result<TcpStream, Refusal> {
    let Some(local) = source.address else {
        return TcpStream::connect_timeout(addr, timeout)
            .await
            .map_err(|e| Refusal::Connect(std::io::Error::from(e).into()));
    };
    connect_bound(local, addr, timeout)
        .await
        .map_err(|e| match e {
            BoundConnectError::Bind { .. } => Refusal::Bind(e.to_string()),
            BoundConnectError::Connect(e) => Refusal::Connect(e.into()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};
    use std::time::Instant;

    const WAIT: Duration = Duration::from_secs(5);

    fn run<F: std::future::Future<Output = ()> + 'static>(f: F) {
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(256 << 10)
            .ring_depth(64)
            .make()
            .expect("executor");
        ex.run(f);
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    /// A port nothing listens on: a listener's, closed again.
    fn closed_port(ip: IpAddr) -> SocketAddr {
        let listener = TcpListener::bind((ip, 0)).expect("bind");
        listener.local_addr().expect("addr")
    }

    /// A loopback listener whose accept queue is full, so the kernel drops further SYNs
    /// (tcp_abort_on_overflow is 0 by default) and a connect to it waits for its timeout,
    /// without any packet leaving the machine. The returned socket and stream keep it so.
    fn black_hole() -> (Socket, std::net::TcpStream, SocketAddr) {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        listener
            .bind(&SocketAddr::new(v4(1), 0).into())
            .expect("bind");
        // A backlog of 0 holds one connection not yet accepted; `filler` is it.
        listener.listen(0).expect("listen");
        let addr = listener
            .local_addr()
            .expect("addr")
            .as_socket()
            .expect("inet");
        let filler = std::net::TcpStream::connect_timeout(&addr, WAIT).expect("filler");
        (listener, filler, addr)
    }

    fn connect_error(r: Result<TcpStream, BoundConnectError>) -> io::Error {
        match r {
            Err(BoundConnectError::Connect(e)) => e,
            Err(e) => panic!("expected a connect error, got {e}"),
            Ok(_) => panic!("expected a connect error, got a connection"),
        }
    }

    fn bind_error(r: Result<TcpStream, BoundConnectError>) -> io::Error {
        match r {
            Err(BoundConnectError::Bind { source, .. }) => source,
            Err(e) => panic!("expected a bind error, got {e}"),
            Ok(_) => panic!("expected a bind error, got a connection"),
        }
    }

    /// Connect from `local` to a listener on `listen_ip`, and check the source address the
    /// listener sees and bytes both ways.
    fn bound_connection_carries_bytes(local: IpAddr, listen_ip: IpAddr) {
        let listener = TcpListener::bind((listen_ip, 0)).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (mut stream, peer) = listener.accept().expect("accept");
            stream.set_read_timeout(Some(WAIT)).expect("timeout");
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).expect("read");
            assert_eq!(&buf, b"EHLO");
            stream.write_all(b"250 ok").expect("write");
            peer
        });
        run(async move {
            let mut stream = connect_bound(local, addr, WAIT).await.expect("connect");
            assert_eq!(stream.local_addr().expect("local").ip(), local);
            stream.write_all(b"EHLO").await.expect("write");
            let mut buf = [0u8; 6];
            stream.read_exact(&mut buf).await.expect("read");
            assert_eq!(&buf, b"250 ok");
        });
        let peer = server.join().expect("server");
        assert_eq!(peer.ip(), local);
        assert_ne!(peer.port(), 0);
    }

    #[test]
    fn connects_from_the_source_address_v4() {
        // Linux's loopback answers for all of 127/8, so 127.0.0.2 is ours without setup.
        bound_connection_carries_bytes(v4(2), v4(1));
    }

    #[test]
    fn connects_from_the_source_address_v6() {
        let lo = IpAddr::V6(Ipv6Addr::LOCALHOST);
        bound_connection_carries_bytes(lo, lo);
    }

    #[test]
    fn refused_is_a_connect_error_that_says_so() {
        let addr = closed_port(v4(1));
        run(async move {
            let e = connect_error(connect_bound(v4(2), addr, WAIT).await);
            assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
        });
    }

    #[test]
    fn an_address_not_on_this_machine_is_a_bind_error() {
        // TEST-NET-2 (RFC 5737) is never assigned to a host. (This sandbox numbers its own
        // network in TEST-NET-1, 192.0.2.0/24, so that block is avoided here.)
        let foreign = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
        let addr = closed_port(v4(1));
        run(async move {
            let e = bind_error(connect_bound(foreign, addr, WAIT).await);
            assert_eq!(e.kind(), ErrorKind::AddrNotAvailable, "{e}");
        });
    }

    #[test]
    fn a_family_mismatch_is_a_bind_error() {
        let remote = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 25);
        run(async move {
            let e = bind_error(connect_bound(v4(2), remote, WAIT).await);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        });
    }

    #[test]
    fn no_answer_times_out() {
        // A full accept queue on loopback rather than a SYN to a non-routable address: from a
        // 127/8 source the kernel refuses any non-loopback destination at once (EINVAL), so
        // the timer would never run, and from this machine's own address the SYN would leave
        // it by the default route.
        let (_listener, _filler, addr) = black_hole();
        run(async move {
            let start = Instant::now();
            let r = connect_bound(v4(2), addr, Duration::from_millis(200)).await;
            let e = connect_error(r);
            assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
            // Loose: the kernel retransmits the SYN after 1 s, which would connect nothing.
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "{:?}",
                start.elapsed()
            );
        });
    }

    /// Descriptors of this process that are TCP sockets with local address `ip`. Counted per
    /// address so that other tests, running at the same time, do not disturb the count.
    fn socket_fds_from(ip: Ipv4Addr) -> usize {
        // /proc/net/tcp prints the address as the in-memory __be32 in host order; inode 0 is
        // a socket nobody holds (TIME_WAIT, orphans).
        let hex = format!("{:08X}", u32::from_ne_bytes(ip.octets()));
        let table = std::fs::read_to_string("/proc/self/net/tcp").expect("tcp table");
        let inodes: std::collections::HashSet<String> = table
            .lines()
            .skip(1)
            .filter_map(|row| {
                let cols: Vec<&str> = row.split_whitespace().collect();
                let local = cols.get(1)?;
                let inode = cols.get(9)?;
                (local.starts_with(&hex) && *inode != "0").then(|| format!("socket:[{inode}]"))
            })
            .collect();
        std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter(|target| inodes.contains(target.to_string_lossy().as_ref()))
            .count()
    }

    #[test]
    fn no_descriptor_outlives_a_connect() {
        const CONNECTS: usize = 200;
        const FAILURES: usize = 20;
        let source = Ipv4Addr::new(127, 0, 0, 3);
        let local = IpAddr::V4(source);
        let listener = TcpListener::bind((v4(1), 0)).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            for _ in 0..CONNECTS {
                drop(listener.accept().expect("accept"));
            }
        });
        let refused = closed_port(v4(1));
        let (_hole, _filler, silent) = black_hole();
        run(async move {
            let before = socket_fds_from(source);
            for _ in 0..CONNECTS {
                let stream = connect_bound(local, addr, WAIT).await.expect("connect");
                assert_eq!(socket_fds_from(source), before + 1);
                drop(stream);
            }
            for _ in 0..FAILURES {
                connect_error(connect_bound(local, refused, WAIT).await);
                let short = Duration::from_millis(5);
                connect_error(connect_bound(local, silent, short).await);
                // Abandoned mid-connect: the future is dropped with its request in flight.
                let abandoned = async {
                    connect_bound(local, silent, WAIT).await.ok();
                };
                let gave_up = async {
                    glommio::timer::sleep(short).await;
                };
                futures_lite::future::or(abandoned, gave_up).await;
            }
            // The kernel finishes cancelled connects on its own time; give it a moment.
            glommio::timer::sleep(Duration::from_millis(50)).await;
            assert_eq!(socket_fds_from(source), before);
        });
        server.join().expect("server");
    }
}
