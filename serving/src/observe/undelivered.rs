//! Undoing what an answer would have handed over when the answer never leaves.

use std::sync::Arc;

/// Lets a handler undo what its answer would have handed over if that answer never leaves: the
/// client reset the stream or went away before the status was sent. The observe layer puts one
/// in every request's extensions; it fires when the call ends CANCELLED. (A lease granted to a
/// caller that gave up would otherwise be held by nobody until its TTL ran out.)
#[derive(Clone, Default)]
pub struct Undelivered(Arc<std::sync::Mutex<Option<Undo>>>);

/// What a handler runs if its answer is never sent.
type Undo = Box<dyn FnOnce() + Send>;

impl std::fmt::Debug for Undelivered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Undelivered")
    }
}

impl Undelivered {
    /// Runs `undo` if the call's answer is never sent (replacing an earlier `undo`).
    pub fn on_undelivered(&self, undo: impl FnOnce() + Send + 'static) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(undo));
    }

    pub(super) fn fire(&self) {
        let undo = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(undo) = undo {
            undo();
        }
    }
}
