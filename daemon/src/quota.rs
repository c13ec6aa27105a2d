//! What one local user may hold of the daemon's shared resources, so that no user can take
//! them from the others: connections (`max-connections-per-uid`) and request memory — the
//! bytes of request frames being read and of requests queued or running
//! (`request-memory-bytes`, of which one non-admin user may hold half).
//!
//! The accounting is a pure state ([`Usage`]) tested on its own; [`Quotas`] wraps it in a mutex
//! and wakes waiters when memory is given back. Holdings are RAII values ([`ConnSlot`],
//! [`Held`]) released on drop, so no path can leak a share.
//! Boundary: knows uids, admin flags and byte counts; nothing about sockets or frames.
//! Admins (uid 0, the daemon's uid, the admin group) are not held to a per-user share, only to
//! the totals.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The counts behind the quotas; pure.
#[derive(Debug, Default)]
struct Usage {
    connections: HashMap<u32, u32>,
    memory: u64,
    memory_by_uid: HashMap<u32, u64>,
}

impl Usage {
    fn connect(&mut self, uid: u32, admin: bool, per_uid: u32) -> Result<(), u32> {
        let n = self.connections.entry(uid).or_default();
        if !admin && *n >= per_uid {
            return Err(*n);
        }
        *n += 1;
        Ok(())
    }

    fn disconnect(&mut self, uid: u32) {
        if let Some(n) = self.connections.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.connections.remove(&uid);
            }
        }
    }

    /// Takes `bytes` for `uid` if the total stays within `total` and a non-admin's share
    /// within `per_uid`.
    fn take(&mut self, uid: u32, admin: bool, bytes: u64, total: u64, per_uid: u64) -> bool {
        let mine = self.memory_by_uid.get(&uid).copied().unwrap_or(0);
        let fits_total = self.memory.checked_add(bytes).is_some_and(|t| t <= total);
        let fits_share = admin || mine.checked_add(bytes).is_some_and(|t| t <= per_uid);
        if !(fits_total && fits_share) {
            return false;
        }
        self.memory += bytes;
        *self.memory_by_uid.entry(uid).or_default() += bytes;
        true
    }

    fn give(&mut self, uid: u32, bytes: u64) {
        self.memory -= bytes;
        if let Some(m) = self.memory_by_uid.get_mut(&uid) {
            *m -= bytes;
            if *m == 0 {
                self.memory_by_uid.remove(&uid);
            }
        }
    }
}

/// The daemon's quotas.
pub struct Quotas {
    connections_per_uid: u32,
    memory_total: u64,
    memory_per_uid: u64,
    usage: Mutex<Usage>,
    freed: Notify,
}

impl Quotas {
    pub fn new(connections_per_uid: u32, memory_total: u64) -> Arc<Quotas> {
        Arc::new(Quotas {
            connections_per_uid,
            memory_total,
            memory_per_uid: memory_total / 2,
            usage: Mutex::default(),
            freed: Notify::new(),
        })
    }

    fn usage(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection slot for `uid`, or the number it already holds when that is its share.
    pub fn connect(self: &Arc<Self>, uid: u32, admin: bool) -> Result<ConnSlot, (u32, u32)> {
        self.usage()
            .connect(uid, admin, self.connections_per_uid)
            .map_err(|held| (held, self.connections_per_uid))?;
        Ok(ConnSlot {
            quotas: self.clone(),
            uid,
        })
    }

    /// `bytes` of request memory for `uid` now, if its share and the total allow.
    pub fn try_hold(self: &Arc<Self>, uid: u32, admin: bool, bytes: u64) -> Option<Held> {
        self.usage()
            .take(uid, admin, bytes, self.memory_total, self.memory_per_uid)
            .then(|| Held {
                quotas: self.clone(),
                uid,
                bytes,
            })
    }

    /// `bytes` of request memory for `uid`, waiting until others give enough back. `bytes`
    /// must be at most half the total (the frame limit guarantees it), so a user alone can
    /// always get it eventually.
    pub async fn hold(self: &Arc<Self>, uid: u32, admin: bool, bytes: u64) -> Held {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check: a release between the check and the await wakes us.
            freed.as_mut().enable();
            if let Some(h) = self.try_hold(uid, admin, bytes) {
                return h;
            }
            freed.await;
        }
    }

    /// Request bytes held now, in total.
    pub fn memory_held(&self) -> u64 {
        self.usage().memory
    }
}

/// One connection of a user; its slot is given back on drop.
pub struct ConnSlot {
    quotas: Arc<Quotas>,
    uid: u32,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.quotas.usage().disconnect(self.uid);
    }
}

/// Request memory held by one request (or one frame being read); given back on drop.
pub struct Held {
    quotas: Arc<Quotas>,
    uid: u32,
    bytes: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.quotas.usage().give(self.uid, self.bytes);
        self.quotas.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_its_share_of_connections_and_admins_are_not_counted_against_one() {
        let q = Quotas::new(2, 1 << 20);
        let a = q.connect(1000, false).unwrap();
        let _b = q.connect(1000, false).unwrap();
        assert_eq!(q.connect(1000, false).err(), Some((2, 2)));
        // Another user is not affected; nor is an admin.
        let _c = q.connect(1001, false).unwrap();
        let admins: Vec<_> = (0..5).map(|_| q.connect(0, true).unwrap()).collect();
        drop(a);
        let _d = q.connect(1000, false).unwrap();
        drop(admins);
        assert_eq!(q.usage().connections.get(&0), None);
    }

    #[test]
    fn memory_stays_within_the_total_and_a_user_within_half() {
        let q = Quotas::new(1, 100);
        let a = q.try_hold(1000, false, 50).unwrap();
        assert!(q.try_hold(1000, false, 1).is_none(), "over its half");
        let b = q.try_hold(1001, false, 40).unwrap();
        assert!(q.try_hold(1002, false, 11).is_none(), "over the total");
        let c = q.try_hold(0, true, 10).unwrap();
        assert_eq!(q.memory_held(), 100);
        assert!(
            q.try_hold(0, true, 1).is_none(),
            "admins are held to the total"
        );
        drop((a, b, c));
        assert_eq!(q.memory_held(), 0);
        assert!(q.usage().memory_by_uid.is_empty());
        assert!(
            q.try_hold(u32::MAX, false, u64::MAX).is_none(),
            "no overflow"
        );
    }

    #[tokio::test]
    async fn a_waiter_gets_memory_when_it_is_given_back() {
        let q = Quotas::new(1, 100);
        let a = q.try_hold(1, false, 50).unwrap();
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.hold(1, false, 30).await.bytes });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "user 1 is at its share");
        drop(a);
        assert_eq!(waiter.await.unwrap(), 30);
    }
}
