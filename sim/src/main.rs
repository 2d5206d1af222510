//! `epoxi-sim --seeds N [--start S] [--jobs J]`: run many seeds and report the failures.
//! `epoxi-sim --seed S [--verbose]`: run (and replay) one seed, printing its trace.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use epoxi_sim::{run, Options};

const USAGE: &str = "usage: epoxi-sim --seeds N [--start S] [--jobs J] [--no-crashes] [--no-faults] [--scale X]\n       epoxi-sim --seed S [--verbose] [--trace-lines N]";

struct Args {
    seeds: u64,
    start: u64,
    one: Option<u64>,
    jobs: usize,
    opts: Options,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        seeds: 100,
        start: 0,
        one: None,
        jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
        opts: Options::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--seeds" => a.seeds = num(&value("--seeds")?)?,
            "--start" => a.start = num(&value("--start")?)?,
            "--seed" => a.one = Some(num(&value("--seed")?)?),
            "--jobs" => a.jobs = num(&value("--jobs")?)?.max(1) as usize,
            "--trace-lines" => a.opts.trace_lines = Some(num(&value("--trace-lines")?)? as usize),
            "--scale" => {
                let v = value("--scale")?;
                a.opts.scale = Some(v.parse().map_err(|_| format!("bad --scale {v}"))?);
            }
            "--verbose" => a.opts.verbose = true,
            "--no-crashes" => a.opts.no_crashes = true,
            "--no-faults" => a.opts.no_faults = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(a)
}

fn num(text: &str) -> Result<u64, String> {
    text.parse()
        .map_err(|_| format!("`{text}` is not a number"))
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Some(seed) = args.one {
        match run(seed, &args.opts) {
            Ok(s) => {
                println!("{s:#?}");
            }
            Err(f) => {
                eprintln!("{f}");
                std::process::exit(1);
            }
        }
        return;
    }
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(args.start));
    let end = args.start + args.seeds;
    let failures = Arc::new(Mutex::new(Vec::new()));
    let totals = Arc::new(Mutex::new((
        0u64,
        0u64,
        epoxi_sim::ledger::LedgerStats::default(),
        epoxi_sim::world::Stats::default(),
    )));
    let mut workers = Vec::new();
    for _ in 0..args.jobs {
        let (next, failures, totals, opts) = (
            next.clone(),
            failures.clone(),
            totals.clone(),
            args.opts.clone(),
        );
        workers.push(std::thread::spawn(move || loop {
            let seed = next.fetch_add(1, Ordering::Relaxed);
            if seed >= end {
                return;
            }
            match run(seed, &opts) {
                Ok(s) => {
                    if let Ok(mut t) = totals.lock() {
                        t.0 += 1;
                        t.1 += u64::from(s.crashes);
                        t.2.add(&s.ledger);
                        t.3.add(&s.stats);
                    }
                }
                Err(f) => {
                    eprintln!("{f}\n");
                    if let Ok(mut v) = failures.lock() {
                        v.push((f.seed, f.invariant));
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.join();
    }
    let failed = failures.lock().map(|v| v.clone()).unwrap_or_default();
    let (ok, crashes, ledger, stats) = totals.lock().map(|t| t.clone()).unwrap_or_default();
    println!(
        "{} seeds from {} in {:.1} s: {ok} passed, {} failed",
        args.seeds,
        args.start,
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    println!(
        "  passed runs: {} recipients acknowledged, {} delivered, {} bounced, {} expired, {} notices, \
         {} delay notices, {} dead letters; {crashes} crashes, {} duplicates after crashes, {} outcomes changed after crashes, \
         {} lost to media corruption",
        ledger.acked,
        ledger.delivered,
        ledger.bounced,
        ledger.expired,
        ledger.notices,
        ledger.delay_notices,
        stats.dead_letters,
        ledger.duplicates,
        ledger.changed_after_crash,
        ledger.exempt
    );
    println!(
        "  spool: {} commits, {} failed; {} compactions ({} declined as gaining nothing, {} that gained nothing); \
         {} quarantined records; {} recovered messages set aside",
        stats.commits_ok,
        stats.commits_failed,
        stats.compactions,
        stats.compactions_skipped,
        stats.compactions_no_gain,
        stats.quarantined,
        stats.restore_errors
    );
    println!(
        "  delivery: {} connections, {} transactions ({} pipelined), {} broken; {} bodies unreadable \
         when the peer asked (record moved by compaction, old segment gone); {} notices whose \
         original was gone",
        stats.connections,
        stats.transactions,
        stats.pipelined,
        stats.broken,
        stats.body_read_failures,
        stats.notice_read_failures
    );
    for (seed, invariant) in &failed {
        println!("  seed {seed}: {invariant}");
    }
    if !failed.is_empty() {
        std::process::exit(1);
    }
}
