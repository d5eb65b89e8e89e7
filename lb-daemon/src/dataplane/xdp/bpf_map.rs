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
