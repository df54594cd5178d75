//! The decoder fuzz targets' checks (`fuzz/fuzz_targets/*.rs`), run on stable
//! Rust over proptest-generated inputs, so every `cargo test` exercises them
//! even where cargo-fuzz (which needs nightly) cannot run.
//!
//! Uniformly random bytes almost never form a command, so inputs are built
//! from protocol fragments (command words, numbers, CRLFs, lone CRs, long
//! runs, well-formed commands and replies) mixed with raw bytes; the input
//! layout is described in `common/decoder_check.rs`.

#[path = "common/decoder_check.rs"]
mod decoder_check;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use spool_proto::{encode_request, encode_response, Put, PutBody, Request, Response, TubeName};

const REQUEST_WORDS: &[&str] = &[
    "put ",
    "peek ",
    "peek-ready",
    "peek-delayed",
    "peek-buried",
    "reserve-with-timeout ",
    "reserve-job ",
    "reserve",
    "delete ",
    "release ",
    "bury ",
    "kick ",
    "kick-job ",
    "touch ",
    "stats-job ",
    "stats-tube ",
    "stats",
    "use ",
    "watch ",
    "ignore ",
    "list-tubes-watched",
    "list-tube-used",
    "list-tubes",
    "quit",
    "pause-tube ",
    "default",
    "-",
    "+",
    "\t",
];

const RESPONSE_WORDS: &[&str] = &[
    "RESERVED ",
    "FOUND ",
    "OK ",
    "INSERTED ",
    "BURIED ",
    "BURIED",
    "USING ",
    "WATCHING ",
    "KICKED ",
    "KICKED",
    "EXPECTED_CRLF",
    "JOB_TOO_BIG",
    "DRAINING",
    "DEADLINE_SOON",
    "TIMED_OUT",
    "DELETED",
    "NOT_FOUND",
    "RELEASED",
    "TOUCHED",
    "NOT_IGNORED",
    "PAUSED",
    "BAD_FORMAT",
    "UNKNOWN_COMMAND",
    "default",
    "+",
    "-",
];

/// Pieces common to both directions.
fn common_fragment() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => Just(b"\r\n".to_vec()),
        2 => Just(b" ".to_vec()),
        1 => Just(b"\r".to_vec()),
        1 => Just(b"\n".to_vec()),
        1 => Just(vec![0u8]),
        4 => (0u64..300).prop_map(|n| n.to_string().into_bytes()),
        1 => any::<u64>().prop_map(|n| n.to_string().into_bytes()),
        1 => Just(b"18446744073709551616".to_vec()),
        1 => Just(b"4294967296".to_vec()),
        2 => proptest::collection::vec(any::<u8>(), 0..8),
        // Runs long enough to cross the 224-byte line window.
        1 => (any::<u8>(), 0usize..500).prop_map(|(b, n)| vec![b; n]),
        1 => (0usize..300).prop_map(|n| vec![b'0'; n]),
    ]
    .boxed()
}

fn request_fragment() -> impl Strategy<Value = Vec<u8>> {
    let put = (
        0u32..3,
        0u32..3,
        0u32..3,
        proptest::collection::vec(any::<u8>(), 0..50),
    )
        .prop_map(|(pri, delay_secs, ttr_secs, body)| {
            let mut wire = Vec::new();
            let request = Request::Put(Put {
                pri,
                delay_secs,
                ttr_secs,
                body: PutBody::Complete(Bytes::from(body)),
            });
            encode_request(&request, &mut wire);
            wire
        });
    // A header whose announced length disagrees with what follows.
    let put_header = (0u32..60).prop_map(|n| format!("put 1 2 3 {n}\r\n").into_bytes());
    prop_oneof![
        6 => proptest::sample::select(REQUEST_WORDS).prop_map(|w| w.as_bytes().to_vec()),
        8 => common_fragment(),
        2 => put,
        2 => put_header,
        1 => Just(encoded_request(&Request::ReserveWithTimeout { timeout_secs: None })),
        1 => Just(encoded_request(&Request::PauseTube {
            tube: TubeName::default_tube(),
            delay_secs: 1,
        })),
    ]
}

