//! Which addresses a guest reaches only when its policy names them, and
//! which no policy a scoped token writes may name at all.
//!
//! The internal set is the IANA special-purpose address registries (IPv4
//! and IPv6) minus what they mark globally reachable, plus multicast, kept
//! as a table of CIDR ranges (`ipnet`) rather than hand-written tests. An
//! IPv6 address that carries an IPv4 address inside it (IPv4-mapped
//! `::ffff:a.b.c.d`, the deprecated IPv4-compatible `::a.b.c.d`, NAT64's
//! `64:ff9b::/96`, 6to4's `2002::/16`) is judged by the address it carries,
//! since that is where a packet sent to it ends up: `64:ff9b::7f00:1` is
//! loopback through a NAT64 gateway. Outbound HTTP and TCP both call
//! [`is_internal`] on every address they connect to, after name lookup.
//!
//! [`never_for_scoped`] is the smaller set a policy written by a scoped
//! token may not name whatever its scopes say: loopback, link-local and
//! unspecified addresses are the host itself (its API, NATS on loopback,
//! the cloud metadata service), never a team's service.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// IPv4 ranges not globally reachable (IANA IPv4 Special-Purpose Address
/// Registry, 2024), and multicast.
const INTERNAL_V4: &[&str] = &[
    "0.0.0.0/8",       // "this network"
    "10.0.0.0/8",      // private
    "100.64.0.0/10",   // shared address space (CGNAT)
    "127.0.0.0/8",     // loopback
    "169.254.0.0/16",  // link-local (cloud metadata services)
    "172.16.0.0/12",   // private
    "192.0.0.0/24",    // IETF protocol assignments
    "192.0.2.0/24",    // documentation (TEST-NET-1)
    "192.88.99.0/24",  // deprecated 6to4 relay anycast
    "192.168.0.0/16",  // private
    "198.18.0.0/15",   // benchmarking
    "198.51.100.0/24", // documentation (TEST-NET-2)
    "203.0.113.0/24",  // documentation (TEST-NET-3)
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved, and the limited broadcast address
];

/// IPv6 ranges not globally reachable (IANA IPv6 Special-Purpose Address
/// Registry), multicast and the deprecated site-local range. The ranges
/// that carry an IPv4 address are in [`embedded_v4`] instead.
const INTERNAL_V6: &[&str] = &[
    "::/128",         // unspecified
    "::1/128",        // loopback
    "64:ff9b:1::/48", // local-use IPv4/IPv6 translation
    "100::/64",       // discard-only
    "2001::/23",      // IETF protocol assignments (Teredo, ORCHIDv2, ...)
    "2001:db8::/32",  // documentation
    "3fff::/20",      // documentation
    "5f00::/16",      // segment routing (SRv6) SIDs
    "fc00::/7",       // unique local
    "fe80::/10",      // link-local
    "fec0::/10",      // site-local (deprecated, still routed by some stacks)
    "ff00::/8",       // multicast
];

/// The ranges no policy a scoped token writes may name: loopback,
/// link-local and unspecified, in both families.
/// Cloud metadata services outside link-local are here too: Alibaba's
/// `100.100.100.200`, Oracle's `192.0.0.192`, AWS's IPv6 `fd00:ec2::254`.
const NEVER_FOR_SCOPED_V4: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "100.100.100.200/32",
    "192.0.0.192/32",
];
const NEVER_FOR_SCOPED_V6: &[&str] = &["::/128", "::1/128", "fe80::/10", "fd00:ec2::254/128"];

fn nets(table: &'static [&'static str]) -> impl Iterator<Item = IpNet> {
    // The tables are constants checked by a test; a line that did not
    // parse would drop a range, so the test parses every one.
    table.iter().filter_map(|text| text.parse().ok())
}

/// [`INTERNAL_V4`] and [`INTERNAL_V6`], parsed once: every outbound
/// connection asks [`is_internal`].
static INTERNAL: std::sync::LazyLock<(Vec<IpNet>, Vec<IpNet>)> =
    std::sync::LazyLock::new(|| (nets(INTERNAL_V4).collect(), nets(INTERNAL_V6).collect()));

/// The IPv4 address an IPv6 address carries, where it carries one that
/// routing honours: IPv4-mapped, IPv4-compatible, NAT64 (RFC 6052's
/// well-known prefix) and 6to4.
pub fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    // ::a.b.c.d (not :: and ::1, which are themselves).
    if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
        return Some(low);
    }
    // 64:ff9b::a.b.c.d
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(low);
    }
    // 2002:AABB:CCDD::/48
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// Whether `ip` is one a guest reaches only when its policy names it.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => INTERNAL.0.iter().any(|net| net.contains(&IpAddr::V4(v4))),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_internal(IpAddr::V4(v4)),
            None => INTERNAL.1.iter().any(|net| net.contains(&IpAddr::V6(v6))),
        },
    }
}

