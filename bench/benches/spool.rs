//! Spool benchmarks: record encoding, record access (checksum + rkyv validation, in place), and
//! appends through the group-commit path to a real file with fdatasync.

use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use epoxi::spool::record::{self, MessageRecord, RecordKind};
use epoxi::spool::{Spool, SpoolConfig};

fn message(size: usize) -> MessageRecord {
    MessageRecord {
        id: 1,
        reception_id: "1a2b3c4d5e6.0.1f".into(),
        received_ms: 1_700_000_000_000,
        mail_from: "sender@example.test".into(),
        rcpts: vec!["rcpt@d0.test".into()],
        peer: "127.0.0.1:40000".into(),
        flags: 0,
        dsn_ret: 0,
        dsn_envid: String::new(),
        dsn_notify: vec![0],
        dsn_orcpt: vec![String::new()],
        body: vec![b'x'; size],
    }
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("record_encode");
    for size in [1024usize, 100 * 1024] {
        let m = message(size);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &m, |b, m| {
            let mut buf = Vec::with_capacity(size + 4096);
            b.iter(|| {
                buf.clear();
                record::encode(&mut buf, RecordKind::Message, m).expect("encode")
            });
        });
    }
    group.finish();
}

fn access(c: &mut Criterion) {
    let mut group = c.benchmark_group("record_access");
    for size in [1024usize, 100 * 1024] {
        let mut buf = Vec::new();
        record::encode(&mut buf, RecordKind::Message, &message(size)).expect("encode");
        let aligned = record::aligned_copy(&buf);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &aligned, |b, bytes| {
            b.iter(|| {
                let (_, payload) = record::decode(bytes).expect("decode");
                record::access_message(payload).expect("access").body.len()
            });
        });
    }
    group.finish();
}

/// Appends from `concurrency` tasks at once, so batches hold many messages per fdatasync, as
/// under load from many SMTP sessions.
fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("spool_append_group_commit");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    for concurrency in [1usize, 64] {
        group.throughput(Throughput::Elements(concurrency as u64));
        group.bench_function(BenchmarkId::new("1KiB_concurrency", concurrency), |b| {
            b.iter_custom(|iters| {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().to_owned();
                let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                    .io_memory(512 << 10)
                    .make()
                    .expect("executor");
                ex.run(async move {
                    let cfg = SpoolConfig {
                        dir: path,
                        shard: 0,
                        segment_size_max: 256 << 20,
                        commit_window_us: 0,
                        commit_batch_max: 8 << 20,
                    };
                    let (spool, _) = Spool::open(cfg).await.expect("open");
                    let committer = glommio::spawn_local(spool.clone().run_committer());
                    let start = Instant::now();
                    for _ in 0..iters {
                        let tasks: Vec<_> = (0..concurrency)
                            .map(|_| {
                                let spool: Rc<Spool> = spool.clone();
                                glommio::spawn_local(async move {
                                    spool.append_message(message(1024)).await.expect("append")
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await;
                        }
                    }
                    let elapsed = start.elapsed();
                    spool.close();
                    committer.await;
                    elapsed
                })
            });
        });
    }
    group.finish();
}

criterion_group!(benches, encode, access, append);
criterion_main!(benches);
