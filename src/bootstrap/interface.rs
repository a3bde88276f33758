//! `XCCL_SOCKET_IFNAME` and `XCCL_SOCKET_FAMILY`: the address TCP listeners bind to, chosen
//! with NCCL's syntax (`eth` prefix, `=eth0` exact, `^docker,lo` or `^=docker0` excluded) and
//! family (`AF_INET`, `AF_INET6`).

use crate::error::{Error, Result};
use std::net::IpAddr;

/// Address family of `XCCL_SOCKET_FAMILY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 (`AF_INET`).
    V4,
    /// IPv6 (`AF_INET6`).
    V6,
}

impl std::str::FromStr for Family {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "AF_INET" | "inet" | "ipv4" => Ok(Family::V4),
            "AF_INET6" | "inet6" | "ipv6" => Ok(Family::V6),
            _ => Err(Error::InvalidArgument(format!(
                "XCCL_SOCKET_FAMILY={s:?}: expected AF_INET or AF_INET6"
            ))),
        }
    }
}

/// A parsed `XCCL_SOCKET_IFNAME`: comma-separated interface names, each a prefix unless the
/// list starts with `=` (exact names), all excluded when it starts with `^`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfnameSpec {
    exclude: bool,
    exact: bool,
    names: Vec<String>,
}

impl IfnameSpec {
    /// Parses `spec` (`eth`, `=eth0`, `^docker,lo`, `^=docker0`, `ib,eth`).
    pub fn parse(spec: &str) -> Result<Self> {
        let mut rest = spec.trim();
        let exclude = rest.starts_with('^');
        if exclude {
            rest = &rest[1..];
        }
        let exact = rest.starts_with('=');
        if exact {
            rest = &rest[1..];
        }
        let names: Vec<String> = rest
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect();
        if names.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "XCCL_SOCKET_IFNAME={spec:?} names no interface (like eth, =eth0, ^docker,lo)"
            )));
        }
        Ok(IfnameSpec {
            exclude,
            exact,
            names,
        })
    }

    /// Whether interface `name` may be used.
    pub fn allows(&self, name: &str) -> bool {
        let hit = self.names.iter().any(|n| match self.exact {
            true => name == n,
            false => name.starts_with(n.as_str()),
        });
        hit != self.exclude
    }
}

/// Link-local IPv6 addresses need a scope to be reached: not for a listener peers dial.
fn usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// The address to bind among `addrs` (interface name, address, in the system's order): the
/// first an interface `spec` allows has in `family`, or without a family the first IPv4 one,
/// else the first IPv6 one.
pub fn choose(
    spec: &IfnameSpec,
    family: Option<Family>,
    addrs: &[(String, IpAddr)],
) -> Option<IpAddr> {
    let fits = |want: Family| {
        addrs
            .iter()
            .filter(|(name, ip)| spec.allows(name) && usable(ip))
            .map(|(_, ip)| *ip)
            .find(|ip| ip.is_ipv4() == (want == Family::V4))
    };
    match family {
        Some(f) => fits(f),
        None => fits(Family::V4).or_else(|| fits(Family::V6)),
    }
}

/// The address `XCCL_SOCKET_IFNAME=spec` (and `XCCL_SOCKET_FAMILY=family`) selects on this
/// host; the error lists the interfaces there are.
pub fn interface_addr(spec: &str, family: Option<Family>) -> Result<IpAddr> {
    let parsed = IfnameSpec::parse(spec)?;
    let addrs: Vec<(String, IpAddr)> = if_addrs::get_if_addrs()
        .map_err(|e| Error::system("listing network interfaces", e))?
        .into_iter()
        .map(|i| (i.name.clone(), i.ip()))
        .collect();
    choose(&parsed, family, &addrs).ok_or_else(|| {
        let seen: Vec<String> = addrs.iter().map(|(n, ip)| format!("{n} {ip}")).collect();
        Error::InvalidArgument(format!(
            "XCCL_SOCKET_IFNAME={spec:?}{}: no interface address matches (this host has: {})",
            family.map_or(String::new(), |f| format!(" with XCCL_SOCKET_FAMILY={f:?}")),
            seen.join(", ")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Vec<(String, IpAddr)> {
        [
            ("lo", "127.0.0.1"),
            ("lo", "::1"),
            ("docker0", "172.17.0.1"),
            ("eth0", "fe80::1"),
            ("eth0", "fd00::2"),
            ("eth0", "192.0.2.2"),
            ("eth1", "198.51.100.7"),
            ("ib0", "fd00::9"),
        ]
        .into_iter()
        .map(|(n, ip)| (n.to_string(), ip.parse().unwrap()))
        .collect()
    }

    fn pick(spec: &str, family: Option<Family>) -> Option<String> {
        choose(&IfnameSpec::parse(spec).unwrap(), family, &host()).map(|ip| ip.to_string())
    }

    #[test]
    fn prefixes_exact_names_and_exclusions_follow_nccl() {
        assert_eq!(pick("eth", None).as_deref(), Some("192.0.2.2"));
        assert_eq!(pick("=eth1", None).as_deref(), Some("198.51.100.7"));
        assert_eq!(pick("=eth", None), None, "exact names are not prefixes");
        assert_eq!(pick("^docker,lo", None).as_deref(), Some("192.0.2.2"));
        assert_eq!(
            pick("^=docker0,lo,eth0", None).as_deref(),
            Some("198.51.100.7")
        );
        assert_eq!(pick("^lo,docker,eth", None).as_deref(), Some("fd00::9"));
        assert_eq!(pick("docker,eth", None).as_deref(), Some("172.17.0.1"));
        assert_eq!(pick("wlan", None), None);
    }

    #[test]
    fn families_pick_ipv4_or_ipv6_and_skip_link_local() {
        assert_eq!(pick("lo", Some(Family::V6)).as_deref(), Some("::1"));
        assert_eq!(pick("lo", Some(Family::V4)).as_deref(), Some("127.0.0.1"));
        assert_eq!(pick("eth0", Some(Family::V6)).as_deref(), Some("fd00::2"));
        assert_eq!(pick("ib", Some(Family::V4)), None);
        assert_eq!(pick("ib", None).as_deref(), Some("fd00::9"));
        assert!("AF_INET6".parse::<Family>().is_ok());
        assert!("AF_UNIX".parse::<Family>().is_err());
    }

    #[test]
    fn an_empty_list_is_refused() {
        assert!(IfnameSpec::parse("^").is_err());
        assert!(IfnameSpec::parse(" , ").is_err());
    }

    #[test]
    fn this_hosts_loopback_is_found() {
        assert_eq!(
            interface_addr("lo", Some(Family::V4)).unwrap(),
            IpAddr::from([127, 0, 0, 1])
        );
        let err = interface_addr("=no-such-interface", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no interface address matches") && err.contains("lo"),
            "{err}"
        );
    }
}
