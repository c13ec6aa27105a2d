use proptest::prelude::*;

use crate::frame::{self, FrameError, HEADER_LEN};
use crate::*;

fn sample_infer() -> RequestFrame {
    RequestFrame {
        id: 7,
        body: Request::Infer(InferRequest {
            model: "digits".into(),
            version: Some(2),
            inputs: vec![Tensor::inline(
                "x",
                DType::Float32,
                vec![1, 2],
                vec![0, 0, 128, 63, 0, 0, 0, 64],
            )],
            outputs: vec![],
            output_regions: Vec::new(),
            output_area: None,
            priority: None,
            timeout_ms: None,
            inline_overflow: false,
        }),
    }
}

/// The wire form as a generic value, to check key names other languages rely on.
fn wire_json<T: serde::Serialize>(msg: &T) -> serde_json::Value {
    let frame = frame::encode(msg).unwrap();
    let mut body = &frame[HEADER_LEN..];
    to_json(rmpv::decode::read_value(&mut body).unwrap())
}

fn to_json(v: rmpv::Value) -> serde_json::Value {
    use rmpv::Value as M;
    use serde_json::Value as J;
    match v {
        M::Nil => J::Null,
        M::Boolean(b) => J::Bool(b),
        M::Integer(i) => serde_json::json!(
            i.as_u64()
                .map(J::from)
                .unwrap_or_else(|| J::from(i.as_i64().unwrap()))
        ),
        M::F32(f) => serde_json::json!(f),
        M::F64(f) => serde_json::json!(f),
        M::String(s) => J::String(s.into_str().unwrap()),
        // Binary shows as an object so tests can tell bin from an array.
        M::Binary(b) => serde_json::json!({"bin": b.len()}),
        M::Array(a) => J::Array(a.into_iter().map(to_json).collect()),
        M::Map(m) => J::Object(
            m.into_iter()
                .map(|(k, v)| (k.as_str().unwrap().to_string(), to_json(v)))
                .collect(),
        ),
        M::Ext(..) => panic!("no ext types on the wire"),
    }
}

#[test]
fn requests_round_trip() {
    let reqs = [
        sample_infer(),
        RequestFrame {
            id: 1,
            body: Request::ListModels,
        },
        RequestFrame {
            id: 2,
            body: Request::Status,
        },
        RequestFrame {
            id: 3,
            body: Request::Health,
        },
        RequestFrame {
            id: 4,
            body: Request::Load(ModelRef {
                model: "m".into(),
                version: None,
            }),
        },
        RequestFrame {
            id: 5,
            body: Request::ModelInfo(ModelRef {
                model: "m".into(),
                version: Some(3),
            }),
        },
    ];
    for r in reqs {
        assert_eq!(frame::round_trip(&r), r);
    }
}

#[test]
fn wire_form_uses_named_keys_and_tags() {
    let v = wire_json(&sample_infer());
    assert_eq!(v["id"], 7);
    assert_eq!(v["body"]["op"], "infer");
    let args = &v["body"]["args"];
    assert_eq!(args["model"], "digits");
    assert_eq!(args["inputs"][0]["dtype"], "float32");
    assert_eq!(args["inputs"][0]["shape"], serde_json::json!([1, 2]));
    assert_eq!(args["inputs"][0]["data"]["inline"]["bin"], 8);
    // A unit request has only the tag.
    let v = wire_json(&RequestFrame {
        id: 9,
        body: Request::Status,
    });
    assert_eq!(v, serde_json::json!({"id": 9, "body": {"op": "status"}}));
    // Errors carry a numeric code.
    let v = wire_json(&ResponseFrame {
        id: 9,
        outcome: Outcome::Err(WireError::new(ErrorCode::Busy, "full")),
    });
    assert_eq!(
        v,
        serde_json::json!({"id": 9, "outcome": {"err": {"code": 500, "message": "full"}}})
    );
}

#[test]
fn inline_data_is_msgpack_bin() {
    let frame = frame::encode(&sample_infer()).unwrap();
    // bin8 marker (0xc4) followed by the 8-byte length.
    assert!(frame.windows(2).any(|w| w == [0xc4, 8]));
}

#[test]
fn handshake_round_trips() {
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        client: "t".into(),
        arena_bytes: 0,
        ring: None,
    };
    assert_eq!(frame::round_trip(&hello), hello);
    let refused = HandshakeReply::Error(HandshakeError {
        error: WireError::new(ErrorCode::UnsupportedVersion, "no"),
        supported: vec![1],
    });
    assert_eq!(frame::round_trip(&refused), refused);
    let v = wire_json(&refused);
    assert_eq!(v["error"]["code"], 102);
    assert_eq!(v["error"]["supported"], serde_json::json!([1]));
}

