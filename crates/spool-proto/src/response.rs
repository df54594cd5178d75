//! Responses: what the server answers, its encoder (server side) and a
//! bounded decoder (client side, used by `spool bench` and the CLI).
//!
//! The stats replies are typed structs here; their YAML is written field by
//! field in beanstalkd 1.12's order so that clients parsing it positionally
//! keep working.

use std::io::Write;

use bytes::{Buf, Bytes, BytesMut};

use crate::limits::LINE_MAX_BYTES;
use crate::name::TubeName;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Inserted(u64),
    /// `put` could not be queued and was buried instead.
    BuriedId(u64),
    ExpectedCrlf,
    JobTooBig,
    Draining,
    OutOfMemory,
    InternalError,
    BadFormat,
    UnknownCommand,
    Using(TubeName),
    Reserved {
        id: u64,
        body: Bytes,
    },
    DeadlineSoon,
    TimedOut,
    Deleted,
    NotFound,
    Released,
    Buried,
    Touched,
    Watching(usize),
    NotIgnored,
    Found {
        id: u64,
        body: Bytes,
    },
    /// `kick <bound>`: how many jobs were kicked.
    Kicked(u32),
    /// `kick-job <id>`.
    KickedJob,
    Paused,
    Stats(Box<ServerStats>),
    StatsTube(Box<TubeStats>),
    StatsJob(Box<JobStats>),
    /// `list-tubes` and `list-tubes-watched`.
    TubeList(Vec<TubeName>),
    /// A YAML body as a client receives it (the decoder's form of the four
    /// variants above).
    Ok(Bytes),
}

/// The `stats` reply. Counters come from the engine; the process fields are
/// filled in by whoever owns the process (the broker).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    pub current_jobs_urgent: u64,
    pub current_jobs_ready: u64,
    pub current_jobs_reserved: u64,
    pub current_jobs_delayed: u64,
    pub current_jobs_buried: u64,
    pub cmd_put: u64,
    pub cmd_peek: u64,
    pub cmd_peek_ready: u64,
    pub cmd_peek_delayed: u64,
    pub cmd_peek_buried: u64,
    pub cmd_reserve: u64,
    pub cmd_reserve_with_timeout: u64,
    pub cmd_delete: u64,
    pub cmd_release: u64,
    pub cmd_use: u64,
    pub cmd_watch: u64,
    pub cmd_ignore: u64,
    pub cmd_bury: u64,
    pub cmd_kick: u64,
    pub cmd_touch: u64,
    pub cmd_stats: u64,
    pub cmd_stats_job: u64,
    pub cmd_stats_tube: u64,
    pub cmd_list_tubes: u64,
    pub cmd_list_tube_used: u64,
    pub cmd_list_tubes_watched: u64,
    pub cmd_pause_tube: u64,
    pub job_timeouts: u64,
    pub total_jobs: u64,
    pub max_job_size: u64,
    pub current_tubes: u64,
    pub current_connections: u64,
    pub current_producers: u64,
    pub current_workers: u64,
    pub current_waiting: u64,
    pub total_connections: u64,
    pub draining: bool,
    pub process: ProcessStats,
}

