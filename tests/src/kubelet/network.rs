//! Pod networks as a CNI plugin would make them: each pod gets a network namespace of its own
//! with loopback up and one end of a veth pair (`eth0`, the pod's /32 address, a default route
//! through the host); the host routes the /32 to the other end. Traffic between pods therefore
//! crosses the host's netfilter FORWARD path (where a NetworkPolicy engine filters it), and host
//! processes reach pods at their addresses.
//!
//! Test servers on the host (API server proxy, OpenID provider, webhook receivers) listen on
//! 127.0.0.1 at ports the kernel picked (`ip_local_port_range`), and pods are given those URLs.
//! So a pod's TCP connections to 127.0.0.0/8 at such a port go to the host rather than to the
//! pod's own loopback: a routing rule sends them through `eth0`, and `route_localnet` on both
//! ends of the pair lets 127.0.0.1 cross it. Replies of the pod's own loopback servers (source
//! ports below the range) stay on its loopback.
//!
//! The namespace lives as long as the kubelet holds its descriptor and a container runs in it;
//! when the pod goes, the kubelet deletes the host end of the pair, which takes the pod's end
//! and the route with it. A killed kubelet leaves nothing behind: the kernel closes the
//! descriptor, the namespace dies with its last process, and the pair with it.

use std::fs::File;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{Context, bail};

use super::ips::GATEWAY;

/// The routing table of a pod's namespace that holds its route to the host's loopback.
const HOST_LOOPBACK_TABLE: u32 = 100;

/// A pod's network namespace and the host end of its veth pair.
#[derive(Debug)]
pub(crate) struct PodNetwork {
    namespace: Arc<OwnedFd>,
    host_link: String,
}

impl PodNetwork {
    /// A namespace for the pod at `address`, wired to the host.
    pub(crate) fn create(address: Ipv4Addr) -> anyhow::Result<Self> {
        let namespace = Arc::new(new_network_namespace().context("a new network namespace")?);
        let [_, _, c, d] = address.octets();
        let host_link = format!("atl{c}-{d}");
        // A pair of the same name left by a kubelet that died with this address is stale: the
        // address is ours now.
        let _ = Command::new("ip")
            .args(["link", "del", &host_link])
            .stderr(Stdio::null())
            .status();
        let network = Self {
            namespace,
            host_link,
        };
        let link = &network.host_link;
        ip_batch(
            None,
            &format!(
                "link add {link} type veth peer name eth0 netns /proc/{}/fd/{}\n",
                std::process::id(),
                network.namespace.as_raw_fd()
            ),
        )?;
        // Forwarding on the host end only: the machine's other interfaces keep their setting.
        for setting in ["forwarding", "route_localnet"] {
            let path = format!("/proc/sys/net/ipv4/conf/{link}/{setting}");
            std::fs::write(&path, "1").with_context(|| format!("writing 1 to {path}"))?;
        }
        ip_batch(
            None,
            &format!("link set {link} up\nroute replace {address}/32 dev {link} src {GATEWAY}\n"),
        )?;
        ip_batch(
            Some(network.namespace.as_raw_fd()),
            &pod_side_commands(address, host_port_range()?),
        )?;
        Ok(network)
    }

    /// The namespace, for containers to join.
    pub(crate) fn namespace(&self) -> Arc<OwnedFd> {
        self.namespace.clone()
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        if let Err(error) = ip_batch(None, &format!("link del {}\n", self.host_link)) {
            tracing::warn!("removing a pod network: {error:#}");
        }
    }
}

/// `ip` commands that set up the pod's end: loopback, address, default route through the host,
/// and the host's loopback servers (ports in `host_ports`) reached through the host.
fn pod_side_commands(address: Ipv4Addr, (first_port, last_port): (u16, u16)) -> String {
    let table = HOST_LOOPBACK_TABLE;
    format!(
        "link set lo up\n\
         addr add {address}/32 dev eth0\n\
         link set eth0 up\n\
         route add default via {GATEWAY} dev eth0 onlink\n\
         route add default via {GATEWAY} dev eth0 onlink src {address} table {table}\n\
         rule add pref 4 to 127.0.0.0/8 ipproto tcp sport 1-{} table local\n\
         rule add pref 5 to 127.0.0.0/8 ipproto tcp dport {first_port}-{last_port} table {table}\n\
         rule add pref 100 table local\n\
         rule del pref 0\n",
        first_port - 1
    )
}

