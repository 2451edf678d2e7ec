//! The unprivileged users process tasks run as: one uid (with a private group of the
//! same number) per task, taken from a configured range while the task holds its
//! directory and given back when the directory is recycled.
//!
//! Nothing is kept on disk here: each task's `task.json` records its uid, and a restarted
//! agent marks the uids of the tasks it recovers as taken before it starts any new one.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::sync::Mutex;

/// The default range, above the ids distributions hand out and below those of user
/// namespaces' common mappings: 65,536 ids.
pub const DEFAULT_RANGE: RangeInclusive<u32> = 200_000..=265_535;

pub struct TaskUsers {
    range: RangeInclusive<u32>,
    state: Mutex<State>,
}

struct State {
    taken: BTreeSet<u32>,
    /// Where the next search starts. Handing uids out in turn, rather than always the
    /// lowest free one, keeps a uid unused for as long as possible after its task.
    next: u32,
}

impl TaskUsers {
    pub fn new(range: RangeInclusive<u32>) -> TaskUsers {
        TaskUsers {
            state: Mutex::new(State {
                taken: BTreeSet::new(),
                next: *range.start(),
            }),
            range,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every section under the lock leaves the state whole, so a poisoned lock still
        // holds consistent data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A uid no task holds, or `None` when every uid of the range is taken.
    pub fn take(&self) -> Option<u32> {
        let mut st = self.state();
        let (start, end) = (*self.range.start(), *self.range.end());
        let from = st.next.clamp(start, end);
        let found = (from..=end)
            .chain(start..from)
            .find(|uid| !st.taken.contains(uid))?;
        st.taken.insert(found);
        st.next = if found == end { start } else { found + 1 };
        Some(found)
    }

    /// Marks a uid recorded by a task the agent recovered as taken. Returns false when
    /// it is outside the range (the range changed across the restart); it is tracked
    /// anyway, so it is never handed to another task while that one holds it.
    pub fn mark(&self, uid: u32) -> bool {
        self.state().taken.insert(uid);
        self.range.contains(&uid)
    }

    /// Gives a uid back once nothing of its task is left.
    pub fn release(&self, uid: u32) {
        self.state().taken.remove(&uid);
    }

    pub fn taken(&self) -> usize {
        self.state().taken.len()
    }
}

/// Parses `FIRST-LAST` (inclusive), e.g. `200000-265535`.
pub fn parse_range(s: &str) -> Result<RangeInclusive<u32>, String> {
    let bad = || format!("{s:?}: expected FIRST-LAST, e.g. 200000-265535");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let first: u32 = a.trim().parse().map_err(|_| bad())?;
    let last: u32 = b.trim().parse().map_err(|_| bad())?;
    if first == 0 || first > last {
        return Err(format!(
            "{s:?}: the range must be non-empty and must not include 0 (root)"
        ));
    }
    Ok(first..=last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_unique_until_released_and_handed_out_in_turn() {
        let users = TaskUsers::new(10..=12);
        assert_eq!(users.take(), Some(10));
        assert_eq!(users.take(), Some(11));
        users.release(10);
        // The search goes on past the last one handed out before it wraps around.
        assert_eq!(users.take(), Some(12));
        assert_eq!(users.take(), Some(10));
        assert_eq!(users.take(), None, "every uid is taken");
        users.release(11);
        assert_eq!(users.take(), Some(11));
    }

    #[test]
    fn recovered_uids_are_not_handed_out_again() {
        let users = TaskUsers::new(10..=11);
        assert!(users.mark(10));
        assert!(!users.mark(99));
        assert_eq!(users.take(), Some(11));
        assert_eq!(users.take(), None);
        assert_eq!(users.taken(), 3);
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("200000-265535"), Ok(200_000..=265_535));
        assert!(parse_range("0-10").is_err());
        assert!(parse_range("10-5").is_err());
        assert!(parse_range("10").is_err());
    }
}
