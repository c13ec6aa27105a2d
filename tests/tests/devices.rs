//! Devices (issue 25, items 5 and 6): what each device computes, probed at start by running a
//! one-node float16 and integer model on it, shown by `rxctl devices` and used by placement (a
//! float16 model is kept off a device without float16 — a test hook gives a CPU device the
//! probe result of a Polaris GPU); and how busy each device is (busy ratio, rows per second,
//! queue depth) in the metrics report, the Prometheus text and `rxctl devices`, under a real
//! closed-loop load and once it is idle again. The WebGPU device's probe on lavapipe is in
//! webgpu.rs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rxd_client::{ClientError, ErrorCode};
use rxd_e2e::*;
use rxd_protocol::{DeviceSummary, ModelState, Support};

fn device<'a>(devices: &'a [DeviceSummary], name: &str) -> &'a DeviceSummary {
    devices
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no device {name}: {devices:?}"))
}

#[test]
fn the_cpu_device_is_probed_at_start_float16_emulated_and_int8_native() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits");
    let d = TestDaemon::start(repo.path(), &[]);
    let devices = d.client().devices().unwrap();
    let caps = device(&devices, "cpu")
        .capabilities
        .expect("probed at start");
    // The CPU runs the float16 Add correctly (by casting): usable, not native.
    assert_eq!(caps.float16, Support::Emulated, "{devices:?}");
    assert_eq!(caps.int8, Support::Native, "{devices:?}");
    let out = d.rxctl(&["devices"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("float16 emulated, int8 native"),
        "rxctl devices:\n{text}"
    );
    let log = d.log_text();
    assert!(
        log.contains("device capabilities") && log.contains("float16=\"emulated\""),
        "{log}"
    );
}

#[test]
fn a_float16_model_is_refused_on_a_device_without_float16_and_placed_on_one_with_it() {
    let repo = Repo::new();
    repo.link("half", 1, "digits")
        .settings("half", "compress = 'fp16'\ndevices = ['polaris']\n")
        .link("half_spill", 1, "digits")
        .settings(
            "half_spill",
            "compress = 'fp16'\ndevices = ['polaris', 'cpu']\n",
        )
        .link("half_any", 1, "digits")
        .settings("half_any", "compress = 'fp16'\n")
        .link("full", 1, "digits")
        .settings("full", "devices = ['polaris']\n");
    // Two CPU devices; the test hook makes 'polaris' probe as a GPU without float16 would.
    // 'polaris' comes first, so a model without a preference would go there.
    let config = "preload = []\nload-on-demand = true\n\
                  [[device]]\nname = 'polaris'\nkind = 'cpu'\n\
                  [[device]]\nname = 'cpu'\nkind = 'cpu'\n";
    let d = TestDaemon::start_env(
        repo.path(),
        &[("RXD_TEST_NO_FLOAT16", "polaris")],
        config,
        &[],
    );
    let c = d.client();
    let devices = c.devices().unwrap();
    assert_eq!(
        device(&devices, "polaris").capabilities.unwrap().float16,
        Support::Absent
    );
    assert_eq!(
        device(&devices, "cpu").capabilities.unwrap().float16,
        Support::Emulated
    );
    let digit = example_npy("digit.npy", "input");
    // Only the device without float16 allowed: refused, naming the device and the capability.
    match c.infer("half", vec![digit.clone()]).unwrap_err() {
        ClientError::Server(w) => {
            assert_eq!(w.kind(), Some(ErrorCode::LoadFailed), "{w}");
            assert!(
                w.message.contains("'polaris'") && w.message.contains("float16"),
                "{w}"
            );
            assert!(w.message.contains("compress = \"fp16\""), "{w}");
        }
        other => panic!("{other}"),
    }
    let s = d.summaries();
    assert_eq!(s["half"].state, ModelState::Failed);
    assert!(
        s["half"].error.as_deref().unwrap().contains("float16"),
        "{:?}",
        s["half"]
    );
    // Another allowed device has float16: it goes there, and answers like the model it
    // was compressed from (float16 rounding: the same digit).
    let want = Reference::new(&model_file("digits")).run(std::slice::from_ref(&digit));
    let want_label = argmax(&tensor_f32(&want[0]));
    for m in ["half_spill", "half_any"] {
        let got = c.infer(m, vec![digit.clone()]).unwrap();
        assert_eq!(argmax(&tensor_f32(&got[0])), want_label, "{m}");
        assert_eq!(d.summaries()[m].device, "cpu", "{m}");
    }
    // A float32 model is placed on the device without float16 as before.
    assert_eq!(c.infer("full", vec![digit.clone()]).unwrap(), want);
    assert_eq!(d.summaries()["full"].device, "polaris");
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap()
}

