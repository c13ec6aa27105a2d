//! A version's lifecycle: an enum whose variants carry what exists in that state (the load's
//! slot while loading, the served model when ready, the reason when failed), and its
//! transitions as pure methods — no IO, no locks, no ORT. The registry calls them under its
//! lock and carries out what they hand back (models to drop after the lock is released).
//! Invariant: a version has a model exactly when it is `Ready` and a load slot exactly when
//! it is `Loading`; a transition that does not apply to the current state changes nothing.

use std::sync::{Arc, Condvar, Mutex};

use rxd_protocol::ModelState;

use crate::error::LoadError;

use super::scan::FileStamp;
use crate::model::LoadedModel;

/// Where a version is in its lifecycle. `M` is the served model (an `Arc<LoadedModel>`; a
/// fake in the tests).
#[derive(Debug)]
pub enum State<M> {
    /// In the repository, not resident. `refused`: why the last load did not fit the memory
    /// budget, when that is why it is not resident.
    Available {
        refused: Option<String>,
    },
    /// A load is under way; requests wait on the slot.
    Loading(Arc<LoadSlot>),
    Ready(M),
    /// Evicted to make room (least recently used); loads again on demand.
    Evicted {
        refused: Option<String>,
    },
    /// Its load failed; not retried per request until its files change (`files`: as they
    /// were when it failed) or an admin loads it.
    Failed {
        reason: String,
        files: FileStamp,
    },
}

/// The idle state a load started from: where a load the budget refuses goes back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    Available,
    Evicted,
    Failed,
}

impl<M> Default for State<M> {
    fn default() -> Self {
        State::Available { refused: None }
    }
}

impl<M> State<M> {
    /// The state as the wire names it.
    pub fn kind(&self) -> ModelState {
        match self {
            State::Available { .. } => ModelState::Available,
            State::Loading(_) => ModelState::Loading,
            State::Ready(_) => ModelState::Ready,
            State::Evicted { .. } => ModelState::Evicted,
            State::Failed { .. } => ModelState::Failed,
        }
    }

    /// The served model, when ready.
    pub fn model(&self) -> Option<&M> {
        match self {
            State::Ready(m) => Some(m),
            _ => None,
        }
    }

    /// The load under way, when loading.
    pub fn slot(&self) -> Option<&Arc<LoadSlot>> {
        match self {
            State::Loading(s) => Some(s),
            _ => None,
        }
    }

    /// Ready or loading: something holds (or will hold) memory for it.
    pub fn resident_or_loading(&self) -> bool {
        matches!(self, State::Ready(_) | State::Loading(_))
    }

    /// Why it failed, or why the budget last refused it.
    pub fn error(&self) -> Option<&str> {
        match self {
            State::Available { refused } | State::Evicted { refused } => refused.as_deref(),
            State::Failed { reason, .. } => Some(reason),
            State::Loading(_) | State::Ready(_) => None,
        }
    }

    /// Not resident because the memory budget refused its last load.
    pub fn refused_by_budget(&self) -> bool {
        matches!(
            self,
            State::Available { refused: Some(_) } | State::Evicted { refused: Some(_) }
        )
    }

    /// A load starts: an idle version becomes `Loading(slot)`; returns the state it left.
    /// `None` (nothing changes) when it is ready or already loading.
    pub fn start(&mut self, slot: Arc<LoadSlot>) -> Option<Idle> {
        let from = match self {
            State::Available { .. } => Idle::Available,
            State::Evicted { .. } => Idle::Evicted,
            State::Failed { .. } => Idle::Failed,
            State::Loading(_) | State::Ready(_) => return None,
        };
        *self = State::Loading(slot);
        Some(from)
    }

    /// A finished load leaves `Loading` before it tells its slot: a version still `Loading`
    /// whose slot was told is one whose ticket was dropped unfinished (its thread panicked).
    /// It becomes available again, so that the next demand starts a new load rather than
    /// answer every request with the abandoned one's error. Returns whether it changed.
    pub fn abandoned(&mut self) -> bool {
        match self {
            State::Loading(slot) if slot.result().is_some() => {
                *self = State::default();
                true
            }
            _ => false,
        }
    }

