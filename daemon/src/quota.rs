//! What one local user may hold of the daemon's shared resources, so that no user can take
//! them from the others:
//! - connections (`max-connections-per-uid`);
//! - request memory (`request-memory-bytes`): the bytes of request frames being read, of
//!   requests queued or running, and of answers queued for a client that has not read them;
//! - shared-memory arenas (`arena-total-bytes`);
//! - model loads its requests start ([`LOAD_BURST`], then one per [`LOAD_EVERY`];
//!   beyond that `busy`).
//!
//! Each byte pool gives one non-admin user at most a share of it (a quarter of request memory,
//! half of the arenas) and all non-admins together at most three quarters, so a few users
//! cannot take it all and an admin always finds a quarter. Waiting for request memory is first
//! come, first served among the waiters that fit: memory given back goes to the oldest of them,
//! never to a newcomer that happens to ask at that moment (a peer that gives back and asks
//! again in a loop cannot keep it from the others).
//!
//! The accounting is a pure state ([`Pool`], [`Usage`]) tested on its own; [`Quotas`] wraps it
//! in a mutex and wakes waiters when memory is given back. Holdings are RAII values
//! ([`ConnSlot`], [`Held`]) released on drop, so no path can leak a share.
//! Boundary: knows uids, admin flags and byte counts; nothing about sockets or frames.
//! Admins (uid 0, the daemon's uid, the admin group) are held to the totals only.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The bounds of one byte pool.
#[derive(Debug, Clone, Copy)]
struct Limits {
    total: u64,
    per_uid: u64,
    non_admin: u64,
}

impl Limits {
    /// `total`, of which one non-admin user may hold `1/share` and non-admins together 3/4.
    fn new(total: u64, share: u64) -> Limits {
        Limits {
            total,
            per_uid: total / share,
            non_admin: total / 4 * 3,
        }
    }
}

/// Bytes held from one pool: in all, by non-admins, by each user.
#[derive(Debug, Default)]
struct Pool {
    used: u64,
    non_admin: u64,
    by_uid: HashMap<u32, u64>,
}

impl Pool {
    fn fits(&self, uid: u32, admin: bool, bytes: u64, lim: Limits) -> bool {
        let under = |held: u64, limit: u64| held.checked_add(bytes).is_some_and(|t| t <= limit);
        under(self.used, lim.total)
            && (admin
                || (under(self.non_admin, lim.non_admin)
                    && under(self.by_uid.get(&uid).copied().unwrap_or(0), lim.per_uid)))
    }

    fn take(&mut self, uid: u32, admin: bool, bytes: u64) {
        self.used += bytes;
        if !admin {
            self.non_admin += bytes;
        }
        *self.by_uid.entry(uid).or_default() += bytes;
    }

    fn give(&mut self, uid: u32, admin: bool, bytes: u64) {
        self.used -= bytes;
        if !admin {
            self.non_admin -= bytes;
        }
        if let Some(m) = self.by_uid.get_mut(&uid) {
            *m -= bytes;
            if *m == 0 {
                self.by_uid.remove(&uid);
            }
        }
    }
}

/// Which pool a holding comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Memory,
    Arena,
}

/// Everything counted; pure.
#[derive(Debug, Default)]
struct Usage {
    connections: HashMap<u32, u32>,
    memory: Pool,
    arena: Pool,
    /// Requests waiting for memory, by ticket (arrival order): (uid, admin, bytes).
    waiting: BTreeMap<u64, (u32, bool, u64)>,
    next_ticket: u64,
    /// Non-admin users with a frame being read (waiting for memory or arriving).
    reading: std::collections::HashSet<u32>,
    /// Loads each non-admin user may still start at once (a token bucket), as of when.
    loads: HashMap<u32, (f64, std::time::Instant)>,
}

/// Loads a non-admin user's requests may start in a burst, and how often one more after that:
/// a client that asks for model after model to make the daemon load and evict them is answered
/// `busy` beyond this rate instead of costing a load (and another user's model) per request.
pub const LOAD_BURST: f64 = 4.0;
pub const LOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

