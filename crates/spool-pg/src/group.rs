//! Group commit of one node's concurrent operations: completions,
//! beanstalkd's deletes under a lease and enqueues of plain jobs that
//! arrive while a group of their kind is in the database wait and go
//! together in the next one, as one statement or transaction (one round
//! trip and one commit for the group, not one each).
//!
//! Nobody is answered before the group committed; a failure of the
//! database answers every member with it. A member the group does not
//! settle (a workflow's job, a lease that expired or never was, a
//! duplicate within the group; an enqueue the group's batch refused) is
//! answered "not done" and its caller runs the ordinary one-job
//! operation, which names the refusal or moves the workflow: one caller's
//! bad lease or job never fails another's. Input that is wrong on its face
//! (a result over the size limit) is refused before it joins a group.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use spool_broker::{BrokerError, JobView, Lease, Leased, NewJob, QueueName};
use tokio::sync::oneshot;

/// Most completions one statement carries: a group stays a short
/// statement, and a backlog is worked off over several.
pub(crate) const COMPLETE_GROUP_MAX: usize = 1_000;

/// Most beanstalkd deletes one statement carries (as completions).
pub(crate) const DELETE_GROUP_MAX: usize = 1_000;

/// A completion's answer from its group: the job completed, or `None`:
/// not settled here, run it alone.
pub(crate) type GroupAnswer = Result<Option<JobView>, BrokerError>;

/// One completion waiting for its group.
#[derive(Debug)]
pub(crate) struct Pending {
    pub lease: Lease,
    pub result: Option<Bytes>,
    pub reply: oneshot::Sender<GroupAnswer>,
}

/// One enqueue of a plain job (no idempotency key, headers or parents)
/// waiting for its group, which is one batch enqueue. Its answer: the job
/// made, or `None`: the batch was refused, enqueue it alone (and get its
/// own answer).
#[derive(Debug)]
pub(crate) struct PendingEnqueue {
    pub queue: QueueName,
    pub job: NewJob,
    pub reply: oneshot::Sender<GroupAnswer>,
}

/// One beanstalkd delete under a lease waiting for its group. Its answer:
/// deleted, or `false`: not settled here, run it alone.
#[derive(Debug)]
pub(crate) struct PendingDelete {
    pub lease: Lease,
    pub reply: oneshot::Sender<Result<bool, BrokerError>>,
}

/// Most jobs one grouped reservation asks for (the members' batches
/// summed): a short statement; more members wait for the next group.
pub(crate) const RESERVE_GROUP_ROWS_MAX: usize = 1_000;

/// A reserve's answer from its group: its jobs (none: nothing ready for
/// it), and when its queue may next have a job to give (a pause's end, a
/// rate-limit token) if the statement said.
pub(crate) type ReserveAnswer = Result<(Vec<Leased>, Option<u64>), BrokerError>;

/// One look of a reserve of one queue waiting for its group: the group's
/// members of a queue are one reservation of their batches summed, whose
/// jobs (in the queue's order) are dealt out in the order they joined.
#[derive(Debug)]
pub(crate) struct PendingReserve {
    pub queue: QueueName,
    pub batch: u32,
    pub reply: oneshot::Sender<ReserveAnswer>,
}

/// Whether an enqueue may join a group: what one batch insert of plain
/// rows carries.
pub(crate) fn plain(job: &NewJob) -> bool {
    job.idempotency_key.is_none() && job.headers.is_empty() && job.parents.is_empty()
}

#[derive(Debug)]
struct Waiting<P> {
    pending: Vec<P>,
    /// A task is running groups: it takes what is pending when it is
    /// free again.
    leading: bool,
}

/// The operations of one kind waiting at one node.
#[derive(Debug)]
pub(crate) struct Groups<P> {
    waiting: Mutex<Waiting<P>>,
}

impl<P> Default for Groups<P> {
    fn default() -> Self {
        Groups {
            waiting: Mutex::new(Waiting {
                pending: Vec::new(),
                leading: false,
            }),
        }
    }
}

impl<P> Groups<P> {
    /// Adds an operation; true when the caller must start the task that
    /// runs groups (none is running).
    pub(crate) fn join(&self, pending: P) -> bool {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.pending.push(pending);
        !std::mem::replace(&mut waiting.leading, true)
    }

    /// The next group of at most `max`, or `None` (and no task leads any
    /// more) when nothing is waiting.
    pub(crate) fn next_group(&self, max: usize) -> Option<Vec<P>> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.pending.is_empty() {
            waiting.leading = false;
            return None;
        }
        let take = waiting.pending.len().min(max.max(1));
        Some(waiting.pending.drain(..take).collect())
    }

    /// The next group whose members' `weight`s sum to at most `max` (at
    /// least one member), or `None` as [`Groups::next_group`].
    pub(crate) fn next_group_weighted(
        &self,
        max: usize,
        weight: impl Fn(&P) -> usize,
    ) -> Option<Vec<P>> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.pending.is_empty() {
            waiting.leading = false;
            return None;
        }
        let mut sum = 0;
        let take = waiting
            .pending
            .iter()
            .take_while(|p| {
                sum += weight(p);
                sum <= max
            })
            .count()
            .max(1);
        Some(waiting.pending.drain(..take).collect())
    }
}

