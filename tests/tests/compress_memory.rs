//! Issue 24.4: static INT8 calibration streams — per-tensor statistics, the inputs a few items
//! at a time — so its memory does not grow with the calibration set. Alone in its own test
//! binary (one test), so that the process's peak resident memory is the calibration's.

use rxd_compress::report::{self, Input};
use rxd_compress::static_int8::{self, Calibration};
use rxd_e2e::*;

/// A line of /proc/self/status, in KiB.
fn status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/self/status"))
}

/// How far the process's resident memory rises above where it is now while `f` runs.
fn peak_growth_kib(f: impl FnOnce()) -> u64 {
    // Writing 5 resets the peak (VmHWM) to the current resident size (Linux ≥ 4.0).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_kib("VmRSS:");
    f();
    status_kib("VmHWM:").saturating_sub(before)
}

fn images(n: usize, seed: u64) -> Input {
    Input {
        name: "images".into(),
        shape: vec![n as i64, 3, 320, 320],
        data: report::Data::F32(random_f32(n * 3 * 320 * 320, seed)),
    }
}

#[test]
fn static_calibration_memory_does_not_grow_with_the_calibration_set() {
    let bytes = std::fs::read(model_file("yolov8n")).unwrap();
    let calibrate = |x: &Input| {
        let (_, st) = static_int8::quantize_with(
            reference_env(),
            &bytes,
            std::slice::from_ref(x),
            Calibration::DEFAULT,
        )
        .unwrap();
        assert_eq!(st.weights, 63);
    };
    // ONNX Runtime's own first-use allocations are not the calibration's.
    calibrate(&images(1, 1));
    let (small, large) = (images(4, 2), images(32, 3));
    let grew_small = peak_growth_kib(|| calibrate(&small));
    let grew_large = peak_growth_kib(|| calibrate(&large));
    eprintln!(
        "peak above the inputs: {} MiB calibrating on 4 images, {} MiB on 32",
        grew_small / 1024,
        grew_large / 1024
    );
    // Eight times the data, the same memory: whatever one image's activations and the
    // per-tensor statistics take (holding every activation of 28 more images would add
    // gigabytes), within allocator noise.
    assert!(
        grew_large <= grew_small + 48 * 1024,
        "{grew_small} KiB for 4 images, {grew_large} KiB for 32"
    );
}
