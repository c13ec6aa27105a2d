//! Fuzz target: the arena descriptor checks and copies (`rxd_shm::Mapping::range`, `ptr`,
//! `copy_in`, `copy_out`) with fuzzed offsets and lengths on a sealed memfd of a fuzzed size,
//! against a model of the rule (in range iff `offset + len` does not overflow and is at most
//! the size); and the `Allocator` under fuzzed alloc/lend/free sequences (regions inside the
//! mapping, aligned, never overlapping, all bytes back once everything is freed).
//! Run: `scripts/fuzz arena [SECONDS]`.
#![no_main]

use std::os::fd::AsFd;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rxd_shm::{Allocator, Lent, Mapping, REGION_ALIGN, Region};

fn edge(u: &mut Unstructured<'_>, size: u64) -> Result<u64> {
    Ok(match u.int_in_range(0..=4)? {
        0 => u.arbitrary()?,
        1 => size,
        2 => size.saturating_sub(u.int_in_range(0..=16)?),
        3 => u64::MAX - u.int_in_range(0..=16)?,
        _ => u.int_in_range(0..=size + 16)?,
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let size = u.int_in_range(1..=3 * 4096 + 100)?;
    let fd = rxd_shm::create_sealed("rxd-fuzz", size).unwrap();
    let map = Mapping::map(fd.as_fd(), size).unwrap();
    // A second view of the same file: what the peer sees.
    let peer = Mapping::map(fd.as_fd(), size).unwrap();
    let size = size as u64;
    for _ in 0..u.int_in_range(1..=16)? {
        let (offset, len) = (edge(u, size)?, edge(u, size)?);
        let inside = offset.checked_add(len).is_some_and(|e| e <= size);
        assert_eq!(
            map.range(offset, len).is_ok(),
            inside,
            "{offset}+{len} of {size}"
        );
        assert_eq!(map.ptr(offset, len).is_ok(), inside);
        if len <= size + 16 {
            let byte: u8 = u.arbitrary()?;
            let src = vec![byte; len as usize];
            assert_eq!(map.copy_in(offset, &src).is_ok(), inside);
            let mut back = vec![!byte; len as usize];
            assert_eq!(peer.copy_out(offset, &mut back).is_ok(), inside);
            if inside {
                assert_eq!(back, src);
            }
        }
    }

    // The allocator.
    let alloc = Allocator::new(map);
    let total = alloc.free_bytes();
    assert_eq!(total, size - size % REGION_ALIGN);
    let mut held: Vec<Region> = Vec::new();
    let mut lent: Vec<Lent> = Vec::new();
    for _ in 0..u.int_in_range(0..=32)? {
        match u.int_in_range(0..=3)? {
            0 | 1 => {
                let want = edge(u, size)?;
                if let Some(mut r) = alloc.alloc(want) {
                    assert!(r.len() >= want.max(1));
                    assert_eq!(r.offset() % REGION_ALIGN, 0);
                    assert_eq!(r.len() % REGION_ALIGN, 0);
                    assert!(r.offset() + r.len() <= size);
                    for o in held
                        .iter()
                        .map(|h| (h.offset(), h.len()))
                        .chain(lent.iter().map(|l| (l.offset(), l.len())))
                    {
                        assert!(r.offset() + r.len() <= o.0 || o.0 + o.1 <= r.offset());
                    }
                    r.as_mut_slice().fill(0x5A);
                    held.push(r);
                }
            }
            2 if !held.is_empty() => {
                let r = held.swap_remove(u.choose_index(held.len())?);
                if u.arbitrary()? {
                    lent.push(r.lend());
                }
            }
            _ if !lent.is_empty() => {
                drop(lent.swap_remove(u.choose_index(lent.len())?));
            }
            _ => {}
        }
    }
    drop(held);
    drop(lent);
    assert_eq!(alloc.free_bytes(), total, "every byte is free again");
    assert!(
        alloc.alloc(total).is_some() || total == 0,
        "and in one piece"
    );
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