fn encoded_request(request: &Request) -> Vec<u8> {
    let mut wire = Vec::new();
    encode_request(request, &mut wire);
    wire
}

fn response_fragment() -> impl Strategy<Value = Vec<u8>> {
    let with_body = (
        0u64..3,
        proptest::collection::vec(any::<u8>(), 0..50),
        0u8..3,
    )
        .prop_map(|(id, body, kind)| {
            let body = Bytes::from(body);
            let response = match kind {
                0 => Response::Reserved { id, body },
                1 => Response::Found { id, body },
                _ => Response::Ok(body),
            };
            let mut wire = Vec::new();
            encode_response(&response, &mut wire);
            wire
        });
    let simple = (0u64..1000, 0u8..4).prop_map(|(n, kind)| {
        let response = match kind {
            0 => Response::Inserted(n),
            1 => Response::Watching(n as usize),
            2 => Response::Kicked(n as u32),
            _ => Response::Using(TubeName::default_tube()),
        };
        let mut wire = Vec::new();
        encode_response(&response, &mut wire);
        wire
    });
    // Whole replies dominate: one malformed line ends a client's stream.
    let line =
        proptest::sample::select(RESPONSE_WORDS).prop_map(|w| format!("{w}\r\n").into_bytes());
    prop_oneof![
        3 => proptest::sample::select(RESPONSE_WORDS).prop_map(|w| w.as_bytes().to_vec()),
        4 => common_fragment(),
        6 => with_body,
        6 => simple,
        6 => line,
    ]
}

/// `[size][n][8 pattern bytes]` then the fragments; `parse_input` uses only
/// the first n pattern bytes, so the unused ones are dropped here.
fn input(fragment: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u8>(),
        any::<u8>(),
        proptest::array::uniform8(any::<u8>()),
        proptest::collection::vec(fragment, 0..40),
    )
        .prop_map(|(size, n, pattern, fragments)| {
            let used = 1 + usize::from(n % 8);
            let mut data = vec![size, n];
            data.extend_from_slice(&pattern[..used]);
            data.extend(fragments.concat());
            data
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn request_decoder_properties(data in input(request_fragment())) {
        decoder_check::check_request_decoder(&data);
    }

    #[test]
    fn response_decoder_properties(data in input(response_fragment())) {
        decoder_check::check_response_decoder(&data);
    }

    /// Raw bytes as the fuzzer starts from.
    #[test]
    fn decoders_survive_raw_bytes(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        decoder_check::check_request_decoder(&data);
        decoder_check::check_response_decoder(&data);
    }
}

/// A reply line longer than 224 bytes is `LineTooLong` whether it arrives
/// in one read or byte by byte (it once decoded when whole).
#[test]
fn response_decoder_rejects_long_lines_however_they_arrive() {
    use bytes::BytesMut;
    use spool_proto::{ResponseDecoder, ResponseError};

    let mut wire = b"OK ".to_vec();
    wire.extend(std::iter::repeat_n(b'0', 300));
    wire.extend_from_slice(b"1\r\nx\r\n");

    let mut buf = BytesMut::from(&wire[..]);
    let whole = ResponseDecoder::new(10).decode(&mut buf);

    let mut decoder = ResponseDecoder::new(10);
    let mut buf = BytesMut::new();
    let mut split = Ok(None);
    for &b in &wire {
        buf.extend_from_slice(&[b]);
        split = decoder.decode(&mut buf);
        if split != Ok(None) {
            break;
        }
    }

    assert_eq!(split, Err(ResponseError::LineTooLong));
    assert_eq!(
        whole, split,
        "the same bytes decode differently in one read"
    );
}
