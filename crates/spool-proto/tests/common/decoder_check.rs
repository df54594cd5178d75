//! The properties of the two decoders, checked on one arbitrary input.
//!
//! One copy, two drivers: the cargo-fuzz targets in `fuzz/` include this file
//! with `#[path]`, and `tests/decoder_fuzz_smoke.rs` runs it under proptest on
//! stable Rust. Every check panics on failure, which is what both drivers
//! report.
//!
//! An input is `[size][n][pattern: n bytes][stream…]`:
//! - `size` sets the decoder's limit (max job size / max reply body), kept
//!   small so that oversized bodies are common;
//! - `n` (1 to 8) and the pattern set the chunk sizes in which the stream is
//!   fed, cycling through the pattern: a pattern byte below 128 is a chunk of
//!   1 to 16 bytes, above it a chunk of up to 509, so both byte-at-a-time
//!   feeding and chunks that straddle the 224-byte line window occur;
//! - the rest is the byte stream a peer sends.
//!
//! Properties, for both decoders:
//! - no panic, and every decoded item consumes input (so decoding ends);
//! - bounded memory: the decoder never asks for more input while the caller
//!   holds as much as the bound (request: `max(224, max_job_size + 2)`;
//!   reply: a 224-byte line plus `max_body + 2`), and never wants more than
//!   that (`bytes_wanted`);
//! - the stream fed in one piece and fed in chunks decodes to the same
//!   results, with the same input left over;
//! - every decoded item re-encodes to bytes that decode to the same item.

use bytes::BytesMut;
use spool_proto::limits::LINE_MAX_BYTES;
use spool_proto::{
    encode_request, encode_response, ProtocolError, PutBody, Request, RequestDecoder, Response,
    ResponseDecoder, ResponseError,
};

/// The decoder limit, the chunk sizes, and the stream of an input.
pub fn parse_input(data: &[u8]) -> (u32, Vec<usize>, &[u8]) {
    let limit = u32::from(data.first().copied().unwrap_or(0) % 40);
    let n = 1 + usize::from(data.get(1).copied().unwrap_or(0) % 8);
    let pattern = data.get(2..).unwrap_or_default();
    let pattern = &pattern[..n.min(pattern.len())];
    let chunks: Vec<usize> = if pattern.is_empty() {
        vec![1]
    } else {
        pattern
            .iter()
            .map(|&b| match b {
                0..=127 => 1 + usize::from(b % 16),
                _ => 1 + usize::from(b - 128) * 4,
            })
            .collect()
    };
    let stream = data.get(2 + pattern.len()..).unwrap_or_default();
    (limit, chunks, stream)
}

/// Calls `each` with successive pieces of `stream`, sized by `chunks` in turn,
/// until it returns false; an empty stream is one empty piece.
fn feed(stream: &[u8], chunks: &[usize], mut each: impl FnMut(&[u8]) -> bool) {
    if stream.is_empty() {
        each(&[]);
        return;
    }
    let mut fed = 0;
    // Each round feeds at least one byte.
    for i in 0..stream.len() {
        if fed == stream.len() {
            return;
        }
        let n = chunks[i % chunks.len()].max(1).min(stream.len() - fed);
        if !each(&stream[fed..fed + n]) {
            return;
        }
        fed += n;
    }
}

// ---- requests (server side) -------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
struct RequestRun {
    results: Vec<Result<Request, ProtocolError>>,
    leftover: Vec<u8>,
    idle: bool,
    wanted: usize,
}

pub fn check_request_decoder(data: &[u8]) {
    let (max_job_size, chunks, stream) = parse_input(data);
    let whole = decode_requests(max_job_size, stream, &[stream.len()]);
    let split = decode_requests(max_job_size, stream, &chunks);
    assert_eq!(
        whole, split,
        "request stream decodes differently in one piece and in chunks {chunks:?} \
         (max job size {max_job_size}, stream {stream:?})"
    );
    for request in whole.results.iter().flatten() {
        check_request_round_trip(request, max_job_size);
    }
}

fn decode_requests(max_job_size: u32, stream: &[u8], chunks: &[usize]) -> RequestRun {
    let bound = LINE_MAX_BYTES.max(max_job_size as usize + 2);
    let mut decoder = RequestDecoder::new(max_job_size);
    let mut buf = BytesMut::new();
    let mut results = Vec::new();
    feed(stream, chunks, |piece| {
        buf.extend_from_slice(piece);
        drain_requests(&mut decoder, &mut buf, &mut results, bound);
        true
    });
    RequestRun {
        results,
        leftover: buf.to_vec(),
        idle: decoder.is_idle(),
        wanted: decoder.bytes_wanted(),
    }
}

