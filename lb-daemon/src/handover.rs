//! Upgrades without a gap: the running daemon hands its listening sockets to the daemon
//! that replaces it (`lb-daemon upgrade`), over a unix socket (`[global] upgrade_socket`),
//! or, when the daemon starts its successor itself (SIGUSR2, [`spawn_successor`]), over a
//! socket pair, as descriptors (`SCM_RIGHTS`), the way HAProxy's `-x` and nginx's binary upgrade do. The
//! sockets, their accept queues and their `SO_REUSEPORT` groups stay open throughout, so no
//! connection is refused; the old daemon stops accepting once the new one is ready, lets its
//! own connections finish (up to `drain_timeout`) and exits, leaving its eBPF data plane
//! pinned for the new one (which adopts it at its start, see `dataplane::xdp::pins`).
//!
//! The exchange, on a stream socket:
//! 1. new → old: `TAKE\n`;
//! 2. old → new: one message whose bytes are a 4-byte big-endian length and that many bytes
//!    of JSON ([`Offer`]: each socket's listen address, protocol and worker, in the order of
//!    the descriptors), with the first [`FDS_PER_MESSAGE`] sockets (or all, if fewer)
//!    attached as `SCM_RIGHTS`;
//! 3. old → new, only when there are more sockets than that: for each further
//!    [`FDS_PER_MESSAGE`] (the last one: the rest), a message of 4 bytes, the big-endian
//!    count of the descriptors attached to it. A hand-over of up to [`FDS_PER_MESSAGE`]
//!    sockets is the single message of 2, as the releases before this step sent and read it;
//! 4. new → old, once it is ready (listening on what it took and on what it bound anew):
//!    `READY\n`. If the new one goes away without `READY` (it failed to start), the old one
//!    goes on as if nothing happened;
//! 5. old → new: `GO\n`, and the old daemon stops accepting and drains; or `NO\n` when it
//!    was already stopping (or had handed over to another new daemon), and the new one then
//!    withdraws the VIP routes it put back itself and exits 1, leaving the eBPF plane to the
//!    old daemon ([`Succession`]). Otherwise a stop that came between 1 and 4 would
//!    empty and detach the eBPF plane the new daemon adopted, while the new daemon went on as
//!    if it served. A daemon of an earlier release sends no answer ([`Offer::answers_ready`]
//!    is `false`): the new one goes on once `READY` is written. A new daemon of an earlier
//!    release reads no answer: it goes on after `READY` whatever this daemon decided, as
//!    before this step.
//!
//! A daemon that is stopping, or has handed over, answers `TAKE` with an offer that carries
//! no socket and the reason ([`Offer::refused`]), as a daemon under a service manager does:
//! the new daemon exits before it adopts anything.
//!
//! The new daemon knows from the JSON how many descriptors to expect; it refuses the offer,
//! closing every descriptor it received, when a message carries more than described or
//! announced, when descriptors were lost on the way (`MSG_CTRUNC`: it ran out of
//! descriptors), or when the whole offer has not arrived within [`OFFER_TIMEOUT`].
//!
//! Between 1 and 4 both daemons accept on the same sockets, and both may write the pinned
//! eBPF maps: the old one only when a backend's health or DNS records change in that window
//! (a second or two); the new one builds its tables from its own view once it runs. When the
//! old daemon stops accepting it takes what is left in each socket's queue and serves it
//! through its drain: a new connection wakes one of the two daemons' accepts only, and the
//! wake-up of one that arrives as the old accept is cancelled would otherwise be lost
//! (`dataplane::proxy::listener`).

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tracing::{debug, info, warn};

use crate::config::Protocol;

/// Most descriptors one `SCM_RIGHTS` message carries (the kernel's `SCM_MAX_FD`).
pub const FDS_PER_MESSAGE: usize = 253;
/// Most sockets one hand-over carries: (proxy services × workers) + 1 admin listener, e.g.
/// 255 services on 256 workers. Both daemons refuse more, and the new one refuses more than
/// its open file limit (`ulimit -n`) too.
pub const MAX_SOCKETS: usize = 65_536;
/// Largest offer accepted, in bytes of JSON: [`MAX_SOCKETS`] at about 120 bytes each (an
/// IPv6 address with a scope, the longest protocol, a large worker number) fit in it.
const MAX_OFFER: usize = 16 << 20;
/// How long the new daemon waits for the whole offer, its descriptors included.
const OFFER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the old daemon waits for a peer's `TAKE`, and for each send of its offer: a
/// peer that connects and says nothing, or stops reading, would otherwise hold the
/// hand-over socket (served one peer at a time) and no upgrade could take over until the
/// daemon restarts. `READY` has no limit: the new daemon sends it once it has started its
/// services, however long that takes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the hand-over did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The socket could not be reached, bound, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The hand-over socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The running daemon refuses to hand over, and says why (e.g. it runs under a service
    /// manager: only its upgrade in place, SIGUSR2, keeps the new daemon in the service).
    #[error("{}: the running daemon refuses to hand over: {why}", path.display())]
    Refused {
        /// The hand-over socket.
        path: PathBuf,
        /// The running daemon's reason.
        why: String,
    },
    /// The other side said something this daemon does not understand.
    #[error("{}: {what}", path.display())]
    Protocol {
        /// The hand-over socket.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
}

/// One socket offered: where it listens, for which protocol, on which proxy worker.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OfferedSocket {
    /// The address it is bound to.
    pub listen: SocketAddr,
    /// `tcp` (a proxy listener), `udp` (a VIP socket), `admin` (the admin API's
    /// listener), or `pin-lock`: no socket but the pin directory's locked descriptor
    /// (`dataplane::xdp::pin_lock`), under the address `0.0.0.0:0`.
    pub protocol: String,
    /// The old daemon's proxy worker that used it.
    pub worker: usize,
}

/// What the old daemon offers: its sockets, in the order of the descriptors, and the state
/// the new one carries on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Offer {
    /// The sockets.
    pub sockets: Vec<OfferedSocket>,
    /// `drain-node` holds the node's VIPs back (`crate::announce`); `false` from a daemon
    /// that does not say.
    #[serde(default)]
    pub node_draining: bool,
    /// Where the old daemon keeps its announced VIP routes (`[announce]`), if it does.
    #[serde(default)]
    pub announced_in: Option<RouteTableId>,
    /// The backends whose state the new daemon carries on (drained, an admin weight, down);
    /// empty from a daemon that does not say.
    #[serde(default)]
    pub backends: Vec<CarriedBackend>,
    /// The old daemon answers `READY` with `GO` or `NO` (step 5 of the exchange); `false`
    /// from a daemon of an earlier release, which answers nothing.
    #[serde(default)]
    pub answers_ready: bool,
    /// Why the old daemon refuses to hand over: the offer then carries no socket, and the new
    /// daemon exits with the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// A backend's state that outlives the daemon in an upgrade: what the admin API set, and a
