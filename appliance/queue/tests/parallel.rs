//! Concurrent delivery: the queue attempts a round's deliveries at once, bounded per next hop
//! and overall, so a next hop that hangs holds up only its own mail, and every message still
//! arrives exactly once. Real store, real SoftHSM, real SMTP sessions over TCP to sinks that
//! this test runs (see `common`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use common::{Gauge, Sink, SinkOptions, TOKEN, eventually, site, still_queued, submit};
use qutemail_hsm::testing::isolated;
use qutemail_queue::Parallelism;

/// Generous: the machine may be busy with other builds.
const DEADLINE: Duration = Duration::from_secs(90);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn parallelism(per_destination: usize, total: usize) -> Parallelism {
    Parallelism {
        per_destination: NonZeroUsize::new(per_destination).unwrap(),
        total: NonZeroUsize::new(total).unwrap(),
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    sorted((0..n).map(|i| format!("<{prefix}-{i}@a.test>")).collect())
}

#[test]
fn a_hanging_next_hop_does_not_hold_up_other_destinations() {
    isolated("a_hanging_next_hop_does_not_hold_up_other_destinations", &[TOKEN], |env| {
        runtime().block_on(async {
            // slow.test accepts connections and then says nothing until released.
            let slow = Sink::start(SinkOptions { hold_greeting: true, ..Default::default() }).await;
            let fast = Sink::start(SinkOptions::default()).await;
            let (t, queue) =
                site(env, &[("slow.test", slow.addr), ("fast.test", fast.addr)], Parallelism::default())
                    .await;
            // The hanging destination's mail is the oldest, so it is claimed and tried first.
            for i in 0..2 {
                submit(&queue, &format!("slow-{i}"), &[&format!("user{i}@slow.test")], 1000).await;
            }
            for i in 0..6 {
                submit(&queue, &format!("fast-{i}"), &[&format!("user{i}@fast.test")], 1000).await;
            }
            let round = tokio::spawn({
                let queue = queue.clone();
                async move { queue.run_once().await }
            });
            assert!(
                eventually(DEADLINE, || fast.received().len() == 6).await,
                "fast.test got {:?} while slow.test hangs",
                fast.received()
            );
            // Still stuck: both sessions to slow.test open, nothing delivered there, round on.
            assert!(slow.received().is_empty());
            assert_eq!(slow.gauge().active(), 2);
            assert!(!round.is_finished());
            assert_eq!(sorted(fast.received()), ids("fast", 6));

            slow.release();
            let tried = tokio::time::timeout(DEADLINE, round).await.unwrap().unwrap().unwrap();
            assert_eq!(tried, 8);
            assert_eq!(sorted(slow.received()), ids("slow", 2));
            assert_eq!(sorted(fast.received()), ids("fast", 6), "fast.test got a message twice");
            assert_eq!(still_queued(&t).await, 0);
        });
    });
}

#[test]
fn attempts_to_one_next_hop_overlap_up_to_the_bound() {
    isolated("attempts_to_one_next_hop_overlap_up_to_the_bound", &[TOKEN], |env| {
        runtime().block_on(async {
            // The sink holds each greeting until 3 sessions are open (or 2 s pass), so that
            // concurrent attempts do overlap; a round trip of 20 ms per reply.
            let sink = Sink::start(SinkOptions {
                gather: 3,
                reply_delay: Duration::from_millis(20),
                ..Default::default()
            })
            .await;
            let (t, queue) = site(env, &[("b.test", sink.addr)], parallelism(3, 16)).await;
            for i in 0..12 {
                submit(&queue, &format!("m-{i}"), &[&format!("user{i}@b.test")], 2000).await;
            }
            let tried = tokio::time::timeout(DEADLINE, queue.run_once()).await.unwrap().unwrap();
            assert_eq!(tried, 12);
            assert_eq!(sorted(sink.received()), ids("m", 12));
            let max = sink.gauge().max();
            assert!(max <= 3, "{max} sessions at once to one next hop, the bound is 3");
            assert!(max >= 2, "attempts to one next hop never overlapped");
            assert_eq!(still_queued(&t).await, 0);
        });
    });
}

#[test]
fn attempts_in_flight_overall_stay_within_the_total_bound() {
    isolated("attempts_in_flight_overall_stay_within_the_total_bound", &[TOKEN], |env| {
        runtime().block_on(async {
            let overall = Arc::new(Gauge::default());
            let options = SinkOptions {
                reply_delay: Duration::from_millis(20),
                gather: 2,
                overall: Some(overall.clone()),
                ..Default::default()
            };
            let mut sinks = Vec::new();
            for _ in 0..3 {
                sinks.push(Sink::start(options.clone()).await);
            }
            let domains = ["b.test", "c.test", "d.test"];
            let routes: Vec<_> = domains.iter().zip(&sinks).map(|(d, s)| (*d, s.addr)).collect();
            let (t, queue) = site(env, &routes, parallelism(4, 5)).await;
            for i in 0..8 {
                for d in domains {
                    submit(&queue, &format!("{d}-{i}"), &[&format!("user{i}@{d}")], 2000).await;
                }
            }
            let tried = tokio::time::timeout(DEADLINE, queue.run_once()).await.unwrap().unwrap();
            assert_eq!(tried, 24);
            for (d, sink) in domains.iter().zip(&sinks) {
                assert_eq!(sorted(sink.received()), ids(d, 8));
                assert!(sink.gauge().max() <= 4, "{d}: {} sessions at once", sink.gauge().max());
            }
            let max = overall.max();
            assert!(max <= 5, "{max} attempts in flight at once, the bound is 5");
            assert!(max >= 2, "attempts never overlapped");
            assert_eq!(still_queued(&t).await, 0);
        });
    });
}

#[test]
fn every_message_is_delivered_exactly_once() {
    isolated("every_message_is_delivered_exactly_once", &[TOKEN], |env| {
        runtime().block_on(async {
            let domains = ["b.test", "c.test", "d.test"];
            let mut sinks = Vec::new();
            for _ in domains {
                let options = SinkOptions { reply_delay: Duration::from_millis(5), ..Default::default() };
                sinks.push(Sink::start(options).await);
            }
            let routes: Vec<_> = domains.iter().zip(&sinks).map(|(d, s)| (*d, s.addr)).collect();
            let (t, queue) = site(env, &routes, Parallelism::default()).await;
            // 40 messages: to one recipient, to two at one domain (one transaction), and to
            // two domains (two deliveries of one message); 60 deliveries, so two rounds.
            let mut expected: Vec<Vec<String>> = vec![Vec::new(); domains.len()];
            for i in 0..40 {
                let (a, b) = (i % 3, (i + 1) % 3);
                let recipients = match i % 4 {
                    0 | 1 => vec![format!("u{i}@{}", domains[a])],
                    2 => vec![format!("u{i}@{}", domains[a]), format!("v{i}@{}", domains[a])],
                    _ => vec![format!("u{i}@{}", domains[a]), format!("v{i}@{}", domains[b])],
                };
                let id = format!("x-{i}");
                expected[a].push(format!("<{id}@a.test>"));
                if i % 4 == 3 {
                    expected[b].push(format!("<{id}@a.test>"));
                }
                let recipients: Vec<&str> = recipients.iter().map(String::as_str).collect();
                submit(&queue, &id, &recipients, 10 * 1024).await;
            }
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let runner = tokio::spawn({
                let queue = queue.clone();
                async move { queue.run(async move { stopped.await.unwrap_or_default() }).await }
            });
            let total: usize = expected.iter().map(Vec::len).sum();
            assert!(
                eventually(DEADLINE, || sinks.iter().map(|s| s.received().len()).sum::<usize>() >= total)
                    .await,
                "only {} of {total} deliveries arrived",
                sinks.iter().map(|s| s.received().len()).sum::<usize>()
            );
            let mut left = still_queued(&t).await;
            let until = std::time::Instant::now() + DEADLINE;
            while left > 0 && std::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
                left = still_queued(&t).await;
            }
            assert_eq!(left, 0, "recipients still queued after every delivery arrived");
            stop.send(()).unwrap();
            tokio::time::timeout(DEADLINE, runner).await.unwrap().unwrap();
            for ((d, sink), want) in domains.iter().zip(&sinks).zip(expected) {
                assert_eq!(sorted(sink.received()), sorted(want), "{d}: a message missing or repeated");
            }
        });
    });
}
