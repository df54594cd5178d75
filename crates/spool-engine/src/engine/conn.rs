//! A beanstalkd session's state, kept small for the many that sit idle:
//! a session that uses any one tube and watches one tube costs a 24-byte
//! record and no allocation. Its leases, a blocked reserve and a watch list
//! of two or more tubes live behind one box, made on first need and freed
//! when the session is back to that idle shape.

use std::collections::{BTreeMap, BTreeSet};

use super::{JobId, TubeId, Wait};
use crate::ms::Ms;

#[derive(Debug)]
pub(super) struct Conn {
    pub(super) use_tube: TubeId,
    /// The one tube watched, while `more` holds no watch list.
    watch_one: TubeId,
    pub(super) producer: bool,
    pub(super) worker: bool,
    more: Option<Box<ConnMore>>,
}

#[derive(Debug, Default)]
struct ConnMore {
    /// The tubes watched when two or more, in beanstalkd's `ms` order;
    /// empty otherwise (then `Conn::watch_one` is the one).
    watch: Ms<TubeId>,
    /// Reserved jobs by reservation seq, so in reservation order.
    reserved: BTreeMap<u64, JobId>,
    /// (deadline, reservation seq): the first is the soonest to expire.
    deadlines: BTreeSet<(u64, u64)>,
    wait: Option<Wait>,
}

impl ConnMore {
    fn is_idle(&self) -> bool {
        self.watch.is_empty()
            && self.reserved.is_empty()
            && self.deadlines.is_empty()
            && self.wait.is_none()
    }
}

impl Conn {
    /// A session using and watching `tube`.
    pub(super) fn new(tube: TubeId) -> Conn {
        Conn {
            use_tube: tube,
            watch_one: tube,
            producer: false,
            worker: false,
            more: None,
        }
    }

    fn more_mut(&mut self) -> &mut ConnMore {
        self.more.get_or_insert_with(Box::default)
    }

    /// Frees the box once it holds nothing.
    fn shrink(&mut self) {
        if self.more.as_ref().is_some_and(|more| more.is_idle()) {
            self.more = None;
        }
    }

    /// The tubes watched, in beanstalkd's order; never empty.
    pub(super) fn watched(&self) -> &[TubeId] {
        match &self.more {
            Some(more) if !more.watch.is_empty() => more.watch.as_slice(),
            _ => std::slice::from_ref(&self.watch_one),
        }
    }

    /// Adds `tube` to the watch list unless it is there; true if added.
    pub(super) fn watch(&mut self, tube: TubeId) -> bool {
        if self.watched().contains(&tube) {
            return false;
        }
        let one = self.watch_one;
        let list = &mut self.more_mut().watch;
        if list.is_empty() {
            list.push(one);
        }
        list.push(tube);
        true
    }

    /// Removes `tube` from the watch list, as beanstalkd's `ms_remove`
    /// does; true if it was there. The caller keeps one tube watched.
    pub(super) fn unwatch(&mut self, tube: TubeId) -> bool {
        let Some(more) = self.more.as_mut().filter(|more| !more.watch.is_empty()) else {
            return false;
        };
        if !more.watch.remove(tube) {
            return false;
        }
        if more.watch.len() == 1 {
            self.watch_one = more.watch.as_slice()[0];
            more.watch = Ms::default();
            self.shrink();
        }
        true
    }

    /// The watch list, taken out for closing the session.
    pub(super) fn take_watched(&mut self) -> Ms<TubeId> {
        match self.more.as_mut().filter(|more| !more.watch.is_empty()) {
            Some(more) => std::mem::take(&mut more.watch),
            None => {
                let mut one = Ms::default();
                one.push(self.watch_one);
                one
            }
        }
    }

    pub(super) fn reserved_count(&self) -> usize {
        self.more.as_ref().map_or(0, |more| more.reserved.len())
    }

