//! Requests to the kernel's routing netlink (`NETLINK_ROUTE`) in the daemon's own network
//! namespace, blocking and bounded in time: one request and its answer, or a dump and all of
//! its answers. Used by `peer.rs`, `bridge_fdb.rs` and `routes.rs`.

use std::io;

use rtnetlink::packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// How long one read of an answer may wait, in seconds: a kernel that never answers must not
/// hold the caller (the sync thread, an attach) for longer.
pub const TIMEOUT_S: i64 = 2;

/// Sends `request` and returns the kernel's one answer.
///
/// Returns `Err` when the socket cannot be opened, the kernel answers an error (`ENODEV` for
/// an interface that is gone), the answer cannot be parsed, or none comes within
/// [`TIMEOUT_S`] seconds.
pub fn request(request: RouteNetlinkMessage) -> io::Result<RouteNetlinkMessage> {
    let socket = send(request, NLM_F_REQUEST)?;
    // One link's or one entry's attributes fit in a few KiB.
    let mut answer = vec![0u8; 64 * 1024];
    let n = socket.recv(&mut &mut answer[..], 0)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..n])
        .map_err(|e| bad(format!("netlink answer: {e}")))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(message) => Ok(message),
        NetlinkPayload::Error(e) => Err(e.to_io()),
        other => Err(bad(format!("netlink answered {other:?}"))),
    }
}

/// Sends `request` as a dump and collects the answers up to `NLMSG_DONE`.
///
/// Returns `Err` when the socket cannot be opened, the kernel answers an error, an answer
/// cannot be parsed, or no answer comes within [`TIMEOUT_S`] seconds.
pub fn dump(request: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
    let socket = send(request, NLM_F_REQUEST | NLM_F_DUMP)?;
    let mut answers = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    // A dump ends with NLMSG_DONE; the bound only guards against a kernel that never says so
    // (64 KiB a read: tens of links or hundreds of entries each).
    for _ in 0..100_000 {
        let n = socket.recv(&mut &mut buffer[..], 0)?;
        let mut at = 0;
        while at < n {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buffer[at..n])
                .map_err(|e| bad(format!("netlink dump answer: {e}")))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(answer) => answers.push(answer),
                NetlinkPayload::Done(_) => return Ok(answers),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                _ => {}
            }
            if length == 0 {
                return Err(bad("netlink dump answer: a message of length 0".into()));
            }
            // Messages are 4-byte aligned in the datagram.
            at += (length + 3) & !3;
        }
    }
    Err(bad("netlink dump did not end".into()))
}

/// Opens a socket with the receive timeout and sends `request` with `flags`.
fn send(request: RouteNetlinkMessage, flags: u16) -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(TIMEOUT_S, 0),
    )
    .map_err(io::Error::from)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut message = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(request));
    message.header.flags = flags;
    message.header.sequence_number = 1;
    message.finalize();
    let mut out = vec![0u8; message.buffer_len()];
    message.serialize(&mut out);
    socket.send(&out, 0)?;
    Ok(socket)
}

/// An answer that is not what netlink promises.
fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}
