use super::*;

fn msg(n: u8, key: &[u8], payload: &[u8]) -> InMessage {
    InMessage {
        id: [n; 16],
        event_time: -1_700_000_000_000 + i64::from(n),
        key: key.to_vec(),
        payload: payload.to_vec(),
    }
}

/// One frame of every kind, with empty and non-empty lists, non-ASCII text and
/// extreme numbers.
fn samples() -> Vec<Frame> {
    vec![
        Frame::MapRequest {
            batch: 0,
            messages: vec![],
        },
        Frame::MapRequest {
            batch: u64::MAX,
            messages: vec![
                msg(1, b"k", b"hello"),
                msg(2, b"", b""),
                msg(3, b"\0\xff", &[7; 300]),
            ],
        },
        Frame::MapResponse {
            batch: 7,
            results: vec![
                vec![],
                vec![Output::new("a").key("k").tags(["x", "ünï"])],
                vec![
                    Output::new(""),
                    Output::new(vec![0u8; 5]).tags(Vec::<String>::new()),
                ],
            ],
        },
        Frame::SinkRequest {
            batch: 9,
            messages: vec![msg(4, b"key", b"body")],
        },
        Frame::SinkResponse {
            batch: 9,
            statuses: vec![
                Ok(()),
                Err("disk full: ünï".into()),
                Err(String::new()),
                Ok(()),
            ],
        },
        Frame::ReadRequest {
            batch: 3,
            max: 500,
            wait_ms: u32::MAX,
        },
        Frame::ReadResponse {
            batch: 3,
            messages: vec![
                SourceMessage::new(vec![], "p").event_time(i64::MIN),
                SourceMessage::new(42u64.to_le_bytes(), "q")
                    .key("k")
                    .event_time(i64::MAX),
            ],
        },
        Frame::ReadResponse {
            batch: 4,
            messages: vec![],
        },
        Frame::AckRequest { batch: 3 },
        Frame::AckResponse { batch: 3 },
        Frame::Error {
            message: "cannot reach the database".into(),
        },
        Frame::Error {
            message: String::new(),
        },
    ]
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    encode(frame, &mut out).unwrap();
    out
}

#[test]
fn every_kind_round_trips_through_the_buffer_and_the_io_helpers() {
    for frame in samples() {
        let bytes = encoded(&frame);
        assert_eq!(
            u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize,
            bytes.len() - 4
        );
        assert_eq!(bytes[4], frame.kind() as u8);
        let (back, used) = decode(&bytes).unwrap().unwrap();
        assert_eq!((back, used), (frame.clone(), bytes.len()));

        let mut wire = Vec::new();
        let mut scratch = Vec::new();
        write_frame(&mut wire, &frame, &mut scratch).unwrap();
        assert_eq!(wire, bytes);
        let mut r = &wire[..];
        assert_eq!(read_frame(&mut r, &mut scratch).unwrap(), Some(frame));
        assert_eq!(read_frame(&mut r, &mut scratch).unwrap(), None, "clean end");
    }
}

#[test]
fn a_partial_frame_decodes_to_none_and_frames_decode_back_to_back() {
    let frames = samples();
    let mut all = Vec::new();
    for f in &frames {
        encode(f, &mut all).unwrap();
    }
    let first = encoded(&frames[1]);
    for cut in 0..first.len() {
        assert_eq!(decode(&first[..cut]).unwrap(), None, "cut at {cut}");
    }
    let mut pos = 0;
    let mut back = Vec::new();
    while let Some((f, used)) = decode(&all[pos..]).unwrap() {
        back.push(f);
        pos += used;
    }
    assert_eq!((back, pos), (frames, all.len()));
}

#[test]
fn the_io_helper_names_a_connection_closed_inside_a_frame() {
    let bytes = encoded(&samples()[1]);
    let mut scratch = Vec::new();
    for cut in [2, 4, 10, bytes.len() - 1] {
        let err = read_frame(&mut &bytes[..cut], &mut scratch).unwrap_err();
        assert!(
            matches!(&err, FrameIoError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof),
            "cut at {cut}: {err}"
        );
        assert!(err.to_string().contains("closed inside a frame"), "{err}");
    }
}

/// A frame from its kind and body, with a correct length prefix.
fn raw(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = ((body.len() + 1) as u32).to_le_bytes().to_vec();
    v.push(kind);
    v.extend_from_slice(body);
    v
}

