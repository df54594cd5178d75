//! The local broker: one task owns the [`Engine`]; sessions talk to it over
//! a channel.
//!
//! There is no lock around the engine. Connection tasks send batches of
//! requests; the engine task wakes, takes every message waiting in the
//! channel, executes them all, runs timers once, and hands each session its
//! replies through a mailbox. Under load one wake-up serves many connections,
//! which is also where the write-ahead log will group-commit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use spool_engine::{ConnId, Engine, EngineConfig, IdHasher};
use spool_proto::{Request, Response};
use tokio::sync::mpsc;

use crate::broker::{Broker, BrokerError, Peer, Session};
use crate::process::ProcessInfo;

/// Messages the engine task handles in one wake-up before it runs timers and
/// delivers replies; bounds the latency one busy wake-up can add.
const MESSAGES_PER_ROUND_MAX: usize = 4096;

enum Msg {
    Open { id: ConnId, mailbox: Arc<Mailbox> },
    Submit { id: ConnId, requests: Vec<Request> },
    Hangup { id: ConnId },
    Close { id: ConnId },
    SetDraining(bool),
}

/// Where the engine task leaves a session's replies.
#[derive(Debug, Default)]
struct Mailbox {
    inner: Mutex<Inbox>,
}

#[derive(Debug, Default)]
struct Inbox {
    replies: Vec<Response>,
    closed: bool,
    /// The connection task waiting for replies, if it is waiting.
    waker: Option<Waker>,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        // A panic elsewhere cannot leave an Inbox half-updated.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, response: Response) {
        self.lock().replies.push(response);
    }

    /// Wakes the connection task if it waits; called once per delivery round.
    fn wake(&self) {
        let waker = self.lock().waker.take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake();
    }
}

/// A [`Broker`] backed by an in-process engine. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LocalBroker {
    tx: mpsc::UnboundedSender<Msg>,
    next_id: Arc<AtomicU64>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl LocalBroker {
    /// Starts the engine task on the current tokio runtime.
    pub fn start(config: EngineConfig, process: ProcessInfo) -> LocalBroker {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = EngineTask {
            engine: Engine::new(config),
            clock: Instant::now(),
            sessions: Default::default(),
            runnable: VecDeque::new(),
            replies: Vec::new(),
            touched: Vec::new(),
            process,
        };
        tokio::spawn(task.run(rx));
        LocalBroker {
            tx,
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }
}

impl Broker for LocalBroker {
    type Session = LocalSession;

    fn open_session(&self, _peer: Peer) -> Result<LocalSession, BrokerError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mailbox = Arc::new(Mailbox::default());
        self.tx
            .send(Msg::Open {
                id,
                mailbox: mailbox.clone(),
            })
            .map_err(|_| BrokerError::Closed)?;
        Ok(LocalSession {
            id,
            tx: self.tx.clone(),
            mailbox,
        })
    }

    fn set_draining(&self, draining: bool) {
        let _ = self.tx.send(Msg::SetDraining(draining));
    }
}

#[derive(Debug)]
pub struct LocalSession {
    id: ConnId,
    tx: mpsc::UnboundedSender<Msg>,
    mailbox: Arc<Mailbox>,
}

impl Session for LocalSession {
    fn submit(&mut self, requests: Vec<Request>) -> Result<(), BrokerError> {
        self.tx
            .send(Msg::Submit {
                id: self.id,
                requests,
            })
            .map_err(|_| BrokerError::Closed)
    }