/// Deals a group's reservation out: each member of `group` (one queue's)
/// still waiting takes the next jobs of `leased` up to its batch, in the
/// order they joined; the statement's error goes to every member. Returns
/// the jobs nobody took (members gone away: a client that hung up), for
/// the caller to hand back.
pub(crate) fn answer_reserves(
    group: Vec<PendingReserve>,
    outcome: Result<Vec<Leased>, BrokerError>,
    wake_at_ns: Option<u64>,
) -> Vec<Leased> {
    match outcome {
        Ok(leased) => {
            let mut leased = leased.into_iter();
            let mut unclaimed = Vec::new();
            for pending in group {
                if pending.reply.is_closed() {
                    continue;
                }
                let mine: Vec<Leased> = leased.by_ref().take(pending.batch as usize).collect();
                if let Err(Ok((mine, _))) = pending.reply.send(Ok((mine, wake_at_ns))) {
                    // Gone away just now: its jobs are handed back too.
                    unclaimed.extend(mine);
                }
            }
            unclaimed.extend(leased);
            unclaimed
        }
        Err(error) => {
            for pending in group {
                let _ = pending.reply.send(Err(error.clone()));
            }
            Vec::new()
        }
    }
}

/// Hands each completion of a group its answer: the job the statement
/// returned for its lease (the first of duplicates), else "run it alone".
pub(crate) fn answer(group: Vec<Pending>, outcome: Result<Vec<JobView>, BrokerError>) {
    match outcome {
        Ok(jobs) => {
            let mut by_id: HashMap<u64, JobView> = jobs.into_iter().map(|j| (j.id, j)).collect();
            for pending in group {
                // A dropped receiver is a caller that went away; its
                // completion stands, as an ungrouped one would.
                let _ = pending.reply.send(Ok(by_id.remove(&pending.lease.job)));
            }
        }
        Err(error) => {
            for pending in group {
                let _ = pending.reply.send(Err(error.clone()));
            }
        }
    }
}

/// Hands each delete of a group its answer: deleted when the statement
/// returned its job (the first of duplicates), else "run it alone".
pub(crate) fn answer_deletes(group: Vec<PendingDelete>, outcome: Result<Vec<u64>, BrokerError>) {
    match outcome {
        Ok(ids) => {
            let mut deleted: std::collections::HashSet<u64> = ids.into_iter().collect();
            for pending in group {
                let _ = pending.reply.send(Ok(deleted.remove(&pending.lease.job)));
            }
        }
        Err(error) => {
            for pending in group {
                let _ = pending.reply.send(Err(error.clone()));
            }
        }
    }
}

