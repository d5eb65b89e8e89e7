//! The per-client limits' check on a new flow (a TCP connection or a UDP session), shared by
//! TCP accept and UDP session open: the admission, or the refusal counted and logged the
//! same way for both protocols.

use std::net::SocketAddr;

use super::access::{self, End};
use super::ctx::Ctx;
use super::limits::{Admission, Refusal};
use super::{LogLimit, ServiceInfo, Shared};
use crate::config::Protocol;
use crate::snapshot::ServiceSnapshot;

/// Asks `service`'s per-client limits (as `snapshot` sets them) whether `client` may open a
/// new flow now.
///
/// `Ok(admission)`: pass it to the client table's `release` when the flow ends.
/// `Err(why)`: the refusal is already counted (`limited`), logged at debug level and, if the
/// service logs access, written to the access log as `refused_log` lets it (at most one line
/// a second, with the count of those held back). The caller only turns the
/// flow away (TCP: a reset; UDP: the datagram is dropped).
pub(super) fn admit_or_refuse(
    ctx: &Ctx,
    service: &ServiceInfo,
    snapshot: &ServiceSnapshot,
    client: SocketAddr,
    refused_log: &mut LogLimit,
) -> Result<Admission, Refusal> {
    let why =
        match service
            .clients
            .admit(client.ip(), &snapshot.limits, snapshot.max_flows, ctx.now)
        {
            Ok(admission) => return Ok(admission),
            Err(why) => why,
        };
    Shared::count(&ctx.shared.limited, 1);
    let flow = match service.protocol {
        Protocol::Tcp => "connection",
        Protocol::Udp => "new session",
    };
    tracing::debug!(
        "service {}: {flow} from {client} refused by the limits ({why:?})",
        service.name
    );
    if snapshot.access_log {
        log_turned_away(ctx, service, client, End::LimitRefused, refused_log);
    }
    Err(why)
}

/// Writes the access log line of a flow of `client` turned away before it reached a backend
/// (`end`: [`End::LimitRefused`] or [`End::NoBackend`]), at most once a second as `limit`
/// counts, with the count of lines held back.
pub(super) fn log_turned_away(
    ctx: &Ctx,
    service: &ServiceInfo,
    client: SocketAddr,
    end: End,
    limit: &mut LogLimit,
) {
    let Some(similar) = limit.allow_counted(ctx.now) else {
        return;
    };
    access::log_summary(
        &access::Line::turned_away(service.protocol, &service.name, client, end),
        similar,
    );
}