impl Usage {
    /// Takes one of `uid`'s load turns if it has one (a token bucket of [`LOAD_BURST`],
    /// refilled one per [`LOAD_EVERY`]).
    fn try_load(&mut self, uid: u32, now: std::time::Instant) -> bool {
        let (tokens, at) = self.loads.entry(uid).or_insert((LOAD_BURST, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() / LOAD_EVERY.as_secs_f64();
        *tokens = (*tokens + refill).min(LOAD_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
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

    /// Whether memory for a request with `ticket` (`u64::MAX`: not waiting yet) may be taken
    /// now: it fits, and no earlier waiter that would fit is passed over.
    fn memory_turn(&self, ticket: u64, uid: u32, admin: bool, bytes: u64, lim: Limits) -> bool {
        self.memory.fits(uid, admin, bytes, lim)
            && !self
                .waiting
                .range(..ticket)
                .any(|(_, &(u, a, b))| self.memory.fits(u, a, b, lim))
    }
}

/// The daemon's quotas.
pub struct Quotas {
    connections_per_uid: u32,
    memory: Limits,
    arena: Limits,
    usage: Mutex<Usage>,
    /// Request memory given back, while someone waits for it (`hold`).
    freed: Notify,
    /// A user's frame done being read (`begin_frame`).
    frame_done: Notify,
}

impl Quotas {
    /// `memory_total` bytes of request memory (a non-admin user: a quarter), `arena_total`
    /// bytes of arenas (a non-admin user: half).
    pub fn new(connections_per_uid: u32, memory_total: u64, arena_total: u64) -> Arc<Quotas> {
        Arc::new(Quotas {
            connections_per_uid,
            memory: Limits::new(memory_total, 4),
            arena: Limits::new(arena_total, 2),
            usage: Mutex::default(),
            freed: Notify::new(),
            frame_done: Notify::new(),
        })
    }

    fn usage(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most request memory one non-admin user may hold.
    pub fn memory_per_uid(&self) -> u64 {
        self.memory.per_uid
    }

    /// A connection slot for `uid`, or (held, limit) when that is its share.
    pub fn connect(self: &Arc<Self>, uid: u32, admin: bool) -> Result<ConnSlot, (u32, u32)> {
        self.usage()
            .connect(uid, admin, self.connections_per_uid)
            .map_err(|held| (held, self.connections_per_uid))?;
        Ok(ConnSlot {
            quotas: self.clone(),
            uid,
        })
    }

    fn held(self: &Arc<Self>, kind: Kind, uid: u32, admin: bool, bytes: u64) -> Held {
        Held {
            quotas: self.clone(),
            kind,
            uid,
            admin,
            bytes,
        }
    }

    /// Waits until no other frame of `uid` is being read, then marks one as being read until
    /// the returned value is dropped (admins: at once, unmarked). One frame at a time per
    /// user — from waiting for memory to its last byte — so that a user's many connections
    /// cannot keep a place in the line for memory while it holds memory already: when its
    /// frame is done, its next one queues behind everyone already waiting.
    pub async fn begin_frame(self: &Arc<Self>, uid: u32, admin: bool) -> Reading {
        if admin {
            return Reading { quotas: None, uid };
        }
        loop {
            let done = self.frame_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.usage().reading.insert(uid) {
                return Reading {
                    quotas: Some(self.clone()),
                    uid,
                };
            }
            done.await;
        }
    }

    /// `bytes` of request memory for `uid` now, if its share and the totals allow and no
    /// earlier waiter that fits is waiting.
    pub fn try_hold(self: &Arc<Self>, uid: u32, admin: bool, bytes: u64) -> Option<Held> {
        let mut u = self.usage();
        if !u.memory_turn(u64::MAX, uid, admin, bytes, self.memory) {
            return None;
        }
        u.memory.take(uid, admin, bytes);
        Some(self.held(Kind::Memory, uid, admin, bytes))
    }

    /// `bytes` of request memory for `uid`, waiting in line until it fits. `bytes` must be at
    /// most a user's share (the config guarantees a frame fits), so it comes eventually.
    pub async fn hold(self: &Arc<Self>, uid: u32, admin: bool, bytes: u64) -> Held {
        let ticket = {
            let mut u = self.usage();
            let t = u.next_ticket;
            u.next_ticket += 1;
            u.waiting.insert(t, (uid, admin, bytes));
            Ticket {
                quotas: self.clone(),
                ticket: t,
            }
        };
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check: a release between the check and the await wakes us.
            freed.as_mut().enable();
            {
                let mut u = self.usage();
                if u.memory_turn(ticket.ticket, uid, admin, bytes, self.memory) {
                    u.waiting.remove(&ticket.ticket);
                    u.memory.take(uid, admin, bytes);
                    drop(u);
                    drop(ticket);
                    return self.held(Kind::Memory, uid, admin, bytes);
                }
            }
            freed.await;
        }
    }

    /// `bytes` of request memory for an answer waiting to be read: within the user's share and
    /// the totals — or regardless of them with `always` (a connection's first unread answer,
    /// which it must be able to receive however large), still counted.
    pub fn hold_answer(
        self: &Arc<Self>,
        uid: u32,
        admin: bool,
        bytes: u64,
        always: bool,
    ) -> Option<Held> {
        let mut u = self.usage();
        if !always && !u.memory.fits(uid, admin, bytes, self.memory) {
            return None;
        }
        u.memory.take(uid, admin, bytes);
        Some(self.held(Kind::Memory, uid, admin, bytes))
    }

    /// `bytes` of arena for `uid`, or why not.
    pub fn hold_arena(self: &Arc<Self>, uid: u32, admin: bool, bytes: u64) -> Result<Held, String> {
        let mut u = self.usage();
        if !u.arena.fits(uid, admin, bytes, self.arena) {
            let mine = u.arena.by_uid.get(&uid).copied().unwrap_or(0);
            return Err(format!(
                "the arena budget cannot take {bytes} more bytes: {} of {} bytes are in use, \
                 {mine} by this user (a user may hold {}; all but admins, {})",
                u.arena.used, self.arena.total, self.arena.per_uid, self.arena.non_admin
            ));
        }
        u.arena.take(uid, admin, bytes);
        Ok(self.held(Kind::Arena, uid, admin, bytes))
    }

    /// Whether a request of `uid` may start a model load now (admins: always); takes the turn.
    pub fn try_load(&self, uid: u32, admin: bool) -> bool {
        admin || self.usage().try_load(uid, std::time::Instant::now())
    }

    /// Request memory held now, in total.
    pub fn memory_held(&self) -> u64 {
        self.usage().memory.used
    }

    /// Arena bytes held now, in total.
    pub fn arena_held(&self) -> u64 {
        self.usage().arena.used
    }
}

/// A frame of a user being read ([`Quotas::begin_frame`]).
pub struct Reading {
    quotas: Option<Arc<Quotas>>,
    uid: u32,
}

impl Drop for Reading {
    fn drop(&mut self) {
        if let Some(q) = &self.quotas {
            q.usage().reading.remove(&self.uid);
            q.frame_done.notify_waiters();
        }
    }
}

/// A request's place in the line for memory; leaves the line if the wait is abandoned.
struct Ticket {
    quotas: Arc<Quotas>,
    ticket: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.quotas.usage().waiting.remove(&self.ticket);
        // The next in line may fit now that this one no longer goes first.
        self.quotas.freed.notify_waiters();
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

/// Bytes held from a pool by one request, frame, answer or arena; given back on drop.
pub struct Held {
    quotas: Arc<Quotas>,
    kind: Kind,
    uid: u32,
    admin: bool,
    bytes: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut u = self.quotas.usage();
        match self.kind {
            Kind::Memory => u.memory.give(self.uid, self.admin, self.bytes),
            Kind::Arena => u.arena.give(self.uid, self.admin, self.bytes),
        }
        // Only waiters for memory are woken, and only when there are some (they are in
        // `waiting` before they look, under this lock): every answer gives memory back, and
        // waking every parked waiter for each would cost each answer as many wake-ups.
        let waiters = self.kind == Kind::Memory && !u.waiting.is_empty();
        drop(u);
        if waiters {
            self.quotas.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_its_share_of_connections_and_admins_are_not_counted_against_one() {
        let q = Quotas::new(2, 1 << 20, 1 << 20);
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
    fn memory_stays_within_a_quarter_per_user_three_quarters_for_non_admins_and_the_total() {
        let q = Quotas::new(1, 100, 100);
        let a = q.try_hold(1000, false, 25).unwrap();
        assert!(q.try_hold(1000, false, 1).is_none(), "over its quarter");
        let b = q.try_hold(1001, false, 25).unwrap();
        let c = q.try_hold(1002, false, 25).unwrap();
        assert!(
            q.try_hold(1003, false, 1).is_none(),
            "non-admins together hold three quarters"
        );
        let d = q.try_hold(0, true, 25).unwrap();
        assert_eq!(q.memory_held(), 100);
        assert!(
            q.try_hold(0, true, 1).is_none(),
            "admins are held to the total"
        );
        drop((a, b, c, d));
        assert_eq!(q.memory_held(), 0);
        assert!(q.usage().memory.by_uid.is_empty());
        assert_eq!(q.usage().memory.non_admin, 0);
        assert!(
            q.try_hold(u32::MAX, false, u64::MAX).is_none(),
            "no overflow"
        );
    }

    #[test]
    fn answers_may_exceed_the_share_only_when_told_and_are_counted() {
        let q = Quotas::new(1, 100, 100);
        let a = q.hold_answer(7, false, 25, false).unwrap();
        assert!(q.hold_answer(7, false, 1, false).is_none());
        let b = q.hold_answer(7, false, 60, true).unwrap();
        assert_eq!(q.memory_held(), 85);
        assert!(
            q.try_hold(8, false, 20).is_none(),
            "counted against the total"
        );
        drop((a, b));
        assert_eq!(q.memory_held(), 0);
    }

    #[test]
    fn arenas_allow_half_per_user_and_say_why_not() {
        let q = Quotas::new(1, 100, 100);
        let a = q.hold_arena(5, false, 50).unwrap();
        let e = q.hold_arena(5, false, 1).err().unwrap();
        assert!(e.contains("50 by this user"), "{e}");
        let b = q.hold_arena(6, false, 25).unwrap();
        assert!(
            q.hold_arena(7, false, 1).is_err(),
            "non-admins: three quarters"
        );
        let c = q.hold_arena(0, true, 25).unwrap();
        assert_eq!(q.arena_held(), 100);
        drop((a, b, c));
        assert_eq!(q.arena_held(), 0);
    }

    #[tokio::test]
    async fn memory_given_back_goes_to_the_oldest_waiter_not_to_a_newcomer() {
        let q = Quotas::new(1, 100, 100);
        // Users 1, 2 and 3 hold the non-admins' three quarters.
        let holds: Vec<_> = (1..=3).map(|u| q.try_hold(u, false, 25).unwrap()).collect();
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.hold(4, false, 20).await.bytes });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "user 4 waits");
        let mut holds = holds.into_iter();
        drop(holds.next());
        // User 1 asks again at once: the waiter is first in line.
        assert!(
            q.try_hold(1, false, 25).is_none(),
            "a newcomer does not pass the waiter"
        );
        assert_eq!(waiter.await.unwrap(), 20);
        // With nobody waiting, a newcomer gets what fits.
        assert!(q.try_hold(1, false, 5).is_some());
    }

    #[tokio::test]
    async fn a_users_next_frame_queues_behind_those_already_waiting() {
        let q = Quotas::new(1, 100, 100);
        // Users 1–3 fill the non-admins' three quarters, each reading one frame; user 1 has a
        // second connection with a frame to read.
        let r1 = q.begin_frame(1, false).await;
        let h1 = q.try_hold(1, false, 25).unwrap();
        let _h2 = q.try_hold(2, false, 25).unwrap();
        let _h3 = q.try_hold(3, false, 25).unwrap();
        let q2 = q.clone();
        let second = tokio::spawn(async move {
            let _r = q2.begin_frame(1, false).await;
            q2.hold(1, false, 25).await.bytes
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let q3 = q.clone();
        let victim = tokio::spawn(async move {
            let _r = q3.begin_frame(4, false).await;
            q3.hold(4, false, 1).await.bytes
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!second.is_finished() && !victim.is_finished());
        // User 1's frame is done: its request still holds the memory for a moment, then
        // gives it back. The victim, waiting longer than user 1's next frame, goes first.
        drop(r1);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(h1);
        assert_eq!(victim.await.unwrap(), 1);
        assert_eq!(second.await.unwrap(), 25);
    }

    #[test]
    fn a_user_starts_a_burst_of_loads_then_one_per_period() {
        let mut u = Usage::default();
        let t0 = std::time::Instant::now();
        for _ in 0..LOAD_BURST as usize {
            assert!(u.try_load(7, t0));
        }
        assert!(!u.try_load(7, t0), "the burst is spent");
        assert!(u.try_load(8, t0), "another user is not held");
        assert!(u.try_load(7, t0 + LOAD_EVERY), "one more per period");
        assert!(!u.try_load(7, t0 + LOAD_EVERY));
        // After long enough the burst is back, never more.
        let later = t0 + LOAD_EVERY * 100;
        for _ in 0..LOAD_BURST as usize {
            assert!(u.try_load(7, later));
        }
        assert!(!u.try_load(7, later));
    }

    #[tokio::test]
    async fn an_abandoned_wait_leaves_the_line() {
        let q = Quotas::new(1, 100, 100);
        let a = q.try_hold(1, false, 25).unwrap();
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.hold(1, false, 25).await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        waiter.abort();
        let _ = waiter.await;
        assert!(q.usage().waiting.is_empty());
        drop(a);
        assert!(q.try_hold(2, false, 25).is_some());
    }
}
