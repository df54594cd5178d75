//! Listening sockets shared by the front doors.

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// Binds a TCP listener with `SO_REUSEADDR`, so a restarted server need not
/// wait out its old connections' `TIME_WAIT`. Call inside a runtime.
pub fn bind_tcp(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}
