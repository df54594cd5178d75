//! Listening sockets shared by the front doors, and what the kernel says
//! about their listen queues.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;

/// Where Linux caps every listen backlog (`net.core.somaxconn`).
const SOMAXCONN_PATH: &str = "/proc/sys/net/core/somaxconn";

/// The TCP counters of the network namespace, where Linux counts
/// connections dropped from listen queues.
const NETSTAT_PATH: &str = "/proc/net/netstat";

/// Binds a TCP listener with `SO_REUSEADDR`, so a restarted server need not
/// wait out its old connections' `TIME_WAIT`. Call inside a runtime.
pub fn bind_tcp(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The backlog a listener asking for `requested` gets: the kernel silently
/// caps it at `net.core.somaxconn`. Also returns that cap, `None` where it
/// cannot be read (not Linux, no procfs): then `requested` is assumed.
pub fn effective_backlog(requested: u32) -> (u32, Option<u32>) {
    let somaxconn = std::fs::read_to_string(SOMAXCONN_PATH)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok());
    (
        somaxconn.map_or(requested, |cap| requested.min(cap)),
        somaxconn,
    )
}

/// Connections the kernel dropped from listen queues, counted since boot
/// for the whole network namespace (every listener in it, not only
/// spool's): Linux's `TcpExt` counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ListenQueueDrops {
    /// `ListenOverflows`: a handshake arrived when the accept queue was
    /// full (the server did not `accept` fast enough, or the backlog is
    /// too small). The client retries after a second or more.
    pub overflows: u64,
    /// `ListenDrops`: every connection request a listener dropped, the
    /// overflows included.
    pub drops: u64,
}

/// Reads [`ListenQueueDrops`] from `/proc/net/netstat`.
pub fn listen_queue_drops() -> io::Result<ListenQueueDrops> {
    let text = std::fs::read_to_string(NETSTAT_PATH)?;
    parse_listen_queue_drops(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{NETSTAT_PATH} has no TcpExt ListenOverflows and ListenDrops"),
        )
    })
}

/// The `TcpExt:` section of `/proc/net/netstat` is a line of names followed
/// by a line of values, in the same order.
fn parse_listen_queue_drops(text: &str) -> Option<ListenQueueDrops> {
    let mut lines = text.lines().filter(|line| line.starts_with("TcpExt:"));
    let names = lines.next()?.split_whitespace().skip(1);
    let values = lines.next()?.split_whitespace().skip(1);
    let mut overflows = None;
    let mut drops = None;
    for (name, value) in names.zip(values) {
        match name {
            "ListenOverflows" => overflows = value.parse().ok(),
            "ListenDrops" => drops = value.parse().ok(),
            _ => {}
        }
    }
    Some(ListenQueueDrops {
        overflows: overflows?,
        drops: drops?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_tcpext_counters_by_name() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPBacklogDrop\n\
                    TcpExt: 1 256 260 0\n\
                    IpExt: InNoRoutes ListenOverflows\n\
                    IpExt: 7 9\n";
        assert_eq!(
            parse_listen_queue_drops(text),
            Some(ListenQueueDrops {
                overflows: 256,
                drops: 260
            })
        );
        assert_eq!(
            parse_listen_queue_drops("TcpExt: ListenDrops\nTcpExt: 3\n"),
            None
        );
        assert_eq!(parse_listen_queue_drops(""), None);
    }

    #[test]
    fn this_kernel_reports_the_counters_and_a_backlog_cap() {
        // Linux only, where spool runs in production; fails rather than
        // skips elsewhere, so a missing counter is noticed.
        let drops = listen_queue_drops().expect("reading /proc/net/netstat");
        assert!(drops.drops >= drops.overflows, "{drops:?}");
        let (backlog, cap) = effective_backlog(u32::MAX);
        let cap = cap.expect("reading net.core.somaxconn");
        assert_eq!(backlog, cap);
        assert_eq!(effective_backlog(1).0, 1);
    }

    #[test]
    fn a_full_listen_queue_shows_in_the_overflow_counter() {
        // A listener that never accepts, with the smallest queue: further
        // handshakes are dropped and counted (by the kernel, for the whole
        // namespace, so other tests can only add to the count).
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("address");
        listener.bind(&loopback.into()).expect("bind");
        listener.listen(1).expect("listen");
        let addr = listener.local_addr().expect("address");
        let before = listen_queue_drops().expect("reading /proc/net/netstat");
        let mut clients = Vec::new();
        for _ in 0..8 {
            let client = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            client.set_nonblocking(true).expect("nonblocking");
            // In progress or refused: only the server side's count matters.
            let _ = client.connect(&addr);
            clients.push(client);
        }
        // The kernel counts the drop when the handshake reaches the full
        // queue, which on loopback happens within the connect calls above
        // or their softirq; poll the counter, bounded.
        let mut after = before;
        for _ in 0..1000 {
            after = listen_queue_drops().expect("reading /proc/net/netstat");
            if after.overflows > before.overflows {
                break;
            }
            std::thread::yield_now();
        }
        assert!(
            after.overflows > before.overflows,
            "{before:?} -> {after:?}"
        );
        assert!(after.drops > before.drops, "{before:?} -> {after:?}");
    }
}