/// health check's verdict of down. A backend with none of it (up, configured weight, not
/// drained) is not carried.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CarriedBackend {
    /// The service's name.
    pub service: String,
    /// The backend's address.
    pub address: SocketAddr,
    /// Drained through the admin API (`drain`): it stays so until `enable`.
    #[serde(default)]
    pub drained: bool,
    /// A weight set through the admin API, and the configured weight it was set over: a new
    /// config that configures another weight clears it, as a reload does.
    #[serde(default)]
    pub admin_weight: Option<(u32, u32)>,
    /// Down by its health check (or by passive failures): it needs `rise` successful checks,
    /// or the hold-off without active checks, to take flows again.
    #[serde(default)]
    pub down: bool,
    /// Down only until its first health check (added to the running service, or given back
    /// by a reload; `down` is also set, for a new daemon of an earlier release): the new
    /// daemon checks it at once and a pass brings it up, and meanwhile the flows already on
    /// it stay there (see `BackendView::awaiting_check`).
    #[serde(default)]
    pub awaiting_check: bool,
}

/// A routing table and route protocol number of announced VIPs (`[announce] table` and
/// `protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouteTableId {
    /// The kernel routing table.
    pub table: u32,
    /// The routes' protocol number.
    pub protocol: u8,
}

impl RouteTableId {
    /// Where `config` announces its VIPs; `None` without `[announce]`.
    pub fn of(config: &crate::config::Config) -> Option<RouteTableId> {
        config.announce.as_ref().map(|a| RouteTableId {
            table: a.table,
            protocol: a.protocol,
        })
    }
}

/// How a running daemon's serving ends, decided once and for all: by handing over to a new
/// daemon that said `READY`, or by its own stop (a signal, a dead thread). Shared by the
/// daemon's main loop and its hand-over threads, so that a stop and a `READY` that cross
/// each other cannot both win: the stopping daemon would empty and detach the eBPF plane
/// that the new one, told to go on, had adopted.
#[derive(Debug, Clone, Default)]
pub struct Succession(Arc<AtomicU8>);

const SERVING: u8 = 0;
const HANDED_OVER: u8 = 1;
const STOPPING: u8 = 2;

impl Succession {
    /// A new daemon said `READY`: returns `true` when this daemon hands over to it, `false`
    /// when it is stopping or has already handed over to another one (the new daemon is
    /// then told `NO`).
    pub fn hand_over(&self) -> bool {
        self.0
            .compare_exchange(SERVING, HANDED_OVER, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Whether the daemon still serves: it has neither handed over nor begun to stop.
    pub fn serving(&self) -> bool {
        self.0.load(Ordering::SeqCst) == SERVING
    }

    /// The daemon stops: returns `true` when the stop is its own, `false` when it has
    /// already handed over to a new daemon, which serves now: the daemon then leaves as
    /// after a hand-over, with its sockets, routes and eBPF plane left as they are.
    pub fn stop(&self) -> bool {
        match self
            .0
            .compare_exchange(SERVING, STOPPING, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => true,
            Err(now) => now == STOPPING,
        }
    }
}

/// How one hand-over ended, on the old daemon's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exchanged {
    /// The new daemon said `READY` and was told `GO`: this daemon hands over.
    HandedOver,
    /// The new daemon said `READY` and was told `NO`: this daemon was stopping, or had
    /// handed over to another new daemon.
    Refused,
    /// The new daemon went away before `READY`.
    Gone,
    /// The new daemon was told why this daemon does not hand over ([`Handing::refused`]).
    Declined,
}

/// What the old daemon hands over at the moment of a `TAKE`: its sockets with their
/// descriptions, and the state the new one carries on.
#[derive(Debug, Default)]
pub struct Handing {
    /// The sockets.
    pub sockets: Vec<(OfferedSocket, OwnedFd)>,
    /// See [`Offer::node_draining`].
    pub node_draining: bool,
    /// See [`Offer::announced_in`].
    pub announced_in: Option<RouteTableId>,
    /// See [`Offer::backends`].
    pub backends: Vec<CarriedBackend>,
    /// See [`Offer::refused`]: when set, no socket is handed over.
    pub refused: Option<String>,
}

/// The sockets a new daemon took over, until its proxy takes them ([`Inherited::take`]),
/// and the state it carries on.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Mutex<Vec<(OfferedSocket, OwnedFd)>>,
    node_draining: bool,
    announced_in: Option<RouteTableId>,
    backends: Mutex<Vec<CarriedBackend>>,
}

