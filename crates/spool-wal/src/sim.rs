//! An in-memory [`Storage`] for tests: it injects I/O failures and builds the
//! image a crash would leave.
//!
//! It tracks, for every file, the bytes written so far and the bytes last made
//! durable by `sync_data`, and, per directory, which entries were made durable
//! by `sync_dir`. [`SimStorage::crash_image`] then keeps what a real crash is
//! guaranteed to keep (synced data under synced names) plus an arbitrary
//! amount of the rest: a prefix of each file's unsynced changes, whose last
//! bytes may be garbled or read back as zeros (the file size reached the disk
//! but the data did not), and either state of each unsynced directory entry.
//!
//! Unsynced changes include overwrites of synced bytes (records written into
//! the zeroed region the log keeps ahead of its end, a manifest slot) as
//! well as growth (that region itself, which until synced may come back
//! short, garbled at its end, or not at all); bytes after the kept prefix
//! are the synced ones.
//!
//! It does not model a crash that persists later unsynced pages of a file but
//! not earlier ones; see "Limits of torn-tail detection" in
//! docs/wal-format.md.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::{parent_dir, LockGuard, Storage, WriteFile};

/// A failure to inject. `nth` counts from 0 from the moment the fault is
/// injected, among the operations the variant names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The `nth` file write fails with `kind` after writing the first
    /// `written` bytes of its buffer (as a short write followed by ENOSPC
    /// would).
    Write {
        nth: u64,
        kind: io::ErrorKind,
        written: usize,
    },
    /// The `nth` `sync_data` or `sync_dir` fails (EIO); nothing it would
    /// have made durable becomes durable.
    Sync { nth: u64 },
    /// The `nth` `zero_extend` fails with `kind` after growing the file by
    /// half the requested zeros.
    ZeroFill { nth: u64, kind: io::ErrorKind },
    /// The `nth` mutating operation (create, write, fsync, truncate, remove,
    /// mkdir) and every operation after it fail: the machine lost power just
    /// before it. Take [`SimStorage::crash_image`] afterwards.
    PowerCut { nth: u64 },
}

/// In-memory storage with fault injection and crash images. Clones share
/// the same state, so a test keeps a clone while the log uses another.
#[derive(Clone, Default)]
pub struct SimStorage {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for SimStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock_state();
        f.debug_struct("SimStorage")
            .field("files", &st.files.keys().collect::<Vec<_>>())
            .field("powered_off", &st.powered_off)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    dirs: BTreeSet<PathBuf>,
    files: BTreeMap<PathBuf, SimFile>,
    /// Entries whose existence survives a crash.
    durable_names: BTreeSet<PathBuf>,
    /// Files removed since their directory was last synced: after a crash
    /// they may be back, with their durable contents.
    removed_unsynced: BTreeMap<PathBuf, Vec<u8>>,
    locks: BTreeSet<PathBuf>,
    faults: Vec<Fault>,
    writes: u64,
    zero_fills: u64,
    syncs: u64,
    mutations: u64,
    powered_off: bool,
}

#[derive(Clone, Default)]
struct SimFile {
    data: Vec<u8>,
    durable: Vec<u8>,
}

fn power_cut_error() -> io::Error {
    io::Error::other("simulated power cut")
}

impl State {
    /// Counts a mutating operation; fails if the power is (now) off.
    /// Counts a write (a mutation) and returns the write fault planned for
    /// it, if any: (error kind, bytes that reach the file first).
    fn next_write(&mut self) -> io::Result<Option<(io::ErrorKind, usize)>> {
        self.mutation()?;
        let n = self.writes;
        self.writes += 1;
        Ok(self.faults.iter().find_map(|f| match f {
            Fault::Write { nth, kind, written } if *nth == n => Some((*kind, *written)),
            _ => None,
        }))
    }

    fn mutation(&mut self) -> io::Result<()> {
        if self.powered_off {
            return Err(power_cut_error());
        }
        let n = self.mutations;
        self.mutations += 1;
        if self
            .faults
            .iter()
            .any(|f| matches!(f, Fault::PowerCut { nth } if *nth == n))
        {
            self.powered_off = true;
            return Err(power_cut_error());
        }
        Ok(())
    }

