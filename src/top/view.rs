//! What `epoxi top` draws: one frame from the last snapshot, the rates since the one before,
//! and the queue depth history. No I/O (ratatui draws into a buffer; `top::run` flushes it).
//!
//! Labels are fixed words followed by their number (`received 120`), so that the screen reads
//! the same to a person and to a test.

use std::collections::VecDeque;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Sparkline, Table};
use ratatui::Frame;

use super::snapshot::{Rates, Snapshot};

/// Queue depths kept for the sparkline: wider than any terminal row, so the line is full.
pub const DEPTH_HISTORY_MAX: usize = 512;

/// Site rows shown: the endpoint sends its top 20.
const SITE_ROWS_MAX: usize = 20;

/// The state of the screen between polls.
#[derive(Debug, Default)]
pub struct View {
    /// Where it polls, for the title.
    pub url: String,
    pub last: Option<Snapshot>,
    pub rates: Option<Rates>,
    pub depths: VecDeque<u64>,
    /// Why the last poll failed, if it did (the figures shown are then the last good ones).
    pub error: Option<String>,
}

impl View {
    /// Takes a new snapshot: rates against the previous one, one more depth point.
    pub fn update(&mut self, snapshot: Snapshot) {
        if let Some(prev) = &self.last {
            self.rates = Rates::between(prev, &snapshot).or(self.rates);
        }
        if self.depths.len() == DEPTH_HISTORY_MAX {
            self.depths.pop_front();
        }
        self.depths.push_back(snapshot.queue.depth);
        self.last = Some(snapshot);
        self.error = None;
    }

    pub fn failed(&mut self, why: String) {
        self.error = Some(why);
    }

    pub fn draw(&self, frame: &mut Frame) {
        let [head, spark, middle, bottom, foot] = Layout::vertical([
            Constraint::Length(6),
            Constraint::Length(3),
            Constraint::Min(6),
            Constraint::Length(6),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        let empty = Snapshot::default();
        let s = self.last.as_ref().unwrap_or(&empty);
        self.draw_head(frame, head, s);
        let depths: Vec<u64> = self.depths.iter().copied().collect();
        let start = depths
            .len()
            .saturating_sub(usize::from(spark.width.saturating_sub(2)));
        frame.render_widget(
            Sparkline::default()
                .block(Block::bordered().title(format!("queue depth {}", s.queue.depth)))
                .data(&depths[start..])
                .style(Style::default().fg(Color::Cyan)),
            spark,
        );
        // Sites get the full width: their names are long, and they are what an operator
        // acts on.
        draw_sites(frame, middle, s);
        let [bounces, shards, alerts] = Layout::horizontal([
            Constraint::Percentage(25),
            Constraint::Percentage(40),
            Constraint::Percentage(35),
        ])
        .areas(bottom);
        draw_bounces(frame, bounces, s);
        draw_shards(frame, shards, s);
        draw_alerts(frame, alerts, s);
        let foot_text = match &self.error {
            Some(e) => Line::from(vec![
                Span::raw("q quit  "),
                Span::styled(format!("error: {e}"), Style::default().fg(Color::Red)),
            ]),
            None => Line::raw(format!("q quit  polled {}  ts_ms {}", self.url, s.ts_ms)),
        };
        frame.render_widget(Paragraph::new(foot_text), foot);
    }

    fn draw_head(&self, frame: &mut Frame, area: Rect, s: &Snapshot) {
        let title = format!(
            " Epoxi {}  {} shards  up {} s  {} ",
            s.hostname,
            s.shards,
            s.uptime_s,
            if self.last.is_none() {
                "waiting"
            } else if s.ready {
                "ready"
            } else {
                "recovering"
            }
        );
        let rate = |f: fn(&Rates) -> f64| {
            self.rates
                .as_ref()
                .map_or("-".to_owned(), |r| format!("{:.1}", f(r)))
        };
        let t = &s.totals;
        let q = &s.queue;
        let lines = vec![
            Line::raw(format!(
                "Rate    in {}/s  out {}/s  bounced {}/s  success {}",
                rate(|r| r.received),
                rate(|r| r.delivered),
                rate(|r| r.bounced),
                s.success_pct()
                    .map_or("-".to_owned(), |p| format!("{p:.1}%")),
            )),
            Line::raw(format!(
                "Totals  received {}  delivered {}  bounced {}  transient {}  expired {}  rejected {}",
                t.received, t.delivered, t.bounced, t.transient_failures, t.expired, t.rejected
            )),
            Line::raw(format!(
                "Queue   depth {}  ready {}  scheduled {}  in_flight {}  oldest {} s",
                q.depth, q.ready, q.scheduled, q.in_flight, q.oldest_age_s
            )),
            Line::raw(format!(
                "Conns   in {}  out {}  spool {} B  segments {}  disk {:.1}%  \
                 latency p99 rcpt {:.1} queue {:.1} dlv {:.1} ms",
                s.connections.inbound,
                s.connections.outbound,
                s.spool.bytes,
                s.spool.segments,
                s.spool.disk_used_pct,
                s.latency_ms.reception_p99,
                s.latency_ms.queue_p99,
                s.latency_ms.delivery_p99,
            )),
        ];
        frame.render_widget(
            Paragraph::new(lines).block(
                Block::bordered()
                    .title(title)
                    .title_style(Style::default().add_modifier(Modifier::BOLD)),
            ),
            area,
        );
    }
}

fn state_style(state: &str) -> Style {
    match state {
        "active" => Style::default().fg(Color::Green),
        "throttled" | "warming" => Style::default().fg(Color::Yellow),
        _ => Style::default().fg(Color::Red),
    }
}

fn draw_sites(frame: &mut Frame, area: Rect, s: &Snapshot) {
    let rows = s.sites.iter().take(SITE_ROWS_MAX).map(|site| {
        Row::new(vec![
            Cell::from(site.site.clone()),
            Cell::from(site.state.clone()).style(state_style(&site.state)),
            Cell::from(site.ready.to_string()),
            Cell::from(site.scheduled.to_string()),
            Cell::from(site.in_flight.to_string()),
            Cell::from(site.delivered.to_string()),
            Cell::from(site.bounced.to_string()),
            Cell::from(site.deferred.to_string()),
        ])
    });
    let widths = [
        Constraint::Fill(1),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(8),
    ];
    let header = Row::new([
        "site",
        "state",
        "ready",
        "sched",
        "infl",
        "delivered",
        "bounced",
        "deferred",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    frame.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::bordered().title("sites")),
        area,
    );
}

fn draw_bounces(frame: &mut Frame, area: Rect, s: &Snapshot) {
    let mut cats: Vec<(&String, &u64)> = s.bounce_categories.iter().collect();
    cats.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let rows = cats
        .into_iter()
        .map(|(c, n)| Row::new(vec![c.clone(), n.to_string()]));
    frame.render_widget(
        Table::new(rows, [Constraint::Fill(1), Constraint::Length(9)])
            .block(Block::bordered().title("bounce categories")),
        area,
    );
}

fn draw_shards(frame: &mut Frame, area: Rect, s: &Snapshot) {
    let rows = s.per_shard.iter().map(|r| {
        Row::new(vec![
            r.shard.to_string(),
            r.received.to_string(),
            r.delivered.to_string(),
            r.queue_depth.to_string(),
            r.connections_in.to_string(),
            r.connections_out.to_string(),
        ])
    });
    let header = Row::new(["shard", "received", "delivered", "queue", "in", "out"])
        .style(Style::default().add_modifier(Modifier::BOLD));
    frame.render_widget(
        Table::new(rows, [Constraint::Length(8); 6])
            .header(header)
            .block(Block::bordered().title("per shard")),
        area,
    );
}

fn draw_alerts(frame: &mut Frame, area: Rect, s: &Snapshot) {
    let lines: Vec<Line> = if s.alerts.is_empty() {
        vec![Line::raw("none")]
    } else {
        s.alerts
            .iter()
            .map(|a| {
                Line::styled(
                    format!(
                        "{} {}: {} ({:.1} > {:.1})",
                        a.rule, a.subject, a.message, a.value, a.threshold
                    ),
                    Style::default().fg(Color::Red),
                )
            })
            .collect()
    };
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(format!("alerts {}", s.alerts.len()))),
        area,
    );
}

