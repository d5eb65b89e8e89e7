//! DNS discovery: a backend `address` that is a name (`app:3000`, as with
//! `docker compose --scale app=5`) becomes one backend per A and AAAA record, re-resolved
//! every `resolve_interval` with the system resolver (so `/etc/hosts`, `nsswitch.conf` and
//! the container's DNS apply, as for any other program on the host).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::time::Duration;

use tracing::warn;

use crate::config::DnsBackend;

/// Resolves `name` now and then every `interval`, and hands each answer to `on_answer`
/// (the service's backend set adds new addresses and lets go of vanished ones: they drain
/// unless the config or another name still asks for them), as [`crate::health::monitor`]
/// reports a transition.
///
/// - `service`: the service's name, for the log.
/// - `on_answer`: gets every address of a successful lookup, sorted and deduplicated;
///   returns `ControlFlow::Break(())` when nobody needs the name any more (the service is
///   gone), which ends the task. Abort the task to stop it sooner.
/// - A failed lookup (no answer, a resolver error) keeps the last set: `on_answer` is not
///   called, as a DNS outage must not drain every backend. It is logged once per failure
///   streak.
pub async fn follow(
    service: String,
    name: DnsBackend,
    interval: Duration,
    on_answer: impl Fn(&[SocketAddr]) -> ControlFlow<()>,
) {
    let label = name.to_string();
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticker.tick().await;
        match resolve(&name).await {
            Ok(addresses) => {
                failing = false;
                let addresses: Vec<SocketAddr> = addresses.into_iter().collect();
                if on_answer(&addresses).is_break() {
                    return;
                }
            }
            Err(e) => {
                if !failing {
                    warn!("service {service}: cannot resolve {label} ({e}); keeping its last backends");
                }
                failing = true;
            }
        }
    }
}

/// Resolves every name of `names` at once with the system resolver, each on a thread of its
/// own, and waits up to `limit` for them: for a service about to start, so that its first
/// table has the backends its names give (a start or an upgrade that placed it with none
/// would refuse every new flow until the first answer). Returns the names that answered in
/// time with their addresses (deduplicated and sorted); a name that failed or is still
/// resolving is left out (its resolver task, [`follow`], answers later). Blocks the calling
/// thread: not for an async task.
pub fn resolve_now(names: &[DnsBackend], limit: Duration) -> Vec<(DnsBackend, Vec<SocketAddr>)> {
    let deadline = std::time::Instant::now() + limit;
    let (tx, rx) = std::sync::mpsc::channel();
    for name in names {
        let (tx, asked) = (tx.clone(), name.clone());
        let spawned = std::thread::Builder::new()
            .name("lb-resolve".into())
            .spawn(move || {
                use std::net::ToSocketAddrs;
                let found: BTreeSet<SocketAddr> = (asked.host.as_str(), asked.port)
                    .to_socket_addrs()
                    .map(|a| a.map(canonical).collect())
                    .unwrap_or_default();
                let _ = tx.send((asked, found));
            });
        if let Err(e) = spawned {
            warn!("cannot resolve {name} before the service starts: {e}");
        }
    }
    drop(tx);
    let mut answers = Vec::new();
    while let Ok((name, found)) =
        rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        if !found.is_empty() {
            answers.push((name, found.into_iter().collect()));
        }
    }
    answers
}

/// `a` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, which a resolver may return)
/// made IPv4: the same backend as the A record's, not a second one.
fn canonical(a: SocketAddr) -> SocketAddr {
    // Only the mapped form is rebuilt: another IPv6 answer keeps its scope (link-local).
    match a {
        SocketAddr::V6(v6) => (v6.ip().to_ipv4_mapped()).map_or(a, |v4| (v4, v6.port()).into()),
        SocketAddr::V4(_) => a,
    }
}

/// The addresses `name` resolves to now, deduplicated and sorted. An empty answer is an
/// error: the resolver returns at least one record or fails.
pub async fn resolve(name: &DnsBackend) -> std::io::Result<BTreeSet<SocketAddr>> {
    let found: BTreeSet<SocketAddr> = tokio::net::lookup_host((name.host.as_str(), name.port))
        .await?
        .map(canonical)
        .collect();
    if found.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no A or AAAA record",
        ));
    }
    Ok(found)
}
