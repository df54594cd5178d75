//! Dispatch limits (`concurrency`, `rate_per_s`) under random operations
//! over both front doors while time passes: a queue never has more jobs
//! reserved than its concurrency, never hands out more than its bucket
//! allows, blocked reservers are served as soon as the limits let them
//! (`check_invariants`), and `tick` keeps no timer overdue.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use proptest::prelude::*;
use spool_broker::{Lease, NewJob, Op, Outcome, QueueName, QueuePolicy};
use spool_engine::{Engine, EngineConfig};
use spool_proto::{Request, Response};

const MS: u64 = 1_000_000;

#[derive(Debug, Clone)]
enum Step {
    Enqueue(u8),
    Reserve(u32),
    Complete(usize),
    Fail(usize),
    /// A beanstalkd session (0 or 1) reserves, with or without a timeout.
    BeanReserve(u8, bool),
    BeanDelete(u8),
    BeanRelease(u8),
    Disconnect(u8),
    Advance(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (1..4u8).prop_map(Step::Enqueue),
        3 => (1..5u32).prop_map(Step::Reserve),
        2 => (0..8usize).prop_map(Step::Complete),
        1 => (0..8usize).prop_map(Step::Fail),
        2 => (0..2u8, any::<bool>()).prop_map(|(c, t)| Step::BeanReserve(c, t)),
        2 => (0..2u8).prop_map(Step::BeanDelete),
        1 => (0..2u8).prop_map(Step::BeanRelease),
        1 => (0..2u8).prop_map(Step::Disconnect),
        3 => prop_oneof![1..300u64, 1_000..3_000u64].prop_map(Step::Advance),
    ]
}

struct Run {
    engine: Engine,
    now: u64,
    queue: QueueName,
    concurrency: Option<u32>,
    rate: Option<f64>,
    leases: Vec<Lease>,
    /// Jobs each session holds, in reservation order.
    held: [Vec<u64>; 2],
    handed_out: u64,
}

impl Run {
    fn settle(&mut self) {
        self.engine.tick(self.now);
        for (conn, reply) in self.engine.take_replies() {
            if let Response::Reserved { id, .. } = reply {
                self.held[conn as usize].push(id);
                self.handed_out += 1;
            }
        }
        self.engine.check_invariants();
        if let Some(at) = self.engine.next_wake() {
            assert!(at > self.now, "a timer is overdue after tick");
        }
        let info = match self.engine.apply(
            Op::GetQueue {
                queue: self.queue.clone(),
            },
            self.now,
        ) {
            Ok(Outcome::Queue(info)) => info,
            other => panic!("{other:?}"),
        };
        if let Some(n) = self.concurrency {
            assert!(info.reserved <= u64::from(n), "concurrency exceeded");
        }
        if let Some(rate) = self.rate {
            // Time starts at 0, the bucket full.
            let allowed = rate.max(1.0) + rate * self.now as f64 / 1e9;
            assert!(self.handed_out as f64 <= allowed + 1e-9, "rate exceeded");
        }
    }

    fn bean(&mut self, conn: u8, request: Request) {
        self.engine.execute(u64::from(conn), request, self.now);
    }

