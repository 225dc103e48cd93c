//! The client's address, which Tenant `allowedSourceCidrs` are checked against.
//!
//! Behind a reverse proxy every request comes from the proxy, so the address is the one the
//! proxy writes into a header (`--trusted-proxy-header`). Anyone can write that header, so it
//! is believed only on connections from the proxies themselves (`--trusted-proxy-cidrs`), and
//! then only its right-most entry: the one our own proxy appended (entries to its left come
//! from the client). A request through a proxy whose header is missing or unreadable has no
//! known address ([`None`]), which no address restriction admits.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::ConnectInfo;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName};
use ipnet::IpNet;

/// Which proxies' address header is believed.
#[derive(Clone, Debug, Default)]
pub struct ProxyTrust {
    pub header: Option<HeaderName>,
    /// Peers whose header is believed; the API refuses to start with a header and none.
    pub proxies: Vec<IpNet>,
}

impl ProxyTrust {
    /// The client's address for a request from `peer`: the peer itself unless it is a trusted
    /// proxy, else the proxy's header (`None` when that is missing or not an address).
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = unmapped(peer);
        match &self.header {
            Some(name) if self.proxies.iter().any(|net| net.contains(&peer)) => {
                forwarded_client(headers, name).map(unmapped)
            }
            _ => Some(peer),
        }
    }

    /// The client's address of a request (see [`ProxyTrust::client`]).
    pub fn client_of(&self, parts: &Parts) -> Option<IpAddr> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip());
        self.client(peer, &parts.headers)
    }
}

/// An IPv4 client reaching a dual-stack socket shows up as `::ffff:a.b.c.d`.
pub fn unmapped(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

fn forwarded_client(headers: &HeaderMap, name: &HeaderName) -> Option<IpAddr> {
    let last = headers.get_all(name).iter().next_back()?.to_str().ok()?;
    let entry = last.rsplit(',').next()?.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|address| address.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = value {
            headers.insert("x-forwarded-for", value.parse().unwrap());
        }
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn trust() -> ProxyTrust {
        ProxyTrust {
            header: Some(HeaderName::from_static("x-forwarded-for")),
            proxies: vec!["10.0.0.0/24".parse().unwrap()],
        }
    }

    #[test]
    fn without_a_header_setting_the_peer_is_the_client() {
        let none = ProxyTrust::default();
        let forged = headers(Some("192.0.2.7"));
        assert_eq!(none.client(ip("10.0.0.9"), &forged), Some(ip("10.0.0.9")));
    }

    #[test]
    fn the_header_counts_only_from_a_trusted_proxy() {
        let trust = trust();
        let forged = headers(Some("6.6.6.6, 192.0.2.7"));
        assert_eq!(
            trust.client(ip("10.0.0.9"), &forged),
            Some(ip("192.0.2.7")),
            "the proxy's own (right-most) entry"
        );
        assert_eq!(
            trust.client(ip("10.0.1.9"), &forged),
            Some(ip("10.0.1.9")),
            "a pod outside the proxy range cannot claim another address"
        );
        assert_eq!(
            trust.client(ip("::ffff:10.0.0.9"), &forged),
            Some(ip("192.0.2.7"))
        );
        assert_eq!(
            trust.client(ip("10.0.0.9"), &headers(Some("[2001:db8::1]:443"))),
            Some(ip("2001:db8::1"))
        );
    }

    #[test]
    fn a_missing_or_garbage_header_from_the_proxy_is_no_address() {
        let trust = trust();
        for value in [None, Some("nonsense"), Some("192.0.2.7, "), Some("")] {
            assert_eq!(
                trust.client(ip("10.0.0.9"), &headers(value)),
                None,
                "{value:?}"
            );
        }
    }
}
