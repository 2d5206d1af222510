//! The injector's SMTP client session over any blocking byte stream.
//!
//! A session is opened once (greeting, EHLO) and then carries one transaction after another.
//! With PIPELINING (RFC 2920) MAIL, RCPT and DATA go out in one write and their three replies
//! are read together; without it they go in lock-step. The message text follows a 354.
//!
//! Invariants: a transaction is classified by its first failing reply (4xx tempfail, 5xx
//! reject); a reply in any other unexpected class is a protocol error and the session must
//! be dropped; after a failed transaction the caller sends RSET before the next one, unless
//! the server said 421 and is closing.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::smtp_line::{Reply, ReplyError, ReplyReader};

/// Greeting commands, each sent in one write; the injector calls itself loadgen.test.
const EHLO: &[u8] = b"EHLO loadgen.test\r\n";
const HELO: &[u8] = b"HELO loadgen.test\r\n";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Reply(#[from] ReplyError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("unexpected reply to {stage}: {} {}", reply.code, reply.text)]
    Unexpected { stage: &'static str, reply: Reply },
}

/// How a transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx after the final dot; `latency` runs from the dot being written to the reply.
    Accepted {
        latency: Duration,
    },
    TempFailed,
    Rejected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transaction {
    pub outcome: Outcome,
    /// The server answered 421 and is closing the connection.
    pub server_closing: bool,
}

pub struct Client<S> {
    reader: ReplyReader<S>,
    pipelining: bool,
    commands: Vec<u8>,
    dots_sent: u64,
}

impl<S: Read + Write> Client<S> {
    /// Reads the greeting and introduces itself with EHLO, or HELO if EHLO is refused.
    pub fn handshake(stream: S) -> Result<Self, ClientError> {
        let mut reader = ReplyReader::new(stream);
        let greeting = reader.read_reply()?;
        if greeting.code != 220 {
            return Err(ClientError::Unexpected {
                stage: "greeting",
                reply: greeting,
            });
        }
        reader.get_mut().write_all(EHLO)?;
        let ehlo = reader.read_reply()?;
        let pipelining = match ehlo.class() {
            2 => ehlo.has_extension("PIPELINING"),
            5 => {
                reader.get_mut().write_all(HELO)?;
                let helo = reader.read_reply()?;
                if helo.class() != 2 {
                    return Err(ClientError::Unexpected {
                        stage: "HELO",
                        reply: helo,
                    });
                }
                false
            }
            _ => {
                return Err(ClientError::Unexpected {
                    stage: "EHLO",
                    reply: ehlo,
                })
            }
        };
        Ok(Self {
            reader,
            pipelining,
            commands: Vec::with_capacity(256),
            dots_sent: 0,
        })
    }

    pub fn pipelining(&self) -> bool {
        self.pipelining
    }

    /// How many messages this session has written up to and including the final dot.
    pub fn dots_sent(&self) -> u64 {
        self.dots_sent
    }

    /// Sends one message to one recipient. `wire` is the message as sent: dot-stuffed and
    /// ending in CRLF "." CRLF.
    pub fn send(
        &mut self,
        from: &str,
        rcpt: &str,
        wire: &[u8],
    ) -> Result<Transaction, ClientError> {
        self.commands.clear();
        write!(self.commands, "MAIL FROM:<{from}>\r\n")?;
        let rcpt_at = self.commands.len();
        write!(self.commands, "RCPT TO:<{rcpt}>\r\n")?;
        let data_at = self.commands.len();
        self.commands.extend_from_slice(b"DATA\r\n");
        let stages = [
            ("MAIL", 0..rcpt_at, 2),
            ("RCPT", rcpt_at..data_at, 2),
            ("DATA", data_at..self.commands.len(), 3),
        ];

        if self.pipelining {
            self.reader.get_mut().write_all(&self.commands)?;
        }
        let mut first_failure = None;
        for (stage, range, expected_class) in stages {
            if !self.pipelining {
                if first_failure.is_some() {
                    break;
                }
                self.reader.get_mut().write_all(&self.commands[range])?;
            }
            let reply = self.reader.read_reply()?;
            if reply.class() == expected_class {
                if stage == "DATA" && first_failure.is_some() {
                    // RFC 2920 says DATA must fail when no recipient was accepted; a server
                    // that says 354 anyway gets an empty message, whose reply is not counted.
                    self.reader.get_mut().write_all(b".\r\n")?;
                    self.reader.read_reply()?;
                }
                continue;
            }
            match reply.class() {
                4 | 5 => {
                    first_failure.get_or_insert(reply.code);
                    if reply.code == 421 {
                        // The server is closing: later replies will not come.
                        return Ok(Transaction {
                            outcome: Outcome::TempFailed,
                            server_closing: true,
                        });
                    }
                }
                _ => return Err(ClientError::Unexpected { stage, reply }),
            }
        }
        if let Some(code) = first_failure {
            return Ok(Transaction {
                outcome: failure_outcome(code),
                server_closing: false,
            });
        }

        self.reader.get_mut().write_all(wire)?;
        self.dots_sent += 1;
        let dot_at = Instant::now();
        let reply = self.reader.read_reply()?;
        let latency = dot_at.elapsed();
        let outcome = match reply.class() {
            2 => Outcome::Accepted { latency },
            4 | 5 => failure_outcome(reply.code),
            _ => {
                return Err(ClientError::Unexpected {
                    stage: "end of data",
                    reply,
                })
            }
        };
        Ok(Transaction {
            outcome,
            server_closing: reply.code == 421,
        })
    }

    /// Clears a failed transaction so the session can carry the next one.
    pub fn reset(&mut self) -> Result<(), ClientError> {
        self.reader.get_mut().write_all(b"RSET\r\n")?;
        let reply = self.reader.read_reply()?;
        if reply.class() != 2 {
            return Err(ClientError::Unexpected {
                stage: "RSET",
                reply,
            });
        }
        Ok(())
    }

    /// Says goodbye. Best effort: the run is over and its counts are already taken.
    pub fn quit(mut self) {
        if self.reader.get_mut().write_all(b"QUIT\r\n").is_ok() {
            let _ = self.reader.read_reply();
        }
    }
}

fn failure_outcome(code: u16) -> Outcome {
    if code / 100 == 4 {
        Outcome::TempFailed
    } else {
        Outcome::Rejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server: reads come from `replies`, writes are collected.
    struct Script {
        replies: std::io::Cursor<Vec<u8>>,
        written: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            self.replies.read(out)
        }
    }

    impl Write for Script {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.written.extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const EHLO_PIPELINING: &str = "220 hi\r\n250-x\r\n250 PIPELINING\r\n";
    const WIRE: &[u8] = b"Subject: t\r\n\r\nbody\r\n.\r\n";

    fn client(replies: &str) -> Client<Script> {
        Client::handshake(Script {
            replies: std::io::Cursor::new(replies.as_bytes().to_vec()),
            written: Vec::new(),
        })
        .unwrap()
    }

    fn written(c: &mut Client<Script>) -> String {
        String::from_utf8(c.reader.get_mut().written.clone()).unwrap()
    }

    #[test]
    fn pipelined_transaction_is_one_write_then_the_message() {
        let mut c = client(&format!(
            "{EHLO_PIPELINING}250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 queued\r\n"
        ));
        assert!(c.pipelining());
        let tx = c.send("a@b.test", "u@d0.test", WIRE).unwrap();
        assert!(matches!(tx.outcome, Outcome::Accepted { .. }));
        assert!(!tx.server_closing);
        assert_eq!(c.dots_sent(), 1);
        assert_eq!(
            written(&mut c),
            "EHLO loadgen.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@d0.test>\r\nDATA\r\n\
Subject: t\r\n\r\nbody\r\n.\r\n"
        );
    }

    #[test]
    fn pipelined_failure_is_classified_by_the_first_failing_reply() {
        let mut c = client(&format!(
            "{EHLO_PIPELINING}250 ok\r\n550 5.1.1 no\r\n554 5.5.1 no rcpt\r\n"
        ));
        let tx = c.send("a@b", "u@d", WIRE).unwrap();
        assert_eq!(tx.outcome, Outcome::Rejected);
        assert_eq!(c.dots_sent(), 0);

        let mut c = client(&format!(
            "{EHLO_PIPELINING}451 4.3.0 later\r\n503 no mail\r\n503 no mail\r\n"
        ));
        assert_eq!(
            c.send("a@b", "u@d", WIRE).unwrap().outcome,
            Outcome::TempFailed
        );

        // A server that wrongly says 354 after a failed RCPT gets an empty message.
        let mut c = client(&format!(
            "{EHLO_PIPELINING}250 ok\r\n452 4.5.3 full\r\n354 go\r\n250 ok\r\n"
        ));
        assert_eq!(
            c.send("a@b", "u@d", WIRE).unwrap().outcome,
            Outcome::TempFailed
        );
        assert!(written(&mut c).ends_with("DATA\r\n.\r\n"));
    }

    #[test]
    fn lock_step_without_pipelining_stops_at_the_first_failure() {
        let mut c = client("220 hi\r\n250 plain\r\n250 ok\r\n550 5.1.1 no\r\n250 reset\r\n");
        assert!(!c.pipelining());
        assert_eq!(
            c.send("a@b", "u@d", WIRE).unwrap().outcome,
            Outcome::Rejected
        );
        c.reset().unwrap();
        assert_eq!(
            written(&mut c),
            "EHLO loadgen.test\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@d>\r\nRSET\r\n"
        );
    }

    #[test]
    fn falls_back_to_helo_and_spots_421_and_garbage() {
        let mut c = client(
            "220 hi\r\n502 no ehlo\r\n250 hello\r\n250 ok\r\n250 ok\r\n354 go\r\n421 4.3.2 bye\r\n",
        );
        assert!(!c.pipelining());
        let tx = c.send("a@b", "u@d", WIRE).unwrap();
        assert_eq!(
            tx,
            Transaction {
                outcome: Outcome::TempFailed,
                server_closing: true
            }
        );

        let mut c = client(&format!(
            "{EHLO_PIPELINING}250 ok\r\n250 ok\r\n250 not 354\r\n"
        ));
        assert!(matches!(
            c.send("a@b", "u@d", WIRE),
            Err(ClientError::Unexpected { stage: "DATA", .. })
        ));

        let mut c = client(&format!("{EHLO_PIPELINING}250 ok\r\n"));
        assert!(matches!(
            c.send("a@b", "u@d", WIRE),
            Err(ClientError::Reply(ReplyError::Closed))
        ));
    }
}
