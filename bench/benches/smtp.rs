//! Benchmarks for the SMTP state machines: command parsing, DATA reading and a whole pipelined
//! server transaction. All of it is in memory, so these measure protocol CPU cost per core,
//! which is what bounds a shard once the sockets are fast.

use std::hint::black_box;
use std::rc::Rc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use epoxi::smtp::data::{write_stuffed, DataReader};
use epoxi::smtp::{parse_command, ServerConfig, Session, Step};

/// A realistic message: headers, then text lines of about 70 bytes, some starting with a dot.
fn body_of(len: usize) -> Vec<u8> {
    let mut body = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: bench\r\n\r\n".to_vec();
    let mut i = 0;
    while body.len() < len {
        let line = if i % 20 == 1 {
            b".a line that starts with a dot and must be stuffed on the wire\r\n".to_vec()
        } else {
            format!("line {i:06} of the message body, plain text like most mail is\r\n")
                .into_bytes()
        };
        body.extend_from_slice(&line);
        i += 1;
    }
    body.truncate(len - 2);
    body.extend_from_slice(b"\r\n");
    body
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    let mail: &[u8] = b"MAIL FROM:<alice.sender@example.com> SIZE=12345 BODY=8BITMIME";
    let rcpt: &[u8] = b"RCPT TO:<bob.recipient@mail.example.net>";
    g.throughput(Throughput::Elements(1));
    g.bench_function("mail_from", |b| b.iter(|| parse_command(black_box(mail))));
    g.bench_function("rcpt_to", |b| b.iter(|| parse_command(black_box(rcpt))));
    g.finish();
}

fn data(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_reader");
    for (name, len) in [("1KiB", 1024), ("100KiB", 100 * 1024)] {
        let mut wire = Vec::new();
        write_stuffed(&body_of(len), &mut wire);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        let mut body = Vec::with_capacity(len);
        g.bench_function(name, |b| {
            b.iter(|| {
                body.clear();
                let mut r = DataReader::new(usize::MAX, 1000);
                let n = r.feed(black_box(&wire), &mut body);
                assert!(r.is_done());
                n
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("dot_stuff");
    let body = body_of(100 * 1024);
    g.throughput(Throughput::Bytes(body.len() as u64));
    let mut out = Vec::with_capacity(body.len() * 2);
    g.bench_function("100KiB", |b| {
        b.iter(|| {
            out.clear();
            write_stuffed(black_box(&body), &mut out);
        })
    });
    g.finish();
}

fn server(c: &mut Criterion) {
    let cfg = Rc::new(ServerConfig::default());
    let mut wire = b"EHLO client.example.com\r\nMAIL FROM:<alice@example.com> SIZE=10240\r\n\
        RCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\n"
        .to_vec();
    write_stuffed(&body_of(10 * 1024), &mut wire);
    wire.extend_from_slice(b"QUIT\r\n");

    let mut g = c.benchmark_group("server");
    g.throughput(Throughput::Bytes(wire.len() as u64));
    // A whole connection: greeting, one pipelined batch carrying EHLO, the envelope, a 10 KiB
    // body and QUIT, the spool's answer, and the 221.
    g.bench_function("pipelined_transaction_10KiB", |b| {
        b.iter_batched_ref(
            || Vec::with_capacity(1024),
            |out| {
                let mut s = Session::new(cfg.clone(), true);
                s.greeting(out);
                s.input(black_box(&wire));
                loop {
                    match s.poll(out) {
                        Step::Message(t) => {
                            black_box(&t);
                            s.message_done(Ok("0000000000000001"), out);
                        }
                        Step::Close => break,
                        Step::NeedInput | Step::StartTls | Step::Auth(_) | Step::Rcpt(_) => {
                            unreachable!("the batch is complete")
                        }
                    }
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, parse, data, server);
criterion_main!(benches);