/// Hands each enqueue of a group its answer: its job (the batch answers in
/// the group's order), every member "run it alone" when the batch was
/// refused (`Ok(None)`), or the database's failure.
pub(crate) fn answer_enqueues(
    group: Vec<PendingEnqueue>,
    outcome: Result<Option<Vec<JobView>>, BrokerError>,
) {
    match outcome {
        Ok(Some(jobs)) if jobs.len() == group.len() => {
            for (pending, job) in group.into_iter().zip(jobs) {
                // A caller gone away: its job stands, as an ungrouped
                // enqueue's would.
                let _ = pending.reply.send(Ok(Some(job)));
            }
        }
        Ok(Some(jobs)) => {
            let error = BrokerError::Internal(format!(
                "a group of {} enqueues made {} jobs",
                group.len(),
                jobs.len()
            ));
            for pending in group {
                let _ = pending.reply.send(Err(error.clone()));
            }
        }
        Ok(None) => {
            for pending in group {
                let _ = pending.reply.send(Ok(None));
            }
        }
        Err(error) => {
            for pending in group {
                let _ = pending.reply.send(Err(error.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(job: u64) -> (Pending, oneshot::Receiver<GroupAnswer>) {
        let (reply, rx) = oneshot::channel();
        let lease = Lease { job, token: 7 };
        (
            Pending {
                lease,
                result: None,
                reply,
            },
            rx,
        )
    }

    fn job_view(id: u64) -> JobView {
        JobView {
            id,
            queue: "q".into(),
            state: spool_broker::JobState::Completed,
            priority: 0,
            payload: Bytes::new(),
            headers: Default::default(),
            attempts: 0,
            max_attempts: 0,
            backoff: Default::default(),
            ttr_ms: 1_000,
            run_at_ms: None,
            deadline_at_ms: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            finished_at_ms: Some(0),
            last_error: None,
            result: None,
            idempotency_key: None,
            cancel_requested: false,
            version: 2,
            parents: Default::default(),
        }
    }

    #[test]
    fn the_first_to_join_leads_until_nothing_waits() {
        let groups = Groups::<Pending>::default();
        assert!(groups.join(pending(1).0));
        assert!(!groups.join(pending(2).0));
        let group = groups.next_group(COMPLETE_GROUP_MAX).expect("two wait");
        assert_eq!(group.len(), 2);
        assert!(!groups.join(pending(3).0), "still led while a group runs");
        assert_eq!(
            groups.next_group(COMPLETE_GROUP_MAX).map(|g| g.len()),
            Some(1)
        );
        assert!(groups.next_group(COMPLETE_GROUP_MAX).is_none());
        assert!(
            groups.join(pending(4).0),
            "nobody leads after an empty look"
        );
    }

    #[test]
    fn a_group_is_at_most_the_maximum() {
        let groups = Groups::<Pending>::default();
        for job in 0..(COMPLETE_GROUP_MAX as u64 + 5) {
            groups.join(pending(job).0);
        }
        assert_eq!(
            groups.next_group(COMPLETE_GROUP_MAX).map(|g| g.len()),
            Some(COMPLETE_GROUP_MAX)
        );
        assert_eq!(
            groups.next_group(COMPLETE_GROUP_MAX).map(|g| g.len()),
            Some(5)
        );
    }

    #[test]
    fn a_lease_the_statement_did_not_settle_is_told_to_run_alone() {
        let (a, mut ra) = pending(1);
        let (b, mut rb) = pending(2);
        let (dup, mut rdup) = pending(1);
        let job = job_view(1);
        answer(vec![a, b, dup], Ok(vec![job]));
        assert_eq!(
            ra.try_recv()
                .ok()
                .and_then(|r| r.ok())
                .flatten()
                .map(|j| j.id),
            Some(1)
        );
        assert!(matches!(rb.try_recv(), Ok(Ok(None))));
        assert!(
            matches!(rdup.try_recv(), Ok(Ok(None))),
            "a duplicate runs alone"
        );
    }

    #[test]
    fn a_failed_statement_fails_every_member() {
        let (a, mut ra) = pending(1);
        let (b, mut rb) = pending(2);
        answer(vec![a, b], Err(BrokerError::Storage("gone".into())));
        assert!(matches!(ra.try_recv(), Ok(Err(BrokerError::Storage(_)))));
        assert!(matches!(rb.try_recv(), Ok(Err(BrokerError::Storage(_)))));
    }

    fn pending_delete(job: u64) -> (PendingDelete, oneshot::Receiver<Result<bool, BrokerError>>) {
        let (reply, rx) = oneshot::channel();
        (
            PendingDelete {
                lease: Lease { job, token: 7 },
                reply,
            },
            rx,
        )
    }

    #[test]
    fn a_delete_the_statement_did_not_settle_is_told_to_run_alone() {
        let (a, mut ra) = pending_delete(1);
        let (b, mut rb) = pending_delete(2);
        let (dup, mut rdup) = pending_delete(1);
        answer_deletes(vec![a, b, dup], Ok(vec![1]));
        assert!(matches!(ra.try_recv(), Ok(Ok(true))));
        assert!(matches!(rb.try_recv(), Ok(Ok(false))));
        assert!(
            matches!(rdup.try_recv(), Ok(Ok(false))),
            "a duplicate runs alone"
        );
        let (c, mut rc) = pending_delete(3);
        answer_deletes(vec![c], Err(BrokerError::Storage("gone".into())));
        assert!(matches!(rc.try_recv(), Ok(Err(BrokerError::Storage(_)))));
    }

    fn pending_enqueue(payload: &'static [u8]) -> (PendingEnqueue, oneshot::Receiver<GroupAnswer>) {
        let (reply, rx) = oneshot::channel();
        let job = NewJob {
            payload: Bytes::from_static(payload),
            ..NewJob::default()
        };
        assert!(plain(&job));
        (
            PendingEnqueue {
                queue: QueueName::new(b"q").expect("a valid name"),
                job,
                reply,
            },
            rx,
        )
    }

    #[test]
    fn enqueues_get_the_batch_jobs_in_order_or_all_run_alone() {
        let (a, mut ra) = pending_enqueue(b"a");
        let (b, mut rb) = pending_enqueue(b"b");
        let mut first = job_view(10);
        first.payload = Bytes::from_static(b"a");
        let mut second = job_view(11);
        second.payload = Bytes::from_static(b"b");
        answer_enqueues(vec![a, b], Ok(Some(vec![first, second])));
        let id = |r: GroupAnswer| r.ok().flatten().map(|j| j.id);
        assert_eq!(ra.try_recv().ok().and_then(id), Some(10));
        assert_eq!(rb.try_recv().ok().and_then(id), Some(11));

        let (a, mut ra) = pending_enqueue(b"a");
        let (b, mut rb) = pending_enqueue(b"b");
        answer_enqueues(vec![a, b], Ok(None));
        assert!(
            matches!(ra.try_recv(), Ok(Ok(None))),
            "a refused batch: each alone"
        );
        assert!(matches!(rb.try_recv(), Ok(Ok(None))));

        let (a, mut ra) = pending_enqueue(b"a");
        let (b, mut rb) = pending_enqueue(b"b");
        answer_enqueues(vec![a, b], Ok(Some(vec![job_view(10)])));
        assert!(matches!(ra.try_recv(), Ok(Err(BrokerError::Internal(_)))));
        assert!(matches!(rb.try_recv(), Ok(Err(BrokerError::Internal(_)))));

        let (a, mut ra) = pending_enqueue(b"a");
        answer_enqueues(vec![a], Err(BrokerError::Storage("gone".into())));
        assert!(matches!(ra.try_recv(), Ok(Err(BrokerError::Storage(_)))));
    }

    #[test]
    fn a_job_with_a_key_headers_or_parents_is_not_plain() {
        let keyed = NewJob {
            idempotency_key: Some("k".into()),
            ..NewJob::default()
        };
        assert!(!plain(&keyed));
        let mut headers = NewJob::default();
        headers.headers.insert("h".into(), "v".into());
        assert!(!plain(&headers));
        let mut parents = NewJob::default();
        parents.parents.insert("p".into(), None);
        assert!(!plain(&parents));
    }

    fn pending_reserve(batch: u32) -> (PendingReserve, oneshot::Receiver<ReserveAnswer>) {
        let (reply, rx) = oneshot::channel();
        (
            PendingReserve {
                queue: QueueName::new(b"q").expect("a valid name"),
                batch,
                reply,
            },
            rx,
        )
    }

    fn leased(id: u64) -> Leased {
        Leased {
            job: job_view(id),
            lease: Lease { job: id, token: id },
        }
    }

    fn ids(answer: Result<ReserveAnswer, oneshot::error::TryRecvError>) -> Vec<u64> {
        match answer {
            Ok(Ok((jobs, _))) => jobs.iter().map(|l| l.job.id).collect(),
            other => panic!("no jobs: {other:?}"),
        }
    }

    #[test]
    fn a_reservation_is_dealt_out_in_join_order_skipping_callers_gone() {
        let (a, mut ra) = pending_reserve(2);
        let (gone, rgone) = pending_reserve(2);
        let (b, mut rb) = pending_reserve(3);
        let (c, mut rc) = pending_reserve(1);
        drop(rgone);
        let unclaimed = answer_reserves(
            vec![a, gone, b, c],
            Ok((1..=6).map(leased).collect()),
            Some(42),
        );
        assert_eq!(ids(ra.try_recv()), vec![1, 2]);
        assert_eq!(ids(rb.try_recv()), vec![3, 4, 5], "the one gone is skipped");
        assert_eq!(ids(rc.try_recv()), vec![6]);
        assert!(unclaimed.is_empty());

        let (a, mut ra) = pending_reserve(1);
        let (gone, rgone) = pending_reserve(5);
        drop(rgone);
        let unclaimed = answer_reserves(vec![a, gone], Ok((1..=4).map(leased).collect()), None);
        assert_eq!(ids(ra.try_recv()), vec![1]);
        assert_eq!(
            unclaimed.iter().map(|l| l.job.id).collect::<Vec<_>>(),
            vec![2, 3, 4],
            "what nobody took is handed back"
        );

        let (a, mut ra) = pending_reserve(1);
        let unclaimed = answer_reserves(vec![a], Err(BrokerError::Storage("gone".into())), None);
        assert!(matches!(ra.try_recv(), Ok(Err(BrokerError::Storage(_)))));
        assert!(unclaimed.is_empty());
    }

    #[test]
    fn a_weighted_group_stops_at_its_maximum_but_takes_one() {
        let groups = Groups::<u32>::default();
        for weight in [600, 300, 200, 5_000] {
            groups.join(weight);
        }
        let weight = |w: &u32| *w as usize;
        assert_eq!(
            groups.next_group_weighted(1_000, weight),
            Some(vec![600, 300])
        );
        assert_eq!(groups.next_group_weighted(1_000, weight), Some(vec![200]));
        assert_eq!(
            groups.next_group_weighted(1_000, weight),
            Some(vec![5_000]),
            "one over the maximum still goes"
        );
        assert_eq!(groups.next_group_weighted(1_000, weight), None);
    }
}