    fn apply(&mut self, step: Step) {
        match step {
            Step::Enqueue(n) => {
                for _ in 0..n {
                    let job = NewJob {
                        payload: Bytes::from_static(b"x"),
                        ttr_ms: Some(2_000),
                        ..NewJob::default()
                    };
                    let op = Op::Enqueue {
                        queue: self.queue.clone(),
                        job,
                    };
                    self.engine.apply(op, self.now).unwrap();
                }
            }
            Step::Reserve(batch) => {
                let got = self
                    .engine
                    .try_reserve(std::slice::from_ref(&self.queue), batch, self.now)
                    .unwrap();
                self.handed_out += got.len() as u64;
                self.leases.extend(got.into_iter().map(|l| l.lease));
            }
            Step::Complete(i) | Step::Fail(i) if i < self.leases.len() => {
                let lease = self.leases.remove(i);
                let op = match step {
                    Step::Complete(_) => Op::Complete {
                        lease,
                        result: None,
                    },
                    _ => Op::Fail {
                        lease,
                        error: "no".into(),
                        retry_in_ms: Some(100),
                        permanent: false,
                    },
                };
                // The lease may have expired meanwhile.
                let _ = self.engine.apply(op, self.now);
            }
            Step::Complete(_) | Step::Fail(_) => {}
            Step::BeanReserve(c, timeout) => {
                if !self.engine.is_waiting(u64::from(c)) {
                    let request = if timeout {
                        Request::ReserveWithTimeout {
                            timeout_secs: Some(1),
                        }
                    } else {
                        Request::Reserve
                    };
                    self.bean(c, request);
                }
            }
            Step::BeanDelete(c) | Step::BeanRelease(c) => {
                let c = c as usize;
                if self.engine.is_waiting(c as u64) || self.held[c].is_empty() {
                    return;
                }
                let id = self.held[c].remove(0);
                let request = match step {
                    Step::BeanDelete(_) => Request::Delete(id),
                    _ => Request::Release {
                        id,
                        pri: 0,
                        delay_secs: 0,
                    },
                };
                self.bean(c as u8, request);
            }
            Step::Disconnect(c) => {
                self.engine.disconnect(u64::from(c), self.now);
                self.held[c as usize].clear();
                self.connect(c);
            }
            Step::Advance(ms) => self.now += ms * MS,
        }
    }

    fn connect(&mut self, c: u8) {
        self.engine.connect(u64::from(c));
        self.bean(c, Request::Watch(self.queue.clone()));
        self.bean(c, Request::Ignore(QueueName::default_tube()));
        self.engine.take_replies();
    }
}

fn run(concurrency: Option<u32>, rate: Option<f64>, steps: Vec<Step>) {
    let mut engine = Engine::new(EngineConfig { max_job_size: 1024 });
    let queue = QueueName::new(b"lim").unwrap();
    let policy = QueuePolicy {
        concurrency,
        rate_per_s: rate,
        ..QueuePolicy::default()
    };
    engine
        .apply(
            Op::SetPolicy {
                queue: queue.clone(),
                policy,
            },
            0,
        )
        .unwrap();
    let mut r = Run {
        engine,
        now: 0,
        queue,
        concurrency,
        rate,
        leases: Vec::new(),
        held: [Vec::new(), Vec::new()],
        handed_out: 0,
    };
    r.connect(0);
    r.connect(1);
    for step in steps {
        r.apply(step);
        r.settle();
    }
}

proptest! {
    #[test]
    fn limits_hold_over_both_front_doors(
        concurrency in proptest::option::of(1..4u32),
        rate in proptest::option::of(prop_oneof![Just(0.5f64), Just(2.0), Just(2.5), Just(10.0)]),
        steps in proptest::collection::vec(step(), 1..80),
    ) {
        run(concurrency, rate, steps);
    }
}

/// A blocked beanstalkd reserver on a queue out of tokens gets its job when
/// the token arrives, from `tick` at the instant `next_wake` names.
#[test]
fn a_token_wakes_a_blocked_reserver_on_time() {
    let mut r = Run {
        engine: Engine::new(EngineConfig { max_job_size: 1024 }),
        now: 0,
        queue: QueueName::new(b"lim").unwrap(),
        concurrency: None,
        rate: Some(4.0),
        leases: Vec::new(),
        held: [Vec::new(), Vec::new()],
        handed_out: 0,
    };
    let policy = QueuePolicy {
        rate_per_s: Some(4.0),
        ..QueuePolicy::default()
    };
    let op = Op::SetPolicy {
        queue: r.queue.clone(),
        policy,
    };
    r.engine.apply(op, 0).unwrap();
    r.connect(0);
    r.apply(Step::Enqueue(3));
    r.apply(Step::Reserve(10));
    assert_eq!(r.leases.len(), 3, "a bucket of 4 tokens");
    r.apply(Step::Enqueue(3));
    r.apply(Step::Reserve(10));
    assert_eq!(r.leases.len(), 4);
    r.apply(Step::BeanReserve(0, false));
    r.settle();
    assert!(r.held[0].is_empty(), "no token yet");
    assert_eq!(
        r.engine.next_wake(),
        Some(250 * MS),
        "the next token's timer"
    );
    r.now = 250 * MS - 1;
    r.settle();
    assert!(r.held[0].is_empty());
    r.now = 250 * MS;
    r.settle();
    assert_eq!(r.held[0].len(), 1, "served when the token arrived");
}
