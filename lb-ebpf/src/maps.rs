//! Every map the programs use, named and sized as `lb_common::maps` documents: that module is
//! the contract with the daemon, this one only declares the maps.
//!
//! The `#[map(name = ...)]` strings must equal the `lb_common::maps` name constants; the daemon
//! looks the maps up by those constants and the TestRun tests fail when they differ.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    maps::{
        Backend, BridgeFdbKey, ClientKey, ClientState, CtEntry, DecapAddr, Limits, NatReverse,
        Service, VipKey, VipValue, BRIDGES_LEN, BRIDGE_FDB_SIZE, BRIDGE_PORTS_SIZE, CLIENTS_SIZE,
        CONNTRACK_SIZE, DECAP_ADDRS_SIZE, DECAP_SOURCES_SIZE, DEVMAP_SIZE, LOCAL_ADDRS_LEN,
        MAX_BACKENDS, MAX_SERVICES, NAT_REVERSE_SIZE, TABLES_LEN, VETH_PEERS_SIZE, VIP_PORTS_LEN,
    },
    Counters, FlowKey, STATS_LEN,
};

use crate::next_hop::{self, NextHop};

/// VIP (address, port, protocol, family) → service id. Written by the daemon.
#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Service id → mode, SNAT / outer source address, and the live table half.
#[map(name = "SERVICES")]
pub static SERVICES: Array<Service> = Array::with_max_entries(MAX_SERVICES, 0);

/// Backend id → address, port, family, flags.
#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Every service's two Maglev table halves; slots hold backend ids.
#[map(name = "TABLES")]
pub static TABLES: Array<u32> = Array::with_max_entries(TABLES_LEN, 0);

/// Client flow → backend (and SNAT port).
///
/// Shared (`LRU_HASH`), not per-CPU: a flow's packets can reach the balancer on different CPUs
/// (several RX queues, or veth, whose XDP runs on the sending CPU), and a per-CPU map would then
/// hold one independent entry per CPU, each placed by whatever table was active when that CPU
/// first saw the flow, so a table change could split one flow over two backends. A shared map
/// costs a lock on insert (once per flow); lookups are lock-free.
#[map(name = "CONNTRACK")]
pub static CONNTRACK: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(CONNTRACK_SIZE, 0);

/// NAT reply 5-tuple → client and VIP. Shared for the same reason as `CONNTRACK`, and because
/// replies arrive on another interface (often another CPU) than the client's packets.
#[map(name = "NAT_REVERSE")]
pub static NAT_REVERSE: LruHashMap<FlowKey, NatReverse> =
    LruHashMap::with_max_entries(NAT_REVERSE_SIZE, 0);

/// ifindex → ifindex: the interfaces `XDP_REDIRECT` may send to.
#[map(name = "DEVMAP")]
pub static DEVMAP: DevMapHash = DevMapHash::with_max_entries(DEVMAP_SIZE, 0);

/// ifindex → ifindex: the veths whose peer is in another namespace, which `lb_tc` sends to
/// with `bpf_redirect_peer`. Written by the daemon; a devmap hash (only looked up, never
/// redirected through) so that the kernel removes an interface's entry when the interface
/// goes away, and an index the kernel gives a new device later is not taken for a veth.
#[map(name = "VETH_PEERS")]
pub static VETH_PEERS: DevMapHash = DevMapHash::with_max_entries(VETH_PEERS_SIZE, 0);

/// (bridge ifindex, Ethernet address) → ifindex of the bridge port the address is behind:
/// `lb_tc` sends a packet routed into a bridge straight to that port. Written by the daemon
/// from the bridge's forwarding database.
#[map(name = "BRIDGE_FDB")]
pub static BRIDGE_FDB: HashMap<BridgeFdbKey, u32> = HashMap::with_max_entries(BRIDGE_FDB_SIZE, 0);

/// ifindex → ifindex: the bridge ports `BRIDGE_FDB` may name, only looked up; a devmap hash so
/// that a port that goes away leaves it at once (as `VETH_PEERS`).
#[map(name = "BRIDGE_PORTS")]
pub static BRIDGE_PORTS: DevMapHash = DevMapHash::with_max_entries(BRIDGE_PORTS_SIZE, 0);

/// A bit per ifindex (modulo 1,024) that may be a bridge with `BRIDGE_FDB` entries
/// (`lb_common::maps::BRIDGES`). Written by the daemon.
#[map(name = "BRIDGES")]
pub static BRIDGES: Array<u64> = Array::with_max_entries(BRIDGES_LEN, 0);

/// Service id → per-client limits. Written by the daemon.
#[map(name = "LIMITS")]
pub static LIMITS: Array<Limits> = Array::with_max_entries(MAX_SERVICES, 0);

