//! The manifest file: reading it at open, and the writer that keeps it
//! current. Its layout is in `format.rs` and docs/wal-format.md.
//!
//! The manifest is written at open, at every rotation, before compaction
//! deletes segments, and at a clean close: a few times per segment, never
//! per commit. Its two slots are overwritten in place, alternately, each
//! write followed by an `fdatasync`: no file is created or renamed after the
//! first write, so updating it needs no free space (compaction runs on a
//! full disk) and no directory fsync, and a crash mid-write leaves the other
//! slot, one generation older, which is still true (see
//! [`ManifestWriter::write`]).

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::error::WalError;
use crate::format::{
    decode_manifest, encode_manifest_slot, ManifestFile, ManifestSlot, MANIFEST_FILE_LEN,
    MANIFEST_FILE_NAME, MANIFEST_SLOT_STRIDE,
};
use crate::storage::{Storage, WriteFile};

/// What the data directory's manifest file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ManifestState {
    /// No manifest file.
    Absent,
    /// A file without a valid slot: why.
    Damaged(String),
    /// The newest valid slot and its index.
    Valid(ManifestSlot, usize),
}

impl ManifestState {
    fn file_exists(&self) -> bool {
        !matches!(self, ManifestState::Absent)
    }
}

pub(crate) fn manifest_path(dir: &Path) -> PathBuf {
    dir.join(MANIFEST_FILE_NAME)
}

/// Reads the manifest of `dir`. A manifest of a newer format is an error:
/// this build cannot tell what it says, and must not overwrite it.
pub(crate) fn read_manifest(storage: &dyn Storage, dir: &Path) -> Result<ManifestState, WalError> {
    let path = manifest_path(dir);
    let (file, _) = match storage.open_read(&path) {
        Ok(opened) => opened,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ManifestState::Absent),
        Err(e) => return Err(WalError::io("open", path, e)),
    };
    // Anything past the two slots is not read (a damaged file may be huge).
    let mut bytes = Vec::new();
    file.take(MANIFEST_FILE_LEN)
        .read_to_end(&mut bytes)
        .map_err(|e| WalError::io("read", &path, e))?;
    match decode_manifest(&bytes) {
        ManifestFile::Valid(slot, index) => Ok(ManifestState::Valid(slot, index)),
        ManifestFile::NoValidSlot(why) => Ok(ManifestState::Damaged(why)),
        ManifestFile::Unsupported(why) => Err(WalError::BadHeader { path, reason: why }),
    }
}

/// Keeps the manifest current; owned by the [`Wal`](crate::Wal).
pub(crate) struct ManifestWriter {
    path: PathBuf,
    file: Box<dyn WriteFile>,
    /// Generation of the newest slot written.
    generation: u64,
    /// Index of the slot holding it; the next write goes to the other one.
    current: usize,
}

impl std::fmt::Debug for ManifestWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestWriter")
            .field("generation", &self.generation)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl ManifestWriter {
    /// Opens (or creates) the manifest of `dir` at the end of recovery and
    /// writes `slot` to both slots, so the file holds no older claims: after
    /// data loss was accepted, an older slot would claim segments or bytes
    /// that are gone.
    pub(crate) fn open(
        storage: &dyn Storage,
        dir: &Path,
        state: &ManifestState,
        mut slot: ManifestSlot,
    ) -> Result<ManifestWriter, WalError> {
        let path = manifest_path(dir);
        let (generation, current) = match state {
            ManifestState::Valid(old, index) => (old.generation, *index),
            // Slot 1 first, so that a new file's first write is slot 0.
            ManifestState::Absent | ManifestState::Damaged(_) => (0, 1),
        };
        if state.file_exists() {
            let file = storage
                .open_append(&path)
                .map_err(|e| WalError::io("open for writing", &path, e))?;
            let mut writer = ManifestWriter {
                path,
                file,
                generation,
                current,
            };
            // One slot at a time, each synced: a crash leaves one valid.
            for _ in 0..2 {
                writer
                    .write_slot(&mut slot)
                    .map_err(|(op, e)| WalError::io(op, &writer.path, e))?;
            }
            return Ok(writer);
        }
        // A new file is written whole: a crash before its directory entry
        // is synced leaves no manifest, or one with no valid slot, which
        // recovery accepts only while no segment depends on it (see
        // `Recovery::check_end`).
        let mut file = storage
            .create_new(&path)
            .map_err(|e| WalError::io("create manifest", &path, e))?;
        let mut bytes = vec![0u8; MANIFEST_FILE_LEN as usize];
        for index in 0..2 {
            slot.generation = generation + 1 + index as u64;
            let at = index * MANIFEST_SLOT_STRIDE as usize;
            let encoded = encode_manifest_slot(&slot);
            bytes[at..at + encoded.len()].copy_from_slice(&encoded);
        }
        file.write_all(&bytes)
            .map_err(|e| WalError::io("write manifest", &path, e))?;
        file.sync_data()
            .map_err(|e| WalError::io("fsync", &path, e))?;
        storage
            .sync_dir(dir)
            .map_err(|e| WalError::io("fsync directory", dir, e))?;
        Ok(ManifestWriter {
            path,
            file,
            generation: generation + 2,
            current: 1,
        })
    }

    /// Records the log's shape: the other slot is overwritten with the next
    /// generation and synced.
    ///
    /// Callers write only claims that are already true on disk (segments
    /// created and synced, records synced), and never weaker ones than the
    /// slot before except at open (which writes both slots), so that if a
    /// crash tears this write, the previous generation in the other slot is
    /// still true: recovery then only checks a little less.
    pub(crate) fn write(
        &mut self,
        first_segment: u64,
        last_segment: u64,
        last_segment_len: u64,
        clean: bool,
    ) -> Result<(), WalError> {
        let mut slot = ManifestSlot {
            generation: 0,
            first_segment,
            last_segment,
            last_segment_len,
            clean,
        };
        self.write_slot(&mut slot)
            .map_err(|(op, e)| WalError::io(op, &self.path, e))
    }

    /// Fails with the operation that failed: a write refused for want of
    /// space left the other slot as it was (callers may undo what the slot
    /// would have claimed); a failed sync is never retried.
    fn write_slot(&mut self, slot: &mut ManifestSlot) -> Result<(), (&'static str, io::Error)> {
        let next = 1 - self.current;
        slot.generation = self.generation + 1;
        self.file
            .write_all_at(
                &encode_manifest_slot(slot),
                next as u64 * MANIFEST_SLOT_STRIDE,
            )
            .map_err(|e| ("write manifest", e))?;
        self.file.sync_data().map_err(|e| ("fsync manifest", e))?;
        self.generation = slot.generation;
        self.current = next;
        Ok(())
    }
}
