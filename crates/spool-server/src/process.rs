//! Facts about the running process that beanstalkd's `stats` reports: pid,
//! CPU time, uptime, host name and OS, and free disk space; and the open file
//! limit that connection admission works against. The only module that
//! calls libc.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

use spool_proto::ProcessStats;

/// What stays fixed for the life of the process, and the start time.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    started: Instant,
    fixed: ProcessStats,
}

impl ProcessInfo {
    pub fn new(version: &str) -> ProcessInfo {
        let uname = uname();
        ProcessInfo {
            started: Instant::now(),
            fixed: ProcessStats {
                pid: std::process::id(),
                version: version.to_string(),
                id: random_instance_id(),
                hostname: uname.0,
                os: uname.1,
                platform: uname.2,
                ..ProcessStats::default()
            },
        }
    }

    /// The fixed facts plus CPU time and uptime as of now.
    pub fn snapshot(&self) -> ProcessStats {
        let (utime_us, stime_us) = cpu_time_us();
        ProcessStats {
            rusage_utime_us: utime_us,
            rusage_stime_us: stime_us,
            uptime_secs: self.started.elapsed().as_secs(),
            ..self.fixed.clone()
        }
    }
}

/// User and system CPU time of this process, in microseconds.
pub fn cpu_time_us() -> (u64, u64) {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return (0, 0);
        }
        usage
    };
    let us = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
    (us(usage.ru_utime), us(usage.ru_stime))
}

/// (nodename, version, machine) as beanstalkd prints them for hostname, os
/// and platform.
fn uname() -> (String, String, String) {
    // SAFETY: uname only writes NUL-terminated strings into the struct.
    unsafe {
        let mut name: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut name) != 0 {
            return Default::default();
        }
        let field = |f: &[libc::c_char]| CStr::from_ptr(f.as_ptr()).to_string_lossy().into_owned();
        (
            field(&name.nodename),
            field(&name.version),
            field(&name.machine),
        )
    }
}

/// A random 64-bit instance id in hex, like beanstalkd's `id` stat.
fn random_instance_id() -> String {
    let mut bytes = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes an unprivileged process may still write on the file system that
/// holds `path`, or `None` if it cannot be told.
pub fn available_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs only writes into the zeroed struct we pass, and reads
    // the NUL-terminated path.
    let stat = unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c_path.as_ptr(), &mut stat) != 0 {
            return None;
        }
        stat
    };
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// The soft and hard limits on open files (RLIMIT_NOFILE).
fn nofile_limits() -> io::Result<(u64, u64)> {
    // SAFETY: getrlimit only writes into the zeroed struct we pass.
    let limits = unsafe {
        let mut limits: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limits) != 0 {
            return Err(io::Error::last_os_error());
        }
        limits
    };
    Ok((limits.rlim_cur, limits.rlim_max))
}

/// Largest soft limit on open files the kernel accepts when the hard limit
/// is unlimited.
fn kernel_nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Raises the soft limit on open files to the hard limit, as servers
/// expecting many connections do (the default soft limit, often 1024, is a
/// relic of `select`). Returns the (soft, hard) limits in force afterwards.
/// Logs nothing: the caller does.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = nofile_limits()?;
    let target = if hard == libc::RLIM_INFINITY {
        // Linux refuses an unlimited soft limit; nr_open is its ceiling.
        kernel_nr_open().unwrap_or(soft)
    } else {
        hard
    };
    if target > soft {
        let limits = libc::rlimit {
            rlim_cur: target,
            rlim_max: hard,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limits) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    nofile_limits()
}

/// Grows the kernel's fd table to hold `slots` descriptors (at most the
/// soft fd limit), so that accepting connections later never waits for the
/// table to grow ([`crate::limits::FD_TABLE_PRESIZE_MAX`] says why): the
/// lowest fd at or above the last slot is taken by a duplicate and closed.
/// Call it before starting threads.
pub fn presize_fd_table(slots: u64) -> io::Result<()> {
    let (soft, _) = nofile_limits()?;
    let last = slots.min(soft).saturating_sub(1);
    let Ok(last) = libc::c_int::try_from(last) else {
        return Ok(());
    };
    let null = std::fs::File::open("/dev/null")?;
    // SAFETY: F_DUPFD_CLOEXEC duplicates an fd we own into a new one,
    // which is closed at once and never used.
    let copy = unsafe { libc::fcntl(null.as_raw_fd(), libc::F_DUPFD_CLOEXEC, last) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `copy` is the fd just made, owned by nothing else.
    unsafe { libc::close(copy) };
    Ok(())
}

/// The soft limit on open files: opening one more fd than this fails with
/// `EMFILE`.
pub fn fd_limit() -> io::Result<u64> {
    Ok(nofile_limits()?.0)
}

/// How many fds the process has open now. Linux 6.2 and later give the
/// count as the size of `/proc/self/fd` (a count of the fd table's bits,
/// microseconds even at 16k fds); older kernels say 0 there, and the
/// directory is listed instead, a read of every fd (~16 ms at 16k fds):
/// not for every accept.
pub fn open_fd_count() -> io::Result<u64> {
    match std::fs::metadata("/proc/self/fd")?.len() {
        0 => open_fd_count_by_listing(),
        open => Ok(open),
    }
}

/// [`open_fd_count`] by listing `/proc/self/fd`, which every kernel does.
fn open_fd_count_by_listing() -> io::Result<u64> {
    let listed = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    // The directory being read is itself an open fd in the listing.
    Ok(listed.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_limit_and_count_are_sane() {
        let limit = fd_limit().unwrap();
        let before = open_fd_count().unwrap();
        assert!(before >= 3 && before < limit, "{before} of {limit}");
        let (soft, hard) = nofile_limits().unwrap();
        assert!(soft <= hard);
    }

    #[test]
    fn the_quick_fd_count_is_the_listing_s() {
        // Other tests open and close fds meanwhile: the two agree at some
        // moment when nothing changed between them.
        for _ in 0..1_000 {
            let before = open_fd_count().unwrap();
            let listed = open_fd_count_by_listing().unwrap();
            let after = open_fd_count().unwrap();
            if before == listed && listed == after {
                return;
            }
        }
        panic!("the size of /proc/self/fd never matched its listing");
    }

    #[test]
    fn presizing_the_fd_table_leaves_no_fd_open() {
        // The duplicate lands at the last slot asked for, or at the
        // limit's; either way it is closed again. Other tests open fds
        // meanwhile, so the check is that no fd stays at that slot.
        let (soft, _) = nofile_limits().unwrap();
        for slots in [64, 4_096, u64::MAX] {
            presize_fd_table(slots).unwrap();
            let last = slots.min(soft) - 1;
            assert!(
                !std::path::Path::new(&format!("/proc/self/fd/{last}")).exists(),
                "fd {last} left open"
            );
        }
    }
}
