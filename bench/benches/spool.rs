//! Spool benchmarks: record encoding, record access (checksum + rkyv validation, in place), and
//! appends through the group-commit path to a real file with fdatasync.

use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use epoxi::envelope::{Body, Envelope, ReceptionId, Recipient, Ret};
use epoxi::spool::record::{self, MessageView};
use epoxi::spool::{Spool, SpoolConfig};

fn envelope(size: usize) -> Envelope {
    Envelope {
        reception: ReceptionId {
            ms: 1_700_000_000_000,
            shard: 0,
            n: 31,
        },
        sender: "sender@example.test".into(),
        rcpts: vec![Recipient::new("rcpt@d0.test")],
        ret: Ret::Unspecified,
        envid: None,
        tenant: None,
        smtputf8: false,
        body: Body::SevenBit,
        size: size as u64,
        peer: "127.0.0.1:40000".into(),
        notices: epoxi::envelope::NoticeSwitches::ALL,
        priority: Default::default(),
        campaign: None,
    }
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("record_encode");
    for size in [1024usize, 100 * 1024] {
        let env = envelope(size);
        let body = vec![b'x'; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &env, |b, env| {
            let mut buf = Vec::with_capacity(size + 4096);
            b.iter(|| {
                buf.clear();
                record::encode_message(&mut buf, 1, env, &[&body]).expect("encode")
            });
        });
    }
    group.finish();
}

fn access(c: &mut Criterion) {
    let mut group = c.benchmark_group("record_access");
    for size in [1024usize, 100 * 1024] {
        let mut buf = Vec::new();
        record::encode_message(&mut buf, 1, &envelope(size), &[&vec![b'x'; size]]).expect("encode");
        let aligned = record::aligned_copy(&buf);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &aligned, |b, bytes| {
            b.iter(|| {
                let (header, payload) = record::decode(bytes).expect("decode");
                MessageView::new(header.version, payload)
                    .expect("access")
                    .body()
                    .len()
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
                        compact_live_ratio: 0.0,
                        compaction_bytes_per_s: 1 << 30,
                    };
                    let (spool, _) = Spool::open_collecting(cfg).await.expect("open");
                    let committer = glommio::spawn_local(spool.clone().run_committer());
                    let start = Instant::now();
                    let env = Rc::new(envelope(1024));
                    let body: Rc<[u8]> = vec![b'x'; 1024].into();
                    let mut next_id = 1u64 << 24;
                    for _ in 0..iters {
                        let tasks: Vec<_> = (0..concurrency)
                            .map(|_| {
                                let spool: Rc<Spool> = spool.clone();
                                let (env, body) = (env.clone(), body.clone());
                                next_id += 1;
                                let id = next_id;
                                glommio::spawn_local(async move {
                                    spool
                                        .append_message(id, &env, &[&body])
                                        .await
                                        .expect("append")
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
