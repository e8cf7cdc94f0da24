//! The node's uplinks: where requests from other nodes come in. By default
//! the interfaces of the default routes (IPv4 and IPv6), read from procfs.

/// Interfaces named by a default route in `/proc/net/route` (IPv4) and
/// `/proc/net/ipv6_route` text, in order, without repeats.
pub fn default_route_interfaces(route: &str, ipv6_route: &str) -> Vec<String> {
    let v4 = route.lines().skip(1).filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Iface, Destination, Gateway, Flags, RefCnt, Use, Metric, Mask.
        (f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    });
    let v6 = ipv6_route.lines().filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // dest, dest prefix length, ..., device last.
        let default = f.len() >= 10 && f[1] == "00" && f[0].bytes().all(|b| b == b'0');
        (default && f[9] != "lo").then(|| f[9].to_string())
    });
    let mut out: Vec<String> = Vec::new();
    for i in v4.chain(v6) {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// This namespace's default-route interfaces.
pub fn default_interfaces() -> Vec<String> {
    let read = |p| std::fs::read_to_string(p).unwrap_or_default();
    default_route_interfaces(&read("/proc/net/route"), &read("/proc/net/ipv6_route"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_name_the_uplinks() {
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
bond1\t00000000\t010300C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        let v6 = "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0\n\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000002 00000000 00000003     eth2\n";
        assert_eq!(default_route_interfaces(v4, v6), ["eth0", "bond1", "eth2"]);
        assert!(default_route_interfaces("Iface\n", "").is_empty());
    }
}