fn le32(n: u32) -> [u8; 4] {
    n.to_le_bytes()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn malformed_frames_give_their_specific_error() {
    let batch = 5u64.to_le_bytes();
    // A MapResponse's head up to its one output's tag count: one message, one output,
    // an empty key.
    let output_head = cat(&[&batch, &le32(1), &le32(1), &le32(0)]);
    let one_msg_head = cat(&[&batch, &le32(1), &[9; 16], &0i64.to_le_bytes()]);
    type Check = fn(&ProtoError) -> bool;
    let cases: Vec<(&str, Vec<u8>, Check, &str)> = vec![
        (
            "empty frame",
            le32(0).to_vec(),
            |e| matches!(e, ProtoError::EmptyFrame),
            "length 0",
        ),
        (
            "over the limit",
            le32(MAX_FRAME as u32 + 1).to_vec(),
            |e| matches!(e, ProtoError::FrameTooLong { len } if *len == MAX_FRAME as u64 + 1),
            "over the limit",
        ),
        (
            "largest length",
            le32(u32::MAX).to_vec(),
            |e| matches!(e, ProtoError::FrameTooLong { .. }),
            "4294967295",
        ),
        (
            "kind 0",
            raw(0, &[]),
            |e| matches!(e, ProtoError::UnknownKind(0)),
            "unknown frame kind 0",
        ),
        (
            "kind 200",
            raw(200, &batch),
            |e| matches!(e, ProtoError::UnknownKind(200)),
            "kinds 1 to 9",
        ),
        (
            "short batch id",
            raw(1, &[1, 2, 3]),
            |e| matches!(e, ProtoError::Truncated { kind: Kind::MapRequest, field, need: 8, left: 3 } if field.name == "batch id"),
            "MapRequest frame: batch id needs 8 bytes but only 3 remain",
        ),
        (
            "count past the frame",
            raw(1, &cat(&[&batch, &le32(1000), &[0; 40]])),
            |e| {
                matches!(
                    e,
                    ProtoError::CountTooLarge {
                        count: 1000,
                        min_each: 32,
                        left: 40,
                        ..
                    }
                )
            },
            "count is 1000, which cannot fit",
        ),
        (
            "count of u32::MAX",
            raw(3, &cat(&[&batch, &le32(u32::MAX)])),
            |e| {
                matches!(
                    e,
                    ProtoError::CountTooLarge {
                        kind: Kind::SinkRequest,
                        ..
                    }
                )
            },
            "SinkRequest frame",
        ),
        (
            "key past the end",
            raw(1, &cat(&[&one_msg_head, &le32(100), b"abc", &[0; 4]])),
            |e| matches!(e, ProtoError::Truncated { field, need: 100, .. } if field.name == "key" && field.message == Some(0)),
            "message 0, key needs 100 bytes",
        ),
        (
            "payload length missing",
            raw(1, &cat(&[&one_msg_head, &le32(4), b"abcd", &[0; 2]])),
            |e| matches!(e, ProtoError::Truncated { field, need: 4, left: 2, .. } if field.name == "payload"),
            "payload needs 4 bytes",
        ),
        (
            "trailing bytes",
            raw(7, &cat(&[&batch, b"xy"])),
            |e| {
                matches!(
                    e,
                    ProtoError::TrailingBytes {
                        kind: Kind::AckRequest,
                        extra: 2
                    }
                )
            },
            "2 bytes left over",
        ),
        (
            "read request with a byte too many",
            raw(5, &cat(&[&batch, &le32(1), &le32(2), &[0]])),
            |e| {
                matches!(
                    e,
                    ProtoError::TrailingBytes {
                        kind: Kind::ReadRequest,
                        extra: 1
                    }
                )
            },
            "ReadRequest frame: 1 bytes left over",
        ),
        (
            "tag not UTF-8",
            raw(
                2,
                &cat(&[
                    &output_head,
                    &1u16.to_le_bytes(),
                    &le32(2),
                    &[0xff, 0xfe],
                    &le32(0),
                ]),
            ),
            |e| matches!(e, ProtoError::NotUtf8 { field, .. } if field.name == "tag" && field.output == Some(0)),
            "message 0, output 0, tag is not valid UTF-8",
        ),
        (
            "tag count past the frame",
            raw(2, &cat(&[&output_head, &u16::MAX.to_le_bytes(), &[0; 8]])),
            |e| {
                matches!(
                    e,
                    ProtoError::CountTooLarge {
                        count: 65535,
                        min_each: 4,
                        ..
                    }
                )
            },
            "tag count is 65535",
        ),
        (
            "output count past the frame",
            raw(2, &cat(&[&batch, &le32(1), &le32(7), &[0; 10]])),
            |e| {
                matches!(
                    e,
                    ProtoError::CountTooLarge {
                        count: 7,
                        min_each: 10,
                        ..
                    }
                )
            },
            "output count is 7",
        ),
        (
            "bad sink status",
            raw(4, &cat(&[&batch, &le32(2), &[0, 2]])),
            |e| matches!(e, ProtoError::BadStatus { value: 2, field, .. } if field.message == Some(1)),
            "message 1, status is 2; expected 0 (ok) or 1 (failed)",
        ),
        (
            "sink error text missing",
            raw(4, &cat(&[&batch, &le32(1), &[1]])),
            |e| matches!(e, ProtoError::Truncated { field, .. } if field.name == "error"),
            "error needs 4 bytes",
        ),
        (
            "error frame not UTF-8",
            raw(9, &cat(&[&le32(1), &[0xc3]])),
            |e| {
                matches!(
                    e,
                    ProtoError::NotUtf8 {
                        kind: Kind::Error,
                        ..
                    }
                )
            },
            "Error frame: message is not valid UTF-8",
        ),
        (
            "read response id past the end",
            raw(6, &cat(&[&batch, &le32(1), &le32(u32::MAX), &[0; 16]])),
            |e| {
                matches!(
                    e,
                    ProtoError::Truncated {
                        kind: Kind::ReadResponse,
                        need: 4294967295,
                        ..
                    }
                )
            },
            "message 0, id needs 4294967295 bytes",
        ),
    ];
    for (name, bytes, check, text) in cases {
        let err = decode(&bytes).expect_err(name);
        assert!(check(&err), "{name}: got {err:?}");
        assert!(
            err.to_string().contains(text),
            "{name}: {err} lacks {text:?}"
        );
        // The io helper reports the same error.
        let mut scratch = Vec::new();
        match read_frame(&mut &bytes[..], &mut scratch) {
            Err(FrameIoError::Proto(e)) => assert_eq!(e, err, "{name}"),
            other => panic!("{name}: read_frame gave {other:?}"),
        }
    }
}

/// xorshift64*: deterministic, dependency-free randomness for the fuzz tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Whatever decodes must encode back to the same bytes, so the codec has one meaning
/// for every byte string it accepts.
fn check_decodes_sanely(bytes: &[u8]) {
    if let Ok(Some((frame, used))) = decode(bytes) {
        assert_eq!(encoded(&frame), bytes[..used], "{frame:?}");
    }
}

#[test]
fn random_bytes_and_mutated_frames_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..20_000 {
        let len = rng.below(64);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Give most a plausible prefix and kind so the body parsers get exercised.
        if len >= 5 && rng.below(4) != 0 {
            bytes[..4].copy_from_slice(&((len - 4) as u32).to_le_bytes());
            bytes[4] = 1 + rng.below(9) as u8;
        }
        check_decodes_sanely(&bytes);
    }
    let frames: Vec<Vec<u8>> = samples().iter().map(encoded).collect();
    for _ in 0..20_000 {
        let mut bytes = frames[rng.below(frames.len())].clone();
        for _ in 0..1 + rng.below(3) {
            let i = 4 + rng.below(bytes.len() - 4);
            bytes[i] = rng.next() as u8;
        }
        if rng.below(4) == 0 {
            bytes.truncate(4 + rng.below(bytes.len() - 4));
            let body = (bytes.len() - 4) as u32;
            bytes[..4].copy_from_slice(&body.to_le_bytes());
        }
        check_decodes_sanely(&bytes);
    }
}

