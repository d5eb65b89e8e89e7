//! DNS discovery: a backend `address` that is a name (`app:3000`, as with
//! `docker compose --scale app=5`) becomes one backend per A and AAAA record, re-resolved
//! every `resolve_interval` with the system resolver (so `/etc/hosts`, `nsswitch.conf` and
//! the container's DNS apply, as for any other program on the host).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Weak;
use std::time::Duration;

use tracing::warn;

use crate::config::DnsBackend;
use crate::service::ServiceRuntime;

/// Resolves `name` now and then every `interval`, and hands each answer to the service
/// ([`ServiceRuntime::set_discovered`]), which adds new addresses and lets go of vanished
/// ones: they drain unless the config or another name still asks for them.
/// Returns when the service is gone; abort the task to stop it sooner.
///
/// A failed lookup (no answer, a resolver error) keeps the last set: a DNS outage must not
/// drain every backend. It is logged once per failure streak.
pub async fn follow(service: Weak<ServiceRuntime>, name: DnsBackend, interval: Duration) {
    let label = name.to_string();
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticker.tick().await;
        let answer = resolve(&name).await;
        let Some(service) = service.upgrade() else {
            return;
        };
        match answer {
            Ok(addresses) => {
                failing = false;
                let addresses: Vec<SocketAddr> = addresses.into_iter().collect();
                service.set_discovered(&label, &addresses);
            }
            Err(e) => {
                if !failing {
                    warn!(
                        "service {}: cannot resolve {label} ({e}); keeping its last backends",
                        service.name()
                    );
                }
                failing = true;
            }
        }
    }
}

/// The addresses `name` resolves to now, deduplicated and sorted. An empty answer is an
/// error: the resolver returns at least one record or fails.
pub async fn resolve(name: &DnsBackend) -> std::io::Result<BTreeSet<SocketAddr>> {
    let found: BTreeSet<SocketAddr> = tokio::net::lookup_host((name.host.as_str(), name.port))
        .await?
        .collect();
    if found.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no A or AAAA record",
        ));
    }
    Ok(found)
}