/// The fields of `stats` that describe the process, not the queues.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessStats {
    pub pid: u32,
    pub version: String,
    pub rusage_utime_us: u64,
    pub rusage_stime_us: u64,
    pub uptime_secs: u64,
    pub binlog_oldest_index: u64,
    pub binlog_current_index: u64,
    pub binlog_records_migrated: u64,
    pub binlog_records_written: u64,
    pub binlog_max_size: u64,
    pub id: String,
    pub hostname: String,
    pub os: String,
    pub platform: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TubeStats {
    pub name: String,
    pub current_jobs_urgent: u64,
    pub current_jobs_ready: u64,
    pub current_jobs_reserved: u64,
    pub current_jobs_delayed: u64,
    pub current_jobs_buried: u64,
    pub total_jobs: u64,
    pub current_using: u64,
    pub current_watching: u64,
    pub current_waiting: u64,
    pub cmd_delete: u64,
    pub cmd_pause_tube: u64,
    pub pause_secs: u64,
    pub pause_time_left_secs: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobStats {
    pub id: u64,
    pub tube: String,
    /// `ready`, `delayed`, `reserved` or `buried`.
    pub state: &'static str,
    pub pri: u32,
    pub age_secs: u64,
    pub delay_secs: u64,
    pub ttr_secs: u64,
    pub time_left_secs: u64,
    pub file: u64,
    pub reserves: u64,
    pub timeouts: u64,
    pub releases: u64,
    pub buries: u64,
    pub kicks: u64,
}

fn stats_yaml(s: &ServerStats, out: &mut Vec<u8>) {
    let p = &s.process;
    let _ = write!(
        out,
        "---\ncurrent-jobs-urgent: {}\ncurrent-jobs-ready: {}\ncurrent-jobs-reserved: {}\n\
         current-jobs-delayed: {}\ncurrent-jobs-buried: {}\ncmd-put: {}\ncmd-peek: {}\n\
         cmd-peek-ready: {}\ncmd-peek-delayed: {}\ncmd-peek-buried: {}\ncmd-reserve: {}\n\
         cmd-reserve-with-timeout: {}\ncmd-delete: {}\ncmd-release: {}\ncmd-use: {}\n\
         cmd-watch: {}\ncmd-ignore: {}\ncmd-bury: {}\ncmd-kick: {}\ncmd-touch: {}\n\
         cmd-stats: {}\ncmd-stats-job: {}\ncmd-stats-tube: {}\ncmd-list-tubes: {}\n\
         cmd-list-tube-used: {}\ncmd-list-tubes-watched: {}\ncmd-pause-tube: {}\n\
         job-timeouts: {}\ntotal-jobs: {}\nmax-job-size: {}\ncurrent-tubes: {}\n\
         current-connections: {}\ncurrent-producers: {}\ncurrent-workers: {}\n\
         current-waiting: {}\ntotal-connections: {}\npid: {}\nversion: \"{}\"\n\
         rusage-utime: {}.{:06}\nrusage-stime: {}.{:06}\nuptime: {}\n\
         binlog-oldest-index: {}\nbinlog-current-index: {}\nbinlog-records-migrated: {}\n\
         binlog-records-written: {}\nbinlog-max-size: {}\ndraining: {}\nid: {}\n\
         hostname: {}\nos: {}\nplatform: {}\n",
        s.current_jobs_urgent,
        s.current_jobs_ready,
        s.current_jobs_reserved,
        s.current_jobs_delayed,
        s.current_jobs_buried,
        s.cmd_put,
        s.cmd_peek,
        s.cmd_peek_ready,
        s.cmd_peek_delayed,
        s.cmd_peek_buried,
        s.cmd_reserve,
        s.cmd_reserve_with_timeout,
        s.cmd_delete,
        s.cmd_release,
        s.cmd_use,
        s.cmd_watch,
        s.cmd_ignore,
        s.cmd_bury,
        s.cmd_kick,
        s.cmd_touch,
        s.cmd_stats,
        s.cmd_stats_job,
        s.cmd_stats_tube,
        s.cmd_list_tubes,
        s.cmd_list_tube_used,
        s.cmd_list_tubes_watched,
        s.cmd_pause_tube,
        s.job_timeouts,
        s.total_jobs,
        s.max_job_size,
        s.current_tubes,
        s.current_connections,
        s.current_producers,
        s.current_workers,
        s.current_waiting,
        s.total_connections,
        p.pid,
        p.version,
        p.rusage_utime_us / 1_000_000,
        p.rusage_utime_us % 1_000_000,
        p.rusage_stime_us / 1_000_000,
        p.rusage_stime_us % 1_000_000,
        p.uptime_secs,
        p.binlog_oldest_index,
        p.binlog_current_index,
        p.binlog_records_migrated,
        p.binlog_records_written,
        p.binlog_max_size,
        s.draining,
        p.id,
        p.hostname,
        p.os,
        p.platform,
    );
}

fn tube_stats_yaml(t: &TubeStats, out: &mut Vec<u8>) {
    let _ = write!(
        out,
        "---\nname: {}\ncurrent-jobs-urgent: {}\ncurrent-jobs-ready: {}\n\
         current-jobs-reserved: {}\ncurrent-jobs-delayed: {}\ncurrent-jobs-buried: {}\n\
         total-jobs: {}\ncurrent-using: {}\ncurrent-watching: {}\ncurrent-waiting: {}\n\
         cmd-delete: {}\ncmd-pause-tube: {}\npause: {}\npause-time-left: {}\n",
        t.name,
        t.current_jobs_urgent,
        t.current_jobs_ready,
        t.current_jobs_reserved,
        t.current_jobs_delayed,
        t.current_jobs_buried,
        t.total_jobs,
        t.current_using,
        t.current_watching,
        t.current_waiting,
        t.cmd_delete,
        t.cmd_pause_tube,
        t.pause_secs,
        t.pause_time_left_secs,
    );
}

fn job_stats_yaml(j: &JobStats, out: &mut Vec<u8>) {
    let _ = write!(
        out,
        "---\nid: {}\ntube: {}\nstate: {}\npri: {}\nage: {}\ndelay: {}\nttr: {}\n\
         time-left: {}\nfile: {}\nreserves: {}\ntimeouts: {}\nreleases: {}\nburies: {}\n\
         kicks: {}\n",
        j.id,
        j.tube,
        j.state,
        j.pri,
        j.age_secs,
        j.delay_secs,
        j.ttr_secs,
        j.time_left_secs,
        j.file,
        j.reserves,
        j.timeouts,
        j.releases,
        j.buries,
        j.kicks,
    );
}

/// Appends `OK <len>\r\n<yaml>\r\n` where the YAML is produced by `fill`.
fn ok_body(out: &mut Vec<u8>, fill: impl FnOnce(&mut Vec<u8>)) {
    let mut yaml = Vec::with_capacity(1024);
    fill(&mut yaml);
    let _ = write!(out, "OK {}\r\n", yaml.len());
    out.extend_from_slice(&yaml);
    out.extend_from_slice(b"\r\n");
}

/// The most bytes a `u64` takes in decimal.
const U64_DIGITS_MAX: usize = 20;

/// Appends `value` in decimal, as `write!` would. The replies every job
/// gets are written with it: `write!` went through `core::fmt` and grew the
/// buffer piece by piece (about 1,000 instructions a job, callgrind).
pub fn push_decimal(out: &mut Vec<u8>, value: u64) {
    let mut digits = [0u8; U64_DIGITS_MAX];
    let mut start = digits.len();
    let mut rest = value;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// Appends `<word> <id>\r\n`, growing `out` once.
fn id_reply(out: &mut Vec<u8>, word: &[u8], id: u64) {
    out.reserve(word.len() + 1 + U64_DIGITS_MAX + 2);
    out.extend_from_slice(word);
    out.push(b' ');
    push_decimal(out, id);
    out.extend_from_slice(b"\r\n");
}

/// Appends `<word> <id> <bytes>\r\n<body>\r\n`, growing `out` once.
fn job_reply(out: &mut Vec<u8>, word: &[u8], id: u64, body: &[u8]) {
    out.reserve(word.len() + 2 * (1 + U64_DIGITS_MAX) + 2 + body.len() + 2);
    out.extend_from_slice(word);
    out.push(b' ');
    push_decimal(out, id);
    out.push(b' ');
    push_decimal(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
}

/// Appends the wire form of `response` to `out` (server side).
pub fn encode_response(response: &Response, out: &mut Vec<u8>) {
    let word: &[u8] = match response {
        Response::Inserted(id) => return id_reply(out, b"INSERTED", *id),
        Response::BuriedId(id) => return id_reply(out, b"BURIED", *id),
        Response::Using(tube) => {
            let _ = write!(out, "USING {tube}\r\n");
            return;
        }
        Response::Watching(n) => {
            let _ = write!(out, "WATCHING {n}\r\n");
            return;
        }
        Response::Kicked(n) => {
            let _ = write!(out, "KICKED {n}\r\n");
            return;
        }
        Response::Reserved { id, body } => return job_reply(out, b"RESERVED", *id, body),
        Response::Found { id, body } => return job_reply(out, b"FOUND", *id, body),
        Response::Stats(s) => return ok_body(out, |y| stats_yaml(s, y)),
        Response::StatsTube(t) => return ok_body(out, |y| tube_stats_yaml(t, y)),
        Response::StatsJob(j) => return ok_body(out, |y| job_stats_yaml(j, y)),
        Response::TubeList(tubes) => {
            return ok_body(out, |y| {
                y.extend_from_slice(b"---\n");
                for t in tubes {
                    let _ = writeln!(y, "- {t}");
                }
            })
        }
        Response::Ok(yaml) => {
            let _ = write!(out, "OK {}\r\n", yaml.len());
            out.extend_from_slice(yaml);
            out.extend_from_slice(b"\r\n");
            return;
        }
        Response::ExpectedCrlf => b"EXPECTED_CRLF",
        Response::JobTooBig => b"JOB_TOO_BIG",
        Response::Draining => b"DRAINING",
        Response::OutOfMemory => b"OUT_OF_MEMORY",
        Response::InternalError => b"INTERNAL_ERROR",
        Response::BadFormat => b"BAD_FORMAT",
        Response::UnknownCommand => b"UNKNOWN_COMMAND",
        Response::DeadlineSoon => b"DEADLINE_SOON",
        Response::TimedOut => b"TIMED_OUT",
        Response::Deleted => b"DELETED",
        Response::NotFound => b"NOT_FOUND",
        Response::Released => b"RELEASED",
        Response::Buried => b"BURIED",
        Response::Touched => b"TOUCHED",
        Response::NotIgnored => b"NOT_IGNORED",
        Response::KickedJob => b"KICKED",
        Response::Paused => b"PAUSED",
    };
    out.extend_from_slice(word);
    out.extend_from_slice(b"\r\n");
}

/// What a client got that it could not read as a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseError {
    /// A line longer than any reply line can be.
    LineTooLong,
    /// A body longer than the client allows.
    BodyTooLong(u64),
    /// Not a reply beanstalkd could send.
    Malformed(String),
}

impl std::fmt::Display for ResponseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResponseError::LineTooLong => {
                write!(f, "reply line longer than {LINE_MAX_BYTES} bytes")
            }
            ResponseError::BodyTooLong(n) => write!(f, "reply body of {n} bytes is over the limit"),
            ResponseError::Malformed(line) => write!(f, "malformed reply {line:?}"),
        }
    }
}

