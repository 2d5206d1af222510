//! The run's trace: a running hash of everything that happened (two runs of one seed must end
//! with the same hash), and, when asked, the last lines of a readable log for a failure report.
//! Lines are only formatted when they are kept, so a plain run pays for the hash alone.

use std::collections::VecDeque;

/// FNV-1a's prime: the hash folds in 64-bit words rather than bytes.
const MIX_PRIME: u64 = 0x0000_0100_0000_01b3;

#[derive(Debug)]
pub struct Trace {
    keep: usize,
    verbose: bool,
    lines: VecDeque<String>,
    hash: u64,
}

impl Trace {
    pub fn new(keep: usize, verbose: bool) -> Trace {
        Trace {
            keep,
            verbose,
            lines: VecDeque::with_capacity(keep.min(4096)),
            hash: 0xcbf2_9ce4_8422_2325,
        }
    }

    pub fn mix(&mut self, word: u64) {
        self.hash = (self.hash ^ word).wrapping_mul(MIX_PRIME);
    }

    pub fn mix_str(&mut self, s: &str) {
        for chunk in s.as_bytes().chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(w));
        }
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// Whether lines are kept (formatting them is only worth it then).
    pub fn on(&self) -> bool {
        self.keep > 0 || self.verbose
    }

    pub fn line(&mut self, line: String) {
        if self.verbose {
            println!("{line}");
        }
        if self.keep == 0 {
            return;
        }
        if self.lines.len() == self.keep {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    pub fn take_lines(&mut self) -> Vec<String> {
        self.lines.drain(..).collect()
    }
}
