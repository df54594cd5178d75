//! How many CPUs this process may use: the cgroup CPU quota when one is set
//! (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), else
//! the CPUs the scheduler lets it run on. Like automaxprocs for Go: a
//! container limited to 2 CPUs on a 64-core host must not start 64 worker
//! threads and then be throttled.
//!
//! The quota of every ancestor cgroup counts (a parent's limit binds its
//! children), so the walk goes from the process's cgroup up to the mount
//! root and keeps the smallest.
//!
//! std's `available_parallelism` applies the same quotas (and the CPU
//! affinity mask) on Linux; the budget never exceeds it. What this module
//! adds is the account of where the number came from, for the startup log
//! an operator reads when a pod is throttled, and a rule that is tested
//! against cgroup v1 and v2 layouts here rather than trusted.

use std::path::{Path, PathBuf};

/// The CPU budget and where it came from, for the startup log.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuBudget {
    /// Whole CPUs to size thread pools by: at least 1.
    pub cpus: usize,
    /// The cgroup quota in CPUs, when one is set.
    pub quota_cpus: Option<f64>,
    /// Which file set the quota, or why none applies.
    pub source: String,
}

/// Reads the budget of the running process.
pub fn detect() -> CpuBudget {
    let online = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    budget(online, &proc_cgroup, &mountinfo, Path::new("/"))
}

/// The budget given the scheduler's CPU count, the contents of
/// `/proc/self/cgroup` and `/proc/self/mountinfo`, and the directory the
/// mount points are relative to (`/`, or a fixture in tests).
pub fn budget(online: usize, proc_cgroup: &str, mountinfo: &str, fs_root: &Path) -> CpuBudget {
    let online = online.max(1);
    match quota(proc_cgroup, mountinfo, fs_root) {
        Some((quota_cpus, source)) => CpuBudget {
            // Rounded down, as automaxprocs does: 1.5 CPUs of quota keep one
            // busy thread from being throttled; never fewer than one.
            cpus: (quota_cpus.floor() as usize).clamp(1, online),
            quota_cpus: Some(quota_cpus),
            source,
        },
        None => CpuBudget {
            cpus: online,
            quota_cpus: None,
            source: "no cgroup CPU quota; CPUs available to the process".to_string(),
        },
    }
}

/// The smallest quota (in CPUs) on the way from the process's cgroup up to
/// the mount root, and the file that set it.
fn quota(proc_cgroup: &str, mountinfo: &str, fs_root: &Path) -> Option<(f64, String)> {
    let mut best: Option<(f64, String)> = None;
    for (version, dir, mount) in cgroup_dirs(proc_cgroup, mountinfo, fs_root) {
        let mut at = dir;
        loop {
            let found = match version {
                Version::V2 => read_v2(&at),
                Version::V1 => read_v1(&at),
            };
            if let Some((cpus, file)) = found {
                if best.as_ref().is_none_or(|(b, _)| cpus < *b) {
                    best = Some((cpus, file.display().to_string()));
                }
            }
            if at == mount || !at.pop() || !at.starts_with(&mount) {
                break;
            }
        }
    }
    best
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Version {
    V1,
    V2,
}

/// For each CPU controller hierarchy the process is in: its cgroup's
/// directory and the hierarchy's mount point.
fn cgroup_dirs(
    proc_cgroup: &str,
    mountinfo: &str,
    fs_root: &Path,
) -> Vec<(Version, PathBuf, PathBuf)> {
    let mut dirs = Vec::new();
    for line in proc_cgroup.lines() {
        // hierarchy-id:controllers:path
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let version = if controllers.is_empty() {
            Version::V2
        } else if controllers.split(',').any(|c| c == "cpu") {
            Version::V1
        } else {
            continue;
        };
        for mount in mountinfo.lines().filter_map(parse_mount) {
            let matches = match version {
                Version::V2 => mount.fstype == "cgroup2",
                Version::V1 => {
                    mount.fstype == "cgroup" && mount.super_options.split(',').any(|o| o == "cpu")
                }
            };
            if !matches {
                continue;
            }
            // The mount shows the hierarchy from `root` down; the process's
            // path is relative to the hierarchy's top.
            let Some(relative) = Path::new(path).strip_prefix(mount.root).ok() else {
                continue;
            };
            let mount_dir = fs_root.join(mount.mount_point.trim_start_matches('/'));
            dirs.push((version, mount_dir.join(relative), mount_dir));
        }
    }
    dirs
}

struct Mount<'a> {
    root: &'a str,
    mount_point: &'a str,
    fstype: &'a str,
    super_options: &'a str,
}

/// One line of /proc/self/mountinfo: `id parent dev root mount_point
/// options [optional fields] - fstype source super_options`.
fn parse_mount(line: &str) -> Option<Mount<'_>> {
    let (before, after) = line.split_once(" - ")?;
    let mut fields = before.split(' ');
    let root = fields.nth(3)?;
    let mount_point = fields.next()?;
    let mut after = after.split(' ');
    let fstype = after.next()?;
    let _source = after.next()?;
    let super_options = after.next().unwrap_or("");
    Some(Mount {
        root,
        mount_point,
        fstype,
        super_options,
    })
}

