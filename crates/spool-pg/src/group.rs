//! Group commit of completions: completes that arrive at one node while a
//! group is in the database wait and go together in the next one, as one
//! statement (one round trip, one commit) instead of a transaction each.
//!
//! Nobody is answered before the statement committed. A completion the
//! group's statement does not settle (a workflow's job, a lease that
//! expired or never was, a duplicate within the group) is answered "not
//! done" and its caller runs the ordinary one-job transaction, which names
//! the refusal or moves the workflow: one caller's bad lease never fails
//! another's completion. Input that is wrong on its face (a result over the
//! size limit) is refused before it joins a group.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use spool_broker::{BrokerError, JobView, Lease};
use tokio::sync::oneshot;

/// Most completions one statement carries: a group stays a short
/// statement, and a backlog is worked off over several.
pub(crate) const COMPLETE_GROUP_MAX: usize = 1_000;

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

#[derive(Debug, Default)]
struct Waiting {
    pending: Vec<Pending>,
    /// A task is running groups: it takes what is pending when it is
    /// free again.
    leading: bool,
}

/// The completions waiting at one node.
#[derive(Debug, Default)]
pub(crate) struct CompleteGroups {
    waiting: Mutex<Waiting>,
}

impl CompleteGroups {
    /// Adds a completion; true when the caller must start the task that
    /// runs groups (none is running).
    pub(crate) fn join(&self, pending: Pending) -> bool {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.pending.push(pending);
        !std::mem::replace(&mut waiting.leading, true)
    }

    /// The next group, or `None` (and no task leads any more) when nothing
    /// is waiting.
    pub(crate) fn next_group(&self) -> Option<Vec<Pending>> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.pending.is_empty() {
            waiting.leading = false;
            return None;
        }
        let take = waiting.pending.len().min(COMPLETE_GROUP_MAX);
        Some(waiting.pending.drain(..take).collect())
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

    #[test]
    fn the_first_to_join_leads_until_nothing_waits() {
        let groups = CompleteGroups::default();
        assert!(groups.join(pending(1).0));
        assert!(!groups.join(pending(2).0));
        let group = groups.next_group().expect("two wait");
        assert_eq!(group.len(), 2);
        assert!(!groups.join(pending(3).0), "still led while a group runs");
        assert_eq!(groups.next_group().map(|g| g.len()), Some(1));
        assert!(groups.next_group().is_none());
        assert!(
            groups.join(pending(4).0),
            "nobody leads after an empty look"
        );
    }

    #[test]
    fn a_group_is_at_most_the_maximum() {
        let groups = CompleteGroups::default();
        for job in 0..(COMPLETE_GROUP_MAX as u64 + 5) {
            groups.join(pending(job).0);
        }
        assert_eq!(
            groups.next_group().map(|g| g.len()),
            Some(COMPLETE_GROUP_MAX)
        );
        assert_eq!(groups.next_group().map(|g| g.len()), Some(5));
    }

    #[test]
    fn a_lease_the_statement_did_not_settle_is_told_to_run_alone() {
        let (a, mut ra) = pending(1);
        let (b, mut rb) = pending(2);
        let (dup, mut rdup) = pending(1);
        let job = JobView {
            id: 1,
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
        };
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
}
