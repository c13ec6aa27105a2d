//! The shared-memory submission/completion ring (PROTOCOL.md, "The ring"): its layout and the
//! index arithmetic both sides use. Pure: offsets and checks only; the atomics and the futex
//! calls live in `rxd-shm`.
//!
//! A ring is two queues of `entries` fixed-size slots each in the connection's arena, after a
//! header of four cache lines:
//!
//! | offset | u32 (little-endian, atomic) | written by | meaning |
//! |---:|---|---|---|
//! | 0 | `sq_tail` | client | submissions published (wrapping count) |
//! | 64 | `sq_head` | daemon | submissions taken (the client may reuse their slots) |
//! | 68 | `sq_wake` | daemon | 1: the daemon sleeps; wake it after publishing |
//! | 128 | `cq_tail` | daemon | completions published |
//! | 192 | `cq_head` | client | completions consumed (the daemon may reuse their slots) |
//! | 196 | `cq_wake` | client | 1: the client sleeps; wake it after publishing |
//!
//! then the submission slots, then the completion slots. A slot holds one frame exactly as on
//! the socket (a u32 length, then that many bytes of MessagePack); a completion slot whose
//! length is 0 is a *redirect*: the answer to the request id in its next 8 bytes (u64) comes on
//! the socket instead (it did not fit the slot).
//!
//! Indices are free-running u32 counts that wrap; a queue holds `tail - head` (wrapping)
//! entries, which is never more than `entries`: a count above it is a lie, and the daemon
//! ends the connection of a peer that tells one.

/// Offsets of the header's words, from the start of the ring.
pub const SQ_TAIL: u64 = 0;
pub const SQ_HEAD: u64 = 64;
pub const SQ_WAKE: u64 = 68;
pub const CQ_TAIL: u64 = 128;
pub const CQ_HEAD: u64 = 192;
pub const CQ_WAKE: u64 = 196;
/// Bytes before the first submission slot.
pub const HEADER_BYTES: u64 = 256;
/// A slot's length prefix (as a frame's).
pub const SLOT_PREFIX: u64 = 4;
/// Slot sizes are multiples of this (each slot starts on a cache line).
pub const SLOT_ALIGN: u32 = 64;
/// The smallest and largest slot a ring may have.
pub const MIN_SLOT_BYTES: u32 = 256;
pub const MAX_SLOT_BYTES: u32 = 1 << 20;
/// The most entries a ring may have (the daemon also caps it at `max_in_flight`).
pub const MAX_ENTRIES: u32 = 256;
/// A completion slot's redirect: length 0, then the request id.
pub const REDIRECT_BYTES: u64 = SLOT_PREFIX + 8;

/// What a ring is: `entries` slots of `slot_bytes` each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub entries: u32,
    pub slot_bytes: u32,
}

impl Geometry {
    /// A geometry both sides accept: `entries` a power of two in 1..=[`MAX_ENTRIES`] (and at
    /// most `max_entries`), `slot_bytes` a multiple of [`SLOT_ALIGN`] in
    /// [`MIN_SLOT_BYTES`]..=[`MAX_SLOT_BYTES`]. The daemon grants `asked` rounded: entries down
    /// to a power of two within its limit, slots up to the alignment, within the bounds.
    pub fn granted(entries: u32, slot_bytes: u32, max_entries: u32) -> Option<Geometry> {
        let cap = max_entries.clamp(1, MAX_ENTRIES);
        if entries == 0 || slot_bytes == 0 {
            return None;
        }
        let entries = prev_power_of_two(entries.min(cap));
        let slot_bytes = slot_bytes
            .clamp(MIN_SLOT_BYTES, MAX_SLOT_BYTES)
            .div_ceil(SLOT_ALIGN)
            * SLOT_ALIGN;
        Some(Geometry {
            entries,
            slot_bytes,
        })
    }

    /// Whether a geometry received from the other side is one the rules allow.
    pub fn is_valid(&self) -> bool {
        self.entries.is_power_of_two()
            && self.entries <= MAX_ENTRIES
            && (MIN_SLOT_BYTES..=MAX_SLOT_BYTES).contains(&self.slot_bytes)
            && self.slot_bytes.is_multiple_of(SLOT_ALIGN)
    }

    /// The ring's size in bytes: the header and both queues.
    pub fn bytes(&self) -> u64 {
        HEADER_BYTES + 2 * u64::from(self.entries) * u64::from(self.slot_bytes)
    }

    /// The largest frame body a slot carries.
    pub fn max_body(&self) -> u64 {
        u64::from(self.slot_bytes) - SLOT_PREFIX
    }

    /// Offset, from the ring's start, of the submission slot for index `i`.
    pub fn sq_slot(&self, i: u32) -> u64 {
        HEADER_BYTES + u64::from(i & (self.entries - 1)) * u64::from(self.slot_bytes)
    }

    /// Offset, from the ring's start, of the completion slot for index `i`.
    pub fn cq_slot(&self, i: u32) -> u64 {
        HEADER_BYTES
            + u64::from(self.entries) * u64::from(self.slot_bytes)
            + u64::from(i & (self.entries - 1)) * u64::from(self.slot_bytes)
    }

