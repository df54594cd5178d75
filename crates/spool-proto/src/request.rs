//! Requests: the typed commands of the beanstalkd protocol, the bounded
//! server-side decoder that turns bytes into them, and the client-side
//! encoder.
//!
//! The decoder reproduces beanstalkd 1.12's parser exactly, quirks included,
//! because clients and their test suites depend on the precise error each
//! malformed line gets:
//! - a command is found by prefix (`quitx` quits, `statsx` is `BAD_FORMAT`);
//! - integers follow C's `strtoul`/`strtol` rules where beanstalkd uses them
//!   (`kick 1x` kicks one job) and its stricter `read_u32`/`read_u64`
//!   elsewhere (`delete 1x` is `BAD_FORMAT`);
//! - a line is complete at the first `\r` only if `\n` follows it;
//! - a line that is not complete within 224 bytes is discarded up to its
//!   end, in 224-byte windows, and only then answered `BAD_FORMAT` (so a
//!   client that never ends the line gets no answer, and memory stays at one
//!   window).

use bytes::{Buf, Bytes, BytesMut};

use crate::limits::LINE_MAX_BYTES;
use crate::name::{is_name_byte, TubeName};

/// One command of the beanstalkd protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Put(Put),
    Use(TubeName),
    Reserve,
    /// `timeout_secs: None` is a negative timeout, which waits forever.
    ReserveWithTimeout {
        timeout_secs: Option<u32>,
    },
    ReserveJob(u64),
    Delete(u64),
    Release {
        id: u64,
        pri: u32,
        delay_secs: u32,
    },
    Bury {
        id: u64,
        pri: u32,
    },
    Touch(u64),
    Watch(TubeName),
    Ignore(TubeName),
    Peek(u64),
    PeekReady,
    PeekDelayed,
    PeekBuried,
    Kick {
        bound: u32,
    },
    KickJob(u64),
    StatsJob(u64),
    StatsTube(TubeName),
    Stats,
    ListTubes,
    ListTubeUsed,
    ListTubesWatched,
    PauseTube {
        tube: TubeName,
        delay_secs: u32,
    },
    Quit,
}

/// A `put` command with its body, or what went wrong with the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub pri: u32,
    pub delay_secs: u32,
    pub ttr_secs: u32,
    pub body: PutBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutBody {
    Complete(Bytes),
    /// Larger than the maximum job size; the body was read and discarded.
    TooBig,
    /// The announced number of bytes was not followed by `\r\n`.
    MissingCrlf,
    /// Bytes followed the size on the command line. beanstalkd answers
    /// `BAD_FORMAT` but, having parsed the size, counts it as a put; the
    /// bytes after the line are read as the next command.
    TrailingBytes,
}

/// A line the decoder could not turn into a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    BadFormat,
    UnknownCommand,
}

#[derive(Debug)]
enum State {
    Line,
    /// Inside a line that was too long: dropping it up to its end.
    DiscardLine,
    Body {
        pri: u32,
        delay_secs: u32,
        ttr_secs: u32,
        len: usize,
    },
    Skip {
        remaining: u64,
        pri: u32,
        delay_secs: u32,
        ttr_secs: u32,
    },
}

/// Turns a connection's byte stream into requests. Sans-IO: the caller feeds
/// it a buffer and it consumes what it decodes.
///
/// Memory stays bounded: it never asks the caller to hold more than one line
/// (224 bytes) or one job body (`max_job_size + 2` bytes); an oversized body
/// is counted off as it streams past, never stored.
#[derive(Debug)]
pub struct RequestDecoder {
    max_job_size: u32,
    state: State,
}

impl RequestDecoder {
    pub fn new(max_job_size: u32) -> RequestDecoder {
        RequestDecoder {
            max_job_size,
            state: State::Line,
        }
    }

    /// How many bytes the caller should have buffered before calling
    /// `decode` again for it to make progress (a hint for sizing reads).
    pub fn bytes_wanted(&self) -> usize {
        match self.state {
            State::Line | State::DiscardLine => LINE_MAX_BYTES,
            State::Body { len, .. } => len + 2,
            State::Skip { .. } => 0,
        }
    }