impl std::error::Error for ResponseError {}

/// Client-side decoder of responses. Bounded: a reply line may be at most
/// 224 bytes and a body at most `max_body` bytes.
#[derive(Debug)]
pub struct ResponseDecoder {
    max_body: u64,
}

impl ResponseDecoder {
    pub fn new(max_body: u64) -> ResponseDecoder {
        ResponseDecoder { max_body }
    }

    /// Decodes one response from the front of `buf`; `Ok(None)` means more
    /// bytes are needed and nothing was consumed.
    ///
    /// Works on the line's bytes: reply lines are ASCII, and going through
    /// `str` (UTF-8 validation, `split`, `parse`) made this a quarter of the
    /// load generator's instructions per job (callgrind). A line that is
    /// not ASCII is still checked as UTF-8, so every input gets the answer
    /// (and the error text) it got before; a test compares the two.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Response>, ResponseError> {
        // A reply line ends within the same 224 bytes a request line must.
        let window = &buf[..buf.len().min(LINE_MAX_BYTES)];
        let Some(eol) = find_crlf(window) else {
            if buf.len() >= LINE_MAX_BYTES {
                return Err(ResponseError::LineTooLong);
            }
            return Ok(None);
        };
        let line = &buf[..eol];
        if !line.is_ascii() && std::str::from_utf8(line).is_err() {
            return Err(ResponseError::Malformed(
                String::from_utf8_lossy(line).into_owned(),
            ));
        }
        // Valid UTF-8 from here on, so the lossy conversion is exact.
        let malformed = || ResponseError::Malformed(String::from_utf8_lossy(line).into_owned());
        // At most three fields follow the word; no allocation per reply.
        let mut fields = line.split(|&b| b == b' ');
        let word = fields.next().unwrap_or_default();
        let mut arg_buf: [&[u8]; 3] = [b""; 3];
        let mut arg_count = 0;
        for field in fields {
            if arg_count == arg_buf.len() {
                return Err(malformed());
            }
            arg_buf[arg_count] = field;
            arg_count += 1;
        }
        let args = &arg_buf[..arg_count];
        // Digits only (Rust's parser would also take a leading `+`), and
        // the value must fit.
        let num = |i: usize| -> Result<u64, ResponseError> {
            args.get(i)
                .and_then(|a| parse_decimal(a))
                .ok_or_else(malformed)
        };
        // Replies with a body: RESERVED <id> <n>, FOUND <id> <n>, OK <n>.
        let with_body = match (word, args.len()) {
            (b"RESERVED", 2) | (b"FOUND", 2) => Some((Some(num(0)?), num(1)?)),
            (b"OK", 1) => Some((None, num(0)?)),
            _ => None,
        };
        if let Some((id, len)) = with_body {
            if len > self.max_body {
                return Err(ResponseError::BodyTooLong(len));
            }
            let len = len as usize;
            let total = eol + 2 + len + 2;
            if buf.len() < total {
                return Ok(None);
            }
            if &buf[total - 2..total] != b"\r\n" {
                return Err(malformed());
            }
            let kind = match (word, id) {
                (b"RESERVED", Some(id)) => Some((true, id)),
                (b"FOUND", Some(id)) => Some((false, id)),
                _ => None,
            };
            buf.advance(eol + 2);
            let body = buf.split_to(len).freeze();
            buf.advance(2);
            return Ok(Some(match kind {
                Some((true, id)) => Response::Reserved { id, body },
                Some((false, id)) => Response::Found { id, body },
                None => Response::Ok(body),
            }));
        }
        let response = match (word, args.len()) {
            (b"INSERTED", 1) => Response::Inserted(num(0)?),
            (b"BURIED", 1) => Response::BuriedId(num(0)?),
            (b"USING", 1) => Response::Using(TubeName::new(args[0]).map_err(|_| malformed())?),
            (b"WATCHING", 1) => Response::Watching(num(0)? as usize),
            (b"KICKED", 1) => Response::Kicked(u32::try_from(num(0)?).map_err(|_| malformed())?),
            (_, 0) => match word {
                b"EXPECTED_CRLF" => Response::ExpectedCrlf,
                b"JOB_TOO_BIG" => Response::JobTooBig,
                b"DRAINING" => Response::Draining,
                b"OUT_OF_MEMORY" => Response::OutOfMemory,
                b"INTERNAL_ERROR" => Response::InternalError,
                b"BAD_FORMAT" => Response::BadFormat,
                b"UNKNOWN_COMMAND" => Response::UnknownCommand,
                b"DEADLINE_SOON" => Response::DeadlineSoon,
                b"TIMED_OUT" => Response::TimedOut,
                b"DELETED" => Response::Deleted,
                b"NOT_FOUND" => Response::NotFound,
                b"RELEASED" => Response::Released,
                b"BURIED" => Response::Buried,
                b"TOUCHED" => Response::Touched,
                b"NOT_IGNORED" => Response::NotIgnored,
                b"KICKED" => Response::KickedJob,
                b"PAUSED" => Response::Paused,
                _ => return Err(malformed()),
            },
            _ => return Err(malformed()),
        };
        buf.advance(eol + 2);
        Ok(Some(response))
    }
}

