//! Helpers shared by the integration tests. Each test binary uses a subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use spool_wal::sim::SimStorage;
use spool_wal::{Wal, WalOptions};

/// A directory under the system temp dir, unique to this process and call,
/// removed (with its contents) on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "spool-wal-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The data directory used inside `SimStorage`s.
pub fn sim_dir() -> PathBuf {
    PathBuf::from("/sim/data")
}

/// Opens the log in `sim`, reading every record.
pub fn open_sim(
    sim: &SimStorage,
    options: WalOptions,
) -> Result<(Wal, Vec<Vec<u8>>, spool_wal::RecoveryReport), spool_wal::WalError> {
    Wal::open_with_storage(Arc::new(sim.clone()), sim_dir(), options)?.collect_records()
}

/// Splits a segment file into its records, independently of the crate's
/// reader: skips the 32-byte header, then length / crc / payload until the
/// bytes run out or a frame does not check out.
pub fn parse_segment(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut pos = 32;
    while pos + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap());
        let Some(payload) = bytes.get(pos + 8..pos + 8 + len) else {
            break;
        };
        let mut h = crc32fast::Hasher::new();
        h.update(&bytes[pos..pos + 4]);
        h.update(payload);
        if h.finalize() != crc {
            break;
        }
        out.push(payload.to_vec());
        pos += 8 + len;
    }
    out
}

/// Start offsets of the records in a well-formed segment file.
pub fn record_offsets(bytes: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut pos = 32;
    while pos + 8 <= bytes.len() {
        out.push(pos as u64);
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        pos += 8 + len;
    }
    out
}