    /// True while the decoder is between requests: nothing half-read.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Line)
    }

    /// Decodes the next request from `buf`, consuming its bytes. `None` means
    /// more input is needed (bytes of an oversized body may still have been
    /// consumed).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Result<Request, ProtocolError>> {
        loop {
            match self.state {
                State::Line => return self.decode_line(buf),
                State::DiscardLine => {
                    let window = &buf[..buf.len().min(LINE_MAX_BYTES)];
                    if let Some(line_len) = scan_line_end(window) {
                        buf.advance(line_len);
                        self.state = State::Line;
                        return Some(Err(ProtocolError::BadFormat));
                    }
                    if buf.len() < LINE_MAX_BYTES {
                        return None;
                    }
                    buf.advance(LINE_MAX_BYTES);
                }
                State::Body {
                    pri,
                    delay_secs,
                    ttr_secs,
                    len,
                } => {
                    if buf.len() < len + 2 {
                        return None;
                    }
                    let body = if &buf[len..len + 2] == b"\r\n" {
                        // Copy so a queued job never pins the whole read buffer.
                        PutBody::Complete(Bytes::copy_from_slice(&buf[..len]))
                    } else {
                        PutBody::MissingCrlf
                    };
                    buf.advance(len + 2);
                    self.state = State::Line;
                    return Some(Ok(Request::Put(Put {
                        pri,
                        delay_secs,
                        ttr_secs,
                        body,
                    })));
                }
                State::Skip {
                    remaining,
                    pri,
                    delay_secs,
                    ttr_secs,
                } => {
                    let n = remaining.min(buf.len() as u64);
                    buf.advance(n as usize);
                    if n < remaining {
                        self.state = State::Skip {
                            remaining: remaining - n,
                            pri,
                            delay_secs,
                            ttr_secs,
                        };
                        return None;
                    }
                    self.state = State::Line;
                    return Some(Ok(Request::Put(Put {
                        pri,
                        delay_secs,
                        ttr_secs,
                        body: PutBody::TooBig,
                    })));
                }
            }
        }
    }

    fn decode_line(&mut self, buf: &mut BytesMut) -> Option<Result<Request, ProtocolError>> {
        let window = &buf[..buf.len().min(LINE_MAX_BYTES)];
        if let Some(line_len) = scan_line_end(window) {
            let line = &buf[..line_len - 2];
            let parsed = if line.contains(&0) {
                Err(ProtocolError::BadFormat)
            } else {
                self.parse_line(line)
            };
            // Advancing rather than splitting keeps the caller's buffer
            // unshared, so it can be reused without reallocating.
            buf.advance(line_len);
            return match parsed {
                Ok(Parsed::Done(request)) => Some(Ok(request)),
                Ok(Parsed::PutHeader {
                    pri,
                    delay_secs,
                    ttr_secs,
                    len,
                }) => {
                    if len > self.max_job_size {
                        self.state = State::Skip {
                            remaining: u64::from(len) + 2,
                            pri,
                            delay_secs,
                            ttr_secs,
                        };
                    } else {
                        self.state = State::Body {
                            pri,
                            delay_secs,
                            ttr_secs,
                            len: len as usize,
                        };
                    }
                    self.decode(buf)
                }
                Err(e) => Some(Err(e)),
            };
        }
        if buf.len() >= LINE_MAX_BYTES {
            buf.advance(LINE_MAX_BYTES);
            self.state = State::DiscardLine;
            return self.decode(buf);
        }
        None
    }

    fn parse_line(&self, line: &[u8]) -> Result<Parsed, ProtocolError> {
        use ProtocolError::{BadFormat, UnknownCommand};
        let done = |r| Ok(Parsed::Done(r));
        // Exactly the keyword, nothing after it.
        let bare = |keyword: &[u8], r: Request| {
            if line.len() == keyword.len() {
                Ok(Parsed::Done(r))
            } else {
                Err(BadFormat)
            }
        };
        let Some(command) = COMMANDS.iter().find(|c| line.starts_with(c.0)) else {
            return Err(UnknownCommand);
        };
        let (keyword, op) = *command;
        let args = &line[keyword.len()..];
        match op {
            Op::Put => {
                let (pri, rest) = read_u32(args)?;
                let (delay_secs, rest) = read_u32(rest)?;
                let (ttr_secs, rest) = read_u32(rest)?;
                let (len, rest) = read_u32(rest)?;
                // beanstalkd checks the size before the bytes after it.
                if len <= self.max_job_size && !rest.is_empty() {
                    return done(Request::Put(Put {
                        pri,
                        delay_secs,
                        ttr_secs,
                        body: PutBody::TrailingBytes,
                    }));
                }
                Ok(Parsed::PutHeader {
                    pri,
                    delay_secs,
                    ttr_secs,
                    len,
                })
            }
            Op::Peek => done(Request::Peek(read_u64_end(args)?)),
            Op::PeekReady => bare(keyword, Request::PeekReady),
            Op::PeekDelayed => bare(keyword, Request::PeekDelayed),
            Op::PeekBuried => bare(keyword, Request::PeekBuried),
            Op::ReserveWithTimeout => {
                let timeout = strtol(args)?;
                // beanstalkd keeps the timeout in a C `int`.
                let timeout = timeout as i32;
                done(Request::ReserveWithTimeout {
                    timeout_secs: u32::try_from(timeout).ok(),
                })
            }
            Op::ReserveJob => done(Request::ReserveJob(read_u64_end(args)?)),
            Op::Reserve => bare(keyword, Request::Reserve),
            Op::Delete => done(Request::Delete(read_u64_end(args)?)),
            Op::Release => {
                let (id, rest) = read_u64(args)?;
                let (pri, rest) = read_u32(rest)?;
                let delay_secs = read_u32_end(rest)?;
                done(Request::Release {
                    id,
                    pri,
                    delay_secs,
                })
            }
            Op::Bury => {
                let (id, rest) = read_u64(args)?;
                let pri = read_u32_end(rest)?;
                done(Request::Bury { id, pri })
            }
            Op::Kick => {
                let bound = strtoul(args)?;
                // beanstalkd keeps the bound in a C `unsigned int`.
                done(Request::Kick {
                    bound: bound as u32,
                })
            }
            Op::KickJob => done(Request::KickJob(read_u64_end(args)?)),
            Op::Touch => done(Request::Touch(read_u64_end(args)?)),
            Op::StatsJob => done(Request::StatsJob(read_u64_end(args)?)),
            Op::StatsTube => done(Request::StatsTube(tube_name(args)?)),
            Op::Stats => bare(keyword, Request::Stats),
            Op::Use => done(Request::Use(tube_name(args)?)),
            Op::Watch => done(Request::Watch(tube_name(args)?)),
            Op::Ignore => done(Request::Ignore(tube_name(args)?)),
            Op::ListTubesWatched => bare(keyword, Request::ListTubesWatched),
            Op::ListTubeUsed => bare(keyword, Request::ListTubeUsed),
            Op::ListTubes => bare(keyword, Request::ListTubes),
            Op::Quit => done(Request::Quit),
            Op::PauseTube => {
                let start = args.iter().take_while(|&&b| b == b' ').count();
                let name_len = args[start..]
                    .iter()
                    .take_while(|&&b| is_name_byte(b))
                    .count();
                if name_len == 0 {
                    return Err(BadFormat);
                }
                let delay_secs = read_u32_end(&args[start + name_len..])?;
                done(Request::PauseTube {
                    tube: tube_name(&args[start..start + name_len])?,
                    delay_secs,
                })
            }
        }
    }
}