impl Inherited {
    /// The backends' state the old daemon carried over ([`CarriedBackend`]), taken once.
    pub fn take_backends(&self) -> Vec<CarriedBackend> {
        std::mem::take(&mut *self.backends.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether the old daemon's node was draining (`drain-node`): the new one goes on
    /// announcing nothing.
    pub fn node_draining(&self) -> bool {
        self.node_draining
    }

    /// Where the old daemon kept its announced VIP routes, if it announced any.
    pub fn announced_in(&self) -> Option<RouteTableId> {
        self.announced_in
    }

    /// The socket bound to `listen` for `protocol` that worker `worker` used, if one was
    /// handed over and not taken yet.
    pub fn take(&self, listen: SocketAddr, protocol: Protocol, worker: usize) -> Option<OwnedFd> {
        self.take_named(listen, &protocol.to_string(), worker)
    }

    /// The socket bound to `listen` of kind `kind` (`tcp`, `udp`, or another part of the
    /// daemon's: the admin API's `admin`) for `worker`, if one was handed over and not taken.
    pub fn take_named(&self, listen: SocketAddr, kind: &str, worker: usize) -> Option<OwnedFd> {
        let mut sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        let at = sockets
            .iter()
            .position(|(s, _)| s.listen == listen && s.protocol == kind && s.worker == worker)?;
        Some(sockets.remove(at).1)
    }

    /// Closes the sockets no service took (the new config dropped their service, or runs
    /// fewer workers); returns their addresses. TCP connections still queued on one of them
    /// are reset by the kernel.
    pub fn close_rest(&self) -> Vec<SocketAddr> {
        let mut sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        sockets.drain(..).map(|(s, _)| s.listen).collect()
    }

    /// How many sockets are left to take.
    pub fn len(&self) -> usize {
        self.sockets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether every socket was taken.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The new daemon's end of a hand-over: tell the old one when ready.
pub struct Taken {
    stream: UnixStream,
    path: PathBuf,
    /// The old daemon answers `READY` ([`Offer::answers_ready`]).
    answers: bool,
}

impl Taken {
    /// Tells the old daemon that this one is ready. Returns `Ok(true)` when it hands over (it
    /// stops accepting and drains), `Ok(false)` when it refused (it is stopping, or handed
    /// over to another new daemon): this daemon must then leave the sockets and the eBPF
    /// plane to it, and exit. An old daemon of an earlier release answers nothing: `Ok(true)` once
    /// `READY` is written.
    ///
    /// Returns `Err(HandoverError::Io)` when the old daemon cannot be told or does not answer
    /// within [`REQUEST_TIMEOUT`] (it is gone), `Err(HandoverError::Protocol)` when its
    /// answer is neither `GO` nor `NO`.
    pub fn ready(mut self) -> Result<bool, HandoverError> {
        let io_err = |source| HandoverError::Io {
            path: self.path.clone(),
            source,
        };
        self.stream.write_all(b"READY\n").map_err(io_err)?;
        if !self.answers {
            return Ok(true);
        }
        self.stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .map_err(io_err)?;
        let mut answer = [0u8; 3];
        self.stream.read_exact(&mut answer).map_err(io_err)?;
        match &answer {
            b"GO\n" => Ok(true),
            b"NO\n" => Ok(false),
            other => Err(HandoverError::Protocol {
                path: self.path.clone(),
                what: format!("{:?} in answer to READY", String::from_utf8_lossy(other)),
            }),
        }
    }
}

/// The new daemon's side: asks the daemon serving `path` for its sockets.
///
/// Returns `Err(HandoverError::Io)` when no daemon answers there, `Err(HandoverError::
/// Protocol)` when the answer is not an offer.
pub fn take_over(path: &Path) -> Result<(Inherited, Taken), HandoverError> {
    let stream = UnixStream::connect(path).map_err(|source| HandoverError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    take_over_on(stream, path)
}

/// The environment variable that gives a daemon started by [`spawn_successor`] the
/// descriptor number of its end of the hand-over.
pub const SUCCESSOR_FD_ENV: &str = "LB_UPGRADE_FD";

/// The descriptor a successor finds its end of the hand-over on.
const SUCCESSOR_FD: RawFd = 3;

/// The new daemon's side when the running daemon started it ([`spawn_successor`]): takes
/// the sockets over the descriptor [`SUCCESSOR_FD_ENV`] names; `None` when it names none
/// (the daemon was started by hand: [`take_over`] then).
///
/// Returns `Some(Err(HandoverError::Protocol))` when the variable does not name a unix
/// stream socket, and the errors of [`take_over`].
pub fn take_over_from_parent() -> Option<Result<(Inherited, Taken), HandoverError>> {
    let value = std::env::var(SUCCESSOR_FD_ENV).ok()?;
    let shown = PathBuf::from(format!("${SUCCESSOR_FD_ENV}={value}"));
    let bad = |what: String| HandoverError::Protocol {
        path: shown.clone(),
        what,
    };
    let Ok(fd) = value.parse::<RawFd>() else {
        return Some(Err(bad("not a descriptor number".into())));
    };
    // A number that is no unix stream socket (a variable left over in an environment) must
    // not be taken for one: its owner, if any, keeps it.
    let is_stream = nix::sys::socket::getsockopt(
        // SAFETY: only borrowed for this one call; ownership is taken below once checked.
        &unsafe { BorrowedFd::borrow_raw(fd) },
        nix::sys::socket::sockopt::SockType,
    )
    .is_ok_and(|t| t == nix::sys::socket::SockType::Stream)
        && nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(fd).is_ok();
    if !is_stream {
        return Some(Err(bad(format!(
            "descriptor {fd} is not a unix stream socket"
        ))));
    }
    // SAFETY: the parent daemon made this descriptor for this process alone (checked above
    // to be a unix stream socket); nothing else in this process owns it.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    Some(take_over_on(stream, &shown))
}

/// `TAKE`, then the offer, on a connected `stream` (`path` names it in errors).
fn take_over_on(mut stream: UnixStream, path: &Path) -> Result<(Inherited, Taken), HandoverError> {
    let io_err = |source| HandoverError::Io {
        path: path.to_path_buf(),
        source,
    };
    stream.write_all(b"TAKE\n").map_err(io_err)?;
    let (offer, fds) = receive_offer(&stream, path, OFFER_TIMEOUT)?;
    if let Some(why) = offer.refused {
        return Err(HandoverError::Refused {
            path: path.to_path_buf(),
            why,
        });
    }
    stream.set_read_timeout(None).map_err(io_err)?;
    let answers = offer.answers_ready;
    info!(
        "upgrade: took {} listening socket(s) from the running daemon ({})",
        fds.len(),
        path.display()
    );
    Ok((
        Inherited {
            sockets: Mutex::new(offer.sockets.into_iter().zip(fds).collect()),
            node_draining: offer.node_draining,
            announced_in: offer.announced_in,
            backends: Mutex::new(offer.backends),
        },
        Taken {
            stream,
            path: path.to_path_buf(),
            answers,
        },
    ))
}

/// Reads steps 2 and 3 of the exchange (see the module's doc) from `stream` within
/// `timeout`: the offer and its descriptors, one for each of `Offer::sockets`, in order.
///
/// Returns `Err(HandoverError::Io)` when the stream fails or the time is up,
/// `Err(HandoverError::Protocol)` when what arrives is not such an offer. Every descriptor
/// received is closed on an error.
fn receive_offer(
    stream: &UnixStream,
    path: &Path,
    timeout: Duration,
) -> Result<(Offer, Vec<OwnedFd>), HandoverError> {
    let bad = |what: String| HandoverError::Protocol {
        path: path.to_path_buf(),
        what,
    };
    let mut incoming = Incoming {
        stream,
        path,
        deadline: Instant::now() + timeout,
        timeout,
    };
    let (head, mut fds) = incoming.read_exact(4)?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > MAX_OFFER {
        return Err(bad(format!(
            "an offer of {len} bytes, more than the {MAX_OFFER} accepted"
        )));
    }
    let (json, more) = incoming.read_exact(len)?;
    fds.extend(more);
    let offer: Offer = serde_json::from_slice(&json)
        .map_err(|e| bad(format!("an offer that is not JSON: {e}")))?;
    let described = offer.sockets.len();
    if described > MAX_SOCKETS {
        return Err(bad(format!(
            "{described} sockets offered, more than the {MAX_SOCKETS} one hand-over carries"
        )));
    }
    // Checked before the rest arrive: past the limit the kernel drops what does not fit,
    // and the error would only say that descriptors were lost.
    let limit = crate::config::open_file_limit();
    if described as u64 > limit {
        return Err(bad(format!(
            "{described} sockets offered, more than this process may open (open file limit \
             {limit})"
        )));
    }
    if fds.len() > described {
        return Err(bad(format!(
            "{described} sockets described, {} descriptors received with them",
            fds.len()
        )));
    }
    // A daemon of an earlier release sent them all with the offer; this one sends the rest
    // in messages of their own.
    while fds.len() < described {
        let (head, more) = incoming.read_exact(4)?;
        let announced = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let missing = described - fds.len();
        if announced == 0 || announced > FDS_PER_MESSAGE.min(missing) {
            return Err(bad(format!(
                "a message announcing {announced} descriptors, with {missing} of {described} \
                 to come"
            )));
        }
        if more.len() != announced {
            return Err(bad(format!(
                "a message announcing {announced} descriptors carried {}",
                more.len()
            )));
        }
        fds.extend(more);
    }
    Ok((offer, fds))
}

/// The new daemon's end of the stream while it reads the offer, until `deadline`.
struct Incoming<'a> {
    stream: &'a UnixStream,
    /// Names the stream in errors.
    path: &'a Path,
    deadline: Instant,
    /// The whole time allowed, for the error.
    timeout: Duration,
}

impl Incoming<'_> {
    /// Reads exactly `n` bytes; returns them and the descriptors that came with them.
    ///
    /// Reading no further than the bytes expected keeps the descriptors of the next message
    /// (attached to its first byte) for the read that asks for it.
    fn read_exact(&mut self, n: usize) -> Result<(Vec<u8>, Vec<OwnedFd>), HandoverError> {
        let io_err = |source| HandoverError::Io {
            path: self.path.to_path_buf(),
            source,
        };
        let bad = |what: String| HandoverError::Protocol {
            path: self.path.to_path_buf(),
            what,
        };
        let mut bytes = vec![0u8; n];
        let mut fds = Vec::new();
        let mut got = 0;
        while got < n {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io_err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the offer did not arrive in full within {:?}", self.timeout),
                )));
            }
            self.stream.set_read_timeout(Some(left)).map_err(io_err)?;
            let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
            let mut iov = [IoSliceMut::new(&mut bytes[got..])];
            let msg = match recvmsg::<()>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => msg,
                // Interrupted, or the read timeout ran out: the deadline is checked above.
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
                Err(e) => return Err(io_err(e.into())),
            };
            let read = msg.bytes;
            let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
            for cmsg in msg.cmsgs().map_err(|e| io_err(e.into()))? {
                if let ControlMessageOwned::ScmRights(raw) = cmsg {
                    // SAFETY: the kernel just installed these descriptors in this process
                    // for us; nothing else owns them.
                    fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                }
            }
            if truncated {
                return Err(bad(format!(
                    "descriptors were lost on the way (control data truncated, {} arrived): \
                     is this process at its open file limit?",
                    fds.len()
                )));
            }
            if read == 0 {
                return Err(bad("the offer ended early".into()));
            }
            got += read;
        }
        Ok((bytes, fds))
    }
}

