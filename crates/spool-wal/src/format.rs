//! The on-disk format: segment file names, the segment header and the record
//! frame, with the limits that bound them. Nothing here does I/O; the byte
//! layout is documented in `docs/wal-format.md`, and this module is the only
//! code that knows it.

/// First 8 bytes of every segment file.
pub const MAGIC: [u8; 8] = *b"SPOOLWAL";

/// Format version written in every segment header. Readers refuse any other
/// version rather than guess (see the version history in docs/wal-format.md).
pub const FORMAT_VERSION: u32 = 1;

/// Bytes of the segment header: magic (8), version (4), sequence (8),
/// length of the previous segment (8), CRC-32 of the first 28 bytes (4).
pub const SEGMENT_HEADER_LEN: u64 = 32;

/// Bytes in front of each record's payload: payload length (4) and CRC-32 (4).
pub const RECORD_HEADER_LEN: u64 = 8;

/// Largest record payload the log accepts.
///
/// The largest payload the engine writes is one job: a body of up to 1 GiB
/// (`spool_proto::limits::MAX_JOB_SIZE_LIMIT_BYTES`, beanstalkd's own
/// maximum) plus its metadata (queue name, headers, idempotency key …),
/// which the engine keeps far below 64 KiB. A length field above this is
/// damage, not data, so recovery never allocates for it.
pub const RECORD_MAX_BYTES: usize = (1 << 30) + (64 << 10);

/// Default size at which the writer starts a new segment. Small enough that
/// compaction (which deletes whole segments) frees space in modest steps,
/// big enough that rotation (two extra fsyncs) is rare.
pub const SEGMENT_MAX_BYTES_DEFAULT: u64 = 64 << 20;

/// File name extension of segment files.
pub const SEGMENT_EXTENSION: &str = "wal";

/// Name of the lock file in the data directory.
pub const LOCK_FILE_NAME: &str = "LOCK";

const _: () = {
    // A record length must fit the u32 length field.
    assert!(RECORD_MAX_BYTES <= u32::MAX as usize);
    // Room for the largest job body plus its metadata.
    assert!(RECORD_MAX_BYTES >= (1 << 30) + (64 << 10));
    assert!(SEGMENT_MAX_BYTES_DEFAULT > SEGMENT_HEADER_LEN + RECORD_HEADER_LEN);
    // magic, version, sequence, previous segment's length, crc
    assert!(MAGIC.len() + 4 + 8 + 8 + 4 == SEGMENT_HEADER_LEN as usize);
};

/// File name of segment `seq`: 16 lowercase hex digits and `.wal`, so that
/// names sort like sequence numbers.
pub fn segment_file_name(seq: u64) -> String {
    format!("{seq:016x}.{SEGMENT_EXTENSION}")
}

/// What a directory entry is, judged by its name alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    /// A well-formed segment name with this sequence number.
    Segment(u64),
    /// Ends in `.wal` but is not a well-formed segment name: refused, since
    /// silently skipping it could hide records.
    MalformedSegment,
    /// Anything else (the lock file, an operator's notes): ignored.
    Other,
}

pub(crate) fn classify_file_name(name: &str) -> FileKind {
    let Some(stem) = name.strip_suffix(".wal") else {
        return FileKind::Other;
    };
    let well_formed = stem.len() == 16
        && stem
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    match u64::from_str_radix(stem, 16) {
        Ok(seq) if well_formed => FileKind::Segment(seq),
        _ => FileKind::MalformedSegment,
    }
}

/// The 32-byte header that opens segment `seq`. `prev_segment_len` is the
/// final length of segment `seq - 1` (0 if there is none): segments before
/// the last are never written again, so recovery can tell that one lost
/// whole records from its end, which its own bytes cannot show.
pub fn encode_segment_header(seq: u64, prev_segment_len: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&seq.to_le_bytes());
    h[20..28].copy_from_slice(&prev_segment_len.to_le_bytes());
    let crc = crc32fast::hash(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Why a segment header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderError {
    Short,
    BadMagic,
    BadChecksum,
    UnsupportedVersion(u32),
    WrongSequence { found: u64 },
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Short => write!(
                f,
                "file is shorter than the {SEGMENT_HEADER_LEN}-byte header"
            ),
            HeaderError::BadMagic => write!(f, "magic is not \"SPOOLWAL\""),
            HeaderError::BadChecksum => write!(f, "header checksum mismatch"),
            HeaderError::UnsupportedVersion(v) => {
                write!(f, "format version {v} is not supported (this build reads version {FORMAT_VERSION})")
            }
            HeaderError::WrongSequence { found } => {
                write!(
                    f,
                    "header names segment {found:#x}, which does not match the file name"
                )
            }
        }
    }
}

/// What a valid segment header says besides its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub(crate) prev_segment_len: u64,
}

