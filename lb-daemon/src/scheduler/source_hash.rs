//! The `source_hash` scheduler: weighted Maglev hashing of the client address only, so
//! every connection from one client goes to the same backend while the set is stable.

use lb_common::flow::source_hash;
use lb_common::FlowKey;

use super::{Candidate, MaglevScheduler, Scheduler, SchedulerError};
use crate::backend_stats::BackendId;
use crate::maglev::MaglevTable;

/// Picks the backend of `source_hash(flow) % M` in a weighted Maglev table; retries walk
/// forward from that slot as [`MaglevScheduler`] does.
pub struct SourceHash(MaglevScheduler);

impl SourceHash {
    /// Builds the table over `candidates` (weight 0 dropped), with `table_size` slots.
    ///
    /// Returns `Err(SchedulerError::NoCandidates)` when no candidate has a weight above 0,
    /// `Err(SchedulerError::Maglev(_))` when `table_size` is not a prime or there are more
    /// candidates than a table can index. A table smaller than the number of candidates is
    /// built all the same: some candidates get no slot (see `MaglevTable::build`).
    pub fn new(candidates: Vec<Candidate>, table_size: u32) -> Result<Self, SchedulerError> {
        MaglevScheduler::with_key(candidates, table_size, source_hash).map(SourceHash)
    }

    /// The Maglev table; its entries index [`SourceHash::candidates`].
    pub fn table(&self) -> &MaglevTable {
        self.0.table()
    }

    /// The candidates the table was built over (draining ones dropped), in the order given.
    pub fn candidates(&self) -> &[Candidate] {
        self.0.candidates()
    }
}

impl Scheduler for SourceHash {
    fn pick(&self, flow: &FlowKey, tried: &[BackendId]) -> Option<BackendId> {
        self.0.pick(flow, tried)
    }

    fn table_digest(&self) -> Option<crate::maglev::TableDigest> {
        self.0.table_digest()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn a_client_sticks_to_one_backend_across_ports() {
        let s = SourceHash::new(candidates(&[1, 1, 1, 1]), 65537).expect("valid set");
        for host in 1..=50u8 {
            let first = s.pick(&flow(host, 1), &[]);
            for port in 2..=40 {
                assert_eq!(
                    s.pick(&flow(host, port), &[]),
                    first,
                    "client 127.0.0.{host} moved to another backend on port {port}"
                );
            }
        }
    }

    #[test]
    fn clients_spread_by_weight() {
        let weights = [1, 2, 3];
        let s = SourceHash::new(candidates(&weights), 65537).expect("valid set");
        let mut got = [0u64; 3];
        // Many clients: 127.x.y.z style source addresses, one flow each.
        for i in 0..30000u32 {
            let mut f = flow(0, 1000);
            f.src_addr[0] = u32::from_ne_bytes([127, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            got[s.pick(&f, &[]).expect("a candidate") - 10] += 1;
        }
        assert_share("source_hash", &got, &weights, 0.05);
    }

    #[test]
    fn retries_skip_failed_backends() {
        let s = SourceHash::new(candidates(&[2, 1, 2]), 65537).expect("valid set");
        assert_respects_tried("source_hash", &s, 3);
        assert_eq!(s.table().size(), 65537);
        assert_eq!(s.candidates().len(), 3);
    }
}
