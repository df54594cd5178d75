//! An ordered multiset with beanstalkd's `ms` semantics.
//!
//! beanstalkd keeps its tube list, each connection's watch list and each
//! tube's waiting connections in this structure. Its quirks are observable:
//! removal swaps the last item into the hole (so `list-tubes` order changes
//! when a tube disappears), and `take` hands items out round-robin from a
//! moving cursor (so it decides which blocked reserver gets the next job).
//! spool reproduces both so that multi-connection sessions see the same
//! replies as on beanstalkd.

#[derive(Debug, Clone)]
pub(crate) struct Ms<T> {
    items: Vec<T>,
    last: usize,
}

impl<T> Default for Ms<T> {
    fn default() -> Self {
        Ms {
            items: Vec::new(),
            last: 0,
        }
    }
}

impl<T: PartialEq + Copy> Ms<T> {
    pub(crate) fn push(&mut self, item: T) {
        self.items.push(item);
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        &self.items
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = T> + '_ {
        self.items.iter().copied()
    }

    /// Removes the item at `index` by moving the last item into its place.
    pub(crate) fn delete_at(&mut self, index: usize) -> Option<T> {
        if index >= self.items.len() {
            return None;
        }
        Some(self.items.swap_remove(index))
    }

    pub(crate) fn remove(&mut self, item: T) -> bool {
        match self.items.iter().position(|&x| x == item) {
            Some(index) => {
                self.items.swap_remove(index);
                true
            }
            None => false,
        }
    }

    /// The next item round-robin, removed.
    pub(crate) fn take(&mut self) -> Option<T> {
        if self.items.is_empty() {
            return None;
        }
        self.last %= self.items.len();
        let item = self.items.swap_remove(self.last);
        self.last += 1;
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_is_round_robin_with_swap_removal() {
        let mut ms = Ms::default();
        for i in 1..=4 {
            ms.push(i);
        }
        // [1,2,3,4] take@0 -> 1, [4,2,3]; take@1 -> 2, [4,3]; take@0 (2%2) -> 4, [3]
        assert_eq!(ms.take(), Some(1));
        assert_eq!(ms.take(), Some(2));
        assert_eq!(ms.take(), Some(4));
        assert_eq!(ms.take(), Some(3));
        assert_eq!(ms.take(), None);
    }

    #[test]
    fn remove_swaps_last_into_the_hole() {
        let mut ms = Ms::default();
        for i in 1..=4 {
            ms.push(i);
        }
        assert!(ms.remove(2));
        assert_eq!(ms.iter().collect::<Vec<_>>(), vec![1, 4, 3]);
        assert!(!ms.remove(9));
    }
}