    /// Reserved jobs in reservation order.
    pub(super) fn reserved(&self) -> impl Iterator<Item = JobId> + '_ {
        self.more
            .iter()
            .flat_map(|more| more.reserved.values().copied())
    }

    /// The job reserved under `seq`, if this session holds it.
    pub(super) fn reserved_under(&self, seq: u64) -> Option<JobId> {
        self.more.as_ref()?.reserved.get(&seq).copied()
    }

    /// The reserved jobs, taken out for closing the session.
    pub(super) fn take_reserved(&mut self) -> BTreeMap<u64, JobId> {
        let taken = self
            .more
            .as_mut()
            .map(|more| {
                more.deadlines.clear();
                std::mem::take(&mut more.reserved)
            })
            .unwrap_or_default();
        self.shrink();
        taken
    }

    pub(super) fn add_lease(&mut self, seq: u64, id: JobId, deadline: u64) {
        let more = self.more_mut();
        more.reserved.insert(seq, id);
        more.deadlines.insert((deadline, seq));
    }

    pub(super) fn remove_lease(&mut self, seq: u64, deadline: u64) {
        if let Some(more) = self.more.as_mut() {
            more.reserved.remove(&seq);
            more.deadlines.remove(&(deadline, seq));
        }
        self.shrink();
    }

    pub(super) fn move_deadline(&mut self, seq: u64, old: u64, new: u64) {
        if let Some(more) = self.more.as_mut() {
            more.deadlines.remove(&(old, seq));
            more.deadlines.insert((new, seq));
        }
    }

    /// The soonest deadline of the jobs this session holds.
    pub(super) fn first_deadline(&self) -> Option<u64> {
        let more = self.more.as_ref()?;
        more.deadlines.first().map(|&(deadline, _)| deadline)
    }

    pub(super) fn wait(&self) -> Option<&Wait> {
        self.more.as_ref()?.wait.as_ref()
    }

    pub(super) fn set_wait(&mut self, wait: Wait) {
        self.more_mut().wait = Some(wait);
    }

    pub(super) fn take_wait(&mut self) -> Option<Wait> {
        let wait = self.more.as_mut()?.wait.take();
        self.shrink();
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tube(n: u32) -> TubeId {
        TubeId(n)
    }

    #[test]
    fn an_idle_session_is_small_and_allocates_nothing() {
        assert!(std::mem::size_of::<Conn>() <= 24);
        let mut conn = Conn::new(tube(0));
        conn.use_tube = tube(3);
        assert!(conn.more.is_none());
        assert_eq!(conn.watched(), &[tube(0)]);
    }

    #[test]
    fn watch_list_keeps_beanstalkd_order_and_folds_back_to_one() {
        let mut conn = Conn::new(tube(0));
        assert!(!conn.watch(tube(0)));
        assert!(conn.watch(tube(1)));
        assert!(conn.watch(tube(2)));
        assert!(!conn.watch(tube(1)));
        assert_eq!(conn.watched(), &[tube(0), tube(1), tube(2)]);
        // Swap removal, as beanstalkd's ms_remove.
        assert!(conn.unwatch(tube(0)));
        assert_eq!(conn.watched(), &[tube(2), tube(1)]);
        assert!(!conn.unwatch(tube(7)));
        assert!(conn.unwatch(tube(2)));
        assert_eq!(conn.watched(), &[tube(1)]);
        assert!(conn.more.is_none(), "one watched tube needs no box");
        assert!(!conn.unwatch(tube(1)), "the last tube stays watched");
        let mut list = conn.take_watched();
        assert_eq!(list.delete_at(0), Some(tube(1)));
        assert_eq!(list.delete_at(0), None);
    }

    #[test]
    fn leases_and_waits_live_in_the_box_while_held() {
        let mut conn = Conn::new(tube(0));
        conn.add_lease(7, 70, 1_000);
        conn.add_lease(5, 50, 2_000);
        assert_eq!(conn.reserved_count(), 2);
        assert_eq!(conn.reserved().collect::<Vec<_>>(), vec![50, 70]);
        assert_eq!(conn.reserved_under(7), Some(70));
        assert_eq!(conn.first_deadline(), Some(1_000));
        conn.move_deadline(7, 1_000, 3_000);
        assert_eq!(conn.first_deadline(), Some(2_000));
        conn.remove_lease(5, 2_000);
        conn.set_wait(Wait {
            timer_at_ns: None,
            since_ns: 1,
        });
        assert!(conn.wait().is_some());
        conn.remove_lease(7, 3_000);
        assert!(conn.more.is_some(), "the wait is still held");
        assert!(conn.take_wait().is_some());
        assert!(conn.more.is_none());
        conn.add_lease(9, 90, 4_000);
        assert_eq!(
            conn.take_reserved().into_values().collect::<Vec<_>>(),
            vec![90]
        );
        assert!(conn.more.is_none() && conn.first_deadline().is_none());
    }
}
