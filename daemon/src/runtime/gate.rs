//! One call at a time into ONNX Runtime's WebGPU EP. The EP keeps what a run records (the
//! command encoder, the compute pass, the buffer cache, the queue) in one context per device,
//! shared by every session made on it, and says it cannot run concurrently
//! (`ConcurrentRunSupported` is false). ORT then serializes the runs of one session, but not
//! those of two sessions on the same context: two models on one WebGPU device, two instances
//! of one model, a model loading or being let go beside another's runs, a tuning layout of
//! two sessions. Two such calls at once corrupt the context ("CommandEncoder is already
//! finished", then a failed assertion or a segfault inside the plugin) and take the daemon
//! and every user's requests with it.
//!
//! So every session is a [`DeviceSession`]: made, run, profiled and released under its
//! device's [`Gate`]. On the WebGPU EP the gate is one process-wide lock (rxd's devices on one
//! adapter share the plugin's context, and taking turns costs a device that runs one thing
//! at a time nothing); on the CPU, CUDA and TensorRT EPs, which run sessions concurrently,
//! there is no gate and a call costs one branch.
//! Invariant: nothing outside this file reaches a session's `&mut Session` except inside
//! [`DeviceSession::with`], which holds the gate.

use std::sync::{Mutex, MutexGuard, PoisonError};

use ort::session::Session;

use super::DeviceKind;

/// Serializes calls into an execution provider that cannot take two at once.
#[derive(Debug, Clone, Copy)]
struct Gate(Option<&'static Mutex<()>>);

/// The WebGPU EP's turn.
static WEBGPU: Mutex<()> = Mutex::new(());

impl Gate {
    /// The gate of sessions on `kind`'s execution provider.
    fn of(kind: &DeviceKind) -> Gate {
        match kind {
            DeviceKind::WebGpu { .. } => Gate(Some(&WEBGPU)),
            DeviceKind::Cpu | DeviceKind::Cuda { .. } | DeviceKind::TensorRt { .. } => Gate(None),
        }
    }

    /// Waits for the turn (none without a gate). A panic under the lock left no state of
    /// rxd's behind, so a poisoned lock is taken as it is.
    fn hold(&self) -> Option<MutexGuard<'static, ()>> {
        self.0
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// A session and its device's gate: every call that reaches the execution provider holds it,
/// the session's release included.
pub struct DeviceSession {
    /// Always `Some` but inside `drop`, which releases it under the gate.
    session: Option<Session>,
    gate: Gate,
}

impl DeviceSession {
    /// Makes a session for `kind`'s execution provider in its turn (`make` creates the
    /// provider, and the weights reach the device).
    pub(super) fn make<E>(
        kind: &DeviceKind,
        make: impl FnOnce() -> Result<Session, E>,
    ) -> Result<DeviceSession, E> {
        let gate = Gate::of(kind);
        let session = {
            let _turn = gate.hold();
            make()?
        };
        Ok(DeviceSession {
            session: Some(session),
            gate,
        })
    }

    /// The session, for what reads it without calling its execution provider (inputs and
    /// outputs, the CPU arena's statistics).
    pub fn get(&self) -> &Session {
        match &self.session {
            Some(s) => s,
            None => unreachable!("a session is taken only when dropped"),
        }
    }

    /// Calls `f` with the session while holding the gate. What `f` returns may borrow the
    /// session (a run's outputs): reading it after the turn ends calls no execution provider
    /// (outputs are CPU tensors once a run returns).
    pub fn with<'s, R>(&'s mut self, f: impl FnOnce(&'s mut Session) -> R) -> R {
        let _turn = self.gate.hold();
        match &mut self.session {
            Some(s) => f(s),
            None => unreachable!("a session is taken only when dropped"),
        }
    }
}

impl std::fmt::Debug for DeviceSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSession")
            .field("gated", &self.gate.0.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for DeviceSession {
    fn drop(&mut self) {
        let _turn = self.gate.hold();
        drop(self.session.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webgpu_sessions_share_one_gate_and_other_providers_have_none() {
        let a = Gate::of(&DeviceKind::WebGpu {
            library: "/a.so".into(),
            adapter: 0,
        });
        let b = Gate::of(&DeviceKind::WebGpu {
            library: "/b.so".into(),
            adapter: 1,
        });
        let held = a.hold().expect("gated");
        // The other WebGPU device waits for the same turn.
        assert!(matches!(
            b.0.map(Mutex::try_lock),
            Some(Err(std::sync::TryLockError::WouldBlock))
        ));
        drop(held);
        assert!(b.hold().is_some());
        assert!(Gate::of(&DeviceKind::Cpu).hold().is_none());
    }
}