#[test]
fn encoding_refuses_what_the_format_cannot_carry_and_leaves_the_buffer_as_it_was() {
    let too_many_tags = Frame::MapResponse {
        batch: 1,
        results: vec![vec![Output::new("x").tags(vec![String::new(); 70_000])]],
    };
    let huge = Frame::SinkRequest {
        batch: 1,
        messages: vec![InMessage {
            payload: vec![0; MAX_FRAME],
            ..InMessage::default()
        }],
    };
    let mut out = b"kept".to_vec();
    let err = encode(&too_many_tags, &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            ProtoError::TooMany {
                len: 70_000,
                max: 65535,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("message 0, output 0, tag count"),
        "{err}"
    );
    let err = encode(&huge, &mut out).unwrap_err();
    assert!(matches!(err, ProtoError::FrameTooLong { .. }), "{err:?}");
    assert_eq!(out, b"kept");
}

#[test]
fn outstanding_requests_check_each_response() {
    let map = |batch, n| Frame::MapRequest {
        batch,
        messages: vec![InMessage::default(); n],
    };
    let map_resp = |batch, n| Frame::MapResponse {
        batch,
        results: vec![vec![]; n],
    };
    let mut o = Outstanding::new(3);
    o.sent(&map(1, 2)).unwrap();
    o.sent(&Frame::ReadRequest {
        batch: 2,
        max: 2,
        wait_ms: 0,
    })
    .unwrap();
    assert_eq!(
        o.sent(&map(1, 1)),
        Err(ProtoError::DuplicateBatch {
            kind: Kind::MapRequest,
            batch: 1
        })
    );
    o.sent(&Frame::AckRequest { batch: 1 }).unwrap();
    assert_eq!(
        o.sent(&map(9, 1)),
        Err(ProtoError::TooManyOutstanding { limit: 3 })
    );
    let err = o.received(&map_resp(1, 3)).unwrap_err();
    assert_eq!(
        err,
        ProtoError::CountMismatch {
            kind: Kind::MapResponse,
            batch: 1,
            expected: 2,
            got: 3
        }
    );
    assert!(
        err.to_string()
            .contains("answers 3 messages; its request carried 2"),
        "{err}"
    );
    let err = o.received(&map_resp(2, 0)).unwrap_err();
    assert!(err.to_string().contains("expected a ReadResponse"), "{err}");
    assert_eq!(
        o.received(&map_resp(8, 0)),
        Err(ProtoError::UnknownBatch {
            kind: Kind::MapResponse,
            batch: 8
        })
    );
    let over = Frame::ReadResponse {
        batch: 2,
        messages: vec![SourceMessage::default(); 3],
    };
    assert!(matches!(
        o.received(&over),
        Err(ProtoError::OverRead { max: 2, got: 3, .. })
    ));
    assert_eq!(
        o.received(&map(1, 0)),
        Err(ProtoError::NotAResponse {
            kind: Kind::MapRequest
        })
    );
    assert_eq!(
        o.sent(&Frame::Error {
            message: String::new()
        }),
        Err(ProtoError::NotARequest { kind: Kind::Error })
    );
    // The right answers clear their requests, once.
    o.received(&map_resp(1, 2)).unwrap();
    o.received(&Frame::ReadResponse {
        batch: 2,
        messages: vec![],
    })
    .unwrap();
    o.received(&Frame::AckResponse { batch: 1 }).unwrap();
    assert!(o.is_empty());
    assert!(o.received(&Frame::AckResponse { batch: 1 }).is_err());
    assert!(o.received(&map_resp(1, 2)).is_err());
}

/// Each line is refused by `parse` with an error containing its text.
fn refuses(parse: impl Fn(&[u8]) -> Result<(), ProtoError>, cases: &[(&[u8], &str)]) {
    for (line, text) in cases {
        let err = parse(line).unwrap_err().to_string();
        assert!(err.contains(text), "{line:?}: {err}");
    }
}

#[test]
fn handshake_lines_round_trip_and_bad_ones_say_what_was_expected() {
    let hello = Hello {
        version: VERSION,
        role: Role::Map,
    };
    assert_eq!(
        hello.to_line(),
        b"{\"op\":\"data\",\"version\":1,\"role\":\"map\"}\n"
    );
    assert_eq!(Hello::parse(&hello.to_line()), Ok(hello));
    refuses(
        |l| Hello::parse(l).map(drop),
        &[
            (
                &b"{\"op\":\"config\",\"version\":1,\"role\":\"map\"}"[..],
                "expected \"data\"",
            ),
            (
                b"{\"op\":\"data\",\"version\":1,\"role\":\"reduce\"}",
                "role",
            ),
            (b"{\"op\":\"data\",\"role\":\"map\"}", "version"),
            (b"not json", "expected {\"op\":\"data\""),
        ],
    );
    for reply in [
        HelloReply::Ok {
            version: 1,
            max_batch: 500,
        },
        HelloReply::Refused {
            error: "no pipeline here".into(),
        },
    ] {
        assert_eq!(HelloReply::parse(&reply.to_line()), Ok(reply));
    }
    assert_eq!(
        HelloReply::parse(b"{\"ok\":true,\"version\":1,\"max_batch\":8,\"later\":[1]}"),
        Ok(HelloReply::Ok {
            version: 1,
            max_batch: 8
        }),
        "unknown fields are ignored"
    );
    refuses(
        |l| HelloReply::parse(l).map(drop),
        &[
            (&b"{\"ok\":true,\"version\":1}"[..], "no max_batch"),
            (
                b"{\"ok\":true,\"version\":1,\"max_batch\":0}",
                "max_batch 0",
            ),
            (
                b"{\"ok\":true,\"version\":-1,\"max_batch\":5}",
                "no version",
            ),
            (b"{\"version\":1}", "no boolean \"ok\""),
            (b"\x00garbage", "not JSON"),
        ],
    );
}