#[test]
fn hello_accepts_missing_optional_fields() {
    #[derive(serde::Serialize)]
    struct Minimal {
        protocol: u32,
    }
    let f = frame::encode(&Minimal { protocol: 1 }).unwrap();
    let hello: Hello = frame::decode(&f[HEADER_LEN..]).unwrap();
    assert_eq!(hello.arena_bytes, 0);
}

#[test]
fn body_len_bounds() {
    assert!(matches!(
        frame::body_len([0, 0, 0, 0], 10),
        Err(FrameError::Empty)
    ));
    assert!(matches!(
        frame::body_len(11u32.to_le_bytes(), 10),
        Err(FrameError::TooLarge { len: 11, max: 10 })
    ));
    assert_eq!(frame::body_len(10u32.to_le_bytes(), 10).unwrap(), 10);
}

#[test]
fn tensor_checks() {
    let ok = Tensor::inline("x", DType::Float32, vec![2, 3], vec![0; 24]);
    assert_eq!(ok.check().unwrap(), 24);
    let short = Tensor::inline("x", DType::Float32, vec![2, 3], vec![0; 23]);
    assert_eq!(
        short.check().unwrap_err().kind(),
        Some(ErrorCode::DataLengthMismatch)
    );
    let overflow = Tensor::inline("x", DType::Float32, vec![u64::MAX, 2], vec![]);
    assert_eq!(
        overflow.check().unwrap_err().kind(),
        Some(ErrorCode::TensorTooLarge)
    );
    // Zero elements, but a dimension ONNX Runtime cannot represent (its dims are int64).
    let huge_dim = Tensor::inline("x", DType::Float32, vec![1 << 63, 0], vec![]);
    assert_eq!(
        huge_dim.check().unwrap_err().kind(),
        Some(ErrorCode::TensorTooLarge)
    );
    let widest = Tensor::inline("x", DType::Float32, vec![limits::MAX_DIM, 0], vec![]);
    assert_eq!(widest.check().unwrap(), 0);
    let deep = Tensor::inline("x", DType::Uint8, vec![1; limits::MAX_RANK + 1], vec![0]);
    assert_eq!(
        deep.check().unwrap_err().kind(),
        Some(ErrorCode::TensorTooLarge)
    );
    let packed = Tensor::inline("x", DType::Int4, vec![3], vec![0; 2]);
    assert_eq!(packed.check().unwrap(), 2);
}

#[test]
fn salvage_id_finds_the_id_of_a_bad_request() {
    #[derive(serde::Serialize)]
    struct Bad {
        id: u64,
        body: u32,
    }
    let f = frame::encode(&Bad { id: 42, body: 3 }).unwrap();
    assert!(frame::decode::<RequestFrame>(&f[HEADER_LEN..]).is_err());
    assert_eq!(frame::salvage_id(&f[HEADER_LEN..]), Some(42));
    assert_eq!(frame::salvage_id(b"\xff\x00garbage"), None);
}

/// The largest legitimate request (every count at its limit) passes the structure check.
#[test]
fn a_request_at_every_limit_passes_the_structure_check() {
    let name = |i: usize| format!("{i:0>1024}");
    let inputs: Vec<Tensor> = (0..limits::MAX_TENSORS)
        .map(|i| Tensor::inline(name(i), DType::Uint8, vec![1; limits::MAX_RANK], vec![1]))
        .collect();
    let outputs: Vec<String> = (0..limits::MAX_TENSORS).map(name).collect();
    let output_regions = outputs
        .iter()
        .map(|n| OutputRegion {
            name: n.clone(),
            offset: u64::MAX,
            len: u64::MAX,
        })
        .collect();
    let r = RequestFrame {
        id: u64::MAX,
        body: Request::Infer(InferRequest {
            model: name(0),
            version: Some(u64::MAX),
            inputs,
            outputs,
            output_regions,
            output_area: Some(ArenaRef { offset: 1, len: 2 }),
            priority: Some(255),
            timeout_ms: Some(u64::MAX),
            inline_overflow: true,
        }),
    };
    let f = frame::encode(&r).unwrap();
    let got: RequestFrame =
        frame::decode_bounded(&f[HEADER_LEN..], limits::MAX_FRAME_VALUES).unwrap();
    assert_eq!(got, r);
}

