//! Keeps the maps in step with the services: the plane's shared [`State`] (the maps, the id
//! pools, the services on XDP and the ones draining out), and a thread that every [`POLL`]
//! republishes each service whose snapshot generation changed and releases what drained.
//!
//! The health checker publishes a new snapshot on every UP/DOWN transition (and a weight
//! change, a reload or a DNS answer does the same), so a change reaches the maps at most
//! `POLL` plus one table write after it is published. A write touches only the slots that
//! differ from what the inactive half holds (Maglev moves few), so it is quick after the
//! first, which writes all M. A thread rather than a tokio task because a table write is
//! blocking map updates, up to 65537 of them, which would stall the control plane's health
//! checks.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{error, info};

use super::ids::IdPool;
use super::{lock, Maps, ServiceSlot};
use crate::service::ServiceRuntime;

/// How often the thread compares generations and looks for drained ids.
pub const POLL: Duration = Duration::from_millis(50);

/// Everything the XDP plane writes into the maps, behind one lock: the reload path (adding,
/// removing services), the sync thread and the counters' reader take it in turn.
pub struct State {
    /// The maps.
    pub maps: Maps,
    /// Free backend ids (`0..MAX_BACKENDS`).
    pub backend_ids: IdPool,
    /// Free service ids (`0..MAX_SERVICES`).
    pub service_ids: IdPool,
    /// How long a removed backend or service keeps its ids for the flows pinned to it.
    pub drain_timeout: Duration,
    /// The services on XDP, in the order they were placed.
    pub running: Vec<Running>,
    /// Removed services whose pinned flows may still go on, until their deadline.
    pub leaving: Vec<Leaving>,
}

/// A service on XDP.
pub struct Running {
    /// The service.
    pub rt: Arc<ServiceRuntime>,
    /// Its place in the maps.
    pub slot: ServiceSlot,
}

/// A removed service, draining: its table is empty, its VIP and backend ids stay.
pub struct Leaving {
    /// The service's name, for the log.
    pub name: String,
    /// Its place in the maps.
    pub slot: ServiceSlot,
    /// When its VIP, service id and backend ids are released.
    pub deadline: Instant,
}

impl State {
    /// Writes `rt`'s current snapshot into `slot` when its generation is not the one
    /// written; logs the outcome (a failure once per generation: the previous table stays
    /// and the next call tries again).
    pub fn republish_if_changed(&mut self, rt: &ServiceRuntime, slot: &mut ServiceSlot) {
        let snap = rt.snapshot().load_full();
        if snap.generation == slot.generation() {
            return;
        }
        let started = Instant::now();
        let deadline = started + self.drain_timeout;
        match self
            .maps
            .publish(slot, &snap, &mut self.backend_ids, deadline)
        {
            Ok(written) => info!(
                "service {}: XDP table generation {} live in half {} ({} of {} backends \
                 eligible; {written} slots written in {} ms)",
                snap.name,
                snap.generation,
                slot.active_half(),
                snap.eligible_count(),
                snap.backends.len(),
                started.elapsed().as_millis()
            ),
            Err(e) => {
                if slot.failed_generation != Some(snap.generation) {
                    slot.failed_generation = Some(snap.generation);
                    error!(
                        "service {}: cannot write XDP table generation {}: {e}; the previous \
                         table stays live and the write is retried",
                        snap.name, snap.generation
                    );
                }
            }
        }
    }

    /// Republishes every running service whose snapshot changed.
    fn republish_all(&mut self) {
        let mut running = std::mem::take(&mut self.running);
        for r in &mut running {
            self.republish_if_changed(&r.rt, &mut r.slot);
        }
        self.running = running;
    }

    /// Releases the backend ids and the removed services whose drain ended by `now`.
    pub fn release_drained(&mut self, now: Instant) {
        // (service, address if one backend left, id): released together, one conntrack scan.
        let mut ids: Vec<(String, Option<std::net::SocketAddr>, u32)> = Vec::new();
        for r in &mut self.running {
            for (address, id) in r.slot.backend_ids_mut().expired(now) {
                ids.push((r.rt.name().to_string(), Some(address), id));
            }
        }
        let (done, left): (Vec<Leaving>, Vec<Leaving>) = std::mem::take(&mut self.leaving)
            .into_iter()
            .partition(|l| l.deadline <= now);
        self.leaving = left;
        for mut l in done {
            // A service started since at the same VIP owns the VIPS entry now.
            let key = l.slot.vip_key();
            let taken = self.running.iter().any(|r| r.slot.vip_key() == key);
            match self.maps.remove_service(&l.slot, !taken) {
                Ok(()) => self.service_ids.give_back(l.slot.id),
                // The id stays out of the pool: its entries may still be live.
                Err(e) => error!(
                    "service {}: cannot take it out of the XDP maps: {e}; service id {} stays \
                     reserved",
                    l.name, l.slot.id
                ),
            }
            for id in l.slot.backend_ids_mut().take_all() {
                ids.push((l.name.clone(), None, id));
            }
            info!(
                "service {}: drained; its VIP{} and XDP ids are released",
                l.name,
                if taken {
                    " (now another service's)"
                } else {
                    ""
                }
            );
        }
        let plain: Vec<u32> = ids.iter().map(|&(_, _, id)| id).collect();
        if self.release_backend_ids(&plain) {
            for (service, address, id) in ids {
                if let Some(address) = address {
                    info!(
                        "service {service}: backend {address} drained; XDP backend id {id} \
                         released"
                    );
                }
            }
        }
    }

    /// Releases backend `ids` to the pool; `false` (logged) when their entries could not be
    /// cleared, and the ids then stay out of the pool.
    pub fn release_backend_ids(&mut self, ids: &[u32]) -> bool {
        match self.maps.release_backends(ids) {
            Ok(_) => {
                for &id in ids {
                    self.backend_ids.give_back(id);
                }
                true
            }
            Err(e) => {
                error!("cannot release XDP backend ids {ids:?}: {e}; they stay reserved");
                false
            }
        }
    }
}

/// The running republisher; [`SyncThread::stop`] ends it.
pub struct SyncThread {
    stop: mpsc::Sender<()>,
    handle: JoinHandle<()>,
}

impl SyncThread {
    /// Starts the thread over `state`, whose slots hold the generation last written.
    pub fn start(state: Arc<Mutex<State>>) -> SyncThread {
        let (stop, stopped) = mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("lb-xdp-sync".into())
            .spawn(move || {
                let mut limits = super::limits::Sweeper::new();
                loop {
                    match stopped.recv_timeout(POLL) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                    let mut st = lock(&state);
                    st.republish_all();
                    st.release_drained(Instant::now());
                    limits.tick(&mut st.maps);
                }
            })
            .unwrap_or_else(|e| panic!("cannot start the XDP map sync thread: {e}"));
        SyncThread { stop, handle }
    }

    /// Stops the thread and waits for it (at most one table write).
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.handle.join();
    }
}
