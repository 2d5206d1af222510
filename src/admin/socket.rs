//! The admin socket: `SPOOL/admin.sock`, a Unix stream socket only its owner may use (mode
//! 0600), and the thread that accepts on it.
//!
//! Why a thread: glommio's `UnixListener` hides its descriptors, and the peer's uid
//! (SO_PEERCRED) for the event log needs one. So a small thread does the blocking accept and
//! asks the kernel who connected, then hands the connection to shard 0 — which serves it
//! asynchronously, like any other socket — over a socket pair: an 8-byte record per
//! connection (the descriptor and the uid). The thread does nothing else; the protocol lives
//! on shard 0 (`shard::admin`).
//!
//! Binding is done by `serve` before any shard starts, under a umask of 077, so the socket is
//! never connectable with a wider mode; the mode is then checked. A socket file left by a
//! killed server (nobody answers on it) is replaced; one a running server answers on stops
//! the start with [`SocketError::Running`].

use std::io::Write as _;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The socket's file name in the spool directory.
pub const SOCKET_NAME: &str = "admin.sock";
/// Only the user the server runs as (and root) may operate it.
pub const SOCKET_MODE: u32 = 0o600;
/// Bytes of one hand-over record: the descriptor (i32) and the peer's uid (u32), little endian.
pub const HANDOVER_LEN: usize = 8;
/// The uid in a hand-over record when the kernel did not say.
pub const UID_UNKNOWN: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "another epoxi is running on this spool: its admin socket {path} answers \
         (stop it first, or use another --spool)"
    )]
    Running { path: PathBuf },
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {path} has mode {mode:o}, not {want:o}", want = SOCKET_MODE)]
    Mode { path: PathBuf, mode: u32 },
}

/// Where the admin socket of spool `dir` is.
pub fn path(spool_dir: &Path) -> PathBuf {
    spool_dir.join(SOCKET_NAME)
}

/// Bind the admin socket at `path` (mode 0600), replacing a stale one; refuse when a running
/// server answers there.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let io = |source| SocketError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(SocketError::Running {
                    path: path.to_owned(),
                })
            }
            // Nobody listens: a server was killed without removing it.
            Err(_) => std::fs::remove_file(path).map_err(io)?,
        }
    }
    // SAFETY: umask only swaps the process's file mode mask; no memory is involved. Called
    // before the shards start, when no other thread creates files.
    let old = unsafe { libc::umask(0o077) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(io)?;
    // Belt and braces: the mode is what an operator relies on, so say so if it is not.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(io)?;
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode != SOCKET_MODE {
        return Err(SocketError::Mode {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(listener)
}

/// The uid of the process on the other end of `fd` (SO_PEERCRED).
pub fn peer_uid(fd: RawFd) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that big.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// A hand-over record.
pub fn handover(fd: RawFd, uid: Option<u32>) -> [u8; HANDOVER_LEN] {
    let mut record = [0u8; HANDOVER_LEN];
    record[..4].copy_from_slice(&fd.to_le_bytes());
    record[4..].copy_from_slice(&uid.unwrap_or(UID_UNKNOWN).to_le_bytes());
    record
}

/// The descriptor and uid of a hand-over record.
pub fn read_handover(record: &[u8; HANDOVER_LEN]) -> (RawFd, Option<u32>) {
    let [a, b, c, d, e, f, g, h] = *record;
    let fd = RawFd::from_le_bytes([a, b, c, d]);
    let uid = u32::from_le_bytes([e, f, g, h]);
    (fd, (uid != UID_UNKNOWN).then_some(uid))
}

/// Accept on `listener` until the other end of `to_shard` goes away, handing each connection
/// over. Runs on a thread of its own (blocking).
pub fn accept_loop(listener: UnixListener, mut to_shard: UnixStream) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!("admin socket: accept failed: {e}");
                // Out of descriptors, say: do not spin on it.
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let uid = peer_uid(stream.as_raw_fd());
        // The shard owns the descriptor from here on.
        let fd = stream.into_raw_fd();
        if to_shard.write_all(&handover(fd, uid)).is_err() {
            // Shard 0 is gone (stopping): nobody will serve it.
            // SAFETY: fd is ours: the hand-over did not happen.
            unsafe { libc::close(fd) };
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_0600_replaces_a_stale_socket_and_refuses_a_live_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = path(dir.path());
        let first = bind(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&path), Err(SocketError::Running { .. })));
        // Closed but left on disk, as after kill -9.
        drop(first);
        let _second = bind(&path).expect("stale socket replaced");
        let client = UnixStream::connect(&path).expect("connect");
        assert_eq!(
            peer_uid(client.as_raw_fd()),
            // SAFETY: getuid has no preconditions.
            Some(unsafe { libc::getuid() })
        );
    }

    #[test]
    fn handover_round_trip() {
        assert_eq!(read_handover(&handover(7, Some(1000))), (7, Some(1000)));
        assert_eq!(read_handover(&handover(3, None)), (3, None));
    }
}
