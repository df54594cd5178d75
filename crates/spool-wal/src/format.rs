//! The on-disk format: segment file names, the segment header and the record
//! frame, with the limits that bound them. Nothing here does I/O; the byte
//! layout is documented in `docs/wal-format.md`, and this module is the only
//! code that knows it.

/// First 8 bytes of every segment file.
pub const MAGIC: [u8; 8] = *b"SPOOLWAL";

/// Format version written in every new segment header. Version 2 has the
/// same bytes as version 1; it says that the data directory keeps a
/// `MANIFEST`, so a reader that finds no valid one knows something is gone.
/// It also makes a release that predates the manifest refuse the log, since
/// that release would rotate and compact without updating the manifest.
pub const FORMAT_VERSION: u32 = 2;

/// Oldest segment format version this build reads: logs written by every
/// earlier release open in place. Readers refuse any version outside
/// `FORMAT_VERSION_OLDEST..=FORMAT_VERSION` rather than guess (see the
/// version history in docs/wal-format.md).
pub const FORMAT_VERSION_OLDEST: u32 = 1;

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

/// Name of the manifest: which segments must exist, and how long the newest
/// was when last recorded. See [`ManifestSlot`].
pub const MANIFEST_FILE_NAME: &str = "MANIFEST";

/// First 8 bytes of each manifest slot.
pub const MANIFEST_MAGIC: [u8; 8] = *b"SPOOLMAN";

/// Manifest format version; readers refuse any other.
pub const MANIFEST_VERSION: u32 = 1;

/// Bytes of one manifest slot: magic (8), version (4), flags (4),
/// generation (8), first segment (8), last segment (8), last segment's
/// length (8), CRC-32 of the first 48 bytes (4).
pub const MANIFEST_SLOT_LEN: usize = 52;

/// Offset of slot 1 (slot 0 is at 0), and half the manifest file's length.
/// A slot is overwritten in place, so a crash can tear it; a page (and the
/// physical sector of current disks) apart, a torn write of one slot cannot
/// reach the other, which keeps the previous, valid generation.
pub const MANIFEST_SLOT_STRIDE: u64 = 4096;

/// Length of the manifest file: two slots, each padded with zeros.
pub const MANIFEST_FILE_LEN: u64 = 2 * MANIFEST_SLOT_STRIDE;

/// Manifest flag: written when the log was closed with everything synced,
/// so `last_segment_len` is the exact final length, not a lower bound.
pub const MANIFEST_FLAG_CLEAN: u32 = 1;

const _: () = {
    // A record length must fit the u32 length field.
    assert!(RECORD_MAX_BYTES <= u32::MAX as usize);
    // Room for the largest job body plus its metadata.
    assert!(RECORD_MAX_BYTES >= (1 << 30) + (64 << 10));
    assert!(SEGMENT_MAX_BYTES_DEFAULT > SEGMENT_HEADER_LEN + RECORD_HEADER_LEN);
    // magic, version, sequence, previous segment's length, crc
    assert!(MAGIC.len() + 4 + 8 + 8 + 4 == SEGMENT_HEADER_LEN as usize);
    // magic, version, flags, generation, first, last, last's length, crc
    assert!(MANIFEST_MAGIC.len() + 4 + 4 + 8 + 8 + 8 + 8 + 4 == MANIFEST_SLOT_LEN);
    assert!(MANIFEST_SLOT_LEN as u64 <= MANIFEST_SLOT_STRIDE);
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

/// The 32-byte header (of version [`FORMAT_VERSION`]) that opens segment
/// `seq`. `prev_segment_len` is the
/// final length of segment `seq - 1` (0 if there is none): segments before
/// the last are never written again, so recovery can tell that one lost
/// whole records from its end, which its own bytes cannot show.
pub fn encode_segment_header(seq: u64, prev_segment_len: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    encode_segment_header_with_version(FORMAT_VERSION, seq, prev_segment_len)
}

/// [`encode_segment_header`] of any format version, for tests and tools
/// that build logs as earlier releases wrote them (the writer only ever
/// writes [`FORMAT_VERSION`]).
pub fn encode_segment_header_with_version(
    version: u32,
    seq: u64,
    prev_segment_len: u64,
) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
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
                write!(f, "format version {v} is not supported (this build reads versions {FORMAT_VERSION_OLDEST} to {FORMAT_VERSION})")
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
    /// [`FORMAT_VERSION_OLDEST`] to [`FORMAT_VERSION`].
    pub(crate) version: u32,
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
    if !(FORMAT_VERSION_OLDEST..=FORMAT_VERSION).contains(&version) {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    let seq = le_u64(&h[12..20]);
    if seq != expected_seq {
        return Err(HeaderError::WrongSequence { found: seq });
    }
    Ok(SegmentHeader {
        version,
        prev_segment_len: le_u64(&h[20..28]),
    })
}

/// What one manifest slot says. The manifest is the log's record of which
/// segments must exist: compaction deletes segments from the front, and new
/// ones are added at the back, so without it a missing oldest or newest file
/// would look like a shorter log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestSlot {
    /// Incremented on every write; the valid slot with the higher one wins.
    pub generation: u64,
    /// Oldest segment that must exist (segments before it were compacted
    /// away; leftovers of a compaction interrupted by a crash are deleted).
    pub first_segment: u64,
    /// Newest segment that must exist. The writer creates a segment before
    /// it records it here, so `last_segment + 1` may exist too (header only).
    pub last_segment: u64,
    /// `last_segment` held at least this many bytes (header and records),
    /// all durable, when the slot was written.
    pub last_segment_len: u64,
    /// Written at a clean close: `last_segment_len` is its exact length.
    pub clean: bool,
}