/// The hand-over socket [`serve_handover`] bound: its path and the file it made there (device
/// and inode), so that a daemon that stops removes its own socket, not one that another daemon
/// (the new one of an upgrade, which binds the same path) has put there since.
#[derive(Debug)]
pub struct BoundSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl BoundSocket {
    fn at(path: &Path) -> io::Result<BoundSocket> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path)?;
        Ok(BoundSocket {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Removes the path while it is still this socket, so that `lb-daemon upgrade` finds
    /// nothing to take over from a daemon that stops; a failure is logged.
    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if !ours {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            warn!(
                "upgrade: cannot remove the hand-over socket {}: {e}",
                self.path.display()
            );
        }
    }
}

/// The old daemon's side: binds `path` (a stale socket file there is replaced; the socket is
/// made 0600) and serves it on a thread of its own: each `TAKE` gets the sockets `offer`
/// lists at that moment; a `READY` that follows is answered by `succession`: `GO` and a call
/// of `on_ready` when the daemon hands over, `NO` when it is stopping. Either ends the
/// thread.
///
/// Returns the socket it bound, or `Err(HandoverError::Io)` when the socket cannot be bound.
pub fn serve_handover(
    path: &Path,
    offer: impl Fn() -> Handing + Send + 'static,
    succession: Succession,
    on_ready: impl Fn() + Send + 'static,
) -> Result<BoundSocket, HandoverError> {
    let io_err = |source| HandoverError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    let bound = BoundSocket::at(path).map_err(io_err)?;
    let shown = path.to_path_buf();
    std::thread::Builder::new()
        .name("lb-handover".into())
        .spawn(move || {
            serve(
                listener,
                &shown,
                offer,
                &succession,
                on_ready,
                REQUEST_TIMEOUT,
            )
        })
        .map_err(io_err)?;
    info!("upgrade: hand-over socket at {}", path.display());
    Ok(bound)
}

fn serve(
    listener: UnixListener,
    path: &Path,
    offer: impl Fn() -> Handing,
    succession: &Succession,
    on_ready: impl Fn(),
    request_timeout: Duration,
) {
    for conn in listener.incoming() {
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!("upgrade: {}: accept failed: {e}", path.display());
                continue;
            }
        };
        match exchange(&mut stream, &offer, succession, request_timeout) {
            Ok(Exchanged::HandedOver) => {
                info!("upgrade: the new daemon is ready; this one stops accepting and drains");
                on_ready();
                return;
            }
            Ok(Exchanged::Refused) => {
                warn!(
                    "upgrade: the new daemon is ready, but this one stops or has handed over \
                     to another: it was told no"
                );
                return;
            }
            Ok(Exchanged::Gone) => {
                warn!("upgrade: the new daemon went away before it was ready; this one goes on")
            }
            Ok(Exchanged::Declined) => {}
            Err(e) => warn!("upgrade: {}: {e}; this one goes on", path.display()),
        }
    }
}

