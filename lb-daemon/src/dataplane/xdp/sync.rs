//! Keeps the maps in step with the services' snapshots: a thread that looks at every XDP
//! service's snapshot generation every [`POLL`] and republishes the ones that changed.
//!
//! The health checker publishes a new snapshot on every UP/DOWN transition (and a weight
//! change does the same), so a change reaches the maps at most `POLL` plus one table write
//! after it is published. A write touches only the slots that differ from what the inactive
//! half holds (Maglev moves few), so it is quick after the first, which writes all M. A thread
//! rather than a tokio task because a table write is blocking map updates, up to 65537 of
//! them, which would stall the control plane's health checks.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{error, info};

use super::{lock, Maps, ServiceSlot};
use crate::service::ServiceRuntime;

/// How often the thread compares generations.
pub const POLL: Duration = Duration::from_millis(50);

/// The running republisher; [`SyncThread::stop`] ends it.
pub struct SyncThread {
    stop: mpsc::Sender<()>,
    handle: JoinHandle<()>,
}

impl SyncThread {
    /// Starts the thread over `services`, whose slots hold the generation last written.
    pub fn start(
        maps: Arc<Mutex<Maps>>,
        services: Vec<(Arc<ServiceRuntime>, Arc<Mutex<ServiceSlot>>)>,
    ) -> SyncThread {
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
                    for (rt, slot) in &services {
                        republish_if_changed(&maps, rt, slot);
                    }
                    limits.tick(&mut lock(&maps));
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

fn republish_if_changed(maps: &Mutex<Maps>, rt: &ServiceRuntime, slot: &Mutex<ServiceSlot>) {
    let snap = rt.snapshot().load_full();
    let mut slot = lock(slot);
    if snap.generation == slot.generation {
        return;
    }
    let mut maps = lock(maps);
    let started = std::time::Instant::now();
    match maps.publish(&mut slot, &snap) {
        Ok(written) => info!(
            "service {}: XDP table generation {} live in half {} ({} of {} backends eligible; \
             {written} slots written in {} ms)",
            snap.name,
            snap.generation,
            slot.active_half,
            snap.eligible_count(),
            snap.backends.len(),
            started.elapsed().as_millis()
        ),
        // The previous table stays live and the next poll tries again, quietly.
        Err(e) => {
            if slot.failed_generation != Some(snap.generation) {
                slot.failed_generation = Some(snap.generation);
                error!(
                    "service {}: cannot write XDP table generation {}: {e}; the previous table \
                     stays live and the write is retried",
                    snap.name, snap.generation
                );
            }
        }
    }
}
