//! Who a network source is, for every per-source limit of a node (the HTTP
//! API, the SSH gateway, the overlay's inbound connections): an IPv4
//! address, or an IPv6 /64.

use std::net::{IpAddr, Ipv6Addr};

/// One party, as far as the limits are concerned: an IPv4 address, or an
/// IPv6 /64 (one host's SLAAC range — a per-address limit on IPv6 would
/// cost an attacker nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(pub(crate) IpAddr);

impl Source {
    /// The source a client address belongs to.
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(_) => Source(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    Source(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

impl Source {
    /// The address that stands for the source: the IPv4 address, or the
    /// IPv6 /64's network address.
    pub fn addr(&self) -> IpAddr {
        self.0
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        assert_eq!(
            Source::of(ip("2001:db8:1:2:aaaa::1")),
            Source::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            Source::of(ip("::ffff:198.18.0.1")),
            Source::of(ip("198.18.0.1"))
        );
        assert_eq!(
            Source::of(ip("2001:db8:1:2::1")).to_string(),
            "2001:db8:1:2::/64"
        );
    }
}
