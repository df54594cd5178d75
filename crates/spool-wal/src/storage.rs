//! The I/O seam: every file system operation the log performs goes through
//! [`Storage`], so that tests can swap the real file system
//! ([`FsStorage`]) for [`SimStorage`](crate::sim::SimStorage), which injects
//! failures and builds the image a crash would leave.
//!
//! The trait is deliberately small and shaped like what the log does, not like
//! a general file system: whole-file sequential reads, appends at the end of
//! a file (segment headers), positioned writes (records, into the zeroed
//! region kept ahead of the log's end), extension with written zeros,
//! truncation, fsyncs of files and directories.

use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// File system operations the log needs. Implementations must be usable from
/// any thread; the log calls them from the one thread that owns it.
pub trait Storage: Send + Sync + fmt::Debug {
    /// `mkdir -p`.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;

    /// Creates `path` if needed and takes an exclusive lock on it, held until
    /// the returned guard is dropped. Fails with
    /// [`io::ErrorKind::WouldBlock`] if someone else holds it.
    fn lock(&self, path: &Path) -> io::Result<Box<dyn LockGuard>>;

    /// Names (not paths) of the plain files in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;

    /// Opens `path` for sequential reading; also returns its length.
    fn open_read(&self, path: &Path) -> io::Result<(Box<dyn Read + Send>, u64)>;

    /// Opens an existing file for writing; `write_all` appends at its end.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WriteFile>>;

    /// Creates a new, empty file; fails if it exists.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WriteFile>>;

    /// Deletes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;

    /// Makes the directory's entries (files created or removed in it) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// A file open for writing.
pub trait WriteFile: Send + fmt::Debug {
    /// Writes all of `buf` at the end of the file. On error, any prefix of
    /// `buf` may have been written.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;

    /// Writes all of `buf` at byte `offset` (overwriting, or extending the
    /// file if it runs past the end). On error, any prefix of `buf` may have
    /// been written.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Grows the file from `from` (its current length) to `to` bytes by
    /// writing zeros, so that the blocks are allocated and later overwrites
    /// change no file metadata (`set_len` would leave a sparse hole instead).
    /// On error, the file may have grown by any number of zero bytes.
    fn zero_extend(&mut self, from: u64, to: u64) -> io::Result<()>;

    /// Makes the file's data durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;

    /// Makes the file's data and metadata durable (`fsync`); used after a
    /// truncation, whose size change `fdatasync` need not persist.
    fn sync_all(&mut self) -> io::Result<()>;

    /// Cuts the file to `len` bytes; later writes go to the new end.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

/// Holds a lock until dropped.
pub trait LockGuard: Send + fmt::Debug {}

/// The real file system, through `std::fs`.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsStorage;

#[derive(Debug)]
struct FsLock {
    // Closing the file releases the lock.
    _file: File,
}

impl LockGuard for FsLock {}

#[derive(Debug)]
struct FsFile {
    file: File,
}

impl WriteFile for FsFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        Write::write_all(&mut self.file, buf)
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        write_all_at(&self.file, buf, offset)
    }

    fn zero_extend(&mut self, from: u64, to: u64) -> io::Result<()> {
        let len = usize::try_from(to.saturating_sub(from))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // One allocation and one write per extension (a few MiB, once per
        // few MiB of records); a zeroed allocation costs no page touches
        // until the kernel copies from it.
        write_all_at(&self.file, &vec![0; len], from)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.file.seek(SeekFrom::Start(len))?;
        Ok(())
    }
}

#[cfg(unix)]
fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

#[cfg(not(unix))]
fn write_all_at(mut file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    // No positioned write in std here: seek, then write. The file position
    // is not relied on elsewhere except by `write_all`, which appends to a
    // file the log only ever grows or cuts before calling it.
    file.seek(SeekFrom::Start(offset))?;
    Write::write_all(&mut file, buf)
}

impl Storage for FsStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn LockGuard>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Box::new(FsLock { _file: file })),
            Err(TryLockError::WouldBlock) => Err(io::ErrorKind::WouldBlock.into()),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            // A name that is not UTF-8 cannot be a segment; keep it visible
            // (lossily) so that odd files are not silently different.
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn open_read(&self, path: &Path) -> io::Result<(Box<dyn Read + Send>, u64)> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok((Box::new(file), len))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        let mut file = OpenOptions::new().write(true).open(path)?;
        file.seek(SeekFrom::End(0))?;
        Ok(Box::new(FsFile { file }))
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        Ok(Box::new(FsFile { file }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// The directory that holds `path`, for directory fsyncs. A bare relative
/// name lives in `.`.
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
