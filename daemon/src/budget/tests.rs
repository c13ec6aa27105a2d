use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn two_devices(a: u64, b: u64) -> Budget<u32> {
    Budget::new(vec![
        DeviceSpec {
            name: "gpu0".into(),
            budget: a,
            tier: 0,
        },
        DeviceSpec {
            name: "cpu".into(),
            budget: b,
            tier: 1,
        },
    ])
}

fn idle(_: &u32) -> bool {
    false
}

fn settled(b: &mut Budget<u32>, k: u32, bytes: u64, now: u64) {
    b.admit(k, bytes, &[0], &idle, now).expect("fits");
    b.settle(&k, bytes, &idle).expect("fits");
}

#[test]
fn fills_then_evicts_least_recently_used() {
    let mut b = two_devices(100, 0);
    settled(&mut b, 1, 40, 1);
    settled(&mut b, 2, 40, 2);
    b.touch(&1, 3);
    let a = b.admit(3, 40, &[0], &idle, 4).expect("evicts one");
    assert_eq!(a.evict, vec![2], "model 1 was used more recently");
    assert_eq!(b.used(0), 80);
}

#[test]
fn pinned_and_busy_models_stay_and_the_error_names_the_residents() {
    let mut b = two_devices(100, 0);
    settled(&mut b, 1, 50, 1);
    settled(&mut b, 2, 50, 2);
    b.set_pinned(&1, true);
    let busy = |k: &u32| *k == 2;
    let err = b.admit(3, 10, &[0], &busy, 3).expect_err("nothing can go");
    assert_eq!(err.need, 10);
    assert_eq!(err.devices[0].residents.len(), 2);
    let text = err.to_string();
    assert!(
        text.contains("pinned") && text.contains("budget 100"),
        "{text}"
    );
    assert_eq!(b.get(&3), None, "a refused admission changes nothing");
    // Once model 2 is idle it can go.
    assert_eq!(b.admit(3, 10, &[0], &idle, 4).expect("fits").evict, vec![2]);
}

#[test]
fn prefers_a_device_with_room_over_evicting() {
    let mut b = two_devices(100, 100);
    settled(&mut b, 1, 90, 1);
    let a = b.admit(2, 30, &[0, 1], &idle, 2).expect("fits");
    assert_eq!(
        (a.device, a.evict.len()),
        (1, 0),
        "falls back to the second choice"
    );
    // No preference: the accelerator first while it has room, then the CPU.
    let a = b.admit(3, 5, &[], &idle, 3).expect("fits");
    assert_eq!(a.device, 0);
    let a = b.admit(4, 20, &[], &idle, 4).expect("fits");
    assert_eq!(
        (a.device, a.evict.len()),
        (1, 0),
        "gpu0 is full: the CPU, evicting nothing"
    );
}

#[test]
fn a_model_larger_than_any_budget_is_refused_and_evicts_nothing() {
    let mut b = two_devices(100, 0);
    settled(&mut b, 1, 60, 1);
    assert!(b.admit(2, 101, &[0], &idle, 2).is_err());
    assert_eq!(b.get(&1), Some((0, 60)));
}

#[test]
fn settling_above_the_estimate_evicts_or_refuses() {
    let mut b = two_devices(100, 0);
    settled(&mut b, 1, 30, 1);
    b.admit(2, 30, &[0], &idle, 2).expect("fits");
    // Measured larger than estimated: model 1 must make room.
    assert_eq!(b.settle(&2, 80, &idle).expect("room"), vec![1]);
    assert_eq!(b.used(0), 80);
    b.admit(3, 10, &[0], &idle, 3).expect("fits");
    b.set_pinned(&2, true);
    let err = b.settle(&3, 50, &idle).expect_err("pinned model 2 stays");
    assert_eq!(err.need, 50);
    assert_eq!(b.get(&3), None, "the refused model is no longer accounted");
    assert_eq!(b.used(0), 80);
}

#[test]
fn shrinking_a_budget_evicts_lru_or_is_refused() {
    let mut b = two_devices(100, 0);
    settled(&mut b, 1, 30, 1);
    settled(&mut b, 2, 30, 2);
    settled(&mut b, 3, 30, 3);
    assert_eq!(b.set_budget(0, 200, &idle).unwrap(), Vec::<u32>::new());
    assert_eq!(
        b.set_budget(0, 60, &idle).unwrap(),
        vec![1],
        "least recently used goes"
    );
    assert_eq!(b.devices()[0].budget, 60);
    b.set_pinned(&2, true);
    let busy = |k: &u32| *k == 3;
    let err = b.set_budget(0, 10, &busy).unwrap_err();
    assert_eq!(err.need, 50);
    assert_eq!(b.devices()[0].budget, 60, "refused: unchanged");
    assert_eq!(b.used(0), 60);
}

#[test]
fn estimator_learns_the_ratio() {
    let mut e = Estimator::default();
    let before = e.estimate(10 << 20);
    e.learn(10 << 20, 30 << 20);
    e.learn(10 << 20, 30 << 20);
    e.learn(10 << 20, 30 << 20);
    let after = e.estimate(10 << 20);
    assert!(after > before && after <= 30 << 20, "{before} -> {after}");
    e.learn(1000, 1 << 30);
    assert_eq!(e.estimate(10 << 20), after, "tiny files teach nothing");
}