#[cfg(test)]
mod tests {
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    use super::super::snapshot::{SiteRow, Totals};
    use super::*;

    fn screen(view: &View, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("terminal");
        terminal.draw(|f| view.draw(f)).expect("draw");
        let buffer = terminal.backend().buffer();
        let mut text = String::new();
        for y in 0..height {
            for x in 0..width {
                text.push_str(buffer[(x, y)].symbol());
            }
            text.push('\n');
        }
        text
    }

    #[test]
    fn shows_totals_rates_and_sites() {
        let mut view = View {
            url: "http://x".into(),
            ..View::default()
        };
        let mut s = Snapshot {
            ts_ms: 1_000,
            ready: true,
            shards: 2,
            hostname: "mx.test".into(),
            ..Snapshot::default()
        };
        view.update(s.clone());
        s.ts_ms = 3_000;
        s.totals = Totals {
            received: 40,
            delivered: 30,
            bounced: 10,
            ..Totals::default()
        };
        s.bounce_categories.insert("InvalidRecipient".into(), 10);
        s.sites.push(SiteRow {
            site: "mx.a.test".into(),
            state: "suspended".into(),
            ready: 7,
            ..SiteRow::default()
        });
        view.update(s);
        let text = screen(&view, 120, 30);
        assert!(
            text.contains("Totals  received 40  delivered 30  bounced 10"),
            "{text}"
        );
        assert!(text.contains("in 20.0/s  out 15.0/s"), "{text}");
        assert!(text.contains("success 75.0%"), "{text}");
        assert!(text.contains("mx.a.test"), "{text}");
        assert!(text.contains("suspended"), "{text}");
        assert!(text.contains("InvalidRecipient"), "{text}");
        assert!(text.contains("2 shards"), "{text}");

        view.failed("connection refused".into());
        let text = screen(&view, 120, 30);
        assert!(text.contains("error: connection refused"), "{text}");
        // The last good figures stay.
        assert!(text.contains("received 40"), "{text}");
        // A small terminal still draws (cut, not a panic).
        screen(&view, 20, 5);
    }

    #[test]
    fn depth_history_is_bounded() {
        let mut view = View::default();
        for i in 0..(DEPTH_HISTORY_MAX as u64 + 10) {
            let mut s = Snapshot {
                ts_ms: i,
                ..Snapshot::default()
            };
            s.queue.depth = i;
            view.update(s);
        }
        assert_eq!(view.depths.len(), DEPTH_HISTORY_MAX);
        assert_eq!(view.depths.front(), Some(&10));
    }
}
