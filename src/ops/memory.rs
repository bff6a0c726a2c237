//! How much memory this process may use, for the default memory budget: physical RAM, or
//! the cgroup's limit when a unit's `MemoryMax=` (or a container) sets a lower one. Read once
//! at start and on reload, never by a core.

use std::path::Path;

/// The memory this process may use, in bytes.
pub fn available_bytes() -> u64 {
    let ram = physical_ram();
    match cgroup_limit(
        &std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default(),
        Path::new("/sys/fs/cgroup"),
    ) {
        Some(limit) if limit < ram => limit,
        _ => ram,
    }
}

/// The budget when the config sets none: half of what the process may use, so the rest is
/// left for the read buffers, the relay and the allocator's slack.
pub fn default_budget() -> u64 {
    (available_bytes() / 2).max(crate::config::MIN_MEMORY_BUDGET)
}

fn physical_ram() -> u64 {
    mem_total(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default()).unwrap_or(u64::MAX)
}

/// `MemTotal:` of /proc/meminfo, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib = line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    Some(kib.saturating_mul(1024))
}

/// The memory limit of this process's cgroup (v2 `memory.max`, or v1
/// `memory.limit_in_bytes`), given `/proc/self/cgroup` and the cgroup mount point.
fn cgroup_limit(proc_cgroup: &str, root: &Path) -> Option<u64> {
    let read = |path: &Path| -> Option<u64> {
        let text = std::fs::read_to_string(path).ok()?;
        // v2 says "max" for no limit; v1 says a huge page-rounded number.
        text.trim().parse::<u64>().ok().filter(|&v| v < 1 << 60)
    };
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        let limit = if controllers.is_empty() {
            read(&root.join(rel).join("memory.max")).or_else(|| read(&root.join("memory.max")))
        } else if controllers.split(',').any(|c| c == "memory") {
            let v1 = root.join("memory");
            // Inside a container the named path may not be visible: the mount is its own.
            read(&v1.join(rel).join("memory.limit_in_bytes"))
                .or_else(|| read(&v1.join("memory.limit_in_bytes")))
        } else {
            None
        };
        if limit.is_some() {
            return limit;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!(
            "ringway-cgroup-{}-{}",
            std::process::id(),
            files.len()
        ));
        let _ = std::fs::remove_dir_all(&root);
        for (path, text) in files {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        root
    }

    #[test]
    fn cgroup_v2_and_v1_limits() {
        let root = tree(&[("system.slice/ringway.service/memory.max", "1073741824\n")]);
        assert_eq!(
            cgroup_limit("0::/system.slice/ringway.service\n", &root),
            Some(1 << 30)
        );
        std::fs::write(
            root.join("system.slice/ringway.service/memory.max"),
            "max\n",
        )
        .unwrap();
        assert_eq!(
            cgroup_limit("0::/system.slice/ringway.service\n", &root),
            None
        );
        std::fs::remove_dir_all(&root).unwrap();

        let root = tree(&[
            ("memory/memory.limit_in_bytes", "9223372036854771712\n"),
            ("cpu/x", ""),
        ]);
        let v1 = "9:name=systemd:/\n4:memory:/docker/abc\n1:cpu:/\n";
        assert_eq!(cgroup_limit(v1, &root), None, "v1 'no limit'");
        std::fs::write(root.join("memory/memory.limit_in_bytes"), "536870912").unwrap();
        assert_eq!(
            cgroup_limit(v1, &root),
            Some(512 << 20),
            "the mount's own file"
        );
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(cgroup_limit("garbage", Path::new("/nonexistent")), None);
    }

    #[test]
    fn meminfo_total() {
        let text = "MemTotal:       24684068 kB\nMemFree:        21946208 kB\n";
        assert_eq!(mem_total(text), Some(24684068 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB"), None);
    }

    #[test]
    fn this_process_has_memory() {
        let avail = available_bytes();
        assert!(avail >= 64 << 20, "{avail}");
        assert!(default_budget() <= avail / 2 + crate::config::MIN_MEMORY_BUDGET);
    }
}
