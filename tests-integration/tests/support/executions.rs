//! Executions of a handler and their claims on its key: the check that no two
//! executions of a key overlap (the crash matrix; the chaos run includes this
//! file by path).
#![allow(dead_code)]

/// One run of the handler: who ran it (`who`), when it started and ended (epoch
/// milliseconds; `end` is `None` when it was cut), and the deadline of the
/// reservation it ran under.
#[derive(Debug, Clone)]
pub struct Execution<W> {
    pub who: W,
    pub start: i64,
    pub deadline: i64,
    pub end: Option<i64>,
}

impl<W> Execution<W> {
    /// The end of its claim on the key: its end, or its deadline if it was cut
    /// or overslept (a reservation holds only until then).
    pub fn claim_end(&self) -> i64 {
        self.end.map_or(self.deadline, |end| end.min(self.deadline))
    }

    /// Whether its claim and `other`'s overlap: two executions held the key at once.
    pub fn overlaps(&self, other: &Self) -> bool {
        other.start < self.claim_end() && self.start < other.claim_end()
    }
}
