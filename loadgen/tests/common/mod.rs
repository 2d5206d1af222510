//! The loadgen binary as the integration tests run it: started with its arguments, its address
//! read from the `listening on ADDR` line on stderr, stopped with SIGTERM, and its one-line
//! JSON report read from stdout.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest any wait here may take: generous for a loaded two-core machine, but bounded.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A running `epoxi-loadgen` command, killed when dropped.
pub struct Running {
    child: Child,
    pub addr: SocketAddr,
}

impl Running {
    /// Runs `epoxi-loadgen ARGS` and waits until it says where it listens. Its stderr is
    /// copied to the test's, each line tagged with the command's name.
    pub fn start(args: &[&str]) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_epoxi-loadgen"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn epoxi-loadgen");
        let tag = args.first().copied().unwrap_or_default().to_owned();
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.parse::<SocketAddr>().expect("listening address"));
                }
            }
        });
        let addr = rx
            .recv_timeout(DEADLINE)
            .expect("epoxi-loadgen says where it listens");
        Running { child, addr }
    }

    /// SIGTERM, then the report line.
    pub fn stop(mut self) -> Value {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) takes plain integers; the pid is our own child's.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + DEADLINE;
        while self.child.try_wait().expect("try_wait").is_none() {
            assert!(Instant::now() < deadline, "epoxi-loadgen did not exit");
            thread::sleep(Duration::from_millis(10));
        }
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read the report");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("report {out:?}: {e}"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
