//! Pod IPs 198.18.1.N (N from 2), unique among live pods, reused after deletion.
//!
//! The API server refuses loopback (127.0.0.0/8) and link-local addresses in EndpointSlices, so
//! pods use 198.18.1.0/24 (reserved for benchmarking, RFC 2544): each pod's address is routed
//! to its own network namespace ([`super::network`]). The kubelet makes 198.18.1.1 ([`GATEWAY`])
//! a local address of the host (pods route through it, and host servers that must be
//! published in EndpointSlices can listen on it), and the rest of the range unreachable, so that
//! a connection to a pod that is gone fails on this machine rather than going to the network.
//! Both routes need root (CAP_NET_ADMIN) and `ip` from iproute2; `make test` removes them at the
//! end (`tests/with-cleanup.sh`).
//!
//! Several kubelets may run on one machine (each test binary has its own cluster), so a pod
//! IP is reserved machine-wide by binding the abstract unix socket `@atelier-pod-ip-ADDRESS`
//! (a second bind fails with `AddrInUse`); the kernel frees the name when the reservation is
//! released or the kubelet process dies, and no file is left behind.

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};

const NETWORK: [u8; 4] = [198, 18, 1, 0];
/// The host's address in the pod range: the pods' next hop.
pub(crate) const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const FIRST_HOST: u8 = 2;
const LAST_HOST: u8 = 254;

pub(crate) struct IpPool {
    /// Prefix of the abstract socket names that reserve addresses.
    lease_prefix: String,
    /// Pod UID → its address and the socket that reserves it.
    leases: HashMap<String, (Ipv4Addr, UnixListener)>,
}

impl IpPool {
    /// The pool of this machine's kubelets, with the range's routes in place.
    pub(crate) fn machine_wide() -> io::Result<Self> {
        let range = format!("{}/24", Ipv4Addr::from(NETWORK));
        ip(&[
            "route",
            "replace",
            "local",
            &GATEWAY.to_string(),
            "dev",
            "lo",
        ])?;
        ip(&["route", "replace", "unreachable", &range])?;
        Ok(Self::new("atelier-pod-ip-"))
    }

    pub(crate) fn new(lease_prefix: &str) -> Self {
        Self {
            lease_prefix: lease_prefix.to_string(),
            leases: HashMap::new(),
        }
    }

    /// The address of the pod `owner` (a UID), reserving the lowest free one on first call.
    pub(crate) fn allocate(&mut self, owner: &str) -> io::Result<Ipv4Addr> {
        if let Some((address, _)) = self.leases.get(owner) {
            return Ok(*address);
        }
        for host in FIRST_HOST..=LAST_HOST {
            let [a, b, c, _] = NETWORK;
            let address = Ipv4Addr::new(a, b, c, host);
            if self.leases.values().any(|(leased, _)| *leased == address) {
                continue;
            }
            let name = format!("{}{address}", self.lease_prefix);
            match UnixListener::bind_addr(&SocketAddr::from_abstract_name(name)?) {
                Ok(lease) => {
                    self.leases.insert(owner.to_string(), (address, lease));
                    return Ok(address);
                }
                Err(error) if error.kind() == io::ErrorKind::AddrInUse => {}
                Err(error) => return Err(error),
            }
        }
        Err(io::Error::other("all pod IPs 198.18.1.2-254 are in use"))
    }

    /// Frees the pod's address (closing the socket frees its name).
    pub(crate) fn release(&mut self, owner: &str) {
        self.leases.remove(owner);
    }
}

/// Runs `ip` (idempotent `replace` commands).
fn ip(args: &[&str]) -> io::Result<()> {
    let output = std::process::Command::new("ip").args(args).output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_across_pools_and_reused_after_release() {
        // A prefix of this test process, so that running kubelets do not take addresses.
        let prefix = format!("atelier-pod-ip-test-{}-", std::process::id());
        let mut first = IpPool::new(&prefix);
        let mut second = IpPool::new(&prefix);
        assert_eq!(first.allocate("a").unwrap(), Ipv4Addr::new(198, 18, 1, 2));
        assert_eq!(first.allocate("a").unwrap(), Ipv4Addr::new(198, 18, 1, 2));
        assert_eq!(first.allocate("b").unwrap(), Ipv4Addr::new(198, 18, 1, 3));
        // Another kubelet on the machine skips the addresses this one holds.
        assert_eq!(second.allocate("c").unwrap(), Ipv4Addr::new(198, 18, 1, 4));
        first.release("a");
        // A process forked by a concurrent test holds a copy of every open socket until it
        // execs (the sockets are close-on-exec), so the freed name may stay taken a moment.
        let reused = (0..200).find_map(|_| {
            let address = second.allocate("d").unwrap();
            if address == Ipv4Addr::new(198, 18, 1, 2) {
                return Some(address);
            }
            second.release("d");
            std::thread::sleep(std::time::Duration::from_millis(10));
            None
        });
        assert_eq!(reused, Some(Ipv4Addr::new(198, 18, 1, 2)));
        assert_eq!(first.allocate("e").unwrap(), Ipv4Addr::new(198, 18, 1, 5));
    }
}