    /// How many entries a queue holds between `head` (the consumer's own count) and `tail`
    /// (read from the producer): `None` if the count is more than the queue can hold — the
    /// producer lies (or `head` is not the consumer's own).
    pub fn queued(&self, head: u32, tail: u32) -> Option<u32> {
        let n = tail.wrapping_sub(head);
        (n <= self.entries).then_some(n)
    }

    /// Whether a slot's length prefix `len` names a body that fits the slot (submissions: a
    /// frame body, 1 ..= max_body; 0 is not a frame).
    pub fn body_fits(&self, len: u32) -> bool {
        len > 0 && u64::from(len) <= self.max_body()
    }
}

fn prev_power_of_two(n: u32) -> u32 {
    debug_assert!(n > 0);
    1 << (31 - n.leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geometry() -> impl Strategy<Value = Geometry> {
        (0u32..=8, 4u32..=(MAX_SLOT_BYTES / SLOT_ALIGN)).prop_map(|(p, s)| Geometry {
            entries: 1 << p,
            slot_bytes: s * SLOT_ALIGN,
        })
    }

    proptest! {
        /// Whatever a peer asks, the grant is valid and no larger than asked where the ask
        /// was allowed.
        #[test]
        fn grants_are_valid(entries in any::<u32>(), slot in any::<u32>(), cap in any::<u32>()) {
            match Geometry::granted(entries, slot, cap) {
                None => prop_assert!(entries == 0 || slot == 0),
                Some(g) => {
                    prop_assert!(g.is_valid(), "{g:?}");
                    prop_assert!(g.entries <= entries && g.entries <= cap.max(1));
                    prop_assert!(g.entries * 2 > entries.min(cap.clamp(1, MAX_ENTRIES)));
                }
            }
        }

        /// Slots of either queue lie inside the ring, never overlap the header or each other,
        /// and index i and i + entries share a slot (wrapping included).
        #[test]
        fn slots_stay_inside(g in geometry(), i in any::<u32>()) {
            let end = g.bytes();
            for (at, other) in [(g.sq_slot(i), g.cq_slot(i)), (g.cq_slot(i), g.sq_slot(i))] {
                prop_assert!(at >= HEADER_BYTES);
                prop_assert!(at + u64::from(g.slot_bytes) <= end);
                prop_assert!(at.abs_diff(other) >= u64::from(g.slot_bytes));
                prop_assert_eq!(at % u64::from(SLOT_ALIGN), 0);
            }
            prop_assert_eq!(g.sq_slot(i), g.sq_slot(i.wrapping_add(g.entries)));
            prop_assert_eq!(g.cq_slot(i), g.cq_slot(i.wrapping_add(g.entries)));
            if g.entries > 1 {
                prop_assert_ne!(g.sq_slot(i), g.sq_slot(i.wrapping_add(1)));
            }
        }

        /// A queue that a consumer at `head` sees holds `n <= entries` across the wrap of the
        /// u32 counts; any tail further away is refused, as is a tail behind the head.
        #[test]
        fn counts_across_the_wrap(g in geometry(), head in any::<u32>(), n in any::<u32>()) {
            let tail = head.wrapping_add(n);
            match g.queued(head, tail) {
                Some(k) => { prop_assert!(n <= g.entries); prop_assert_eq!(k, n); }
                None => prop_assert!(n > g.entries),
            }
            // A tail behind the head (a count going backwards) is a lie too, unless it is
            // a whole u32 turn away, which no queue can hold.
            if (1..=u32::MAX - g.entries).contains(&n) {
                prop_assert_eq!(g.queued(tail, head), None);
            }
        }

        /// A producer that only ever publishes while `queued < entries`, and a consumer that
        /// takes one at a time, never see a count the check refuses, and each index reaches a
        /// distinct slot among those in the queue.
        #[test]
        fn producer_and_consumer_agree(g in geometry(), start in any::<u32>(),
                                       steps in proptest::collection::vec(any::<bool>(), 1..400)) {
            let (mut head, mut tail) = (start, start);
            for produce in steps {
                let n = g.queued(head, tail).unwrap();
                if produce && n < g.entries {
                    tail = tail.wrapping_add(1);
                } else if n > 0 {
                    head = head.wrapping_add(1);
                }
                let n = g.queued(head, tail).unwrap();
                let mut seen = std::collections::HashSet::new();
                for k in 0..n {
                    prop_assert!(seen.insert(g.sq_slot(head.wrapping_add(k))));
                }
            }
        }

        #[test]
        fn bodies_fit_their_slot(g in geometry(), len in any::<u32>()) {
            prop_assert_eq!(g.body_fits(len), len >= 1 && u64::from(len) + SLOT_PREFIX <= u64::from(g.slot_bytes));
        }
    }

    #[test]
    fn the_header_words_are_on_their_own_lines() {
        let lines = [SQ_TAIL / 64, SQ_HEAD / 64, CQ_TAIL / 64, CQ_HEAD / 64];
        assert_eq!(lines, [0, 1, 2, 3]);
        assert_eq!(
            SQ_WAKE / 64,
            SQ_HEAD / 64,
            "the daemon's words share its line"
        );
        assert_eq!(
            CQ_WAKE / 64,
            CQ_HEAD / 64,
            "the client's words share its line"
        );
        const { assert!(CQ_WAKE + 4 <= HEADER_BYTES) };
    }
}
