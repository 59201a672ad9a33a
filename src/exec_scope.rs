//! Thread-local marker of whether the code running on this thread is tract's plan
//! execution or daain's own code.
//!
//! The frame loop aims to allocate nothing of its own after warm-up, but tract allocates
//! node outputs on every run. An allocation counter (such as the one in
//! `tests/no_alloc.rs`) reads [`in_tract`] to attribute each allocation. The backbone
//! marks its plan runs, and the custom plan ops mark their own evaluation as daain code
//! again. Reading or setting the marker never allocates: it is a `const`-initialised
//! `Cell` without a destructor.

use std::cell::Cell;

thread_local! {
    static IN_TRACT: Cell<bool> = const { Cell::new(false) };
}

/// Returns whether this thread is inside a tract plan run, outside daain's custom ops.
pub fn in_tract() -> bool {
    IN_TRACT.with(Cell::get)
}

/// Sets the marker for its lifetime and restores the previous value when dropped.
pub(crate) struct ScopeGuard {
    previous: bool,
}

impl ScopeGuard {
    /// Marks the code that follows as tract's plan execution.
    pub(crate) fn tract() -> Self {
        Self::set(true)
    }

    /// Marks the code that follows as daain's own, inside a tract run.
    pub(crate) fn daain() -> Self {
        Self::set(false)
    }

    fn set(value: bool) -> Self {
        Self {
            previous: IN_TRACT.with(|cell| cell.replace(value)),
        }
    }
}

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        IN_TRACT.with(|cell| cell.set(self.previous));
    }
}
