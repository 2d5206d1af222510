//! A full disk: Epoxi answers 451 for what it cannot make durable, never crashes or loses what
//! it acknowledged, and accepts mail again once delivered messages free their segments.
//!
//! The spool sits on a small tmpfs, so this needs root (to mount it); CI runs as root.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A tmpfs mounted for the test, unmounted when dropped (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs failed: {status}");
        Tmpfs(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_tempfails_then_recovers() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("full_disk_tempfails_then_recovers: not root, cannot mount a tmpfs; skipped");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    // Declared before Epoxi, so it is unmounted after Epoxi is stopped.
    let _tmpfs = Tmpfs::mount(&spool, "4m");
    let sink_port = dead_port();
    let mut opts = Opts::new(dir.path())
        .route(sink_port)
        .set("spool", "segment_size_max", "1048576")
        .set("queue", "retry_base_ms", "200")
        .set("queue", "retry_cap_ms", "500")
        // A short site backoff: the destination comes up during the test.
        .set("delivery", "site_backoff_ms", "500")
        .set("delivery", "site_backoff_cap_ms", "1000");
    opts.spool = spool.clone();
    let epoxi = Epoxi::start(&opts);

    // 80 messages of 100 KiB do not fit in 4 MiB: the overflow must get 451, not a 250.
    let injected = Inject::new(80)
        .size(100 * 1024)
        .connections(2)
        .run(dir.path(), epoxi.port);
    let accepted = injected.count("accepted");
    let tempfailed = injected.count("tempfailed");
    assert!(accepted > 0, "some mail fits: {}", injected.json);
    assert!(tempfailed > 0, "a full disk gives 451s: {}", injected.json);
    assert_eq!(injected.count("rejected"), 0, "{}", injected.json);
    assert_eq!(accepted, injected.ids.len() as u64);

    // Still serving.
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("QUIT", 221);

    // The destination comes up: everything acknowledged is delivered once.
    let sink = Sink::start_on(dir.path(), &format!("127.0.0.1:{sink_port}"), &[]);
    epoxi.wait_events("Delivery", accepted as usize);

    // Delivered messages free their segments, so the spool takes mail again.
    let more = Inject::new(10).size(1000).run(dir.path(), epoxi.port);
    assert_eq!(more.count("accepted"), 10, "space came back: {}", more.json);
    epoxi.wait_events("Delivery", accepted as usize + 10);

    let mut epoxi = epoxi;
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(report.count("duplicates"), 0, "sink: {}", report.json);
    let delivered: BTreeSet<&String> = report.ids.iter().collect();
    for id in injected.ids.iter().chain(&more.ids) {
        assert!(delivered.contains(id), "acknowledged {id} never arrived");
    }
    assert_eq!(
        report.count("unique"),
        accepted + 10,
        "sink: {}",
        report.json
    );
}
