//! Pod IPs 198.18.0.N (N from 2), unique among live pods, reused after deletion.
//!
//! The API server refuses loopback (127.0.0.0/8) and link-local addresses in EndpointSlices, so
//! pods cannot use 127.0.0.N if Services are to find them. Instead the whole range
//! 198.18.0.0/24 (reserved for benchmarking, RFC 2544) is made local like 127.0.0.0/8: one
//! `local` route to the loopback interface lets a process bind any address of it, and a
//! connection to an address nobody listens on is refused on this machine rather than sent to
//! the network, even after its pod is gone. Setting the route needs root (CAP_NET_ADMIN) and
//! `ip` from iproute2.
//!
//! Several kubelets may run on one machine (each test binary has its own cluster), so a pod
//! IP is reserved machine-wide with an exclusive `flock` on a file named after it; the kernel
//! drops the lock when the reservation is released or the kubelet process dies.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

const NETWORK: [u8; 4] = [198, 18, 0, 0];
const FIRST_HOST: u8 = 2;
const LAST_HOST: u8 = 254;

pub(crate) struct IpPool {
    lock_dir: PathBuf,
    /// Pod UID → its address and the locked file that reserves it.
    leases: HashMap<String, (Ipv4Addr, File)>,
}

impl IpPool {
    /// The pool of this machine's kubelets, with the range routed to the loopback interface.
    pub(crate) fn machine_wide() -> io::Result<Self> {
        route_range_to_loopback()?;
        Ok(Self::new(std::env::temp_dir().join("atelier-pod-ips")))
    }

    pub(crate) fn new(lock_dir: PathBuf) -> Self {
        Self {
            lock_dir,
            leases: HashMap::new(),
        }
    }

    /// The address of the pod `owner` (a UID), reserving the lowest free one on first call.
    pub(crate) fn allocate(&mut self, owner: &str) -> io::Result<Ipv4Addr> {
        if let Some((address, _)) = self.leases.get(owner) {
            return Ok(*address);
        }
        std::fs::create_dir_all(&self.lock_dir)?;
        for host in FIRST_HOST..=LAST_HOST {
            let [a, b, c, _] = NETWORK;
            let address = Ipv4Addr::new(a, b, c, host);
            if self.leases.values().any(|(leased, _)| *leased == address) {
                continue;
            }
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(self.lock_dir.join(address.to_string()))?;
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                self.leases.insert(owner.to_string(), (address, file));
                return Ok(address);
            }
        }
        Err(io::Error::other("all pod IPs 198.18.0.2-254 are in use"))
    }

    /// Frees the pod's address (closing the file releases its lock).
    pub(crate) fn release(&mut self, owner: &str) {
        self.leases.remove(owner);
    }
}

/// `ip route replace local 198.18.0.0/24 dev lo` (idempotent; it lands in the `local` table).
fn route_range_to_loopback() -> io::Result<()> {
    let range = format!("{}/24", Ipv4Addr::from(NETWORK));
    let output = std::process::Command::new("ip")
        .args(["route", "replace", "local", &range, "dev", "lo"])
        .output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip route replace local {range} dev lo: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_across_pools_and_reused_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = IpPool::new(dir.path().to_path_buf());
        let mut second = IpPool::new(dir.path().to_path_buf());
        assert_eq!(first.allocate("a").unwrap(), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(first.allocate("a").unwrap(), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(first.allocate("b").unwrap(), Ipv4Addr::new(198, 18, 0, 3));
        // Another kubelet on the machine skips the addresses this one holds.
        assert_eq!(second.allocate("c").unwrap(), Ipv4Addr::new(198, 18, 0, 4));
        first.release("a");
        assert_eq!(second.allocate("d").unwrap(), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(first.allocate("e").unwrap(), Ipv4Addr::new(198, 18, 0, 5));
    }
}