    fn hangup(&mut self) {
        let _ = self.tx.send(Msg::Hangup { id: self.id });
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>, out: &mut Vec<Response>) -> Poll<bool> {
        let mut inbox = self.mailbox.lock();
        if !inbox.replies.is_empty() {
            out.append(&mut inbox.replies);
            return Poll::Ready(true);
        }
        if inbox.closed {
            return Poll::Ready(false);
        }
        match &mut inbox.waker {
            Some(waker) => waker.clone_from(cx.waker()),
            None => inbox.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for LocalSession {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Close { id: self.id });
    }
}

#[derive(Debug)]
struct SessionState {
    mailbox: Arc<Mailbox>,
    pending: VecDeque<Request>,
    hung_up: bool,
    queued: bool,
}

type SessionMap =
    std::collections::HashMap<ConnId, SessionState, std::hash::BuildHasherDefault<IdHasher>>;

struct EngineTask {
    engine: Engine,
    clock: Instant,
    sessions: SessionMap,
    /// Sessions with pending requests that are not blocked.
    runnable: VecDeque<ConnId>,
    replies: Vec<(ConnId, Response)>,
    touched: Vec<ConnId>,
    process: ProcessInfo,
}

impl EngineTask {
    fn now(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut next_wake: Option<u64> = None;
        loop {
            let msg = match next_wake {
                Some(at) => {
                    let deadline = self.clock + Duration::from_nanos(at);
                    tokio::select! {
                        msg = rx.recv() => match msg {
                            Some(msg) => Some(msg),
                            None => break,
                        },
                        _ = tokio::time::sleep_until(deadline.into()) => None,
                    }
                }
                None => match rx.recv().await {
                    Some(msg) => Some(msg),
                    None => break,
                },
            };
            if let Some(msg) = msg {
                self.handle(msg);
                for _ in 1..MESSAGES_PER_ROUND_MAX {
                    match rx.try_recv() {
                        Ok(msg) => self.handle(msg),
                        Err(_) => break,
                    }
                }
            }
            let now = self.now();
            loop {
                self.run_sessions(now);
                self.engine.tick(now);
                if !self.deliver() {
                    break;
                }
            }
            next_wake = self.engine.next_wake();
        }
        for session in self.sessions.values() {
            session.mailbox.close();
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Open { id, mailbox } => {
                self.engine.connect(id);
                self.sessions.insert(
                    id,
                    SessionState {
                        mailbox,
                        pending: VecDeque::new(),
                        hung_up: false,
                        queued: false,
                    },
                );
            }
            Msg::Submit { id, requests } => {
                let Some(session) = self.sessions.get_mut(&id) else {
                    return;
                };
                session.pending.extend(requests);
                if !session.queued && !self.engine.is_waiting(id) {
                    session.queued = true;
                    self.runnable.push_back(id);
                }
            }
            Msg::Hangup { id } => {
                let Some(session) = self.sessions.get_mut(&id) else {
                    return;
                };
                // Like beanstalkd: a blocked reserve times out, what was sent
                // before the hangup is answered, then the session closes.
                session.hung_up = true;
                self.engine.time_out_wait(id);
                if !session.queued {
                    session.queued = true;
                    self.runnable.push_back(id);
                }
            }
            Msg::Close { id } => self.close(id),
            Msg::SetDraining(draining) => self.engine.set_draining(draining),
        }
    }

    fn close(&mut self, id: ConnId) {
        if !self.sessions.contains_key(&id) {
            return;
        }
        // Replies already made for this session go out before it closes.
        self.engine.drain_replies_into(&mut self.replies);
        self.route_replies();
        let Some(session) = self.sessions.remove(&id) else {
            return;
        };
        let now = self.now();
        self.engine.disconnect(id, now);
        session.mailbox.close();
    }

    /// Executes pending requests of every runnable session until each is
    /// empty or blocked.
    fn run_sessions(&mut self, now: u64) {
        while let Some(id) = self.runnable.pop_front() {
            let Some(session) = self.sessions.get_mut(&id) else {
                continue;
            };
            session.queued = false;
            while let Some(request) = session.pending.pop_front() {
                self.engine.execute(id, request, now);
                if self.engine.is_waiting(id) {
                    if !session.hung_up {
                        break;
                    }
                    // Nobody will read a job handed out now.
                    self.engine.time_out_wait(id);
                }
            }
            if session.hung_up && session.pending.is_empty() {
                self.close(id);
            }
        }
    }

    /// Hands replies to mailboxes. Returns true if a blocked session became
    /// runnable again and another round is needed.
    fn deliver(&mut self) -> bool {
        self.engine.drain_replies_into(&mut self.replies);
        self.route_replies();
        let mut again = false;
        for id in self.touched.drain(..) {
            let Some(session) = self.sessions.get_mut(&id) else {
                continue;
            };
            session.mailbox.wake();
            if !session.queued && !session.pending.is_empty() && !self.engine.is_waiting(id) {
                session.queued = true;
                self.runnable.push_back(id);
                again = true;
            }
        }
        again
    }

    fn route_replies(&mut self) {
        for (id, mut response) in self.replies.drain(..) {
            let Some(session) = self.sessions.get(&id) else {
                continue;
            };
            if let Response::Stats(stats) = &mut response {
                stats.process = self.process.snapshot();
            }
            session.mailbox.push(response);
            if self.touched.last() != Some(&id) {
                self.touched.push(id);
            }
        }
    }
}