/// Checks a segment header against the sequence number its file name gives.
///
/// The checksum is checked before the version so that a damaged header is
/// reported as damage, and a well-formed header from a newer format as such.
pub(crate) fn decode_segment_header(
    bytes: &[u8],
    expected_seq: u64,
) -> Result<SegmentHeader, HeaderError> {
    let h = bytes
        .get(..SEGMENT_HEADER_LEN as usize)
        .ok_or(HeaderError::Short)?;
    if h[0..8] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    if crc32fast::hash(&h[0..28]) != le_u32(&h[28..32]) {
        return Err(HeaderError::BadChecksum);
    }
    let version = le_u32(&h[8..12]);
    if version != FORMAT_VERSION {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    let seq = le_u64(&h[12..20]);
    if seq != expected_seq {
        return Err(HeaderError::WrongSequence { found: seq });
    }
    Ok(SegmentHeader {
        prev_segment_len: le_u64(&h[20..28]),
    })
}

/// Appends one framed record (length, CRC-32 of length bytes and payload,
/// payload) to `out`.
///
/// # Panics
/// If `payload` is longer than [`RECORD_MAX_BYTES`] (the writer checks first
/// and returns an error instead).
pub fn encode_record(out: &mut Vec<u8>, payload: &[u8]) {
    assert!(
        payload.len() <= RECORD_MAX_BYTES,
        "record over RECORD_MAX_BYTES"
    );
    #[allow(clippy::cast_possible_truncation)] // bounded by RECORD_MAX_BYTES
    let len = (payload.len() as u32).to_le_bytes();
    out.reserve(RECORD_HEADER_LEN as usize + payload.len());
    out.extend_from_slice(&len);
    out.extend_from_slice(&record_crc(len, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The checksum stored in a record: CRC-32 (IEEE) over the 4 length bytes
/// followed by the payload, so that a damaged length is caught too.
pub(crate) fn record_crc(len_bytes: [u8; 4], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len_bytes);
    h.update(payload);
    h.finalize()
}

/// Reads a little-endian u32 from the first 4 bytes of `b`.
pub(crate) fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// If `bytes` starts with a whole, valid record, its total framed length.
pub(crate) fn valid_record_at(bytes: &[u8]) -> Option<usize> {
    let header = bytes.get(..RECORD_HEADER_LEN as usize)?;
    let len = le_u32(header) as usize;
    if len > RECORD_MAX_BYTES {
        return None;
    }
    let end = RECORD_HEADER_LEN as usize + len;
    let payload = bytes.get(RECORD_HEADER_LEN as usize..end)?;
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(&header[..4]);
    (record_crc(len_bytes, payload) == le_u32(&header[4..8])).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let h = encode_segment_header(0x1234_5678_9abc, 4242);
        assert_eq!(
            decode_segment_header(&h, 0x1234_5678_9abc),
            Ok(SegmentHeader {
                prev_segment_len: 4242
            })
        );
        assert_eq!(
            decode_segment_header(&h, 7),
            Err(HeaderError::WrongSequence {
                found: 0x1234_5678_9abc
            })
        );
        assert_eq!(decode_segment_header(&h[..31], 1), Err(HeaderError::Short));
        for i in 0..h.len() {
            let mut bad = h;
            bad[i] ^= 0x10;
            assert!(
                decode_segment_header(&bad, 0x1234_5678_9abc).is_err(),
                "byte {i}"
            );
        }
    }

    #[test]
    fn header_layout_is_the_documented_one() {
        let h = encode_segment_header(2, 0x0102);
        assert_eq!(&h[0..8], b"SPOOLWAL");
        assert_eq!(h[8..12], [1, 0, 0, 0]);
        assert_eq!(h[12..20], [2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(h[20..28], [2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(le_u32(&h[28..32]), crc32fast::hash(&h[..28]));
    }

    #[test]
    fn newer_version_is_reported_as_such() {
        let mut h = encode_segment_header(1, 0);
        h[8] = 2;
        let crc = crc32fast::hash(&h[0..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_segment_header(&h, 1),
            Err(HeaderError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn record_frame_is_length_crc_payload() {
        let mut out = Vec::new();
        encode_record(&mut out, b"abc");
        assert_eq!(out[0..4], [3, 0, 0, 0]);
        let mut whole = vec![3u8, 0, 0, 0];
        whole.extend_from_slice(b"abc");
        assert_eq!(le_u32(&out[4..8]), crc32fast::hash(&whole));
        assert_eq!(&out[8..], b"abc");
        assert_eq!(valid_record_at(&out), Some(11));
        assert_eq!(valid_record_at(&out[..10]), None);
        out[0] = 2; // a damaged length is caught by the checksum
        assert_eq!(valid_record_at(&out), None);
    }

    #[test]
    fn empty_record_is_valid_and_zeros_are_not() {
        let mut out = Vec::new();
        encode_record(&mut out, b"");
        assert_eq!(valid_record_at(&out), Some(8));
        assert_eq!(valid_record_at(&[0u8; 64]), None);
    }

    #[test]
    fn file_names() {
        assert_eq!(segment_file_name(0xab), "00000000000000ab.wal");
        assert_eq!(
            classify_file_name("00000000000000ab.wal"),
            FileKind::Segment(0xab)
        );
        assert_eq!(
            classify_file_name("00000000000000AB.wal"),
            FileKind::MalformedSegment
        );
        assert_eq!(classify_file_name("ab.wal"), FileKind::MalformedSegment);
        assert_eq!(
            classify_file_name("+000000000000000.wal"),
            FileKind::MalformedSegment
        );
        assert_eq!(classify_file_name("LOCK"), FileKind::Other);
        assert_eq!(
            classify_file_name("00000000000000ab.wal.bak"),
            FileKind::Other
        );
    }
}