/// Issue 19 (red team): a frame of millions of one-byte values decodes into tens of bytes per
/// value; the structure check refuses it before anything is allocated, wherever the values
/// sit (a known key, an unknown key, `args` before `op`).
#[test]
fn frames_of_many_tiny_values_are_refused_before_decoding() {
    // {"id": 1, "body": {"args": {"x": [nil × 100 000]}, "op": "status"}}
    let mut b = vec![
        0x82, 0xa2, b'i', b'd', 0x01, 0xa4, b'b', b'o', b'd', b'y', 0x82,
    ];
    b.extend_from_slice(&[0xa4, b'a', b'r', b'g', b's', 0x81, 0xa1, b'x', 0xdd]);
    b.extend_from_slice(&100_000u32.to_be_bytes());
    b.extend(std::iter::repeat_n(0xc0, 100_000));
    b.extend_from_slice(&[0xa2, b'o', b'p', 0xa6, b's', b't', b'a', b't', b'u', b's']);
    let e = frame::decode_bounded::<RequestFrame>(&b, limits::MAX_FRAME_VALUES).unwrap_err();
    assert!(e.to_string().contains("values"), "{e}");
    assert_eq!(e.to_wire().kind(), Some(ErrorCode::MalformedMessage));
    // Nesting deeper than the limit.
    let mut deep = vec![0x91; limits::MAX_DEPTH + 2];
    deep.push(0xc0);
    assert!(frame::check_structure(&deep, limits::MAX_FRAME_VALUES).is_err());
    let mut ok = vec![0x91; limits::MAX_DEPTH - 1];
    ok.push(0xc0);
    frame::check_structure(&ok, limits::MAX_FRAME_VALUES).unwrap();
    // Lengths past the end, an array longer than the bytes left, the unused marker.
    for bad in [
        &[0xc6, 0xff, 0xff, 0xff, 0xff][..],
        &[0xdd, 0x7f, 0xff, 0xff, 0xff, 0xc0],
        &[0xdb, 0x00, 0x00, 0x00, 0x09, b'x'],
        &[0xc1],
        &[],
        // One value, then bytes the message does not have.
        &[0x80, 0x00],
        &[0xc0, 0xc0],
    ] {
        assert!(frame::check_structure(bad, 1 << 20).is_err(), "{bad:?}");
    }
}

proptest! {
    /// The decoder never panics on arbitrary bytes (the fuzz target does the same, longer).
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = frame::decode::<RequestFrame>(&bytes);
        let _ = frame::decode_bounded::<RequestFrame>(&bytes, limits::MAX_FRAME_VALUES);
        let _ = frame::check_structure(&bytes, 64);
        let _ = frame::decode::<Hello>(&bytes);
        let _ = frame::decode::<ResponseFrame>(&bytes);
        let _ = frame::salvage_id(&bytes);
    }

    /// Mutating a valid frame never panics the decoder.
    #[test]
    fn decode_mutated_frames(pos in 0usize..64, val in any::<u8>()) {
        let mut f = frame::encode(&sample_infer()).unwrap();
        let body = &mut f[HEADER_LEN..];
        let p = pos % body.len();
        body[p] = val;
        let _ = frame::decode::<RequestFrame>(body);
    }

    /// Every frame the encoder writes passes the structure check with its exact value count.
    #[test]
    fn encoded_frames_pass_the_structure_check(shape in proptest::collection::vec(0u64..4, 0..6),
                                               names in proptest::collection::vec("[a-z]{0,6}", 0..20)) {
        let n = element_count(&shape).unwrap() as usize;
        let r = RequestFrame { id: 3, body: Request::Infer(InferRequest {
            model: "m".into(), version: None,
            inputs: vec![Tensor::inline("x", DType::Uint8, shape, vec![1; n])],
            outputs: names, output_regions: Vec::new(), output_area: None, priority: Some(1),
            timeout_ms: None, inline_overflow: false, }) };
        let f = frame::encode(&r).unwrap();
        prop_assert!(frame::check_structure(&f[HEADER_LEN..], limits::MAX_FRAME_VALUES).is_ok());
    }

    #[test]
    fn infer_round_trip(id in 1u64.., shape in proptest::collection::vec(0u64..4, 0..4),
                        name in "[a-z]{1,8}") {
        let n = element_count(&shape).unwrap() as usize;
        let r = RequestFrame { id, body: Request::Infer(InferRequest {
            model: name.clone(), version: None,
            inputs: vec![Tensor::inline(name, DType::Int64, shape, vec![7; n * 8])],
            outputs: vec![], output_regions: Vec::new(), output_area: None, priority: None, timeout_ms: None, inline_overflow: false, }) };
        prop_assert_eq!(frame::round_trip(&r), r);
    }
}