    fn check_power(&self) -> io::Result<()> {
        if self.powered_off {
            Err(power_cut_error())
        } else {
            Ok(())
        }
    }

    fn file_mut(&mut self, path: &Path) -> io::Result<&mut SimFile> {
        self.files.get_mut(path).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no such file", path.display()),
            )
        })
    }

    fn sync_fault(&mut self) -> io::Result<()> {
        let n = self.syncs;
        self.syncs += 1;
        if self
            .faults
            .iter()
            .any(|f| matches!(f, Fault::Sync { nth } if *nth == n))
        {
            return Err(io::Error::other("simulated fsync failure (EIO)"));
        }
        Ok(())
    }
}

/// SplitMix64: a small, good-enough generator so that crash images are a
/// pure function of a seed (and proptest can shrink the seed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..=max`.
    fn upto(&mut self, max: usize) -> usize {
        #[allow(clippy::cast_possible_truncation)] // result is <= max
        let r = (self.next() % (max as u64 + 1)) as usize;
        r
    }
}

impl SimStorage {
    pub fn new() -> Self {
        SimStorage::default()
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the state from the others.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Arms a fault; counting for it starts now.
    pub fn inject(&self, fault: Fault) {
        let mut st = self.lock_state();
        let rebased = match fault {
            Fault::Write { nth, kind, written } => Fault::Write {
                nth: nth + st.writes,
                kind,
                written,
            },
            Fault::Sync { nth } => Fault::Sync {
                nth: nth + st.syncs,
            },
            Fault::ZeroFill { nth, kind } => Fault::ZeroFill {
                nth: nth + st.zero_fills,
                kind,
            },
            Fault::PowerCut { nth } => Fault::PowerCut {
                nth: nth + st.mutations,
            },
        };
        st.faults.push(rebased);
    }

    /// Whether a [`Fault::PowerCut`] has fired.
    pub fn powered_off(&self) -> bool {
        self.lock_state().powered_off
    }

    /// Mutating operations performed so far (the count `PowerCut` uses).
    pub fn mutation_count(&self) -> u64 {
        self.lock_state().mutations
    }

    /// The current contents of a file (what a reader would see now).
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        self.lock_state().files.get(path).map(|f| f.data.clone())
    }

    /// Creates or replaces a file whose contents and name are already durable
    /// (as if written by an earlier, cleanly shut down process).
    pub fn put_file(&self, path: &Path, contents: &[u8]) {
        let mut st = self.lock_state();
        st.dirs.insert(parent_dir(path));
        st.files.insert(
            path.to_path_buf(),
            SimFile {
                data: contents.to_vec(),
                durable: contents.to_vec(),
            },
        );
        st.durable_names.insert(path.to_path_buf());
    }

    /// Names of the files in `dir`, sorted.
    pub fn file_names(&self, dir: &Path) -> Vec<String> {
        let st = self.lock_state();
        names_in(&st, dir)
    }

    /// A fresh storage holding what a crash at this moment could leave on
    /// disk, chosen by `seed`: all synced data under synced names, plus, per
    /// file, a random prefix of the unsynced bytes whose last few bytes may be
    /// garbled or zero, and either state of each unsynced directory entry.
    /// Locks and faults are not carried over (the process is gone).
    pub fn crash_image(&self, seed: u64) -> SimStorage {
        let st = self.lock_state();
        let mut rng = Rng(seed);
        let mut image = State {
            dirs: st.dirs.clone(),
            ..State::default()
        };
        let mut keep = |path: &Path, contents: Vec<u8>| {
            image.files.insert(
                path.to_path_buf(),
                SimFile {
                    data: contents.clone(),
                    durable: contents,
                },
            );
            image.durable_names.insert(path.to_path_buf());
        };
        for (path, file) in &st.files {
            if !st.durable_names.contains(path) && rng.upto(1) == 0 {
                continue; // the new directory entry did not reach the disk
            }
            keep(path, crash_contents(file, &mut rng));
        }
        for (path, durable) in &st.removed_unsynced {
            if rng.upto(1) == 0 {
                keep(path, durable.clone()); // the unlink did not reach the disk
            }
        }
        SimStorage {
            state: Arc::new(Mutex::new(image)),
        }
    }
}

