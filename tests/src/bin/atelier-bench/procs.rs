//! What processes cost, read from `/proc`: CPU seconds (utime + stime), peak resident memory
//! (`VmHWM`), and a CPU breakdown of the benchmark's process tree by component.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde::Serialize;

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// `(ppid, utime + stime in seconds)` from the text of `/proc/PID/stat`.
pub fn parse_stat(stat: &str) -> Option<(u32, f64)> {
    // The command name may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((ppid, (utime + stime) / clock_ticks()))
}

/// CPU seconds a process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, cpu)| cpu)
}

/// A `kB` field of `/proc/PID/status` (`VmHWM`, `VmRSS`), in bytes.
pub fn status_bytes(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        let kib: u64 = value.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    })
}

/// Peak resident memory of a process.
pub fn peak_rss(pid: u32) -> Option<u64> {
    status_bytes(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        "VmHWM",
    )
}

/// Busy and total jiffies of the whole machine (`/proc/stat`), as seconds.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0.0) + values.get(4).copied().unwrap_or(0.0);
    let ticks = clock_ticks();
    ((total - idle) / ticks, total / ticks)
}

/// The component a process of the benchmark's tree belongs to.
fn component(pid: u32, me: u32) -> &'static str {
    if pid == me {
        return "bench (kubelet, API proxy, load generator)";
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    match comm.trim() {
        c if c.starts_with("atelier-operato") => {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.split(|b| *b == 0).any(|arg| arg == b"api") {
                "API (atelier-operator api)"
            } else {
                "operator (atelier-operator controller)"
            }
        }
        c if c.starts_with("atelier-inferen") => "inference and outputs pods",
        c if c.starts_with("atelier-testclu") => "control plane (apiserver, etcd, cm, scheduler)",
        "node" => "OpenID provider (node)",
        _ => "other children",
    }
}

/// CPU seconds of every process below (and including) this one, by component.
fn tree_cpu() -> HashMap<u32, (&'static str, f64)> {
    let me = std::process::id();
    let mut parents = HashMap::new();
    let mut cpu = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((ppid, seconds)) = parse_stat(&stat) {
            parents.insert(pid, ppid);
            cpu.insert(pid, seconds);
        }
    }
    let descends = |mut pid: u32| {
        for _ in 0..64 {
            if pid == me {
                return true;
            }
            match parents.get(&pid) {
                Some(&parent) if parent != 0 => pid = parent,
                _ => return false,
            }
        }
        false
    };
    cpu.into_iter()
        .filter(|(pid, _)| descends(*pid))
        .map(|(pid, seconds)| (pid, (component(pid, me), seconds)))
        .collect()
}

/// A point in time to measure CPU use from.
pub struct CpuMark {
    at: Instant,
    machine: (f64, f64),
    tree: HashMap<u32, (&'static str, f64)>,
}

/// Where the CPU went between a [`CpuMark`] and now.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuUse {
    pub wall_seconds: f64,
    /// Cores of the machine busy on average (all processes).
    pub machine_busy_cores: f64,
    /// CPU seconds by component of the benchmark; processes outside it under "outside".
    pub seconds: BTreeMap<String, f64>,
}

impl CpuMark {
    pub fn now() -> Self {
        Self {
            at: Instant::now(),
            machine: machine_cpu(),
            tree: tree_cpu(),
        }
    }

    pub fn since(&self) -> CpuUse {
        let wall = self.at.elapsed().as_secs_f64();
        let (busy, _) = machine_cpu();
        let mut seconds: BTreeMap<String, f64> = BTreeMap::new();
        for (pid, (component, now)) in tree_cpu() {
            let before = self.tree.get(&pid).map_or(0.0, |(_, s)| *s);
            *seconds.entry(component.to_string()).or_default() += (now - before).max(0.0);
        }
        let ours: f64 = seconds.values().sum();
        let machine = busy - self.machine.0;
        seconds.insert(
            "outside the benchmark (other work on the machine)".into(),
            (machine - ours).max(0.0),
        );
        CpuUse {
            wall_seconds: wall,
            machine_busy_cores: if wall > 0.0 { machine / wall } else { 0.0 },
            seconds,
        }
    }
}

/// The machine, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub load_average: String,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = status_bytes(&meminfo, "MemTotal").unwrap_or(0);
    Machine {
        cpu_model,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: memory as f64 / f64::from(1u32 << 30),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        load_average: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_name_with_spaces_and_parentheses() {
        let stat = "42 (a (b) c) S 7 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 1 1 1";
        let (ppid, cpu) = parse_stat(stat).unwrap();
        assert_eq!(ppid, 7);
        assert!((cpu - 300.0 / clock_ticks()).abs() < 1e-9);
    }

    #[test]
    fn status_kib_fields_are_bytes() {
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t1024 kB\n";
        assert_eq!(status_bytes(status, "VmHWM"), Some(2 << 20));
        assert_eq!(status_bytes(status, "VmRSS"), Some(1 << 20));
        assert_eq!(status_bytes(status, "VmSwap"), None);
    }

    #[test]
    fn this_process_has_a_cpu_time_and_a_peak() {
        assert!(cpu_seconds(std::process::id()).is_some());
        assert!(peak_rss(std::process::id()).unwrap() > 0);
    }
}
