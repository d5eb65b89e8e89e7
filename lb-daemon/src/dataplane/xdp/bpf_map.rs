//! The bottom of the XDP side: taking a map out of the loaded object, and the one error type
//! of every map read and write.

use aya::Ebpf;

/// Why a map could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// The object has no map of this name, or one of another type or layout.
    #[error("the BPF object has no usable map `{name}` ({reason}); it is not the lb-ebpf this daemon was built with")]
    Missing {
        /// The map's name.
        name: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A map update or lookup failed.
    #[error("BPF map {map}: {source}")]
    Io {
        /// The map's name.
        map: &'static str,
        /// What the kernel said.
        source: Box<aya::maps::MapError>,
    },
    /// A walk of the map stopped before its end (entries deleted during it made it start
    /// over until its bound): entries it did not reach may still name what was to be
    /// forgotten.
    #[error("BPF map {map}: the walk stopped before the end; entries not reached wait for the next walk")]
    WalkIncomplete {
        /// The map's name.
        map: &'static str,
    },
    /// DEVMAP or VETH_PEERS refused an interface.
    #[error("BPF map {map}: interface index {ifindex}: {reason}")]
    Devmap {
        /// The map's name.
        map: &'static str,
        /// The interface index.
        ifindex: u32,
        /// What went wrong.
        reason: String,
    },
    /// The table could not be built (a bug: validation checks its inputs).
    #[error("Maglev table: {0}")]
    Maglev(#[from] crate::maglev::MaglevError),
    /// The number of CPUs could not be read, so per-CPU counters cannot be reset.
    #[error("cannot count the CPUs: {0}")]
    Cpus(String),
}

/// The result of deleting a map entry, an entry already gone being no error: `Ok(true)` when
/// it was deleted, `Ok(false)` when there was none.
///
/// Why: the kernel says `ENOENT`, which aya gives as `MapError::SyscallError` (only lookups
/// give `MapError::KeyNotFound`), and entries do go away under us: an LRU map (`CONNTRACK`,
/// `CLIENTS`) evicts its oldest entries as the program adds flows, and the kernel deletes a
/// device map's entry when its interface goes. Taken for an error, such a delete would stop
/// the release of backend and service ids for good.
///
/// Returns the other errors as they came.
pub fn removed(result: Result<(), aya::maps::MapError>) -> Result<bool, aya::maps::MapError> {
    match result {
        Ok(()) => Ok(true),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(false)
        }
        Err(aya::maps::MapError::KeyNotFound) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Turns a failed map call on `map` into `MapsError::Io`.
pub fn io(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapsError {
    move |e| MapsError::Io {
        map,
        source: Box::new(e),
    }
}

/// Takes map `name` out of `ebpf` as a `T`.
///
/// Returns `Err(MapsError::Missing)` when the object has no such map or one of another type
/// or layout.
pub fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, MapsError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(MapsError::Missing {
        name,
        reason: "not in the object".into(),
    })?;
    T::try_from(map).map_err(|e| MapsError::Missing {
        name,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use aya::maps::{HashMap, MapData};
    use lb_common::maps::{self as contract, CtEntry};
    use lb_common::FlowKey;

    use super::*;

    /// A delete of an entry that is not there (one an LRU map evicted) is told from a
    /// failure, on the real `CONNTRACK`: aya gives the kernel's `ENOENT` as a syscall error.
    #[test]
    fn a_delete_of_an_entry_already_gone_is_no_error() {
        if !lb_tests::require_root("bpf_map::a_delete_of_an_entry_already_gone_is_no_error") {
            return;
        }
        let object = lb_tests::xdp::bpf_object();
        let mut ebpf = super::super::loader::load_object(&object, &[contract::CONNTRACK], &[])
            .expect("the object loads");
        let mut conntrack: HashMap<MapData, FlowKey, CtEntry> =
            take(&mut ebpf, contract::CONNTRACK).expect("CONNTRACK");
        let key = FlowKey::default();
        let gone = conntrack.remove(&key);
        assert!(
            matches!(removed(gone), Ok(false)),
            "a delete of a missing entry must read as already gone"
        );
        conntrack
            .insert(key, CtEntry::default(), 0)
            .expect("an entry goes in");
        assert!(
            matches!(removed(conntrack.remove(&key)), Ok(true)),
            "a delete of an entry that is there must read as deleted"
        );
    }
}