fn names_in(st: &State, dir: &Path) -> Vec<String> {
    st.files
        .keys()
        .filter(|p| parent_dir(p) == dir)
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect()
}

/// What one file may hold after a crash.
fn crash_contents(file: &SimFile, rng: &mut Rng) -> Vec<u8> {
    let durable_len = file.durable.len();
    if file.data.len() < durable_len {
        // Truncated since the last sync: either version.
        return if rng.upto(1) == 0 {
            file.durable.clone()
        } else {
            file.data.clone()
        };
    }
    // Unsynced changes start at the first byte that differs from the synced
    // contents: an overwrite inside them, or else growth past their end.
    // They end at the end of the file if it grew, else at the last byte that
    // differs: bytes no write touched (the manifest's other slot) are never
    // damaged by a crash.
    let common = file.data.len().min(durable_len);
    let (data, durable) = (&file.data[..common], &file.durable[..common]);
    let first_change = first_difference(data, durable).unwrap_or(durable_len);
    let change_end = if file.data.len() > durable_len {
        file.data.len()
    } else {
        last_difference(data, durable).map_or(first_change, |last| last + 1)
    };
    let unsynced = change_end - first_change;
    let kept = rng.upto(unsynced);
    let kept_end = first_change + kept;
    let mut out = file.data[..kept_end].to_vec();
    // Only unsynced bytes may be damaged.
    let damage = rng.upto(kept.min(16));
    let start = out.len() - damage;
    match rng.upto(2) {
        0 => {}
        1 => {
            for b in &mut out[start..] {
                #[allow(clippy::cast_possible_truncation)] // one random byte
                let r = rng.next() as u8;
                *b ^= r | 1;
            }
        }
        _ => out[start..].fill(0),
    }
    // Past the kept changes the synced bytes are still there (the size was
    // synced even where the new data was not).
    if kept_end < durable_len {
        out.extend_from_slice(&file.durable[kept_end..]);
    }
    out
}

/// Block size for comparing file images: slice equality is a `memcmp`,
/// fast even in debug builds, where a byte-wise iterator is not (crash
/// tests compare multi-MiB zero-filled segments thousands of times).
const COMPARE_BLOCK_BYTES: usize = 4096;

/// Index of the first byte where equally long `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    let block = a
        .chunks(COMPARE_BLOCK_BYTES)
        .zip(b.chunks(COMPARE_BLOCK_BYTES))
        .position(|(x, y)| x != y)?;
    let at = block * COMPARE_BLOCK_BYTES;
    (at..a.len()).find(|&i| a[i] != b[i])
}

/// Index of the last byte where equally long `a` and `b` differ.
fn last_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    let block = a
        .chunks(COMPARE_BLOCK_BYTES)
        .zip(b.chunks(COMPARE_BLOCK_BYTES))
        .rposition(|(x, y)| x != y)?;
    let at = block * COMPARE_BLOCK_BYTES;
    (at..a.len().min(at + COMPARE_BLOCK_BYTES))
        .rev()
        .find(|&i| a[i] != b[i])
}

struct SimLock {
    state: Arc<Mutex<State>>,
    path: PathBuf,
}

impl fmt::Debug for SimLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimLock").field("path", &self.path).finish()
    }
}

impl LockGuard for SimLock {}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.locks.remove(&self.path);
    }
}

struct SimHandle {
    state: Arc<Mutex<State>>,
    path: PathBuf,
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle")
            .field("path", &self.path)
            .finish()
    }
}