/// The ports the host's kernel picks for servers bound to port 0.
fn host_port_range() -> anyhow::Result<(u16, u16)> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    match (ports.next(), ports.next()) {
        (Some(Ok(first)), Some(Ok(last))) if first > 1 => Ok((first, last)),
        _ => bail!("{path}: expected two ports, found {text:?}"),
    }
}

/// A new network namespace, made on a thread of its own (a namespace belongs to the thread that
/// unshares it, and this one ends right after), with `route_localnet` on for all its interfaces.
fn new_network_namespace() -> io::Result<OwnedFd> {
    std::thread::spawn(|| {
        // SAFETY: changes only this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // /proc/sys/net shows the namespace of the thread that opens it.
        std::fs::write("/proc/sys/net/ipv4/conf/all/route_localnet", "1")?;
        Ok(OwnedFd::from(File::open("/proc/thread-self/ns/net")?))
    })
    .join()
    .map_err(|_| io::Error::other("the thread making a network namespace panicked"))?
}

/// Makes the calling process enter `namespace`; for a forked child before exec (only a system
/// call).
pub(crate) fn join(namespace: RawFd) -> io::Result<()> {
    // SAFETY: setns on a descriptor that the caller keeps open.
    if unsafe { libc::setns(namespace, libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Runs `ip -batch -` with `commands`, in `namespace` when given.
fn ip_batch(namespace: Option<RawFd>, commands: &str) -> anyhow::Result<()> {
    let mut command = Command::new("ip");
    command
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(namespace) = namespace {
        // SAFETY: only a system call between fork and exec.
        unsafe {
            command.pre_exec(move || join(namespace));
        }
    }
    let mut child = command.spawn().context("running ip (iproute2)")?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(commands.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "ip -batch failed on\n{commands}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;
    use crate::kubelet::ips::IpPool;

    /// Needs root and iproute2, as the kubelet does.
    #[test]
    fn a_pod_network_is_its_own_reaches_host_loopback_servers_and_goes_away() {
        let mut pool = IpPool::machine_wide().unwrap();
        let address = pool.allocate("network unit test").unwrap();
        let network = PodNetwork::create(address).unwrap();
        // A host server on 127.0.0.1 at a port the kernel picked, like the tests' servers.
        let host_server = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let host_port = host_server.local_addr().unwrap().port();

        let namespace = network.namespace();
        let pod_server = std::thread::spawn(move || {
            // Sockets belong to the namespace of the thread that makes them.
            join(namespace.as_raw_fd()).unwrap();
            // A port below the kernel's range: servers of the pod itself listen on such ports.
            let own_loopback = TcpListener::bind(("127.0.0.1", 1023)).unwrap();
            TcpStream::connect(("127.0.0.1", 1023)).expect("the pod's own loopback server");
            own_loopback.accept().unwrap();
            TcpStream::connect(("127.0.0.1", host_port)).expect("the host's loopback server");
            (TcpListener::bind((address, 8080)).unwrap(), own_loopback)
        })
        .join()
        .unwrap();
        let (pod_server, _own_loopback) = pod_server;

        let (_, peer) = host_server.accept().unwrap();
        assert_eq!(
            peer.ip(),
            address,
            "the pod's connection came over its veth"
        );
        TcpStream::connect((address, 8080)).expect("the host reaches the pod's address");
        let (_, peer) = pod_server.accept().unwrap();
        assert_eq!(peer.ip(), GATEWAY);
        TcpListener::bind(("127.0.0.1", 1023)).expect("the pod's loopback is not the host's");

        drop(network);
        assert!(TcpStream::connect((address, 8080)).is_err());
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        let link = format!("atl{}-{}:", address.octets()[2], address.octets()[3]);
        assert!(!String::from_utf8_lossy(&links.stdout).contains(&link));
    }
}