enum Parsed {
    Done(Request),
    PutHeader {
        pri: u32,
        delay_secs: u32,
        ttr_secs: u32,
        len: u32,
    },
}

#[derive(Clone, Copy)]
enum Op {
    Put,
    Peek,
    PeekReady,
    PeekDelayed,
    PeekBuried,
    ReserveWithTimeout,
    ReserveJob,
    Reserve,
    Delete,
    Release,
    Bury,
    Kick,
    KickJob,
    Touch,
    StatsJob,
    StatsTube,
    Stats,
    Use,
    Watch,
    Ignore,
    ListTubesWatched,
    ListTubeUsed,
    ListTubes,
    Quit,
    PauseTube,
}

/// Command prefixes in the order beanstalkd 1.12 tests them: the first
/// prefix that matches wins, which is why `reserve-job` comes before
/// `reserve` and `stats-job ` before `stats`.
const COMMANDS: &[(&[u8], Op)] = &[
    (b"put ", Op::Put),
    (b"peek ", Op::Peek),
    (b"peek-ready", Op::PeekReady),
    (b"peek-delayed", Op::PeekDelayed),
    (b"peek-buried", Op::PeekBuried),
    (b"reserve-with-timeout ", Op::ReserveWithTimeout),
    (b"reserve-job ", Op::ReserveJob),
    (b"reserve", Op::Reserve),
    (b"delete ", Op::Delete),
    (b"release ", Op::Release),
    (b"bury ", Op::Bury),
    (b"kick ", Op::Kick),
    (b"kick-job ", Op::KickJob),
    (b"touch ", Op::Touch),
    (b"stats-job ", Op::StatsJob),
    (b"stats-tube ", Op::StatsTube),
    (b"stats", Op::Stats),
    (b"use ", Op::Use),
    (b"watch ", Op::Watch),
    (b"ignore ", Op::Ignore),
    (b"list-tubes-watched", Op::ListTubesWatched),
    (b"list-tube-used", Op::ListTubeUsed),
    (b"list-tubes", Op::ListTubes),
    (b"quit", Op::Quit),
    (b"pause-tube", Op::PauseTube),
];

