//! The shared-memory submission/completion ring (issue 26; PROTOCOL.md, "The ring"): answers
//! through the ring equal in-process ONNX Runtime, and a client that lies in the ring, stops
//! consuming it or dies with it full hurts only its own connection.

use std::time::Duration;

use rxd_client::{RingClient, RingOptions};
use rxd_e2e::*;

fn ring_options(entries: u32, slot_bytes: u32) -> RingOptions {
    RingOptions {
        entries,
        slot_bytes,
        spin: Duration::from_micros(20),
        ..RingOptions::default()
    }
}

#[test]
fn answers_through_the_ring_equal_in_process_ort_across_many_wraps_of_its_slots() {
    let repo = Repo::new();
    repo.link("sigmoid", 1, "sigmoid")
        .link("ppocr_cls", 1, "ppocr_cls");
    let d = TestDaemon::start(repo.path(), &[]);
    let mut c = RingClient::connect(&d.socket, ring_options(4, 1024)).unwrap();
    assert!(c.has_ring(), "{:?}", c.welcome());
    let grant = c.welcome().ring.unwrap();
    assert_eq!((grant.entries, grant.slot_bytes), (4, 1024));
    let mut reference = Reference::new(&model_file("sigmoid"));
    // 300 requests: 75 turns of a 4-slot ring, every one a different input.
    for i in 0..300u64 {
        let x = f32_tensor("x", &[3, 4, 5], &random_f32(60, i));
        let got = c.infer("sigmoid", vec![x.clone()]).unwrap();
        assert_eq!(got, reference.run(&[x]), "request {i}");
    }
    // A 110 KiB classifier crop in a 128 KiB slot.
    let mut c = RingClient::connect(&d.socket, ring_options(2, 128 << 10)).unwrap();
    let mut reference = Reference::new(&model_file("ppocr_cls"));
    for i in 0..20u64 {
        let x = f32_tensor("x", &[1, 3, 48, 192], &random_f32(3 * 48 * 192, 100 + i));
        let got = c.infer("ppocr_cls", vec![x.clone()]).unwrap();
        let want = reference.run(&[x]);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!(
                max_rel_diff(g, w) < 1e-5,
                "crop {i}: {}",
                max_rel_diff(g, w)
            );
        }
    }
    // The same crop does not fit a 1 KiB slot: it goes on the socket, answered the same.
    let mut small = RingClient::connect(&d.socket, ring_options(2, 1024)).unwrap();
    let x = f32_tensor("x", &[1, 3, 48, 192], &random_f32(3 * 48 * 192, 7));
    let got = small.infer("ppocr_cls", vec![x.clone()]).unwrap();
    assert!(max_rel_diff(&got[0], &reference.run(&[x])[0]) < 1e-5);
}

#[test]
fn an_answer_larger_than_a_slot_comes_on_the_socket_and_inputs_through_the_arena() {
    let repo = Repo::new();
    repo.example("digits");
    let d = TestDaemon::start(repo.path(), &[]);
    // 1 KiB slots: 300 rows of digits (77 KB) go through the arena, and their answer (12 KB
    // of scores) does not fit a completion slot.
    let mut c = RingClient::connect(
        &d.socket,
        RingOptions {
            arena_bytes: 1 << 20,
            ..ring_options(4, 1024)
        },
    )
    .unwrap();
    assert!(c.has_ring());
    let all = example_npy("digits_test_x.npy", "input");
    let mut reference = Reference::new(&model_file("digits"));
    for (i, rows) in [300usize, 1, 300, 7, 299].into_iter().enumerate() {
        let bytes =
            rxd_client::tensor::bytes(&all).unwrap()[i * 64 * 4..(i + rows) * 64 * 4].to_vec();
        let x = rxd_client::Tensor::inline(
            "input",
            rxd_client::DType::Float32,
            vec![rows as u64, 64],
            bytes,
        );
        let got = c.infer("digits", vec![x.clone()]).unwrap();
        assert_eq!(got, reference.run(&[x]), "{rows} rows");
    }
    // The daemon's counters saw every request (none lost between ring and socket).
    assert_eq!(d.summaries()["digits"].requests, 5);
}