impl SimHandle {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl WriteFile for SimHandle {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut st = self.lock_state();
        let fault = st.next_write()?;
        let file = st.file_mut(&self.path)?;
        match fault {
            Some((kind, written)) => {
                file.data.extend_from_slice(&buf[..written.min(buf.len())]);
                Err(io::Error::new(kind, "simulated write failure"))
            }
            None => {
                file.data.extend_from_slice(buf);
                Ok(())
            }
        }
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.lock_state();
        let fault = st.next_write()?;
        let file = st.file_mut(&self.path)?;
        let at =
            usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let (buf, result) = match fault {
            Some((kind, written)) => (
                &buf[..written.min(buf.len())],
                Err(io::Error::new(kind, "simulated write failure")),
            ),
            None => (buf, Ok(())),
        };
        if file.data.len() < at + buf.len() {
            // Writing past the end leaves zeros in any gap, as a file does.
            file.data.resize(at + buf.len(), 0);
        }
        file.data[at..at + buf.len()].copy_from_slice(buf);
        result
    }

    fn zero_extend(&mut self, from: u64, to: u64) -> io::Result<()> {
        let mut st = self.lock_state();
        st.mutation()?;
        let n = st.zero_fills;
        st.zero_fills += 1;
        let fault = st.faults.iter().find_map(|f| match f {
            Fault::ZeroFill { nth, kind } if *nth == n => Some(*kind),
            _ => None,
        });
        let file = st.file_mut(&self.path)?;
        let bad = || io::Error::from(io::ErrorKind::InvalidInput);
        let from = usize::try_from(from).map_err(|_| bad())?;
        let to = usize::try_from(to).map_err(|_| bad())?;
        if from != file.data.len() || to < from {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "zero_extend must start at the end of the file",
            ));
        }
        match fault {
            Some(kind) => {
                file.data.resize(from + (to - from) / 2, 0);
                Err(io::Error::new(kind, "simulated zero-fill failure"))
            }
            None => {
                file.data.resize(to, 0);
                Ok(())
            }
        }
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let mut st = self.lock_state();
        st.mutation()?;
        st.sync_fault()?;
        let file = st.file_mut(&self.path)?;
        file.durable = file.data.clone();
        Ok(())
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        let mut st = self.lock_state();
        st.mutation()?;
        let file = st.file_mut(&self.path)?;
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        file.data.resize(len, 0);
        Ok(())
    }
}

impl Storage for SimStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock_state();
        if st.dirs.contains(dir) {
            return st.check_power();
        }
        st.mutation()?;
        st.dirs.insert(dir.to_path_buf());
        Ok(())
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn LockGuard>> {
        let mut st = self.lock_state();
        st.check_power()?;
        if !st.locks.insert(path.to_path_buf()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(Box::new(SimLock {
            state: Arc::clone(&self.state),
            path: path.to_path_buf(),
        }))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = self.lock_state();
        st.check_power()?;
        if !st.dirs.contains(dir) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no such directory", dir.display()),
            ));
        }
        Ok(names_in(&st, dir))
    }

    fn open_read(&self, path: &Path) -> io::Result<(Box<dyn Read + Send>, u64)> {
        let mut st = self.lock_state();
        st.check_power()?;
        let data = st.file_mut(path)?.data.clone();
        let len = data.len() as u64;
        Ok((Box::new(Cursor::new(data)), len))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        let mut st = self.lock_state();
        st.check_power()?;
        st.file_mut(path)?;
        Ok(Box::new(SimHandle {
            state: Arc::clone(&self.state),
            path: path.to_path_buf(),
        }))
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        let mut st = self.lock_state();
        st.mutation()?;
        if !st.dirs.contains(&parent_dir(path)) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such directory"));
        }
        if st.files.contains_key(path) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        st.files.insert(path.to_path_buf(), SimFile::default());
        Ok(Box::new(SimHandle {
            state: Arc::clone(&self.state),
            path: path.to_path_buf(),
        }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock_state();
        st.mutation()?;
        let file = st
            .files
            .remove(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        if st.durable_names.contains(path) {
            st.removed_unsynced.insert(path.to_path_buf(), file.durable);
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock_state();
        st.mutation()?;
        st.sync_fault()?;
        let st = &mut *st;
        st.durable_names.retain(|p| parent_dir(p) != dir);
        st.removed_unsynced.retain(|p, _| parent_dir(p) != dir);
        for p in st.files.keys() {
            if parent_dir(p) == dir {
                st.durable_names.insert(p.clone());
            }
        }
        Ok(())
    }
}