/// The old daemon's side of an upgrade in place (SIGUSR2, for a service manager that must
/// keep the service's processes its own): starts `exe upgrade -c config` with its end of a
/// socket pair as descriptor 3 (named by [`SUCCESSOR_FD_ENV`]) and serves the hand-over on
/// the other end on a thread of its own: the successor's `TAKE` gets the sockets `offer`
/// lists at that moment; its `READY` is answered by `succession` (as in [`serve_handover`]):
/// `GO` and `on_end(Some(its pid))` when this daemon hands over. A successor that ends
/// before `READY` (a config it refuses, a binary that does not start) is waited for and
/// logged, and `on_end(None)` called: this daemon goes on. One told `NO` (this daemon
/// stops) is waited for and logged the same way, if this daemon is still there. `exe` is the
/// path the daemon was started from, read at its start: after a package upgrade it holds the
/// new binary.
///
/// Returns the successor's pid, or `Err(HandoverError::Io)` when the socket pair, the thread
/// or the process cannot be made.
pub fn spawn_successor(
    exe: &Path,
    config: &Path,
    offer: impl Fn() -> Handing + Send + 'static,
    succession: Succession,
    on_end: impl FnOnce(Option<u32>) + Send + 'static,
) -> Result<u32, HandoverError> {
    use std::os::unix::process::CommandExt;
    let io_err = |source| HandoverError::Io {
        path: exe.to_path_buf(),
        source,
    };
    let (mut ours, theirs) = UnixStream::pair().map_err(io_err)?;
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("upgrade")
        .arg("-c")
        .arg(config)
        .env(SUCCESSOR_FD_ENV, SUCCESSOR_FD.to_string());
    // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
    // (dup2, fcntl) on a descriptor that stays open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if theirs_fd == SUCCESSOR_FD {
                // dup2 onto itself would keep close-on-exec set.
                if libc::fcntl(theirs_fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(theirs_fd, SUCCESSOR_FD) != SUCCESSOR_FD {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(io_err)?;
    // Only the successor holds its end now: it closing (exiting) ends the exchange.
    drop(theirs);
    let pid = child.id();
    info!(
        "upgrade: started {} upgrade -c {} (pid {pid}) to take over",
        exe.display(),
        config.display()
    );
    std::thread::Builder::new()
        .name("lb-successor".into())
        .spawn(move || match exchange(&mut ours, &offer, &succession, REQUEST_TIMEOUT) {
            Ok(Exchanged::HandedOver) => {
                info!("upgrade: the new daemon (pid {pid}) is ready; this one stops accepting and drains");
                on_end(Some(pid));
            }
            outcome => {
                let why = match outcome {
                    Err(e) => e.to_string(),
                    Ok(Exchanged::Refused) => "it was ready, but this one is stopping".into(),
                    Ok(Exchanged::Declined) => "this one refused to hand over".into(),
                    _ => "it ended before it was ready".into(),
                };
                let status = child
                    .wait()
                    .map_or_else(|e| format!("unknown ({e})"), |s| s.to_string());
                warn!("upgrade: the new daemon (pid {pid}) did not take over ({why}; {status})");
                on_end(None);
            }
        })
        .map_err(io_err)?;
    Ok(pid)
}

/// One hand-over: `TAKE`, the offer, then `READY`, answered as `succession` decides
/// (`Ok(Exchanged::HandedOver)` or `Ok(Exchanged::Refused)`), or the end of the stream
/// (`Ok(Exchanged::Gone)`). `TAKE`, each send of the offer and the answer may take
/// `request_timeout` at most (`Err` of kind `WouldBlock` / `TimedOut` past it); `READY` is
/// waited for without limit.
fn exchange(
    stream: &mut UnixStream,
    offer: &impl Fn() -> Handing,
    succession: &Succession,
    request_timeout: Duration,
) -> io::Result<Exchanged> {
    stream.set_read_timeout(Some(request_timeout))?;
    stream.set_write_timeout(Some(request_timeout))?;
    let mut word = [0u8; 5];
    stream.read_exact(&mut word)?;
    if &word != b"TAKE\n" {
        return Err(io::Error::other("not a hand-over request"));
    }
    // Before the offer: a new daemon turned away now adopts nothing (the eBPF plane, the
    // pin directory's lock) and places no config on it.
    if !succession.serving() {
        return decline(
            stream,
            "it is stopping, or has handed over to another new daemon",
        );
    }
    let Handing {
        sockets,
        node_draining,
        announced_in,
        backends,
        refused,
    } = offer();
    if let Some(why) = refused {
        return decline(stream, &why);
    }
    if sockets.len() > MAX_SOCKETS {
        return Err(io::Error::other(format!(
            "{} sockets to hand over, more than the {MAX_SOCKETS} one hand-over carries",
            sockets.len()
        )));
    }
    let (described, fds): (Vec<OfferedSocket>, Vec<OwnedFd>) = sockets.into_iter().unzip();
    let mut offered = Offer {
        sockets: described,
        node_draining,
        announced_in,
        backends,
        answers_ready: true,
        refused: None,
    };
    let mut json = serde_json::to_vec(&offered).map_err(io::Error::other)?;
    if json.len() > MAX_OFFER && !offered.backends.is_empty() {
        // The sockets matter more: the new daemon starts its backends afresh instead.
        warn!(
            "upgrade: the state of {} backend(s) is too large to hand over; the new daemon \
             starts them up, at their configured weights, not drained",
            offered.backends.len()
        );
        offered.backends.clear();
        json = serde_json::to_vec(&offered).map_err(io::Error::other)?;
    }
    if json.len() > MAX_OFFER {
        return Err(io::Error::other(format!(
            "an offer of {} bytes, more than the {MAX_OFFER} the new daemon accepts",
            json.len()
        )));
    }
    let mut bytes = (json.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&json);
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let first = raw.len().min(FDS_PER_MESSAGE);
    send_with_fds(stream, &bytes, &raw[..first])?;
    for chunk in raw[first..].chunks(FDS_PER_MESSAGE) {
        send_with_fds(stream, &(chunk.len() as u32).to_be_bytes(), chunk)?;
    }
    info!("upgrade: handed {} socket(s) to the new daemon", fds.len());
    stream.set_read_timeout(None)?;
    let mut ready = [0u8; 6];
    match stream.read_exact(&mut ready) {
        Ok(()) if &ready == b"READY\n" => {}
        Ok(()) => return Err(io::Error::other("not READY")),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Exchanged::Gone),
        Err(e) => return Err(e),
    }
    // Decided before the answer: a `GO` the new daemon reads means this one hands over,
    // whatever signal comes next.
    if !succession.hand_over() {
        if let Err(e) = stream.write_all(b"NO\n") {
            warn!("upgrade: cannot refuse the new daemon's READY: {e}");
        }
        return Ok(Exchanged::Refused);
    }
    // Handed over even when the answer cannot be written: a new daemon of an earlier
    // release closes its end once READY is out, and serves; taking the hand-over back would
    // leave two daemons serving, and this one, once stopped, would empty the plane the other
    // uses. One of this release that cannot read it exits: none serves then, as when a new
    // daemon dies right after READY.
    if let Err(e) = stream.write_all(b"GO\n") {
        debug!("upgrade: cannot answer the new daemon's READY: {e}");
    }
    Ok(Exchanged::HandedOver)
}

/// Answers a `TAKE` with an offer that carries no socket and says `why` this daemon does not
/// hand over ([`Offer::refused`]); the new daemon exits with it.
fn decline(stream: &mut UnixStream, why: &str) -> io::Result<Exchanged> {
    let declined = Offer {
        sockets: Vec::new(),
        node_draining: false,
        announced_in: None,
        backends: Vec::new(),
        answers_ready: true,
        refused: Some(why.to_string()),
    };
    let json = serde_json::to_vec(&declined).map_err(io::Error::other)?;
    let mut bytes = (json.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&json);
    stream.write_all(&bytes)?;
    warn!("upgrade: a new daemon asked to take over; refused: {why}");
    Ok(Exchanged::Declined)
}

/// Sends `bytes` with `fds` (at most [`FDS_PER_MESSAGE`]) attached to their first part.
fn send_with_fds(stream: &mut UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    let sent = loop {
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::empty(),
            None,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            sent => break sent.map_err(io::Error::from)?,
        }
    };
    // The descriptors went with the bytes sent; the rest follows plain.
    stream.write_all(&bytes[sent..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopping_daemon_removes_its_own_hand_over_socket_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("upgrade.sock");
        let nothing = Handing::default;
        let old = serve_handover(&path, nothing, Succession::default(), || {}).expect("serve");
        // The new daemon of an upgrade binds the same path.
        let new =
            serve_handover(&path, nothing, Succession::default(), || {}).expect("serve again");
        old.remove();
        assert!(
            path.exists(),
            "the old daemon removed the new daemon's socket"
        );
        new.remove();
        assert!(!path.exists(), "the socket's own daemon left it behind");
    }

    #[test]
    fn sockets_cross_with_their_descriptions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("upgrade.sock");
        let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = a.local_addr().expect("addr");
        let fd: OwnedFd = a.into();
        let dup = fd.try_clone().expect("dup");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let offered = Mutex::new(Some(dup));
        serve_handover(
            &path,
            move || {
                let fd = offered.lock().expect("lock").take().expect("offered once");
                Handing {
                    sockets: vec![(
                        OfferedSocket {
                            listen: addr,
                            protocol: "tcp".into(),
                            worker: 0,
                        },
                        fd,
                    )],
                    node_draining: true,
                    announced_in: Some(RouteTableId {
                        table: 100,
                        protocol: 250,
                    }),
                    backends: vec![carried()],
                    refused: None,
                }
            },
            Succession::default(),
            move || ready_tx.send(()).expect("ready"),
        )
        .expect("serve");
        let (inherited, taken) = take_over(&path).expect("take over");
        assert_eq!(inherited.len(), 1);
        assert!(
            inherited.node_draining(),
            "the node's drain is carried over"
        );
        assert_eq!(
            inherited.announced_in(),
            Some(RouteTableId {
                table: 100,
                protocol: 250
            })
        );
        assert_eq!(
            inherited.take_backends(),
            vec![carried()],
            "the backends' state"
        );
        assert!(inherited.take_backends().is_empty(), "taken once");
        assert!(inherited.take(addr, Protocol::Udp, 0).is_none(), "not udp");
        let got = inherited
            .take(addr, Protocol::Tcp, 0)
            .expect("the listener");
        // The same socket: a connection to the old one is accepted from the new descriptor.
        drop(fd);
        let listener = std::net::TcpListener::from(got);
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        let (_, from) = listener
            .accept()
            .expect("accepted from the handed-over socket");
        assert!(from.ip().is_loopback());
        assert!(taken.ready().expect("ready sent"), "the old daemon said no");
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the old side saw READY");
    }

    /// A peer that connects and says nothing holds the hand-over socket for the request
    /// timeout only: the new daemon that comes next takes over.
    #[test]
    fn a_silent_peer_does_not_keep_the_next_one_from_taking_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("upgrade.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let serving = path.clone();
        std::thread::spawn(move || {
            serve(
                listener,
                &serving,
                Handing::default,
                &Succession::default(),
                move || ready_tx.send(()).expect("ready"),
                Duration::from_millis(200),
            )
        });
        let _silent = UnixStream::connect(&path).expect("the silent peer connects");
        let (inherited, taken) = take_over(&path).expect("the next peer takes over");
        assert_eq!(inherited.len(), 0);
        assert!(taken.ready().expect("ready sent"), "the old daemon said no");
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the old side saw READY from the peer after the silent one");
    }

    /// `n` UDP sockets on 127.0.0.1 (each on a port of its own), described as worker `i`'s.
    /// Raises this process's open file limit to its hard limit first: two such tests at
    /// once hold over a thousand descriptors (each socket twice), past a soft limit of 1024.
    fn udp_sockets(n: usize) -> Vec<(OfferedSocket, OwnedFd)> {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            if soft < hard {
                let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            }
        }
        (0..n)
            .map(|worker| {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
                let listen = socket.local_addr().expect("addr");
                let described = OfferedSocket {
                    listen,
                    protocol: "udp".into(),
                    worker,
                };
                (described, socket.into())
            })
            .collect()
    }

    #[test]
    fn more_sockets_than_one_message_carries_cross_all() {
        // 300 > 253 (SCM_MAX_FD): e.g. 4 services with 64 workers and the admin listener
        // would be 257.
        let sockets = udp_sockets(300);
        let described: Vec<OfferedSocket> = sockets.iter().map(|(s, _)| s.clone()).collect();
        let (mut old, new) = UnixStream::pair().expect("socket pair");
        let offered = Mutex::new(Some(sockets));
        let old_side = std::thread::spawn(move || {
            exchange(
                &mut old,
                &|| Handing {
                    sockets: offered.lock().expect("lock").take().expect("offered once"),
                    ..Handing::default()
                },
                &Succession::default(),
                REQUEST_TIMEOUT,
            )
        });
        let (inherited, taken) =
            take_over_on(new, Path::new("pair")).expect("the new daemon takes 300 sockets");
        assert_eq!(inherited.len(), 300, "sockets taken over");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("client");
        for s in &described {
            let got = inherited
                .take(s.listen, Protocol::Udp, s.worker)
                .unwrap_or_else(|| {
                    panic!(
                        "worker {}'s socket {} was not handed over",
                        s.worker, s.listen
                    )
                });
            let got = std::net::UdpSocket::from(got);
            assert_eq!(
                got.local_addr().expect("addr"),
                s.listen,
                "worker {}'s descriptor is another socket",
                s.worker
            );
            // The same socket, not one at the same address: what is sent to it arrives here.
            client.send_to(&[s.worker as u8], s.listen).expect("send");
            got.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut buf = [0u8; 1];
            let (_, from) = got
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("worker {}'s socket got no datagram: {e}", s.worker));
            assert_eq!(from, client.local_addr().expect("client addr"));
        }
        assert!(inherited.is_empty());
        assert!(taken.ready().expect("ready sent"), "the old daemon said no");
        let outcome = old_side.join().expect("old side");
        assert!(
            matches!(outcome, Ok(Exchanged::HandedOver)),
            "the old daemon did not see READY: {outcome:?}"
        );
    }

    /// One exchange on a socket pair with an old daemon whose serving ends as `succession`
    /// says, which is told to stop between `TAKE` and `READY` when `stop` is set: what the
    /// new daemon's READY got, and how the old daemon saw it.
    fn ready_against(
        succession: &Succession,
        stop: bool,
    ) -> (Result<bool, HandoverError>, Exchanged) {
        let (mut old, new) = UnixStream::pair().expect("socket pair");
        let deciding = succession.clone();
        let old_side = std::thread::spawn(move || {
            exchange(&mut old, &Handing::default, &deciding, REQUEST_TIMEOUT)
        });
        let (_, taken) = take_over_on(new, Path::new("pair")).expect("taken");
        if stop {
            assert!(succession.stop(), "a serving daemon's stop is its own");
        }
        let answer = taken.ready();
        let seen = old_side.join().expect("old side").expect("exchanged");
        (answer, seen)
    }

    /// A daemon told to stop while a new one was taking over answers its READY `NO`: the new
    /// one must not go on with the eBPF plane this one empties as it stops. Its stop stays
    /// its own.
    #[test]
    fn a_stopping_daemon_refuses_a_ready_that_comes_after_its_stop() {
        let succession = Succession::default();
        let (answer, seen) = ready_against(&succession, true);
        assert!(
            !answer.expect("answered"),
            "a stopping daemon told the new daemon to go on"
        );
        assert_eq!(seen, Exchanged::Refused);
        assert!(succession.stop(), "the refused READY took the stop over");
        turns_away_a_late_take(&succession, "a stopping daemon");
    }

    /// A new daemon that asks an old daemon whose serving ended as `succession` says (`what`)
    /// is turned away at its `TAKE`, before it adopts anything.
    fn turns_away_a_late_take(succession: &Succession, what: &str) {
        let (mut old, new) = UnixStream::pair().expect("socket pair");
        let deciding = succession.clone();
        let old_side = std::thread::spawn(move || {
            exchange(&mut old, &Handing::default, &deciding, REQUEST_TIMEOUT)
        });
        let late = take_over_on(new, Path::new("pair"));
        assert!(
            matches!(&late, Err(HandoverError::Refused { .. })),
            "{what} handed its sockets to a new daemon"
        );
        let seen = old_side.join().expect("old side").expect("exchanged");
        assert_eq!(seen, Exchanged::Declined);
    }

    /// A READY that comes first wins: the stop that follows finds the hand-over done (the
    /// daemon leaves everything to the new one), and a second new daemon is turned away at
    /// its `TAKE`, before it adopts anything.
    #[test]
    fn a_stop_after_a_ready_leaves_as_after_a_hand_over() {
        let succession = Succession::default();
        let (answer, seen) = ready_against(&succession, false);
        assert!(answer.expect("answered"), "a serving daemon said no");
        assert_eq!(seen, Exchanged::HandedOver);
        turns_away_a_late_take(&succession, "a daemon that handed over");
        assert!(
            !succession.stop(),
            "a stop after the hand-over took the eBPF plane back from the new daemon"
        );
    }

    /// A new daemon of an earlier release closes its end as soon as READY is out, without
    /// reading the answer: it serves, so this daemon hands over all the same (or both would
    /// serve, and this one, once stopped, would empty the plane the other uses).
    #[test]
    fn a_ready_from_a_daemon_that_reads_no_answer_is_a_hand_over() {
        let succession = Succession::default();
        let (mut old, mut new) = UnixStream::pair().expect("socket pair");
        let deciding = succession.clone();
        let old_side = std::thread::spawn(move || {
            exchange(&mut old, &Handing::default, &deciding, REQUEST_TIMEOUT)
        });
        new.write_all(b"TAKE\n").expect("TAKE");
        receive_offer(&new, Path::new("pair"), Duration::from_secs(5)).expect("the offer");
        new.write_all(b"READY\n").expect("READY");
        drop(new);
        let seen = old_side.join().expect("old side").expect("exchanged");
        assert_eq!(seen, Exchanged::HandedOver);
        assert!(!succession.stop(), "the stop after it took the plane back");
    }

    /// A daemon that refuses to hand over says why, and the new daemon gets no socket: it
    /// fails with the reason.
    #[test]
    fn a_refusal_reaches_the_new_daemon_with_its_reason() {
        let (mut old, new) = UnixStream::pair().expect("socket pair");
        let old_side = std::thread::spawn(move || {
            exchange(
                &mut old,
                &|| Handing {
                    refused: Some("it runs under a service manager".into()),
                    ..Handing::default()
                },
                &Succession::default(),
                REQUEST_TIMEOUT,
            )
        });
        let e = take_over_on(new, Path::new("pair"))
            .err()
            .expect("a refused hand-over");
        assert!(
            matches!(&e, HandoverError::Refused { why, .. } if why.contains("service manager")),
            "{e}"
        );
        let seen = old_side.join().expect("old side").expect("exchanged");
        assert_eq!(seen, Exchanged::Declined);
    }

    /// An old daemon of an earlier release answers nothing to READY: the new one goes on as
    /// soon as READY is written (and does not wait for an answer that never comes).
    #[test]
    fn ready_to_a_daemon_that_does_not_answer_goes_on() {
        let (mut old, new) = UnixStream::pair().expect("socket pair");
        // The previous release's offer: no `answers_ready`.
        let json = br#"{"sockets":[],"node_draining":false}"#;
        old.write_all(&(json.len() as u32).to_be_bytes())
            .expect("send");
        old.write_all(json).expect("send");
        let (_, taken) = take_over_on(new, Path::new("pair")).expect("taken");
        let started = Instant::now();
        assert!(taken.ready().expect("READY written"));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "waited for an answer"
        );
        let mut got = [0u8; 11];
        old.read_exact(&mut got).expect("TAKE and READY");
        assert_eq!(&got, b"TAKE\nREADY\n");
    }

    /// A drained backend with an admin weight, down.
    fn carried() -> CarriedBackend {
        CarriedBackend {
            service: "web".into(),
            address: "10.0.0.11:8080".parse().expect("address"),
            drained: true,
            admin_weight: Some((5, 1)),
            down: true,
            awaiting_check: false,
        }
    }

    /// The bytes of step 2 for `sockets`: the length, then the JSON.
    fn offer_bytes(sockets: &[(OfferedSocket, OwnedFd)]) -> Vec<u8> {
        let json = serde_json::to_vec(&Offer {
            sockets: sockets.iter().map(|(s, _)| s.clone()).collect(),
            node_draining: false,
            announced_in: None,
            backends: Vec::new(),
            answers_ready: false,
            refused: None,
        })
        .expect("json");
        let mut bytes = (json.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&json);
        bytes
    }

    fn raw(sockets: &[(OfferedSocket, OwnedFd)]) -> Vec<RawFd> {
        sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect()
    }

    #[test]
    fn an_offer_from_a_daemon_that_carries_no_backends_reads_as_none() {
        let json = concat!(
            r#"{"sockets":[{"listen":"127.0.0.1:80","protocol":"tcp","worker":0}],"#,
            r#""node_draining":true}"#
        )
        .as_bytes();
        let offer: Offer = serde_json::from_slice(json).expect("an older daemon's offer");
        assert!(offer.backends.is_empty() && offer.node_draining);
        let carried = serde_json::to_value(carried()).expect("json");
        let back: CarriedBackend = serde_json::from_value(carried).expect("read back");
        assert_eq!(back, super::tests::carried());
    }

    #[test]
    fn an_offer_in_one_message_as_the_previous_release_sends_it_is_taken() {
        let sockets = udp_sockets(FDS_PER_MESSAGE);
        let (mut old, new) = UnixStream::pair().expect("socket pair");
        // The previous release: one message, every descriptor attached.
        send_with_fds(&mut old, &offer_bytes(&sockets), &raw(&sockets)).expect("send");
        let (offer, fds) =
            receive_offer(&new, Path::new("pair"), Duration::from_secs(5)).expect("taken");
        assert_eq!(fds.len(), FDS_PER_MESSAGE);
        for ((s, _), fd) in sockets.iter().zip(fds) {
            let got = std::net::UdpSocket::from(fd).local_addr().expect("addr");
            assert_eq!(
                got, s.listen,
                "worker {}'s descriptor is another socket",
                s.worker
            );
        }
        assert_eq!(offer.sockets.len(), FDS_PER_MESSAGE);
    }

    #[test]
    fn a_message_with_more_descriptors_than_it_announces_is_refused() {
        let sockets = udp_sockets(FDS_PER_MESSAGE + 2);
        let (mut old, new) = UnixStream::pair().expect("socket pair");
        let fds = raw(&sockets);
        send_with_fds(&mut old, &offer_bytes(&sockets), &fds[..FDS_PER_MESSAGE]).expect("send");
        // Announces 1 of the 2 left and carries both.
        send_with_fds(&mut old, &1u32.to_be_bytes(), &fds[FDS_PER_MESSAGE..]).expect("send");
        let e = receive_offer(&new, Path::new("pair"), Duration::from_secs(5))
            .expect_err("a message carrying more than it announces");
        assert!(
            e.to_string().contains("announcing 1 descriptors carried 2"),
            "{e}"
        );
    }

    #[test]
    fn more_descriptors_than_described_are_refused() {
        let sockets = udp_sockets(3);
        let (mut old, new) = UnixStream::pair().expect("socket pair");
        send_with_fds(&mut old, &offer_bytes(&sockets[..2]), &raw(&sockets)).expect("send");
        let e = receive_offer(&new, Path::new("pair"), Duration::from_secs(5))
            .expect_err("3 descriptors for 2 sockets");
        assert!(e.to_string().contains("2 sockets described, 3"), "{e}");
    }

    #[test]
    fn an_offer_whose_descriptors_stop_coming_times_out() {
        let sockets = udp_sockets(FDS_PER_MESSAGE + 1);
        let (mut old, new) = UnixStream::pair().expect("socket pair");
        // The offer and its first message, then nothing (the stream stays open).
        send_with_fds(
            &mut old,
            &offer_bytes(&sockets),
            &raw(&sockets)[..FDS_PER_MESSAGE],
        )
        .expect("send");
        let started = Instant::now();
        let e = receive_offer(&new, Path::new("pair"), Duration::from_millis(300))
            .expect_err("the last descriptor never comes");
        assert!(
            matches!(&e, HandoverError::Io { source, .. } if source.kind() == io::ErrorKind::TimedOut),
            "{e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "waited {:?} for a 300 ms timeout",
            started.elapsed()
        );
    }
}