/// Encodes one manifest slot (without its zero padding).
pub fn encode_manifest_slot(slot: &ManifestSlot) -> [u8; MANIFEST_SLOT_LEN] {
    let mut b = [0u8; MANIFEST_SLOT_LEN];
    b[0..8].copy_from_slice(&MANIFEST_MAGIC);
    b[8..12].copy_from_slice(&MANIFEST_VERSION.to_le_bytes());
    let flags = if slot.clean { MANIFEST_FLAG_CLEAN } else { 0 };
    b[12..16].copy_from_slice(&flags.to_le_bytes());
    b[16..24].copy_from_slice(&slot.generation.to_le_bytes());
    b[24..32].copy_from_slice(&slot.first_segment.to_le_bytes());
    b[32..40].copy_from_slice(&slot.last_segment.to_le_bytes());
    b[40..48].copy_from_slice(&slot.last_segment_len.to_le_bytes());
    let crc = crc32fast::hash(&b[0..48]);
    b[48..52].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Why a manifest slot was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotError {
    /// Torn, damaged, or never written: the other slot may still be good.
    Invalid(&'static str),
    /// Well-formed (checksum valid) but from a format this build does not
    /// know: refused, never guessed at or overwritten.
    Unsupported { version: u32, flags: u32 },
}

/// Checks one manifest slot (`bytes` may be short or longer than a slot).
pub(crate) fn decode_manifest_slot(bytes: &[u8]) -> Result<ManifestSlot, SlotError> {
    let b = bytes
        .get(..MANIFEST_SLOT_LEN)
        .ok_or(SlotError::Invalid("shorter than a slot"))?;
    if b[0..8] != MANIFEST_MAGIC {
        return Err(SlotError::Invalid("magic is not \"SPOOLMAN\""));
    }
    if crc32fast::hash(&b[0..48]) != le_u32(&b[48..52]) {
        return Err(SlotError::Invalid("checksum mismatch"));
    }
    let (version, flags) = (le_u32(&b[8..12]), le_u32(&b[12..16]));
    if version != MANIFEST_VERSION || flags & !MANIFEST_FLAG_CLEAN != 0 {
        return Err(SlotError::Unsupported { version, flags });
    }
    let slot = ManifestSlot {
        generation: le_u64(&b[16..24]),
        first_segment: le_u64(&b[24..32]),
        last_segment: le_u64(&b[32..40]),
        last_segment_len: le_u64(&b[40..48]),
        clean: flags & MANIFEST_FLAG_CLEAN != 0,
    };
    // The writer never records these; a checksum that matches them anyway
    // is damage (or a bug), not a log to check against.
    if slot.first_segment == 0
        || slot.first_segment > slot.last_segment
        || slot.last_segment_len < SEGMENT_HEADER_LEN
    {
        return Err(SlotError::Invalid("inconsistent fields"));
    }
    Ok(slot)
}

/// What a manifest file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ManifestFile {
    /// The newest valid slot, and its index (0 or 1).
    Valid(ManifestSlot, usize),
    /// Neither slot is valid; why, per slot.
    NoValidSlot(String),
    /// A slot from a newer manifest format: what it says.
    Unsupported(String),
}

/// Reads both slots of a manifest file's bytes and picks the newest valid.
pub(crate) fn decode_manifest(bytes: &[u8]) -> ManifestFile {
    let mut best: Option<(ManifestSlot, usize)> = None;
    let mut why = Vec::new();
    for index in 0..2 {
        #[allow(clippy::cast_possible_truncation)] // 0 or 4096
        let at = index * MANIFEST_SLOT_STRIDE as usize;
        match decode_manifest_slot(bytes.get(at..).unwrap_or(&[])) {
            Ok(slot) => {
                if best.is_none_or(|(b, _)| slot.generation > b.generation) {
                    best = Some((slot, index));
                }
            }
            Err(SlotError::Invalid(reason)) => why.push(format!("slot {index}: {reason}")),
            Err(SlotError::Unsupported { version, flags }) => {
                return ManifestFile::Unsupported(format!(
                    "slot {index} is of manifest format version {version} with flags {flags:#x}; \
                     this build reads version {MANIFEST_VERSION} with flags up to {MANIFEST_FLAG_CLEAN:#x}"
                ))
            }
        }
    }
    match best {
        Some((slot, index)) => ManifestFile::Valid(slot, index),
        None => ManifestFile::NoValidSlot(why.join("; ")),
    }
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
                version: 2,
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
        assert_eq!(h[8..12], [2, 0, 0, 0]);
        assert_eq!(h[12..20], [2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(h[20..28], [2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(le_u32(&h[28..32]), crc32fast::hash(&h[..28]));
    }

    fn with_version(version: u32) -> [u8; 32] {
        let h = encode_segment_header_with_version(version, 1, 0);
        assert_eq!(h[8..12], version.to_le_bytes());
        assert_eq!(le_u32(&h[28..32]), crc32fast::hash(&h[..28]));
        h
    }

    #[test]
    fn versions_1_and_2_are_read_and_newer_ones_reported_as_such() {
        for v in [1, 2] {
            assert_eq!(
                decode_segment_header(&with_version(v), 1).map(|h| h.version),
                Ok(v)
            );
        }
        for v in [0, 3] {
            assert_eq!(
                decode_segment_header(&with_version(v), 1),
                Err(HeaderError::UnsupportedVersion(v))
            );
        }
    }

    const SLOT: ManifestSlot = ManifestSlot {
        generation: 7,
        first_segment: 3,
        last_segment: 5,
        last_segment_len: 0x1234,
        clean: true,
    };

    #[test]
    fn manifest_slot_layout_is_the_documented_one() {
        let b = encode_manifest_slot(&SLOT);
        assert_eq!(&b[0..8], b"SPOOLMAN");
        assert_eq!(b[8..12], [1, 0, 0, 0]);
        assert_eq!(b[12..16], [1, 0, 0, 0]);
        assert_eq!(b[16..24], [7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b[24..32], [3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b[32..40], [5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b[40..48], [0x34, 0x12, 0, 0, 0, 0, 0, 0]);
        assert_eq!(le_u32(&b[48..52]), crc32fast::hash(&b[..48]));
        assert_eq!(decode_manifest_slot(&b), Ok(SLOT));
        for i in 0..b.len() {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert!(decode_manifest_slot(&bad).is_err(), "byte {i}");
        }
    }

    #[test]
    fn manifest_takes_the_newest_valid_slot() {
        let mut file = vec![0u8; MANIFEST_FILE_LEN as usize];
        let older = ManifestSlot {
            generation: 6,
            ..SLOT
        };
        file[..MANIFEST_SLOT_LEN].copy_from_slice(&encode_manifest_slot(&older));
        file[4096..4096 + MANIFEST_SLOT_LEN].copy_from_slice(&encode_manifest_slot(&SLOT));
        assert_eq!(decode_manifest(&file), ManifestFile::Valid(SLOT, 1));
        // A torn newer slot leaves the older one.
        file[4096 + 20] ^= 1;
        assert_eq!(decode_manifest(&file), ManifestFile::Valid(older, 0));
        file[3] ^= 1;
        assert!(matches!(
            decode_manifest(&file),
            ManifestFile::NoValidSlot(_)
        ));
        assert!(matches!(decode_manifest(&[]), ManifestFile::NoValidSlot(_)));
        // A newer format is refused, even next to a valid slot.
        let mut newer = encode_manifest_slot(&SLOT);
        newer[8] = 2;
        let crc = crc32fast::hash(&newer[..48]);
        newer[48..52].copy_from_slice(&crc.to_le_bytes());
        file[4096..4096 + MANIFEST_SLOT_LEN].copy_from_slice(&newer);
        file[3] ^= 1;
        assert!(matches!(
            decode_manifest(&file),
            ManifestFile::Unsupported(_)
        ));
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