/// beanstalkd's `scan_line_end`: the line ends at the first `\r` if a `\n`
/// follows it; a lone `\r` earlier in the buffer hides any later `\r\n`.
fn scan_line_end(window: &[u8]) -> Option<usize> {
    if window.len() < 2 {
        return None;
    }
    let cr = window[..window.len() - 1]
        .iter()
        .position(|&b| b == b'\r')?;
    (window[cr + 1] == b'\n').then_some(cr + 2)
}

fn tube_name(args: &[u8]) -> Result<TubeName, ProtocolError> {
    TubeName::new(args).map_err(|_| ProtocolError::BadFormat)
}

/// Leading spaces, then decimal digits (at least one) that fit in a u64.
/// Returns the value and the unparsed rest.
fn read_u64(s: &[u8]) -> Result<(u64, &[u8]), ProtocolError> {
    let start = s.iter().take_while(|&&b| b == b' ').count();
    let s = &s[start..];
    let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return Err(ProtocolError::BadFormat);
    }
    let value = parse_digits(&s[..digits]).ok_or(ProtocolError::BadFormat)?;
    Ok((value, &s[digits..]))
}

fn read_u32(s: &[u8]) -> Result<(u32, &[u8]), ProtocolError> {
    let (value, rest) = read_u64(s)?;
    let value = u32::try_from(value).map_err(|_| ProtocolError::BadFormat)?;
    Ok((value, rest))
}

fn read_u64_end(s: &[u8]) -> Result<u64, ProtocolError> {
    match read_u64(s)? {
        (value, []) => Ok(value),
        _ => Err(ProtocolError::BadFormat),
    }
}

fn read_u32_end(s: &[u8]) -> Result<u32, ProtocolError> {
    match read_u32(s)? {
        (value, []) => Ok(value),
        _ => Err(ProtocolError::BadFormat),
    }
}