#[test]
fn device_busy_ratio_rises_under_load_matches_the_rows_answered_and_falls_to_zero_when_idle() {
    let repo = Repo::new();
    repo.link("cls", 1, "ppocr_cls");
    let d = TestDaemon::start(repo.path(), &[]);
    let c = d.client();
    let item = f32_tensor("x", &[1, 3, 48, 192], &random_f32(3 * 48 * 192, 7));
    c.infer("cls", vec![item.clone()]).unwrap();
    let idle = device(&c.metrics().unwrap().devices, "cpu")
        .load
        .clone()
        .unwrap();
    assert!(idle.busy_ratio < 0.2, "{idle:?}");

    // A closed loop of 4 clients for 12 s; the device is reported every second meanwhile.
    let socket = d.socket.clone();
    let load_item = item.clone();
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let load = std::thread::spawn(move || {
        let r = closed_loop(&socket, "cls", &load_item, &[4], 12.0);
        flag.store(true, Ordering::Relaxed);
        r
    });
    let mut peak = 0.0f64;
    let mut during = None;
    let started = Instant::now();
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(1));
        let m = c.metrics().unwrap();
        let l = device(&m.devices, "cpu").load.clone().unwrap();
        peak = peak.max(l.busy_ratio);
        // Late in the run the device's window (10 s) and the model's 10 s rate both lie
        // inside the load.
        if during.is_none() && started.elapsed() >= Duration::from_secs(11) {
            let model = m.models.iter().find(|x| x.name == "cls").unwrap().clone();
            during = Some((l, model));
            let text = d.rxctl(&["metrics", "--prometheus"]);
            let text = String::from_utf8(text.stdout).unwrap();
            promtool_accepts(&text);
            for family in [
                "rxd_device_busy_ratio{device=\"cpu\"}",
                "rxd_device_rows_per_second{device=\"cpu\"}",
                "rxd_device_queue_depth{device=\"cpu\"}",
                "rxd_device_rows_total{device=\"cpu\"}",
                "rxd_device_capability{device=\"cpu\",capability=\"float16\",support=\"emulated\"} 1",
            ] {
                assert!(text.contains(family), "{family} missing:\n{text}");
            }
        }
    }
    let report = load.join().unwrap().remove(0);
    assert_eq!(report.ok, report.requests, "{report:?}");
    assert!(peak > 0.5, "busy ratio under load peaked at {peak}");
    let (l, model) = during.expect("a report late in the run");
    let rate10 = model.rates.iter().find(|r| r.window_s == 10).unwrap();
    let (dev, answered) = (l.rows_per_s, rate10.requests_per_s);
    println!(
        "busy ratio peaked at {peak:.2}; late in the run: device {dev:.1} rows/s over {:.1} s, \
         model {answered:.1} answers/s over 10 s",
        l.window_s
    );
    assert!(
        dev > 0.75 * answered && dev < 1.33 * answered,
        "device rows/s {dev} against {answered} answers/s ({l:?})"
    );

    // Idle: the ratio falls back to 0 within the window; every row run was a request answered.
    let deadline = Instant::now() + Duration::from_secs(25);
    let last = loop {
        std::thread::sleep(Duration::from_secs(1));
        let m = c.metrics().unwrap();
        let l = device(&m.devices, "cpu").load.clone().unwrap();
        if l.busy_ratio == 0.0 || Instant::now() > deadline {
            break (l, m);
        }
    };
    let (l, m) = last;
    assert_eq!(l.busy_ratio, 0.0, "{l:?}");
    assert_eq!(l.rows_per_s, 0.0, "{l:?}");
    assert_eq!(l.queue_depth, 0);
    let ok = m.models.iter().find(|x| x.name == "cls").unwrap().outcomes["ok"];
    assert_eq!(l.rows_total, ok, "{l:?}");
    assert!(l.busy_seconds_total > 5.0, "{l:?}");
    let out = d.rxctl(&["devices"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("busy 0%, 0.0 rows/s"),
        "rxctl devices:\n{text}"
    );
}
