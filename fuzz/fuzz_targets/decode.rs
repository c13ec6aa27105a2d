//! Fuzz target: every decoder the daemon runs on client bytes. Must never panic or allocate
//! without bound. Run: `cargo fuzz run decode` (from the repository root; needs cargo-fuzz).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rxd_protocol::frame::{self, HEADER_LEN};
use rxd_protocol::{Hello, RequestFrame};

/// The same message: compared by what it says (`Debug`), because a float field may be NaN
/// (`latency_target_ms`), which is not equal to itself.
fn same(a: &RequestFrame, b: &RequestFrame) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

fuzz_target!(|data: &[u8]| {
    // As a stream: header then body, like the daemon reads it.
    if data.len() >= HEADER_LEN {
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&data[..HEADER_LEN]);
        if let Ok(len) = frame::body_len(header, 1 << 20) {
            let body = &data[HEADER_LEN..];
            let body = &body[..len.min(body.len())];
            if let Ok(req) = frame::decode::<RequestFrame>(body) {
                if let rxd_protocol::Request::Infer(infer) = &req.body {
                    let _ = infer.check();
                }
            }
        }
    }
    // As bare bodies: the daemon checks the structure first; whatever passes the check and
    // decodes must also decode without it (the check never changes what a body means).
    let checked =
        frame::decode_bounded::<RequestFrame>(data, rxd_protocol::limits::MAX_FRAME_VALUES);
    if let Ok(req) = &checked {
        let plain = frame::decode::<RequestFrame>(data);
        assert!(
            plain.as_ref().is_ok_and(|p| same(p, req)),
            "{plain:?} != {req:?}"
        );
    }
    let _ = frame::decode_bounded::<Hello>(data, rxd_protocol::limits::MAX_FRAME_VALUES);
    let _ = frame::decode::<Hello>(data);
    let _ = frame::salvage_id(data);
    if let Ok(req) = frame::decode::<RequestFrame>(data) {
        // Whatever decodes re-encodes and decodes to the same value.
        let again = frame::round_trip(&req);
        assert!(same(&again, &req), "{again:?} != {req:?}");
    }
});