fn parse_digits(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// C's `isspace` in the "C" locale.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Splits what `strtoul`/`strtol` would read: optional whitespace and sign,
/// then digits. Returns (negative, digits).
fn c_number(s: &[u8]) -> (bool, &[u8]) {
    let s = &s[s.iter().take_while(|&&b| is_c_space(b)).count()..];
    let (negative, s) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
    (negative, &s[..digits])
}

/// `strtoul` as beanstalkd's `kick` uses it: no digits or overflow is an
/// error, trailing bytes are ignored, a minus sign negates modulo 2^64.
fn strtoul(s: &[u8]) -> Result<u64, ProtocolError> {
    let (negative, digits) = c_number(s);
    if digits.is_empty() {
        return Err(ProtocolError::BadFormat);
    }
    let value = parse_digits(digits).ok_or(ProtocolError::BadFormat)?;
    Ok(if negative {
        value.wrapping_neg()
    } else {
        value
    })
}

/// `strtol` as beanstalkd's `reserve-with-timeout` uses it: only overflow is
/// an error; no digits reads as 0 and trailing bytes are ignored.
fn strtol(s: &[u8]) -> Result<i64, ProtocolError> {
    let (negative, digits) = c_number(s);
    let magnitude = parse_digits(digits).ok_or(ProtocolError::BadFormat)?;
    if negative {
        if magnitude > i64::MAX as u64 + 1 {
            return Err(ProtocolError::BadFormat);
        }
        Ok((magnitude as i64).wrapping_neg())
    } else {
        i64::try_from(magnitude).map_err(|_| ProtocolError::BadFormat)
    }
}

/// Appends the wire form of `request` to `out` (client side).
///
/// `PutBody::TooBig` and `MissingCrlf` are server-side outcomes and encode
/// as an empty body.
pub fn encode_request(request: &Request, out: &mut Vec<u8>) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = match request {
        Request::Put(put) => {
            let body: &[u8] = match &put.body {
                PutBody::Complete(body) => body,
                PutBody::TooBig | PutBody::MissingCrlf | PutBody::TrailingBytes => b"",
            };
            let _ = write!(
                out,
                "put {} {} {} {}\r\n",
                put.pri,
                put.delay_secs,
                put.ttr_secs,
                body.len()
            );
            out.extend_from_slice(body);
            Ok(())
        }
        Request::Use(t) => write!(out, "use {t}"),
        Request::Reserve => write!(out, "reserve"),
        Request::ReserveWithTimeout { timeout_secs } => match timeout_secs {
            Some(t) => write!(out, "reserve-with-timeout {t}"),
            None => write!(out, "reserve-with-timeout -1"),
        },
        Request::ReserveJob(id) => write!(out, "reserve-job {id}"),
        // A worker sends one per job: no `core::fmt` for it.
        Request::Delete(id) => {
            out.extend_from_slice(b"delete ");
            crate::response::push_decimal(out, *id);
            Ok(())
        }
        Request::Release {
            id,
            pri,
            delay_secs,
        } => write!(out, "release {id} {pri} {delay_secs}"),
        Request::Bury { id, pri } => write!(out, "bury {id} {pri}"),
        Request::Touch(id) => write!(out, "touch {id}"),
        Request::Watch(t) => write!(out, "watch {t}"),
        Request::Ignore(t) => write!(out, "ignore {t}"),
        Request::Peek(id) => write!(out, "peek {id}"),
        Request::PeekReady => write!(out, "peek-ready"),
        Request::PeekDelayed => write!(out, "peek-delayed"),
        Request::PeekBuried => write!(out, "peek-buried"),
        Request::Kick { bound } => write!(out, "kick {bound}"),
        Request::KickJob(id) => write!(out, "kick-job {id}"),
        Request::StatsJob(id) => write!(out, "stats-job {id}"),
        Request::StatsTube(t) => write!(out, "stats-tube {t}"),
        Request::Stats => write!(out, "stats"),
        Request::ListTubes => write!(out, "list-tubes"),
        Request::ListTubeUsed => write!(out, "list-tube-used"),
        Request::ListTubesWatched => write!(out, "list-tubes-watched"),
        Request::PauseTube { tube, delay_secs } => write!(out, "pause-tube {tube} {delay_secs}"),
        Request::Quit => write!(out, "quit"),
    };
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Vec<Result<Request, ProtocolError>> {
        let mut decoder = RequestDecoder::new(10);
        let mut buf = BytesMut::from(input);
        std::iter::from_fn(|| decoder.decode(&mut buf)).collect()
    }

    fn one(input: &str) -> Result<Request, ProtocolError> {
        let mut all = decode_all(input.as_bytes());
        assert_eq!(all.len(), 1, "{input:?} gave {all:?}");
        all.remove(0)
    }

    use ProtocolError::{BadFormat, UnknownCommand};

    #[test]
    fn parses_like_beanstalkd() {
        assert_eq!(one("delete  7\r\n"), Ok(Request::Delete(7)));
        assert_eq!(one("delete 1x\r\n"), Err(BadFormat));
        assert_eq!(one("delete +1\r\n"), Err(BadFormat));
        assert_eq!(one("delete\r\n"), Err(UnknownCommand));
        assert_eq!(one("peek 99999999999999999999999\r\n"), Err(BadFormat));
        assert_eq!(one("stats \r\n"), Err(BadFormat));
        assert_eq!(one("reserve-job\r\n"), Err(BadFormat));
        assert_eq!(one("kick-job\r\n"), Err(UnknownCommand));
        assert_eq!(one("quit \r\n"), Ok(Request::Quit));
        assert_eq!(one("QUIT\r\n"), Err(UnknownCommand));
        assert_eq!(one("\r\n"), Err(UnknownCommand));
        assert_eq!(one("kick 1x\r\n"), Ok(Request::Kick { bound: 1 }));
        assert_eq!(one("kick -4294967295\r\n"), Ok(Request::Kick { bound: 1 }));
        assert_eq!(one("kick \t1\r\n"), Ok(Request::Kick { bound: 1 }));
        assert_eq!(one("kick \r\n"), Err(BadFormat));
        assert_eq!(one("kick 99999999999999999999\r\n"), Err(BadFormat));
        assert_eq!(
            one("reserve-with-timeout x\r\n"),
            Ok(Request::ReserveWithTimeout {
                timeout_secs: Some(0)
            })
        );
        assert_eq!(
            one("reserve-with-timeout -1\r\n"),
            Ok(Request::ReserveWithTimeout { timeout_secs: None })
        );
        assert_eq!(
            one("pause-tubedefault 5\r\n"),
            Ok(Request::PauseTube {
                tube: TubeName::default_tube(),
                delay_secs: 5
            })
        );
        assert_eq!(one("pause-tube -foo 1\r\n"), Err(BadFormat));
        assert_eq!(one("pause-tube default\t1\r\n"), Err(BadFormat));
        assert_eq!(one("use -foo\r\n"), Err(BadFormat));
        assert_eq!(one("use  foo\r\n"), Err(BadFormat));
        assert_eq!(one("a\0b\r\n"), Err(BadFormat));
        assert_eq!(one("put 4294967296 0 1 1\r\n"), Err(BadFormat));
        assert_eq!(one("put 0 0 1 99999999999\r\n"), Err(BadFormat));
        assert_eq!(one("put 0 0 1 +2\r\n"), Err(BadFormat));
    }

    #[test]
    fn put_bodies() {
        let put = |body| {
            Ok(Request::Put(Put {
                pri: 1,
                delay_secs: 2,
                ttr_secs: 3,
                body,
            }))
        };
        assert_eq!(
            one("put 1 2 3 5\r\nhello\r\n"),
            put(PutBody::Complete(Bytes::from_static(b"hello")))
        );
        assert_eq!(one("put 1 2 3 1\r\nxy\r"), put(PutBody::MissingCrlf));
        assert_eq!(one("put 1 2 3 1 \r\n"), put(PutBody::TrailingBytes));
        // Too big wins over trailing bytes: the body is still skipped.
        assert_eq!(
            decode_all(b"put 1 2 3 11 x\r\n0123456789a\r\n"),
            vec![put(PutBody::TooBig)]
        );
        assert_eq!(
            decode_all(b"put 1 2 3 11\r\n0123456789a\r\nstats\r\n"),
            vec![put(PutBody::TooBig), Ok(Request::Stats)]
        );
    }

    #[test]
    fn long_lines_are_dropped_to_their_end() {
        let long = |n: usize, tail: &[u8]| {
            let mut line = vec![b'y'; n];
            line.extend_from_slice(tail);
            decode_all(&line)
        };
        let peek = Ok(Request::Peek(9));
        assert_eq!(
            long(300, b"\r\npeek 9\r\n"),
            vec![Err(BadFormat), peek.clone()]
        );
        assert_eq!(
            long(222, b"\r\npeek 9\r\n"),
            vec![Err(UnknownCommand), peek.clone()]
        );
        // The CR ends the first window, so the line runs on to the next CRLF.
        assert_eq!(long(223, b"\r\npeek 9\r\n"), vec![Err(BadFormat)]);
        assert_eq!(long(447, b"\r\npeek 9\r\n"), vec![Err(BadFormat)]);
        assert_eq!(
            long(448, b"\r\npeek 9\r\n"),
            vec![Err(BadFormat), peek.clone()]
        );
        // No answer until the line ends.
        assert_eq!(long(1300, b""), vec![]);
        // A lone CR hides the line end until the window is full.
        assert_eq!(decode_all(b"foo\rbar\r\n"), vec![]);
        let mut input = vec![b'y'; 100];
        input.push(b'\r');
        input.extend_from_slice(&[b'y'; 200]);
        input.extend_from_slice(b"\r\npeek 9\r\n");
        assert_eq!(decode_all(&input), vec![Err(BadFormat), peek]);
    }

    #[test]
    fn input_split_anywhere_decodes_the_same() {
        let input = b"put 1 2 3 5\r\nhello\r\nuse foo\r\nput 0 0 1 20\r\n01234567890123456789\r\nreserve\r\n";
        let whole = decode_all(input);
        for split in 0..input.len() {
            let mut decoder = RequestDecoder::new(10);
            let mut buf = BytesMut::from(&input[..split]);
            let mut got: Vec<_> = std::iter::from_fn(|| decoder.decode(&mut buf)).collect();
            buf.extend_from_slice(&input[split..]);
            got.extend(std::iter::from_fn(|| decoder.decode(&mut buf)));
            assert_eq!(got, whole, "split at {split}");
        }
    }

    #[test]
    fn encoded_requests_decode_to_themselves() {
        let tube = TubeName::new(b"t").expect("valid name");
        let requests = vec![
            Request::Put(Put {
                pri: 1,
                delay_secs: 2,
                ttr_secs: 3,
                body: PutBody::Complete(Bytes::from_static(b"ab")),
            }),
            Request::Use(tube.clone()),
            Request::Reserve,
            Request::ReserveWithTimeout {
                timeout_secs: Some(4),
            },
            Request::ReserveWithTimeout { timeout_secs: None },
            Request::ReserveJob(9),
            Request::Release {
                id: 1,
                pri: 2,
                delay_secs: 3,
            },
            Request::Bury { id: 1, pri: 2 },
            Request::Kick { bound: 7 },
            Request::PauseTube {
                tube: tube.clone(),
                delay_secs: 5,
            },
            Request::ListTubesWatched,
            Request::Quit,
        ];
        let mut wire = Vec::new();
        for r in &requests {
            encode_request(r, &mut wire);
        }
        let decoded: Vec<_> = decode_all(&wire).into_iter().map(Result::unwrap).collect();
        assert_eq!(decoded, requests);
    }

    #[test]
    fn delete_is_written_digit_by_digit() {
        for id in [0, 7, 10, 123_456, u64::MAX] {
            let mut wire = Vec::new();
            encode_request(&Request::Delete(id), &mut wire);
            assert_eq!(wire, format!("delete {id}\r\n").into_bytes());
            assert_eq!(decode_all(&wire), vec![Ok(Request::Delete(id))]);
        }
    }
}