/// Where the first `\r\n` in `bytes` starts.
fn find_crlf(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(cr) = bytes.get(from..)?.iter().position(|&b| b == b'\r') {
        let at = from + cr;
        match bytes.get(at + 1) {
            Some(b'\n') => return Some(at),
            Some(_) => from = at + 1,
            None => return None,
        }
    }
    None
}

/// A non-empty run of ASCII digits as a `u64`; `None` for anything else or
/// a value that does not fit.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |value, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        value.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_responses_round_trip() {
        let responses = vec![
            Response::Inserted(3),
            Response::BuriedId(4),
            Response::Reserved {
                id: 5,
                body: Bytes::from_static(b"a\r\nb"),
            },
            Response::Found {
                id: 6,
                body: Bytes::new(),
            },
            Response::Using(TubeName::default_tube()),
            Response::Watching(2),
            Response::Kicked(7),
            Response::KickedJob,
            Response::Buried,
            Response::NotFound,
            Response::Ok(Bytes::from_static(b"---\n- default\n")),
            Response::DeadlineSoon,
        ];
        let mut wire = Vec::new();
        for r in &responses {
            encode_response(r, &mut wire);
        }
        let mut buf = BytesMut::from(&wire[..]);
        let mut decoder = ResponseDecoder::new(1 << 20);
        let mut got = Vec::new();
        while let Some(r) = decoder.decode(&mut buf).expect("valid reply") {
            got.push(r);
        }
        assert_eq!(got, responses);
        assert!(buf.is_empty());
    }

    #[test]
    fn job_replies_are_the_bytes_format_writes() {
        let ids = [
            0,
            1,
            9,
            10,
            99,
            100,
            12_345,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ];
        for id in ids {
            let mut digits = Vec::new();
            push_decimal(&mut digits, id);
            assert_eq!(digits, id.to_string().into_bytes());
            for body in [&b""[..], b"x", &[b'y'; 1000][..]] {
                let body = Bytes::copy_from_slice(body);
                let n = body.len();
                let cases = [
                    (Response::Inserted(id), format!("INSERTED {id}\r\n")),
                    (Response::BuriedId(id), format!("BURIED {id}\r\n")),
                    (
                        Response::Reserved {
                            id,
                            body: body.clone(),
                        },
                        format!("RESERVED {id} {n}\r\n"),
                    ),
                    (
                        Response::Found {
                            id,
                            body: body.clone(),
                        },
                        format!("FOUND {id} {n}\r\n"),
                    ),
                ];
                for (response, line) in cases {
                    let mut expected = line.into_bytes();
                    if matches!(response, Response::Reserved { .. } | Response::Found { .. }) {
                        expected.extend_from_slice(&body);
                        expected.extend_from_slice(b"\r\n");
                    }
                    // Appended after earlier bytes, as a pipeline's replies are.
                    let mut wire = b"DELETED\r\n".to_vec();
                    encode_response(&response, &mut wire);
                    assert_eq!(&wire[..9], b"DELETED\r\n");
                    assert_eq!(wire[9..], expected[..], "{response:?}");
                }
            }
        }
    }

    #[test]
    fn tube_list_is_beanstalkd_yaml() {
        let mut wire = Vec::new();
        encode_response(
            &Response::TubeList(vec![TubeName::default_tube()]),
            &mut wire,
        );
        assert_eq!(wire, b"OK 14\r\n---\n- default\n\r\n");
    }

    #[test]
    fn decoder_is_bounded() {
        let mut decoder = ResponseDecoder::new(10);
        let mut buf = BytesMut::from(&b"RESERVED 1 11\r\n"[..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Err(ResponseError::BodyTooLong(11))
        );
        let mut buf = BytesMut::from(&[b'x'; 300][..]);
        assert_eq!(decoder.decode(&mut buf), Err(ResponseError::LineTooLong));
    }

    /// The decoder as it was before it worked on bytes (through `str`):
    /// the reference the byte-level one must agree with on every input.
    fn reference_decode(
        max_body: u64,
        buf: &mut BytesMut,
    ) -> Result<Option<Response>, ResponseError> {
        let window = &buf[..buf.len().min(LINE_MAX_BYTES)];
        let Some(eol) = window.windows(2).position(|w| w == b"\r\n") else {
            if buf.len() >= LINE_MAX_BYTES {
                return Err(ResponseError::LineTooLong);
            }
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[..eol])
            .map_err(|_| ResponseError::Malformed(String::from_utf8_lossy(&buf[..eol]).into()))?;
        let malformed = || ResponseError::Malformed(line.to_string());
        let mut fields = line.split(' ');
        let word = fields.next().unwrap_or_default();
        let mut arg_buf = [""; 3];
        let mut arg_count = 0;
        for field in fields {
            if arg_count == arg_buf.len() {
                return Err(malformed());
            }
            arg_buf[arg_count] = field;
            arg_count += 1;
        }
        let args = &arg_buf[..arg_count];
        let num = |i: usize| -> Result<u64, ResponseError> {
            args.get(i)
                .filter(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|a| a.parse::<u64>().ok())
                .ok_or_else(malformed)
        };
        let with_body = match (word, args.len()) {
            ("RESERVED", 2) | ("FOUND", 2) => Some((Some(num(0)?), num(1)?)),
            ("OK", 1) => Some((None, num(0)?)),
            _ => None,
        };
        if let Some((id, len)) = with_body {
            if len > max_body {
                return Err(ResponseError::BodyTooLong(len));
            }
            let len = len as usize;
            let total = eol + 2 + len + 2;
            if buf.len() < total {
                return Ok(None);
            }
            if &buf[total - 2..total] != b"\r\n" {
                return Err(malformed());
            }
            let kind = match (word, id) {
                ("RESERVED", Some(id)) => Some((true, id)),
                ("FOUND", Some(id)) => Some((false, id)),
                _ => None,
            };
            buf.advance(eol + 2);
            let body = buf.split_to(len).freeze();
            buf.advance(2);
            return Ok(Some(match kind {
                Some((true, id)) => Response::Reserved { id, body },
                Some((false, id)) => Response::Found { id, body },
                None => Response::Ok(body),
            }));
        }
        let response = match (word, args.len()) {
            ("INSERTED", 1) => Response::Inserted(num(0)?),
            ("BURIED", 1) => Response::BuriedId(num(0)?),
            ("USING", 1) => {
                Response::Using(TubeName::new(args[0].as_bytes()).map_err(|_| malformed())?)
            }
            ("WATCHING", 1) => Response::Watching(num(0)? as usize),
            ("KICKED", 1) => Response::Kicked(u32::try_from(num(0)?).map_err(|_| malformed())?),
            (_, 0) => match word {
                "EXPECTED_CRLF" => Response::ExpectedCrlf,
                "JOB_TOO_BIG" => Response::JobTooBig,
                "DRAINING" => Response::Draining,
                "OUT_OF_MEMORY" => Response::OutOfMemory,
                "INTERNAL_ERROR" => Response::InternalError,
                "BAD_FORMAT" => Response::BadFormat,
                "UNKNOWN_COMMAND" => Response::UnknownCommand,
                "DEADLINE_SOON" => Response::DeadlineSoon,
                "TIMED_OUT" => Response::TimedOut,
                "DELETED" => Response::Deleted,
                "NOT_FOUND" => Response::NotFound,
                "RELEASED" => Response::Released,
                "BURIED" => Response::Buried,
                "TOUCHED" => Response::Touched,
                "NOT_IGNORED" => Response::NotIgnored,
                "KICKED" => Response::KickedJob,
                "PAUSED" => Response::Paused,
                _ => return Err(malformed()),
            },
            _ => return Err(malformed()),
        };
        buf.advance(eol + 2);
        Ok(Some(response))
    }

    /// Decodes `stream` to the end (or the first error) with both decoders
    /// and requires the same replies, error and leftover bytes.
    fn assert_decoders_agree(max_body: u64, stream: &[u8]) {
        let mut ours = BytesMut::from(stream);
        let mut reference = BytesMut::from(stream);
        let mut decoder = ResponseDecoder::new(max_body);
        for _ in 0..=stream.len() {
            let got = decoder.decode(&mut ours);
            let want = reference_decode(max_body, &mut reference);
            assert_eq!(got, want, "decoding {stream:?}");
            assert_eq!(ours, reference, "left over from {stream:?}");
            if !matches!(got, Ok(Some(_))) {
                return;
            }
        }
    }

    #[test]
    fn byte_level_decoder_agrees_with_the_str_one() {
        let words: &[&[u8]] = &[
            b"RESERVED",
            b"FOUND",
            b"OK",
            b"INSERTED",
            b"BURIED",
            b"USING",
            b"WATCHING",
            b"KICKED",
            b"DELETED",
            b"TIMED_OUT",
            b"NOT_FOUND",
            b"PAUSED",
            b"",
            b"reserved",
            b"RESERVED\xff",
            b"DELETED\xc3\xa9",
            b"X",
        ];
        let args: &[&[u8]] = &[
            b"0",
            b"7",
            b"3",
            b"42",
            b"+1",
            b"-1",
            b"",
            b"1a",
            b"18446744073709551615",
            b"18446744073709551616",
            b"4294967296",
            b"tube",
            b"t\xc3\xa9",
            b"\xff",
            b"05",
        ];
        let ends: &[&[u8]] = &[b"\r\n", b"\r", b"\n", b"\rx\r\n", b""];
        let bodies: &[&[u8]] = &[b"", b"abc\r\n", b"ab\r\n", b"\r\nabcdefg\r\n", b"abc"];
        // A small deterministic generator: every combination of a word, up
        // to four arguments, a line end and what follows it.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for _ in 0..20_000 {
            let mut stream = Vec::new();
            for _ in 0..1 + next(3) {
                stream.extend_from_slice(words[next(words.len())]);
                for _ in 0..next(5) {
                    stream.push(b' ');
                    stream.extend_from_slice(args[next(args.len())]);
                }
                stream.extend_from_slice(ends[next(ends.len())]);
                stream.extend_from_slice(bodies[next(bodies.len())]);
            }
            assert_decoders_agree(next(8) as u64, &stream);
        }
        // Lines at and past the window.
        for len in [
            LINE_MAX_BYTES - 3,
            LINE_MAX_BYTES - 2,
            LINE_MAX_BYTES - 1,
            LINE_MAX_BYTES,
        ] {
            let mut stream = vec![b'A'; len];
            stream.extend_from_slice(b"\r\n");
            assert_decoders_agree(10, &stream);
            assert_decoders_agree(10, &stream[..len]);
        }
    }
}
