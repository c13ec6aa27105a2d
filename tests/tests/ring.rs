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

/// CPU time so far (ns, the scheduler's own count) of the daemon's threads whose names start
/// with `prefix` (`rxd-w-`: the model workers; `rxd-ring`: the ring's poller).
fn thread_cpu_ns(pid: i32, prefix: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

#[test]
fn a_light_model_runs_on_the_ring_poller_while_its_workers_sleep_and_answers_the_same() {
    let repo = Repo::new();
    repo.link("sigmoid", 1, "sigmoid");
    // A debug build's own part of a batch (gathering, answering) is many times slower than a
    // release build's, and counts in a batch's expected run: the bound is raised to 1 ms.
    let d = TestDaemon::start_env(repo.path(), &[("RXD_TEST_INLINE_MAX_US", "1000")], "", &[]);
    let mut reference = Reference::new(&model_file("sigmoid"));
    let mut ring = RingClient::connect(&d.socket, ring_options(4, 1024)).unwrap();
    assert!(ring.has_ring());
    // On the socket whatever RXD_CLIENT_RING says.
    let options = rxd_client::ClientOptions {
        ring_entries: 0,
        ..Default::default()
    };
    let socket = rxd_client::blocking::Client::connect_with(&d.socket, options).unwrap();
    let x = |i: u64| f32_tensor("x", &[3, 4, 5], &random_f32(60, 5000 + i));
    // The workers run the first requests: the model's costs are measured from them.
    for i in 0..50 {
        assert_eq!(
            socket.infer("sigmoid", vec![x(i)]).unwrap(),
            reference.run(&[x(i)])
        );
    }
    // One request at a time through the ring: the poller runs each (its workers are idle).
    let before = thread_cpu_ns(d.pid(), "rxd-w-");
    for i in 100..500 {
        let got = ring.infer("sigmoid", vec![x(i)]).unwrap();
        assert_eq!(got, reference.run(&[x(i)]), "request {i} through the ring");
    }
    let through_ring = thread_cpu_ns(d.pid(), "rxd-w-") - before;
    // Through the socket a worker runs each.
    let before = thread_cpu_ns(d.pid(), "rxd-w-");
    for i in 500..900 {
        let got = socket.infer("sigmoid", vec![x(i)]).unwrap();
        assert_eq!(
            got,
            reference.run(&[x(i)]),
            "request {i} through the socket"
        );
    }
    let through_socket = thread_cpu_ns(d.pid(), "rxd-w-") - before;
    assert!(
        through_ring * 4 < through_socket,
        "400 requests took the workers {through_ring} ns of CPU through the ring, \
         {through_socket} ns on the socket"
    );
}

#[test]
fn a_light_model_made_slow_by_its_input_values_holds_the_poller_up_once() {
    let repo = Repo::new();
    // Sums range(n): microseconds for a small n, milliseconds for n = 5e6 (tens the first
    // time, which faults its memory in) — its cost follows a value, not a shape. One
    // single-thread session: each run's CPU is on the thread that runs it.
    repo.link("range_sum", 1, "range_sum")
        .settings("range_sum", "instances = 1\nintra-op-threads = 1\n");
    // The bound is raised for a debug build (see the test above); the stop (1 ms of the
    // poller's CPU for one run) is the daemon's own.
    let d = TestDaemon::start_env(repo.path(), &[("RXD_TEST_INLINE_MAX_US", "3000")], "", &[]);
    let mut reference = Reference::new(&model_file("range_sum"));
    let mut c = RingClient::connect(&d.socket, ring_options(4, 1024)).unwrap();
    assert!(c.has_ring());
    let n = |v: f32| f32_tensor("n", &[1], &[v]);
    // Cheap requests: the model's costs are learnt, and the poller runs them.
    for i in 0..100u64 {
        let x = n((i % 7) as f32);
        assert_eq!(
            c.infer("range_sum", vec![x.clone()]).unwrap(),
            reference.run(&[x])
        );
    }
    let cpu = |prefix: &str| thread_cpu_ns(d.pid(), prefix);
    let slow = n(5e6);
    let want = reference.run(std::slice::from_ref(&slow));
    let (poller0, workers0) = (cpu("rxd-ring"), cpu("rxd-w-"));
    assert_eq!(c.infer("range_sum", vec![slow.clone()]).unwrap(), want);
    let poller1 = cpu("rxd-ring");
    for _ in 0..5 {
        assert_eq!(c.infer("range_sum", vec![slow.clone()]).unwrap(), want);
    }
    let (poller2, workers2) = (cpu("rxd-ring"), cpu("rxd-w-"));
    // Six slow runs: a run's CPU, on average, is a sixth of what they took on both kinds of
    // thread (poller and workers).
    let run = (poller2 - poller0 + workers2 - workers0) / 6;
    let (first, later) = (poller1 - poller0, poller2 - poller1);
    // The first ran on the poller, which expected a cheap run; no other did.
    assert!(
        first > run / 2 && later < run / 2,
        "one slow run takes {run} ns of CPU; the poller spent {first} ns on the first and \
         {later} ns on the next five"
    );
    // Cheap requests are answered as before (by the workers now).
    for i in 0..20u64 {
        let x = n((i % 5) as f32);
        assert_eq!(
            c.infer("range_sum", vec![x.clone()]).unwrap(),
            reference.run(&[x])
        );
    }
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

#[test]
fn the_library_clients_send_inferences_through_the_ring_when_asked() {
    let repo = Repo::new();
    repo.example("digits").link("yolov8n", 1, "yolov8n");
    let d = TestDaemon::start(repo.path(), &[]);
    let options = rxd_client::ClientOptions {
        ring_entries: 4,
        ..rxd_client::ClientOptions::default()
    };
    let c = rxd_client::blocking::Client::connect_with(&d.socket, options).unwrap();
    assert_eq!(c.as_async().ring_requests(), Some(0));
    let all = example_npy("digits_test_x.npy", "input");
    let bytes = rxd_client::tensor::bytes(&all).unwrap().to_vec();
    let rows = |from: usize, n: usize| {
        rxd_client::Tensor::inline(
            "input",
            rxd_client::DType::Float32,
            vec![n as u64, 64],
            bytes[from * 256..(from + n) * 256].to_vec(),
        )
    };
    let mut reference = Reference::new(&model_file("digits"));
    for i in 0..50 {
        let x = rows(i, 1 + i % 5);
        assert_eq!(
            c.infer("digits", vec![x.clone()]).unwrap(),
            reference.run(&[x])
        );
    }
    assert_eq!(c.as_async().ring_requests(), Some(50));
    // Eight threads share the client: more requests in flight than the ring has entries,
    // those beyond go on the socket; every answer is its own request's.
    let want: Vec<(rxd_client::Tensor, Vec<rxd_client::Tensor>)> = (0..64)
        .map(|i| {
            let x = rows(i * 3, 1 + i % 7);
            let y = reference.run(std::slice::from_ref(&x));
            (x, y)
        })
        .collect();
    std::thread::scope(|s| {
        for t in 0..8 {
            let (c, want) = (&c, &want);
            s.spawn(move || {
                for (x, y) in want.iter().skip(t).step_by(8) {
                    assert_eq!(&c.infer("digits", vec![x.clone()]).unwrap(), y);
                }
            });
        }
    });
    let on_ring = c.as_async().ring_requests().unwrap() - 50;
    assert!(on_ring > 0 && on_ring <= 64, "{on_ring}");
    // A 1.2 MB image through the arena, its outputs placed in the arena, the request on the
    // ring.
    let x = f32_tensor("images", &[1, 3, 320, 320], &random_f32(3 * 320 * 320, 5));
    let got = c.infer("yolov8n", vec![x.clone()]).unwrap();
    let want = Reference::new(&model_file("yolov8n")).run(&[x]);
    assert!(max_rel_diff(&got[0], &want[0]) < 1e-4);
    assert_eq!(c.as_async().ring_requests().unwrap(), 50 + on_ring + 1);
    // A daemon that grants no ring (inline only, and no arena asked: the ring still comes,
    // at offset 0) and one that has none left both answer.
    let inline = rxd_client::blocking::Client::connect_with(
        &d.socket,
        rxd_client::ClientOptions {
            ring_entries: 2,
            ..rxd_client::ClientOptions::inline_only()
        },
    )
    .unwrap();
    assert!(inline.arena().is_none());
    let x = rows(0, 2);
    assert_eq!(
        inline.infer("digits", vec![x.clone()]).unwrap(),
        reference.run(&[x])
    );
    assert_eq!(inline.as_async().ring_requests(), Some(1));
}