    /// A load (or a rebuild of a ready version) produced `model`: ready. Returns the model it
    /// replaces, for the caller to drop outside the lock.
    pub fn ready(&mut self, model: M) -> Option<M> {
        match std::mem::replace(self, State::Ready(model)) {
            State::Ready(old) => Some(old),
            _ => None,
        }
    }

    /// The load failed, or the settings it needs are broken: failed until its files change.
    /// A ready version keeps serving (nothing changes; returns false).
    pub fn fail(&mut self, reason: String, files: FileStamp) -> bool {
        if matches!(self, State::Ready(_)) {
            return false;
        }
        *self = State::Failed { reason, files };
        true
    }

    /// The memory budget refused a load that may fit later: back to the state it started from,
    /// with the refusal as its error (a version that had failed stays failed, for this
    /// reason). Only a loading version changes (returns false otherwise).
    pub fn refuse(&mut self, from: Idle, reason: String, files: FileStamp) -> bool {
        if !matches!(self, State::Loading(_)) {
            return false;
        }
        *self = match from {
            Idle::Available => State::Available {
                refused: Some(reason),
            },
            Idle::Evicted => State::Evicted {
                refused: Some(reason),
            },
            Idle::Failed => State::Failed { reason, files },
        };
        true
    }

    /// Evicted by the budget: a ready version gives up its model (returned). Nothing else
    /// can be a victim (the budget never picks a loading version).
    pub fn evict(&mut self) -> Option<M> {
        if !matches!(self, State::Ready(_)) {
            return None;
        }
        match std::mem::replace(self, State::Evicted { refused: None }) {
            State::Ready(m) => Some(m),
            _ => None,
        }
    }

    /// Unloaded by an admin: available again, its model (if ready) returned. A loading
    /// version is left to its load (nothing changes).
    pub fn unload(&mut self) -> Option<M> {
        if matches!(self, State::Loading(_)) {
            return None;
        }
        self.reset()
    }

    /// A rescan found a failed version's files changed (put back, replaced, model.toml
    /// edited): available again. Returns whether it changed.
    pub fn files_changed(&mut self, now: &FileStamp) -> bool {
        match self {
            State::Failed { files, .. } if files != now => {
                *self = State::default();
                true
            }
            _ => false,
        }
    }

    /// Shutdown: available, whatever it was; its model (if ready) returned.
    pub fn reset(&mut self) -> Option<M> {
        match std::mem::take(self) {
            State::Ready(m) => Some(m),
            _ => None,
        }
    }
}

/// One load in progress: every request that needs the version waits on it, so concurrent
/// demands for a cold model trigger one load.
#[derive(Default)]
pub struct LoadSlot {
    done: Mutex<Option<Result<(), LoadError>>>,
    cv: Condvar,
    notify: tokio::sync::Notify,
    /// The model the load made, held as long as anyone holds the slot: while its waiters
    /// have not queued their requests yet, the model counts as busy (see `Version::busy`),
    /// so the next load cannot evict it from under them.
    made: Mutex<Option<Arc<LoadedModel>>>,
}

impl std::fmt::Debug for LoadSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadSlot")
            .field("done", &self.result())
            .finish_non_exhaustive()
    }
}

impl LoadSlot {
    pub(super) fn hold(&self, model: Arc<LoadedModel>) {
        *self.made.lock().unwrap_or_else(|e| e.into_inner()) = Some(model);
    }

