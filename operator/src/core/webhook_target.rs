//! Which addresses a job's webhook may reach. A webhook URL is written by any tenant member, and
//! the operator's network position is trusted (tenant network policies let the platform
//! namespace in, the inference and outputs APIs answer it): a webhook to a cluster-internal or
//! metadata address would let a member act with the operator's reach. So every address the
//! URL's host resolves to must be public, unless the platform allows its range.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Why an address is refused, in words for the job's Event (never the URL: it may carry a
/// token).
pub fn refusal(address: IpAddr, allowed: &[IpNet]) -> Option<&'static str> {
    if allowed.iter().any(|net| net.contains(&address)) {
        return None;
    }
    match address {
        IpAddr::V4(v4) => refusal_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => refusal_v4(v4),
            None => refusal_v6(v6),
        },
    }
}

fn refusal_v4(address: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = address.octets();
    if address.is_loopback() {
        Some("a loopback address")
    } else if address.is_link_local() {
        Some("a link-local address (cloud metadata lives there)")
    } else if address.is_private() {
        Some("a private address")
    } else if a == 100 && (64..128).contains(&b) {
        Some("a shared (carrier-grade NAT) address")
    } else if address.is_unspecified() || a == 0 {
        Some("an unspecified address")
    } else if address.is_multicast() || address.is_broadcast() || a >= 240 {
        Some("a multicast or reserved address")
    } else {
        None
    }
}

fn refusal_v6(address: Ipv6Addr) -> Option<&'static str> {
    let first = address.segments()[0];
    if address.is_loopback() {
        Some("a loopback address")
    } else if address.is_unspecified() {
        Some("an unspecified address")
    } else if first & 0xffc0 == 0xfe80 {
        Some("a link-local address (cloud metadata lives there)")
    } else if first & 0xfe00 == 0xfc00 {
        Some("a private (unique local) address")
    } else if address.is_multicast() {
        Some("a multicast or reserved address")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn internal_and_metadata_addresses_are_refused() {
        for address in [
            "127.0.0.1",
            "169.254.169.254",
            "10.96.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "::ffff:127.0.0.1",
        ] {
            assert!(refusal(ip(address), &[]).is_some(), "{address} was allowed");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        for address in ["93.184.215.14", "8.8.8.8", "100.128.0.1", "2606:4700::1111"] {
            assert_eq!(refusal(ip(address), &[]), None, "{address}");
        }
    }

    #[test]
    fn the_platform_may_allow_a_range() {
        let allowed: Vec<IpNet> = vec!["10.20.0.0/16".parse().unwrap()];
        assert_eq!(refusal(ip("10.20.3.4"), &allowed), None);
        assert!(refusal(ip("10.21.3.4"), &allowed).is_some());
        assert!(refusal(ip("169.254.169.254"), &allowed).is_some());
    }
}