#[test]
fn dims_text_names_plain_dimensions_and_marks_the_rest() {
    let spec = TensorSpec {
        name: "output0".into(),
        dtype: DType::Float32,
        dims: vec![-1, 22, -1, -1],
        dim_names: vec![
            "batch".into(),
            String::new(),
            "(floor(height/2 - 1/2) + 1)*2".into(),
            String::new(),
        ],
        max_dims: Vec::new(),
        warmup_dims: Vec::new(),
        warmup_value: None,
    };
    assert_eq!(spec.dims_text(), "[batch, 22, ?, ?]");
    // Older daemons send no warmup_dims; the field is optional on the wire.
    let mut v = wire_json(&spec);
    assert!(v.get("warmup_dims").is_none(), "{v}");
    v.as_object_mut().unwrap().remove("max_dims");
    let back: TensorSpec = rmp_serde::from_slice(&rmp_serde::to_vec_named(&v).unwrap()).unwrap();
    assert_eq!(back, spec);
}

#[test]
fn publish_wire_form() {
    let req = RequestFrame {
        id: 3,
        body: Request::Publish(PublishRequest {
            model: "digits".into(),
            version: None,
            data: TensorData::Arena(ArenaRef {
                offset: 4096,
                len: 100,
            }),
        }),
    };
    assert_eq!(frame::round_trip(&req), req);
    assert!(req.body.is_admin());
    assert_eq!(
        wire_json(&req),
        serde_json::json!({"id": 3, "body": {"op": "publish", "args": {
            "model": "digits", "data": {"arena": {"offset": 4096, "len": 100}}}}})
    );
    let inline = Request::Publish(PublishRequest {
        model: "m".into(),
        version: Some(2),
        data: TensorData::Inline(vec![1, 2, 3]),
    });
    let v = wire_json(&RequestFrame {
        id: 4,
        body: inline,
    });
    assert_eq!(v["body"]["args"]["version"], 2);
    assert_eq!(v["body"]["args"]["data"]["inline"]["bin"], 3);
}

#[test]
fn repository_names_name_one_entry_inside_the_repository() {
    for ok in ["digits", "yolo_v8n-2", "a.b", "A9"] {
        check_repository_name(ok).unwrap();
    }
    let long = "x".repeat(256);
    for bad in [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        "/abs",
        ".hidden",
        "-flag",
        "a\0b",
        "a b",
        "é",
        long.as_str(),
    ] {
        let e = check_repository_name(bad).unwrap_err();
        assert_eq!(e.kind(), Some(ErrorCode::InvalidRequest), "{bad:?}");
    }
}

#[test]
fn device_summaries_decode_with_and_without_capabilities_and_load() {
    #[derive(serde::Serialize)]
    struct Old<'a> {
        name: &'a str,
        kind: &'a str,
        used_bytes: u64,
        models: Vec<String>,
    }
    // A summary from a daemon before capabilities and load: both absent.
    let old = rmp_serde::to_vec_named(&Old {
        name: "cpu",
        kind: "cpu",
        used_bytes: 0,
        models: vec![],
    })
    .unwrap();
    let d: DeviceSummary = rmp_serde::from_slice(&old).unwrap();
    assert_eq!((d.capabilities, d.load, d.cores), (None, None, None));

    let new = DeviceSummary {
        capabilities: Some(Capabilities {
            float16: Support::Absent,
            int8: Support::Native,
        }),
        load: Some(DeviceLoad {
            busy_ratio: 0.5,
            queue_depth: 3,
            ..DeviceLoad::default()
        }),
        cores: Some("0-3".into()),
        ..d
    };
    let bytes = rmp_serde::to_vec_named(&new).unwrap();
    let back: DeviceSummary = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(back, new);
    let json = wire_json(&new);
    assert_eq!(json["capabilities"]["float16"], "absent");
    assert_eq!(json["load"]["queue_depth"], 3);

    // A support value from a newer daemon reads as unknown.
    #[derive(serde::Serialize)]
    struct Newer<'a> {
        float16: &'a str,
        bfloat16: &'a str,
    }
    let c: Capabilities = rmp_serde::from_slice(
        &rmp_serde::to_vec_named(&Newer {
            float16: "partial",
            bfloat16: "native",
        })
        .unwrap(),
    )
    .unwrap();
    assert_eq!(c.float16, Support::Unknown);
    assert_eq!(c.int8, Support::Unknown);
}