/// (service, client address) → token bucket and open flows. Shared, not per-CPU: a client's
/// flows arrive on any CPU, and a per-CPU bucket would give it one bucket per CPU.
#[map(name = "CLIENTS")]
pub static CLIENTS: LruHashMap<ClientKey, ClientState> =
    LruHashMap::with_max_entries(CLIENTS_SIZE, 0);

/// The local addresses `lb_decap` accepts as outer destination → their ifindex. Written by
/// `lb-daemon decap`; the balancer does not use it.
#[map(name = "DECAP_ADDRS")]
pub static DECAP_ADDRS: HashMap<DecapAddr, u32> = HashMap::with_max_entries(DECAP_ADDRS_SIZE, 0);

/// The VIPs' addresses (those of `VIPS`' keys). Written by the daemon.
#[map(name = "VIP_ADDRS")]
pub static VIP_ADDRS: HashMap<DecapAddr, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// A bit per port that some VIP has (`lb_common::maps::VIP_PORTS`). Written by the daemon.
#[map(name = "VIP_PORTS")]
pub static VIP_PORTS: Array<u64> = Array::with_max_entries(VIP_PORTS_LEN, 0);

/// The balancers' addresses `lb_decap` accepts as outer source. Written by `lb-daemon decap
/// --from`; the balancer does not use it.
#[map(name = "DECAP_SOURCES")]
pub static DECAP_SOURCES: HashMap<DecapAddr, u32> =
    HashMap::with_max_entries(DECAP_SOURCES_SIZE, 0);

/// Global per-CPU counters indexed by `lb_common::Stat`.
#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

/// Per-CPU counters per service id.
#[map(name = "SERVICE_STATS")]
pub static SERVICE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Per-CPU counters per backend id.
#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// The SNAT source addresses of `nat` services with several (`lb_common::maps`, "Several
/// local addresses"), written by the daemon.
#[map(name = "LOCAL_ADDRS")]
pub static LOCAL_ADDRS: Array<[u32; 4]> = Array::with_max_entries(LOCAL_ADDRS_LEN, 0);

/// Per-CPU scratch space for `nat::snat_port`: the `NAT_REVERSE` key and value it builds, kept
/// off the balancer's stack, which is at the verifier's 512-byte limit (see `balancer`).
#[repr(C)]
pub struct NatScratch {
    /// The reply key of the port being probed.
    pub rkey: FlowKey,
    /// The entry a port taken for the flow gets.
    pub owner: NatReverse,
    /// The free port seen longest ago among those probed so far (0: none yet).
    pub best_port: u32,
    /// How long (seconds) `best_port` has been free.
    pub best_age: u32,
    /// `best_port`'s `NAT_REVERSE` state word when it was probed.
    pub best_state: u64,
    /// The first probed port without a `NAT_REVERSE` entry (0: none yet), taken only when
    /// no probed port is free.
    pub empty_port: u32,
}

/// One [`NatScratch`] per CPU: scratch space for `nat::snat_port`, kept off the 512-byte BPF
/// stack. Internal to the program; the daemon never touches it.
#[map(name = "NAT_SCRATCH")]
pub static NAT_SCRATCH: PerCpuArray<NatScratch> = PerCpuArray::with_max_entries(1, 0);

/// The answers sent on one CPU in the current second.
#[repr(C)]
pub struct TooBigBudget {
    /// The second (monotonic clock) `sent` counts in.
    pub second: u64,
    /// Answers sent in it.
    pub sent: u64,
}

/// One [`TooBigBudget`] per CPU: the "fragmentation needed" /
/// "packet too big" answers sent in the current second (see `too_big.rs`). Internal to the
/// program; the daemon never touches it.
#[map(name = "TOO_BIG_BUDGET")]
pub static TOO_BIG_BUDGET: PerCpuArray<TooBigBudget> = PerCpuArray::with_max_entries(1, 0);

/// What `fib::lookup` found for the packet on one CPU, for `fib::send` after it.
#[repr(C)]
pub struct FibScratch {
    /// The `bpf_fib_lookup` parameter block (first: 8-aligned, see `fib::zero`).
    pub params: bpf_fib_lookup,
    /// The kind of hop found (`fib::Hop::word`).
    pub hop: u32,
}

/// One [`FibScratch`] per CPU: scratch space for `fib::lookup` and `fib::send`, kept off the
/// 512-byte BPF stack (and, for the hop, out of the verifier's sight: see `fib::lookup`).
/// Internal to the program; the daemon never touches it.
#[map(name = "FIB_SCRATCH")]
pub static FIB_SCRATCH: PerCpuArray<FibScratch> = PerCpuArray::with_max_entries(1, 0);

/// The next-hop cache, [`next_hop::SLOTS`] per CPU (see `next_hop`). Internal to the program;
/// the daemon never touches it.
#[map(name = "NEXT_HOPS")]
pub static NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(next_hop::SLOTS, 0);
