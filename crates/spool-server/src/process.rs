//! Facts about the running process that beanstalkd's `stats` reports: pid,
//! CPU time, uptime, host name and OS, and free disk space. The only module
//! that calls libc.
#![allow(unsafe_code)]

use std::ffi::CStr;
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