/// Whether two ranges share an address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The IPv6 ranges that carry the addresses of an IPv4 range, one per
/// embedding of [`embedded_v4`].
fn embeddings(v4: Ipv4Net) -> Vec<IpNet> {
    let [a, b, c, d] = v4.network().octets();
    let low = |prefix: [u16; 6]| {
        Ipv6Addr::new(
            prefix[0],
            prefix[1],
            prefix[2],
            prefix[3],
            prefix[4],
            prefix[5],
            u16::from_be_bytes([a, b]),
            u16::from_be_bytes([c, d]),
        )
    };
    let len = v4.prefix_len();
    let mut out = Vec::new();
    for (addr, bits) in [
        (low([0, 0, 0, 0, 0, 0xffff]), 96 + len),
        (low([0, 0, 0, 0, 0, 0]), 96 + len),
        (low([0x64, 0xff9b, 0, 0, 0, 0]), 96 + len),
        (
            Ipv6Addr::new(
                0x2002,
                u16::from_be_bytes([a, b]),
                u16::from_be_bytes([c, d]),
                0,
                0,
                0,
                0,
                0,
            ),
            16 + len,
        ),
    ] {
        if let Ok(net) = Ipv6Net::new(addr, bits) {
            out.push(IpNet::V6(net.trunc()));
        }
    }
    out
}

/// Every range that is, or carries, a range of `v4` and `v6`.
fn with_embeddings(v4: &'static [&'static str], v6: &'static [&'static str]) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = nets(v4).chain(nets(v6)).collect();
    for net in nets(v4) {
        if let IpNet::V4(net) = net {
            out.extend(embeddings(net));
        }
    }
    out
}

/// The ranges a policy written by a scoped token may not name (loopback,
/// link-local, unspecified, in every IPv6 form that carries them).
pub fn never_for_scoped() -> Vec<IpNet> {
    with_embeddings(NEVER_FOR_SCOPED_V4, NEVER_FOR_SCOPED_V6)
}

/// `ip` as a range of one address, with the IPv6 forms that carry it when
/// it is IPv4 (a grant of any of them reaches it).
pub fn address_ranges(ip: IpAddr) -> Vec<IpNet> {
    let ip = ip.to_canonical();
    let mut out = vec![IpNet::from(ip)];
    if let IpAddr::V4(v4) = ip {
        out.extend(embeddings(Ipv4Net::from(v4)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_of_the_tables_is_a_range() {
        for table in [
            INTERNAL_V4,
            INTERNAL_V6,
            NEVER_FOR_SCOPED_V4,
            NEVER_FOR_SCOPED_V6,
        ] {
            for text in table {
                assert!(text.parse::<IpNet>().is_ok(), "{text}");
            }
        }
    }

    /// The fence over every special-purpose range: an address inside each
    /// is internal, in every IPv6 form that carries it; public addresses
    /// are not.
    #[test]
    fn the_fence_covers_every_special_purpose_range_and_its_embeddings() {
        let internal = [
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.255.0.9",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.170",
            "192.0.2.10",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "100::1",
            "2001::1",
            "2001:db8::1",
            "2002:7f00:1::1",
            "2002:a00:1::",
            "3fff::1",
            "5f00::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
        ];
        for text in internal {
            let ip: IpAddr = text.parse().unwrap();
            assert!(is_internal(ip), "{text} should be internal");
        }
        let public = [
            "8.8.8.8",
            "93.184.216.34",
            "100.128.0.1",
            "172.32.0.1",
            "198.20.0.1",
            "223.255.255.255",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ];
        for text in public {
            let ip: IpAddr = text.parse().unwrap();
            assert!(!is_internal(ip), "{text} should be public");
        }
    }

    #[test]
    fn scoped_writers_never_name_loopback_link_local_or_unspecified_in_any_form() {
        let never = never_for_scoped();
        let named = |text: &str| {
            let net: IpNet = text.parse().unwrap();
            never.iter().any(|n| overlaps(n, &net))
        };
        for text in [
            "127.0.0.1/32",
            "0.0.0.0/0",
            "169.254.169.254/32",
            "::1/128",
            "::/0",
            "::ffff:127.0.0.1/128",
            "64:ff9b::7f00:1/128",
            "2002:7f00::/24",
            "fe80::/64",
            "fd00::/8",
            "100.100.100.200/32",
        ] {
            assert!(named(text), "{text}");
        }
        for text in ["10.0.0.0/8", "192.168.1.0/24", "fd12::/16", "8.8.8.8/32"] {
            assert!(!named(text), "{text}");
        }
        let nats: IpAddr = "10.9.8.7".parse().unwrap();
        let ranges = address_ranges(nats);
        for text in ["10.9.8.7/32", "10.0.0.0/8", "::ffff:10.9.8.7/128"] {
            let net: IpNet = text.parse().unwrap();
            assert!(ranges.iter().any(|r| overlaps(r, &net)), "{text}");
        }
    }
}
