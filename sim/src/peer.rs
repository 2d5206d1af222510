//! Scripted SMTP peers, one per destination site, whose behaviour the seed draws and changes
//! over time: healthy, slow, greylisting, bouncing, refusing connections, stalling, dropping
//! connections mid-transaction. The simulation does not run the SMTP client: a transaction is
//! its per-recipient replies (or a broken connection) after a delay.

use std::collections::BTreeMap;

use epoxi::smtp::reply::Reply;

use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Accepts everything, quickly.
    Healthy,
    /// Accepts, with slow replies.
    Slow,
    /// A bit of everything.
    Flaky,
    /// 451 to everything.
    Greylist,
    /// 550 to some recipients.
    Hostile,
    /// Refuses connections.
    Down,
    /// Often never answers.
    Stalling,
    /// Often drops the connection mid-transaction.
    Dropping,
}

const PROFILES: &[(Profile, u32)] = &[
    (Profile::Healthy, 40),
    (Profile::Slow, 10),
    (Profile::Flaky, 20),
    (Profile::Greylist, 8),
    (Profile::Hostile, 6),
    (Profile::Down, 6),
    (Profile::Stalling, 5),
    (Profile::Dropping, 5),
];

/// How a connection attempt ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectPlan {
    /// Greets and takes EHLO after `delay_ms`.
    Open { delay_ms: u64 },
    /// Refused (or greeted with a 4xx) after `delay_ms`: the remote end answered.
    Refuse { delay_ms: u64 },
    /// No answer until the connect timeout.
    Timeout,
    /// The egress source's address cannot be bound.
    Bind,
}

/// How one transaction ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnPlan {
    /// Replies for each recipient after `delay_ms`.
    Replies { delay_ms: u64, rcpts: Vec<Reply> },
    /// The connection breaks after `delay_ms`; `got_it`: the peer had the whole message
    /// (so it may see it again on the retry, as SMTP allows).
    Drop { delay_ms: u64, got_it: bool },
    /// No reply: the client's reply timeout breaks the connection.
    Stall,
}

#[derive(Debug)]
pub struct Peer {
    pub name: String,
    pub profile: Profile,
    pub pipelining: bool,
    /// SIZE advertised in EHLO (bigger messages are refused before sending).
    pub size_max: Option<u64>,
    /// Messages received per (reception id, recipient): the peer's own view, duplicates
    /// included.
    pub receipts: BTreeMap<(u64, u16, u64, String), u32>,
}

impl Peer {
    pub fn new(name: String, rng: &mut Rng) -> Peer {
        let mut p = Peer {
            name,
            profile: Profile::Healthy,
            pipelining: true,
            size_max: None,
            receipts: BTreeMap::new(),
        };
        p.change(rng);
        p
    }

    /// A new behaviour, drawn.
    pub fn change(&mut self, rng: &mut Rng) {
        let weights: Vec<u32> = PROFILES.iter().map(|(_, w)| *w).collect();
        self.profile = PROFILES[rng.weighted(&weights)].0;
        self.pipelining = rng.chance(600);
        self.size_max = rng.chance(100).then(|| rng.range(500, 4_000));
    }

    /// The run heals: accept everything from now on.
    pub fn heal(&mut self) {
        self.profile = Profile::Healthy;
        self.size_max = None;
    }

    pub fn connect_plan(&self, rng: &mut Rng) -> ConnectPlan {
        let open = ConnectPlan::Open {
            delay_ms: rng.range(1, 30),
        };
        let refuse = ConnectPlan::Refuse {
            delay_ms: rng.range(1, 20),
        };
        match self.profile {
            Profile::Healthy => open,
            Profile::Down => match rng.weighted(&[70, 25, 5]) {
                0 => refuse,
                1 => ConnectPlan::Timeout,
                _ => ConnectPlan::Bind,
            },
            Profile::Flaky | Profile::Stalling | Profile::Dropping => {
                match rng.weighted(&[85, 8, 5, 2]) {
                    0 => open,
                    1 => refuse,
                    2 => ConnectPlan::Timeout,
                    _ => ConnectPlan::Bind,
                }
            }
            Profile::Slow | Profile::Greylist | Profile::Hostile => {
                if rng.chance(30) {
                    refuse
                } else {
                    open
                }
            }
        }
    }

    /// How the next transaction, for `rcpts` recipients, ends.
    pub fn txn_plan(&self, rng: &mut Rng, rcpts: usize) -> TxnPlan {
        let quick = rng.range(1, 40);
        let ok = || Reply::new(250, Some((2, 0, 0)), "OK");
        let transient = |rng: &mut Rng| match rng.below(2) {
            0 => Reply::new(451, Some((4, 7, 1)), "Try again later"),
            _ => Reply::new(421, Some((4, 4, 2)), "Service not available"),
        };
        let permanent = || Reply::new(550, Some((5, 1, 1)), "No such user");
        let all = |r: Reply| vec![r; rcpts];
        match self.profile {
            Profile::Healthy => TxnPlan::Replies {
                delay_ms: quick,
                rcpts: all(ok()),
            },
            Profile::Slow => TxnPlan::Replies {
                delay_ms: rng.range(100, 2_500),
                rcpts: all(ok()),
            },
            Profile::Greylist => TxnPlan::Replies {
                delay_ms: quick,
                rcpts: all(transient(rng)),
            },
            Profile::Hostile => TxnPlan::Replies {
                delay_ms: quick,
                rcpts: (0..rcpts)
                    .map(|_| if rng.chance(500) { permanent() } else { ok() })
                    .collect(),
            },
            Profile::Down => TxnPlan::Replies {
                delay_ms: quick,
                rcpts: all(transient(rng)),
            },
            Profile::Stalling if rng.chance(400) => TxnPlan::Stall,
            Profile::Dropping if rng.chance(400) => TxnPlan::Drop {
                delay_ms: rng.range(1, 200),
                got_it: rng.chance(500),
            },
            Profile::Flaky | Profile::Stalling | Profile::Dropping => {
                match rng.weighted(&[55, 12, 10, 8, 8, 4, 3]) {
                    0 => TxnPlan::Replies {
                        delay_ms: quick,
                        rcpts: all(ok()),
                    },
                    1 => TxnPlan::Replies {
                        delay_ms: rng.range(1, 1_500),
                        rcpts: (0..rcpts)
                            .map(|_| match rng.weighted(&[60, 25, 15]) {
                                0 => ok(),
                                1 => transient(rng),
                                _ => permanent(),
                            })
                            .collect(),
                    },
                    2 => TxnPlan::Replies {
                        delay_ms: quick,
                        rcpts: all(transient(rng)),
                    },
                    3 => TxnPlan::Replies {
                        delay_ms: quick,
                        rcpts: all(permanent()),
                    },
                    4 => TxnPlan::Drop {
                        delay_ms: rng.range(1, 300),
                        got_it: rng.chance(300),
                    },
                    5 => TxnPlan::Stall,
                    _ => TxnPlan::Replies {
                        delay_ms: rng.range(500, 3_000),
                        rcpts: all(ok()),
                    },
                }
            }
        }
    }
}