/// cgroup v2 `cpu.max`: `max PERIOD` (no limit) or `QUOTA PERIOD`.
fn read_v2(dir: &Path) -> Option<(f64, PathBuf)> {
    let file = dir.join("cpu.max");
    let text = std::fs::read_to_string(&file).ok()?;
    let mut parts = text.split_whitespace();
    let quota: f64 = parts.next()?.parse().ok()?;
    let period: f64 = parts.next()?.parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| (quota / period, file))
}

/// cgroup v1: `cpu.cfs_quota_us` (-1: no limit) over `cpu.cfs_period_us`.
fn read_v1(dir: &Path) -> Option<(f64, PathBuf)> {
    let file = dir.join("cpu.cfs_quota_us");
    let quota: f64 = std::fs::read_to_string(&file).ok()?.trim().parse().ok()?;
    let period: f64 = std::fs::read_to_string(dir.join("cpu.cfs_period_us"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (quota > 0.0 && period > 0.0).then(|| (quota / period, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture(PathBuf);

    impl Fixture {
        fn new(tag: &str) -> Fixture {
            let dir = std::env::temp_dir().join(format!(
                "spool-cpu-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Fixture(dir)
        }

        fn write(&self, path: &str, text: &str) {
            let file = self.0.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, text).unwrap();
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const V2_MOUNT: &str =
        "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn cgroup_v2_quota_sets_the_budget() {
        let fx = Fixture::new("v2");
        fx.write("sys/fs/cgroup/kubepods/pod1/cpu.max", "250000 100000\n");
        let b = budget(64, "0::/kubepods/pod1\n", V2_MOUNT, &fx.0);
        assert_eq!(b.cpus, 2, "2.5 CPUs of quota round down to 2");
        assert_eq!(b.quota_cpus, Some(2.5));
        assert!(b.source.ends_with("kubepods/pod1/cpu.max"), "{}", b.source);
    }

    #[test]
    fn a_parents_quota_binds_its_children() {
        let fx = Fixture::new("parent");
        fx.write("sys/fs/cgroup/kubepods/cpu.max", "100000 100000\n");
        fx.write("sys/fs/cgroup/kubepods/pod1/cpu.max", "max 100000\n");
        let b = budget(8, "0::/kubepods/pod1\n", V2_MOUNT, &fx.0);
        assert_eq!(b.cpus, 1);
        assert!(b.source.ends_with("kubepods/cpu.max"), "{}", b.source);
    }

    #[test]
    fn unlimited_v2_uses_the_online_cpus() {
        let fx = Fixture::new("max");
        fx.write("sys/fs/cgroup/cpu.max", "max 100000\n");
        let b = budget(8, "0::/\n", V2_MOUNT, &fx.0);
        assert_eq!(b.cpus, 8);
        assert_eq!(b.quota_cpus, None);
    }

    #[test]
    fn a_small_quota_still_gets_one_cpu_and_never_more_than_online() {
        let fx = Fixture::new("small");
        fx.write("sys/fs/cgroup/cpu.max", "20000 100000\n");
        assert_eq!(budget(8, "0::/\n", V2_MOUNT, &fx.0).cpus, 1);
        fx.write("sys/fs/cgroup/cpu.max", "1600000 100000\n");
        assert_eq!(budget(4, "0::/\n", V2_MOUNT, &fx.0).cpus, 4);
    }

    #[test]
    fn cgroup_v1_cfs_quota_sets_the_budget() {
        let fx = Fixture::new("v1");
        let mountinfo = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
                         35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n";
        fx.write(
            "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us",
            "300000\n",
        );
        fx.write(
            "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us",
            "100000\n",
        );
        let cgroup = "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n";
        let b = budget(16, cgroup, mountinfo, &fx.0);
        assert_eq!(b.cpus, 3);
        assert!(b.source.ends_with("cpu.cfs_quota_us"), "{}", b.source);
        // -1 is "no limit".
        fx.write(
            "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us",
            "-1\n",
        );
        assert_eq!(budget(16, cgroup, mountinfo, &fx.0).cpus, 16);
    }

    #[test]
    fn a_container_sees_its_cgroup_at_the_mount_root() {
        // Inside a container the hierarchy is mounted from the container's
        // own cgroup: root `/docker/abc`, and /proc/self/cgroup says the same.
        let fx = Fixture::new("ns");
        fx.write("sys/fs/cgroup/cpu.max", "200000 100000\n");
        let mountinfo = "30 23 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let b = budget(32, "0::/docker/abc\n", mountinfo, &fx.0);
        assert_eq!(b.cpus, 2);
    }

    #[test]
    fn garbage_never_panics() {
        for cgroup in ["", ":::", "x", "0::", "1:cpu:", "\n\n"] {
            for mountinfo in ["", " - ", "1 2 3", "a b c d e f - cgroup2"] {
                let b = budget(4, cgroup, mountinfo, Path::new("/nonexistent"));
                assert_eq!(b.cpus, 4);
            }
        }
        assert_eq!(budget(0, "", "", Path::new("/")).cpus, 1);
    }
}