/// Decodes until the decoder wants more input, checking the memory bound.
fn drain_requests(
    decoder: &mut RequestDecoder,
    buf: &mut BytesMut,
    results: &mut Vec<Result<Request, ProtocolError>>,
    bound: usize,
) {
    // Every request consumes at least one byte (checked below), so at most
    // `buf.len()` requests come out before the decoder wants more.
    for _ in 0..=buf.len() {
        let before = buf.len();
        let Some(result) = decoder.decode(buf) else {
            let wanted = decoder.bytes_wanted();
            assert!(
                buf.len() < bound,
                "decoder wants more input while holding {} bytes (bound {bound})",
                buf.len()
            );
            assert!(
                wanted <= bound,
                "bytes_wanted {wanted} is over the bound {bound}"
            );
            if wanted == 0 {
                assert!(
                    buf.is_empty(),
                    "bytes_wanted is 0 but {} bytes wait",
                    buf.len()
                );
            } else {
                assert!(
                    buf.len() < wanted,
                    "decoder wants more input though it holds {} bytes and bytes_wanted is {wanted}",
                    buf.len()
                );
            }
            return;
        };
        assert!(buf.len() < before, "{result:?} was decoded from no input");
        results.push(result);
    }
    panic!("decoder returned more requests than there were bytes");
}

fn check_request_round_trip(request: &Request, max_job_size: u32) {
    // Too-big, missing-CRLF and trailing-bytes puts are server-side outcomes
    // with no wire form of their own.
    if let Request::Put(put) = request {
        if !matches!(put.body, PutBody::Complete(_)) {
            return;
        }
    }
    let mut wire = Vec::new();
    encode_request(request, &mut wire);
    let mut buf = BytesMut::from(&wire[..]);
    let mut decoder = RequestDecoder::new(max_job_size);
    assert_eq!(
        decoder.decode(&mut buf),
        Some(Ok(request.clone())),
        "{request:?} encodes as {wire:?}, which decodes to something else"
    );
    assert!(buf.is_empty(), "{wire:?} decodes with {buf:?} left over");
}

// ---- replies (client side) ----------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
struct ResponseRun {
    responses: Vec<Response>,
    error: Option<ResponseError>,
    leftover: Vec<u8>,
}

pub fn check_response_decoder(data: &[u8]) {
    let (max_body, chunks, stream) = parse_input(data);
    let whole = decode_responses(max_body, stream, &[stream.len()]);
    let split = decode_responses(max_body, stream, &chunks);
    // After an error the client closes the connection, so what is left in
    // the buffer then is of no interest.
    let comparable = |run: &ResponseRun| (run.responses.clone(), run.error.clone());
    assert_eq!(
        comparable(&whole),
        comparable(&split),
        "reply stream decodes differently in one piece and in chunks {chunks:?} \
         (max body {max_body}, stream {stream:?})"
    );
    if whole.error.is_none() {
        assert_eq!(whole.leftover, split.leftover, "different input left over");
    }
    for response in &whole.responses {
        check_response_round_trip(response, max_body);
    }
}

fn decode_responses(max_body: u32, stream: &[u8], chunks: &[usize]) -> ResponseRun {
    // A reply line (at most 224 bytes with its CRLF), then a body and its CRLF.
    let bound = LINE_MAX_BYTES + max_body as usize + 2;
    let mut decoder = ResponseDecoder::new(u64::from(max_body));
    let mut buf = BytesMut::new();
    let mut responses = Vec::new();
    let mut error = None;
    feed(stream, chunks, |piece| {
        buf.extend_from_slice(piece);
        // Every reply consumes at least one byte (checked below).
        for _ in 0..=buf.len() {
            let before = buf.clone();
            match decoder.decode(&mut buf) {
                Ok(Some(response)) => {
                    assert!(
                        buf.len() < before.len(),
                        "{response:?} was decoded from no input"
                    );
                    responses.push(response);
                }
                Ok(None) => {
                    assert_eq!(buf, before, "Ok(None) consumed input");
                    assert!(
                        buf.len() < bound,
                        "reply decoder wants more input while holding {} bytes (bound {bound})",
                        buf.len()
                    );
                    return true;
                }
                Err(e) => {
                    error = Some(e);
                    return false;
                }
            }
        }
        panic!("reply decoder returned more replies than there were bytes");
    });
    ResponseRun {
        responses,
        error,
        leftover: buf.to_vec(),
    }
}

fn check_response_round_trip(response: &Response, max_body: u32) {
    let mut wire = Vec::new();
    encode_response(response, &mut wire);
    let mut buf = BytesMut::from(&wire[..]);
    let mut decoder = ResponseDecoder::new(u64::from(max_body));
    assert_eq!(
        decoder.decode(&mut buf),
        Ok(Some(response.clone())),
        "{response:?} encodes as {wire:?}, which decodes to something else"
    );
    assert!(buf.is_empty(), "{wire:?} decodes with {buf:?} left over");
}