#[derive(Debug, Clone)]
enum Op {
    Admit {
        key: u32,
        bytes: u64,
        prefs: Vec<usize>,
    },
    Settle {
        key: u32,
        bytes: u64,
    },
    Touch(u32),
    Pin(u32, bool),
    Release(u32),
    Busy(u32, bool),
    Budget(usize, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u32..8, 0u64..120, proptest::collection::vec(0usize..2, 0..3))
            .prop_map(|(key, bytes, prefs)| Op::Admit { key, bytes, prefs }),
        2 => (0u32..8, 0u64..120).prop_map(|(key, bytes)| Op::Settle { key, bytes }),
        2 => (0u32..8).prop_map(Op::Touch),
        1 => (0u32..8, any::<bool>()).prop_map(|(k, p)| Op::Pin(k, p)),
        1 => (0u32..8).prop_map(Op::Release),
        1 => (0u32..8, any::<bool>()).prop_map(|(k, b)| Op::Busy(k, b)),
        1 => (0usize..2, 0u64..300).prop_map(|(d, b)| Op::Budget(d, b)),
    ]
}

proptest! {
    /// Resident bytes never exceed a budget; pinned, loading and busy models are never
    /// victims; victims are the least-recently-used eligible models of their device.
    #[test]
    fn budget_invariants(a in 0u64..300, c in 0u64..300, ops in proptest::collection::vec(op(), 1..80)) {
        let mut b = two_devices(a, c);
        let mut busy: BTreeSet<u32> = BTreeSet::new();
        let mut pinned: BTreeSet<u32> = BTreeSet::new();
        let mut last: BTreeMap<u32, u64> = BTreeMap::new();
        let mut loading: BTreeSet<u32> = BTreeSet::new();
        for (now, op) in (1u64..).zip(ops) {
            let before = b.clone();
            let loading_before = loading.clone();
            let subject = match &op {
                Op::Admit { key, .. } | Op::Settle { key, .. } => Some(*key),
                _ => None,
            };
            let is_busy = |k: &u32| busy.contains(k);
            let victims = match op {
                Op::Admit { key, bytes, prefs } => {
                    let fresh = b.get(&key).is_none();
                    match b.admit(key, bytes, &prefs, &is_busy, now) {
                        Ok(adm) => {
                            prop_assert_eq!(b.get(&key).map(|x| x.0), Some(adm.device));
                            if fresh {
                                last.insert(key, now);
                                loading.insert(key);
                                pinned.remove(&key);
                                if !prefs.is_empty() {
                                    prop_assert!(prefs.contains(&adm.device));
                                }
                            }
                            adm.evict.into_iter().map(|k| (k, adm.device)).collect::<Vec<_>>()
                        }
                        Err(e) => {
                            prop_assert_eq!(e.need, bytes);
                            prop_assert_eq!(b.get(&key), None);
                            prop_assert_eq!(format!("{:?}", b.entries), format!("{:?}", before.entries));
                            Vec::new()
                        }
                    }
                }
                Op::Settle { key, bytes } => {
                    let dev = b.get(&key).map(|x| x.0);
                    match b.settle(&key, bytes, &is_busy) {
                        Ok(v) => {
                            if dev.is_some() {
                                prop_assert_eq!(b.get(&key), Some((dev.unwrap(), bytes)));
                                loading.remove(&key);
                            }
                            v.into_iter().map(|k| (k, dev.unwrap())).collect()
                        }
                        Err(_) => {
                            prop_assert_eq!(b.get(&key), None);
                            loading.remove(&key);
                            last.remove(&key);
                            pinned.remove(&key);
                            Vec::new()
                        }
                    }
                }
                Op::Touch(k) => {
                    b.touch(&k, now);
                    if b.get(&k).is_some() {
                        last.insert(k, now);
                    }
                    Vec::new()
                }
                Op::Pin(k, p) => {
                    b.set_pinned(&k, p);
                    if b.get(&k).is_some() {
                        if p { pinned.insert(k); } else { pinned.remove(&k); }
                    }
                    Vec::new()
                }
                Op::Release(k) => {
                    b.release(&k);
                    last.remove(&k);
                    pinned.remove(&k);
                    loading.remove(&k);
                    Vec::new()
                }
                Op::Busy(k, x) => {
                    if x { busy.insert(k); } else { busy.remove(&k); }
                    Vec::new()
                }
                Op::Budget(d, bytes) => match b.set_budget(d, bytes, &is_busy) {
                    Ok(v) => {
                        prop_assert_eq!(b.devices()[d].budget, bytes);
                        v.into_iter().map(|k| (k, d)).collect()
                    }
                    Err(_) => {
                        prop_assert_eq!(&b.devices()[d], &before.devices()[d]);
                        prop_assert_eq!(format!("{:?}", b.entries), format!("{:?}", before.entries));
                        Vec::new()
                    }
                },
            };
            for (v, dev) in &victims {
                prop_assert!(!pinned.contains(v), "pinned {v} evicted");
                prop_assert!(!busy.contains(v), "busy {v} evicted");
                prop_assert!(!loading.contains(v), "loading {v} evicted");
                prop_assert_eq!(b.get(v), None);
                // Every eligible model left on the device was used no earlier than the victim.
                for (k, (d, _)) in before.entries.iter().map(|(k, e)| (k, (e.device, e.bytes))) {
                    let eligible = d == *dev && !pinned.contains(k) && !busy.contains(k)
                        && !loading_before.contains(k) && b.get(k).is_some() && Some(*k) != subject;
                    if eligible {
                        prop_assert!(last[k] >= last[v], "victim {v} (used {}) before LRU {k} (used {})", last[v], last[k]);
                    }
                }
                last.remove(v);
                pinned.remove(v);
            }
            for d in 0..2 {
                prop_assert!(b.used(d) <= b.devices()[d].budget, "device {d} over budget");
            }
        }
    }
}