    pub(super) fn finish(&self, result: Result<(), LoadError>) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        self.cv.notify_all();
        self.notify.notify_waiters();
    }

    pub(super) fn result(&self) -> Option<Result<(), LoadError>> {
        self.done.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits (blocking) until the load is over.
    pub fn wait_blocking(&self) -> Result<(), LoadError> {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = done.clone() {
                return r;
            }
            done = self.cv.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits (async) until the load is over.
    pub async fn wait(&self) -> Result<(), LoadError> {
        loop {
            // Registered before the check, so a finish in between still wakes us.
            let notified = self.notify.notified();
            if let Some(r) = self.result() {
                return r;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model a fake runtime builds: the lifecycle only moves it around.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct FakeModel(&'static str);

    fn files(size: u64) -> FileStamp {
        FileStamp::fake(size)
    }

    fn slot() -> Arc<LoadSlot> {
        Arc::new(LoadSlot::default())
    }

    fn loading() -> State<FakeModel> {
        let mut s = State::default();
        assert_eq!(s.start(slot()), Some(Idle::Available));
        s
    }

    fn ready(name: &'static str) -> State<FakeModel> {
        let mut s = loading();
        assert_eq!(s.ready(FakeModel(name)), None);
        s
    }

    fn failed() -> State<FakeModel> {
        let mut s = State::default();
        assert!(s.fail("broken".into(), files(1)));
        s
    }

    #[test]
    fn a_load_starts_only_from_an_idle_state_and_remembers_which() {
        let mut available: State<FakeModel> = State::default();
        assert_eq!(available.kind(), ModelState::Available);
        let s = slot();
        assert_eq!(available.start(s.clone()), Some(Idle::Available));
        assert_eq!(available.kind(), ModelState::Loading);
        assert!(
            Arc::ptr_eq(available.slot().unwrap(), &s),
            "waiters share it"
        );
        assert!(available.model().is_none());

        let mut evicted = ready("a");
        evicted.evict();
        assert_eq!(evicted.start(slot()), Some(Idle::Evicted));
        let mut broken = failed();
        assert_eq!(
            broken.start(slot()),
            Some(Idle::Failed),
            "an admin retries it"
        );
        assert_eq!(broken.error(), None, "loading clears the old reason");

        let mut again = loading();
        assert_eq!(again.start(slot()), None, "one load at a time");
        assert!(!Arc::ptr_eq(again.slot().unwrap(), &s));
        let mut serving = ready("a");
        assert_eq!(serving.start(slot()), None);
        assert_eq!(serving.model(), Some(&FakeModel("a")));
    }

    #[test]
    fn a_finished_load_is_ready_and_a_rebuild_hands_back_the_model_it_replaces() {
        let mut s = loading();
        assert_eq!(s.ready(FakeModel("v1")), None);
        assert_eq!(s.kind(), ModelState::Ready);
        assert!(s.slot().is_none());
        assert!(s.resident_or_loading());
        assert_eq!(s.ready(FakeModel("v1 rebuilt")), Some(FakeModel("v1")));
        assert_eq!(s.model(), Some(&FakeModel("v1 rebuilt")));
    }

    #[test]
    fn a_failed_load_is_failed_until_its_files_change() {
        let mut s = loading();
        assert!(s.fail("no such op".into(), files(10)));
        assert_eq!(s.kind(), ModelState::Failed);
        assert_eq!(s.error(), Some("no such op"));
        assert!(!s.resident_or_loading());
        assert!(!s.refused_by_budget());
        assert!(!s.files_changed(&files(10)), "the same files: stays failed");
        assert_eq!(s.kind(), ModelState::Failed);
        assert!(s.files_changed(&files(11)));
        assert_eq!(s.kind(), ModelState::Available);
        assert_eq!(s.error(), None);
        assert!(
            !s.files_changed(&files(12)),
            "only a failed version changes"
        );

        let mut idle: State<FakeModel> = State::default();
        assert!(
            idle.fail("model.toml: bad".into(), files(1)),
            "bad settings"
        );
        assert_eq!(idle.kind(), ModelState::Failed);

        let mut serving = ready("a");
        assert!(
            !serving.fail("x".into(), files(1)),
            "a ready version keeps serving"
        );
        assert_eq!(serving.kind(), ModelState::Ready);
    }

    #[test]
    fn a_refused_load_goes_back_where_it_started_with_the_refusal() {
        for (from, kind) in [
            (Idle::Available, ModelState::Available),
            (Idle::Evicted, ModelState::Evicted),
            (Idle::Failed, ModelState::Failed),
        ] {
            let mut s = loading();
            assert!(s.refuse(from, "does not fit the memory budget".into(), files(1)));
            assert_eq!(s.kind(), kind);
            assert_eq!(s.error(), Some("does not fit the memory budget"));
            assert_eq!(s.refused_by_budget(), from != Idle::Failed);
            assert!(s.slot().is_none(), "waiters were told; the slot is gone");
        }
        let mut idle: State<FakeModel> = State::default();
        assert!(
            !idle.refuse(Idle::Evicted, "x".into(), files(1)),
            "not loading"
        );
        assert_eq!(idle.kind(), ModelState::Available);
        let mut serving = ready("a");
        assert!(!serving.refuse(Idle::Available, "x".into(), files(1)));
        assert_eq!(serving.kind(), ModelState::Ready);
    }

    #[test]
    fn only_a_ready_version_is_evicted() {
        let mut s = ready("a");
        assert_eq!(s.evict(), Some(FakeModel("a")));
        assert_eq!(s.kind(), ModelState::Evicted);
        assert_eq!(s.error(), None);
        assert!(!s.resident_or_loading());
        assert_eq!(s.evict(), None);
        assert_eq!(s.kind(), ModelState::Evicted);
        let mut l = loading();
        assert_eq!(l.evict(), None);
        assert_eq!(l.kind(), ModelState::Loading);
        let mut f = failed();
        assert_eq!(f.evict(), None);
        assert_eq!(f.kind(), ModelState::Failed);
    }

    #[test]
    fn unloading_makes_any_idle_or_ready_version_available_and_leaves_a_load_alone() {
        let mut s = ready("a");
        assert_eq!(s.unload(), Some(FakeModel("a")));
        assert_eq!(s.kind(), ModelState::Available);
        let mut f = failed();
        assert_eq!(f.unload(), None);
        assert_eq!(f.kind(), ModelState::Available);
        assert_eq!(f.error(), None, "unloading clears the failure");
        let mut e = ready("a");
        e.evict();
        assert_eq!(e.unload(), None);
        assert_eq!(e.kind(), ModelState::Available);
        let mut r = loading();
        r.refuse(Idle::Available, "over".into(), files(1));
        r.unload();
        assert!(!r.refused_by_budget());
        let mut l = loading();
        assert_eq!(l.unload(), None);
        assert_eq!(l.kind(), ModelState::Loading, "its load finishes it");
    }

    #[test]
    fn shutdown_resets_every_state() {
        for mut s in [ready("a"), loading(), failed(), State::default()] {
            let had = s.model().cloned();
            assert_eq!(s.reset(), had);
            assert_eq!(s.kind(), ModelState::Available);
            assert_eq!(s.error(), None);
        }
    }

    #[test]
    fn a_load_whose_slot_was_told_while_still_loading_starts_again() {
        let mut s: State<FakeModel> = State::default();
        let abandoned = slot();
        s.start(abandoned.clone());
        assert!(!s.abandoned(), "a load under way is left alone");
        assert_eq!(s.kind(), ModelState::Loading);
        abandoned.finish(Err(LoadError::Abandoned));
        assert!(s.abandoned());
        assert_eq!(s.kind(), ModelState::Available);
        assert_eq!(s.error(), None);
        assert_eq!(
            s.start(slot()),
            Some(Idle::Available),
            "the next demand loads it"
        );
        for mut other in [ready("a"), failed(), State::default()] {
            let kind = other.kind();
            assert!(!other.abandoned());
            assert_eq!(other.kind(), kind);
        }
    }

    #[test]
    fn waiters_learn_the_outcome_once_it_is_set() {
        let s = LoadSlot::default();
        assert!(s.result().is_none());
        s.finish(Ok(()));
        assert_eq!(s.wait_blocking(), Ok(()));
        assert_eq!(s.result(), Some(Ok(())));
    }
}
