//! The XDP map contract: every map the balancer (`lb_xdp`) and the decapsulator (`lb_decap`)
//! use, by name, with its key and value layout, capacity and meaning.
//!
//! Addresses everywhere use [`FlowKey`]'s layout: four 32-bit words holding the address bytes
//! in network order (`u32::from_ne_bytes` of each 4-byte group); an IPv4 address fills word 0
//! and leaves words 1..4 zero. Ports are in host byte order. Every `_pad` field is zero.
//!
//! # Maps
//!
//! | name ([`VIPS`] ...) | kind | key → value | written by |
//! |---|---|---|---|
//! | `VIPS` | hash, [`MAX_SERVICES`] | [`VipKey`] → [`VipValue`] | daemon |
//! | `SERVICES` | array, [`MAX_SERVICES`] | service id → [`Service`] | daemon |
//! | `BACKENDS` | array, [`MAX_BACKENDS`] | backend id → [`Backend`] | daemon |
//! | `TABLES` | array, [`TABLES_LEN`] | [`table_index`] → backend id (`u32`) | daemon |
//! | `CONNTRACK` | LRU hash (shared), [`CONNTRACK_SIZE`] | [`FlowKey`] → [`CtEntry`] | program |
//! | `NAT_REVERSE` | LRU hash (shared), [`NAT_REVERSE_SIZE`] | [`FlowKey`] → [`NatReverse`] | program |
//! | `DEVMAP` | devmap hash, [`DEVMAP_SIZE`] | ifindex → ifindex (`u32`) | daemon |
//! | `VETH_PEERS` | devmap hash, [`VETH_PEERS_SIZE`] | ifindex → ifindex (`u32`, only looked up) | daemon |
//! | `BRIDGE_FDB` | hash, [`BRIDGE_FDB_SIZE`] | [`BridgeFdbKey`] → port ifindex (`u32`) | daemon |
//! | `BRIDGE_PORTS` | devmap hash, [`BRIDGE_PORTS_SIZE`] | ifindex → ifindex (`u32`, only looked up) | daemon |
//! | `BRIDGES` | array, [`BRIDGES_LEN`] | [`bridge_bit`] word → `u64` bits | daemon |
//! | `LIMITS` | array, [`MAX_SERVICES`] | service id → [`Limits`] | daemon |
//! | `CLIENTS` | LRU hash (shared), [`CLIENTS_SIZE`] | [`ClientKey`] → [`ClientState`] | program (daemon lowers counts) |
//! | `DECAP_ADDRS` | hash, [`DECAP_ADDRS_SIZE`] | [`DecapAddr`] → ifindex (`u32`) | `lb-daemon decap` |
//! | `VIP_ADDRS` | hash, [`MAX_SERVICES`] | [`DecapAddr`] (an address and its family) → `u32` (0, unread) | daemon |
//! | `VIP_PORTS` | array, [`VIP_PORTS_LEN`] | [`vip_port_bit`] word → `u64` bits | daemon |
//! | `DECAP_SOURCES` | hash, [`DECAP_SOURCES_SIZE`] | [`DecapAddr`] → `u32` (0, unread) | `lb-daemon decap` |
//! | `LOCAL_ADDRS` | array, [`LOCAL_ADDRS_LEN`] | [`local_addr_index`]`(service, i)` → address words (`[u32; 4]`) | daemon |
//! | `STATS` | per-CPU array, [`STATS_LEN`](crate::STATS_LEN) | [`Stat`](crate::Stat) → `u64` | program |
//! | `SERVICE_STATS` | per-CPU array, [`MAX_SERVICES`] | service id → [`Counters`](crate::Counters) | program |
//! | `BACKEND_STATS` | per-CPU array, [`MAX_BACKENDS`] | backend id → [`Counters`](crate::Counters) | program |
//!
//! The object also holds `FIB_SCRATCH` and `NAT_SCRATCH`, one-entry per-CPU arrays the program
//! uses as scratch space, and `NEXT_HOPS`, the program's per-CPU cache of route lookups (kept
//! for [`NEXT_HOP_TTL_NS`]); the daemon leaves them alone.
//!
//! Ids are chosen by the daemon: a service id is `0..MAX_SERVICES`, a backend id is
//! `0..MAX_BACKENDS` and global (not per service). Entries the daemon never wrote read as
//! zeroes, which the program treats as absent (a [`Backend`] with `family == 0`, a
//! [`Service`] with `table_size == [0, 0]`).
//!
//! # How the daemon drives it
//!
//! Load the object, then for each service that runs on XDP:
//!
//! 1. `BACKENDS`: write every backend the new table names (address, port, family, flags).
//!    A backend id must not be reused for another address while flows may still be pinned to
//!    it in `CONNTRACK` (they would follow the id to the new address); retire ids for at least
//!    the conntrack lifetime, or reuse them only for the same address. `lb-daemon` keeps a
//!    removed backend's id and entry for its `drain_timeout` (pinned flows finish there), then
//!    writes the entry with `family` 0, deletes the `CONNTRACK` entries naming the id, and
//!    only then reuses it.
//! 2. `TABLES`: write the inactive half, `1 - active_half`, slots `0..size`, with
//!    [`table_index`]`(service, inactive, slot)`. Slot values are backend ids.
//! 3. `SERVICES`: write the service with `table_size[inactive] = size` and `active_half`
//!    unchanged. The program never reads the inactive half's size, so this is invisible.
//! 4. `SERVICES`: write it again with `active_half = inactive`: the flip. `active_half` is one
//!    aligned `u32` and nothing else changes in this update, so a packet reads the old half
//!    with its size or the new half with its size, never a mix. Do not merge steps 3 and 4:
//!    an array update is a `memcpy`, and a packet could read the new index with the old size.
//! 5. `VIPS`: insert the service's [`VipKey`] → [`VipValue`] last, the first time only, then
//!    set its port's bit in `VIP_PORTS`; from then on packets for the VIP are balanced.
//!    Delete it first when removing a service (and clear the bit once no key has the port); to
//!    drain a service first, publish size 0 (steps 3-4): new flows find no backend while
//!    flows pinned in `CONNTRACK` go on.
//!
//! A health change is the same steps 2–4 with the rebuilt table, plus a `BACKENDS` update of
//! the backend's [`BACKEND_F_DOWN`] flag: set it when the backend goes down (flows conntrack
//! pinned to it are re-placed by the active table, since it cannot serve them), clear it when
//! it comes back. A draining backend (weight 0, or removed) leaves the table and gets
//! [`BACKEND_F_DRAINING`], so its existing flows finish on it while a new connection that
//! reuses one of their 4-tuples is placed by the table. So does a backend that waits for its
//! first health check (one a reload gives back may still carry flows pinned before).
//!
//! ## NAT
//!
//! A `nat` service needs [`Service::local_addr`] (an address of the balancer the backends
//! route back to) and a port range [`Service::snat_port_min`]`..=`[`Service::snat_port_max`].
//! The program rewrites client → VIP into local_addr:snat_port → backend, and records the
//! reply's 5-tuple (backend → local_addr:snat_port) in `NAT_REVERSE` to translate replies back
//! into VIP → client. Give each service its own range (or its own address); keep the ranges
//! outside `net.ipv4.ip_local_port_range` of the balancer host, or the host's own connections
//! could collide with translated flows. A range of N ports carries at most N concurrent flows
//! per backend address and port; beyond that new flows are refused (see "SNAT ports").
//!
//! Replies arrive on the backend-facing interface: **`lb_xdp` must be attached there too**
//! (and on every interface replies can come in on). A reply that finds no `NAT_REVERSE`
//! entry is an ordinary non-VIP packet and passes to the kernel untouched.
//!
//! ## SNAT ports
//!
//! A SNAT port of `local_addr` towards one backend address and port is one `NAT_REVERSE`
//! entry, keyed by the reply's 5-tuple. The program never deletes it: when its flow ends the
//! entry stays, marked in its [`NatReverse::state`] word (time and `NAT_F_*` flags), and a new
//! flow later takes it over by replacing the element whole. So NAT_REVERSE holds at most one
//! entry per (local address, port, backend address and port, protocol), and a late packet of
//! the old flow still finds whom the port belonged to. Userspace only reads the map (the
//! daemon's count of ports in use, `lb_xdp_snat_ports_in_use`).
//!
//! - **In use**: a flow's packets keep the state's time fresh: the backend's replies and
//!   the client's UDP packets rewrite it once it is [`CT_REFRESH_SECS`] old, the client's
//!   TCP segments that check their port (see "Ownership": those that renew the flow's
//!   conntrack time, and those of a flow closed or made in mid-stream) once it is a second
//!   old. The client's FIN sets [`NAT_F_FIN_CLIENT`], the backend's (in a reply)
//!   [`NAT_F_FIN_BACKEND`].
//! - **Ended** ([`NAT_F_ENDED`], the time becomes the end): by the second of the two FINs,
//!   or an RST either way. If the backend's FIN came first the backend's socket sits in
//!   TIME_WAIT for that 4-tuple, marked [`NAT_F_TIME_WAIT`]: the port is held for
//!   [`Service::snat_hold_s`]. Otherwise (the client closed first, so the backend closed
//!   passively; or an RST, which leaves no TIME_WAIT) it is held only
//!   `min(snat_hold_s, `[`SNAT_QUIET_S`]`)`, for the last ACK and retransmitted FINs in flight.
//! - **Idle**: a flow not ended whose time is older than its service's
//!   [`Limits::idle_timeout_s`]` + CT_REFRESH_SECS + 1` (as conntrack ageing) is free too,
//!   for TCP only once `snat_hold_s` has also passed since its last packet (the backend may
//!   have closed it). With `idle_timeout_s` 0 ports are freed only by FINs and RSTs.
//! - **Taken over**: a new flow (a TCP SYN, or a UDP packet, that has no port) probes up to
//!   16 ports of the range, at offsets 0, 1, 3, 6, 10... from its hash (consecutive ones in
//!   a range of at most 16 ports; triangular offsets keep taken ports from clustering into
//!   runs, which with 8 probes refused SYNs at about 40% of a range instead of about 50%).
//!   With a share `f` of the ports towards a backend held, at random, a new flow is refused
//!   with a probability of about `f^16`; with 8 probes (before) a benchmark at 24,000
//!   connections/s over three backends (each port held one to two seconds after its flow, a
//!   third of the range or so) refused 3 to 5 SYNs in every 48,000. Among the probed ports
//!   that are free, the one free the longest (the oldest state time) is taken: least
//!   recently freed first, approximated over the probes, not over the whole range. Only when
//!   none is free (or the claim is lost, or the free one's flow left a TIME_WAIT on the
//!   backend less than [`SNAT_TIME_WAIT_S`] ago) is a probed port without entry (never used,
//!   or evicted) taken, with a `BPF_NOEXIST` insert; failing that, such a young TIME_WAIT
//!   port. Free ports first keep `NAT_REVERSE` at about the flows and held
//!   ports of the moment: taking never-used ports first would give every port ever used an
//!   entry, more than `NAT_REVERSE_SIZE` once a range serves five backends, and the LRU
//!   would then evict entries of live flows that idle. Every
//!   probe is looked at, also once a free one has been seen: the flow's own port (its
//!   conntrack entry lost) may be any of them. The taker claims it with a
//!   64-bit compare-and-swap of the state word from the value it read to one with
//!   [`NAT_F_CLAIMED`], then replaces the element with its own (`BPF_EXIST`). Two CPUs that
//!   read the same free port race on the compare-and-swap and one wins; an old flow's packet
//!   that changes the word meanwhile (a refresh, a FIN) makes the claim fail, and the new
//!   flow takes a port without entry, or is refused, rather than share the port. A claim whose update fails (no memory) puts
//!   the word back.
//! - **Ownership**: a client packet of a flow with a port checks that the port's entry still
//!   names its client address and port and VIP address and port (the entry is read anyway,
//!   to re-create it after an eviction, so this costs compares, no lookup). Every UDP packet
//!   checks; an established TCP flow's segments without SYN, FIN or RST check only when they
//!   renew the flow's conntrack time, at most [`CT_REFRESH_SECS`]` + 1` seconds apart while
//!   it is busy, or once the flow is closed ([`CT_F_CLOSED`]) or was re-made in mid-stream
//!   ([`CT_F_MIDSTREAM`]): the lookup was a sixth to a fifth of such a segment's cost. A
//!   packet that checks and
//!   finds its port taken over is never translated onto it: a TCP segment is answered with a
//!   RST, a UDP packet dropped, both counted in
//!   [`Stat::ResetNatPortReclaimed`](crate::Stat::ResetNatPortReclaimed). Between two checks,
//!   a busy TCP flow's segments go out on a port another flow took over only if the LRU
//!   evicted the port's entry under it or its local address changed (lb-ebpf
//!   `balancer::keeps_port`); they reach the backend on the new flow's 4-tuple, outside that
//!   connection's sequence window, until the next check resets the flow. The reverse
//!   direction cannot tell: the backend's late packets of the old flow carry the new flow's
//!   5-tuple, which is what the hold is for.
//!
//! **Several local addresses** (IPVS full-NAT's local address pool): a `nat` service with
//! [`Service::local_addrs`] `= n > 1` has its addresses in `LOCAL_ADDRS` entries
//! [`local_addr_index`]`(service, 0..n)` (entry 0 equal to [`Service::local_addr`]), and
//! a flow's SNAT source address is [`snat_addr_index`] of its flow hash: one address per flow,
//! the same for every packet of it (nothing to store), the flows spread evenly over the
//! addresses. Its port is probed as above among that address's ports. Sustained new flows per
//! second towards one backend are then about `n × span / hold`, and concurrent flows about
//! `n × span` (a flow is refused when the probed ports of its own address are taken, while
//! another address may have some free).
//!
//! A new flow that finds no port is refused at once: its SYN gets a RST+ACK
//! ([`Stat::RefusedNatPortsExhausted`](crate::Stat::RefusedNatPortsExhausted)), a UDP packet
//! is dropped ([`Stat::DropNatPortsExhausted`](crate::Stat::DropNatPortsExhausted)), and a
//! connection slot the per-client limits gave it goes back. A TCP segment without SYN that has
//! no port (its conntrack entry, and its port's entry, are gone, or its backend went down) takes
//! none, since its backend never saw the flow: it is answered with a RST
//! ([`Stat::ResetNatNoFlow`](crate::Stat::ResetNatNoFlow)). If its port's entry survived its
//! conntrack entry, the probe finds it and the flow goes on. A SYN with FIN or RST is dropped
//! ([`Stat::DropSynFin`](crate::Stat::DropSynFin)), in both modes.
//!
//! **Why the hold, and its default.** Measured on Linux 6.18 (two network namespaces, a
//! server that closes first so it holds TIME_WAIT for 60 s, Linux's `TCP_TIMEWAIT_LEN`;
//! `tcp_timestamps=1`, `tcp_rfc1337=0`; SYNs crafted on the old 4-tuple): a SYN whose
//! timestamp is newer than the old connection's last one is accepted (SYN-ACK) whatever its
//! sequence number; with an older timestamp it gets an ACK of the old connection instead,
//! whatever its sequence number (PAWS); without timestamps it is accepted only if its sequence
//! number is after the old one's. After that ACK, the client's RST (what a connecting Linux
//! client sends) ends the TIME_WAIT and the same SYN again is accepted: the client loses its
//! SYN retransmission timeout (1 s on Linux), or, against a backend with `tcp_rfc1337=1`, up
//! to the rest of the 60 s. A flow from the same client through the same VIP keeps its
//! timestamp clock (Linux offsets timestamps per address pair) and is accepted at once; a flow
//! from another client carries an unrelated timestamp and sequence number and stalls about
//! half the time. A hold shorter than TIME_WAIT does not lower that chance, so the choice is
//! between 60 s (no SYN lands on TIME_WAIT, but a range then carries at most
//! `ports × backends / 60` new flows per second where backends close first,
//! and refuses every flow beyond) and a short hold (a SYN now and then delayed by a second
//! under churn). `lb-daemon`'s default `snat_port_hold` is short, 2 s (a few retransmission
//! timeouts for the old flow's last packets): a delayed SYN is the better failure than a
//! refused one. The stalls stay rare: a port whose backend closed first is taken again within
//! [`SNAT_TIME_WAIT_S`] only when none of the flow's probes found a port without entry, that
//! is once its range towards that backend is nearly all in use. Because only ports
//! whose backend closed first are held the whole `snat_hold_s`, a service that sets 60 s pays
//! it only where a TIME_WAIT exists. Sustained new flows per second are bounded by
//! `ports × local addresses × backends / snat_hold_s` where backends close first, and by
//! `/ min(snat_hold_s, SNAT_QUIET_S)` where clients close first or flows end by RST.
//!
//! ## DSR
//!
//! A `dsr` service needs [`Service::local_addr`] as the outer source address of the IPIP or
//! IP6IP6 packet; the outer destination is the backend's address, and the backend's port is
//! ignored (the inner packet keeps the VIP port). Backends must have the VIP's address family.
//! On each backend host, attach `lb_decap` to the interface the encapsulated packets arrive on
//! and configure the VIP on the backend's loopback: `lb_decap` strips the outer header of every
//! IPIP (outer IPv4 protocol 4) and IP6IP6 (outer IPv6 next header 41) packet arriving there
//! whose outer destination is in `DECAP_ADDRS` ([`DecapAddr`] → the ifindex `lb_decap` runs on,
//! a value the program does not read), and passes the inner packet to the stack, which
//! answers the client directly from the VIP. An encapsulated packet for any other address
//! (a tunnel that ends on another host, routed through this one) passes untouched and is
//! counted in [`Stat::DecapNotLocal`](crate::Stat::DecapNotLocal); with `DECAP_ADDRS` empty
//! nothing is decapsulated. A tunnel for this host is stripped only when its outer source is
//! in `DECAP_SOURCES`, the balancers' `local_address`es (`lb-daemon decap --from`); one from
//! any other source is dropped and counted in
//! [`Stat::DecapBadSource`](crate::Stat::DecapBadSource): whoever can reach a backend could
//! otherwise inject packets with any inner source address past its filters. With
//! `DECAP_SOURCES` empty every tunnel for this host is dropped. `lb-daemon decap` fills the map with every address of its
//! network namespace (the backend's address may sit on a VLAN, a bond, a dummy device or `lo`
//! rather than on the interface the tunnels arrive on) and keeps it in step with them.
//!
//! ## Forwarding and `DEVMAP`
//!
//! After the rewrite, `bpf_fib_lookup` in the balancer's namespace picks the next hop: an
//! input-route lookup from the ingress interface, so **forwarding must be enabled** there
//! (`net.ipv4.conf.<if>.forwarding=1` or `net.ipv4.ip_forward=1`, and
//! `net.ipv6.conf.all.forwarding=1`), else packets are dropped
//! ([`Stat::DropForwardingDisabled`](crate::Stat::DropForwardingDisabled)). If the egress
//! interface is the ingress one the packet leaves with `XDP_TX`; otherwise with `XDP_REDIRECT`
//! through `DEVMAP`, which must hold `ifindex → ifindex` for every interface the routes can
//! choose (client-facing and backend-facing). Its value is the kernel's `bpf_devmap_val` with
//! no program: with aya, `DevMapHash::insert(ifindex, ifindex, None, 0)`. The kernel resolves
//! the ifindex in the network namespace of the process that writes the entry, so write it from
//! the balancer's namespace (else `EINVAL`). A missing entry drops the packet
//! ([`Stat::DropNoDevmapEntry`](crate::Stat::DropNoDevmapEntry)), except a NAT reply or an
//! ICMP error translated towards the client, which then goes to the kernel to forward
//! ([`Stat::FibPass`](crate::Stat::FibPass)): its source is the VIP. A veth only transmits
//! redirected frames when **its peer has an XDP program attached** (any program, e.g.
//! `lb_xdp` itself or one that returns `XDP_PASS`); otherwise the kernel drops them. When the
//! next hop's MAC address is not known yet (no neighbour entry) the rewritten packet is passed
//! to the kernel stack, which resolves it and forwards the packet; the balancer namespace needs
//! forwarding enabled for that too ([`Stat::FibPass`](crate::Stat::FibPass); also used
//! when the route says the destination is local). `nat` forwards like a router: it decrements the TTL / hop limit of what it translates (both directions) and drops a packet that arrives with 1 or 0 before it takes a port or an entry ([`Stat::DropTtlExpired`](crate::Stat::DropTtlExpired); no ICMP time exceeded is sent); `dsr` leaves the client's packet as it is and sends it in a new outer header with TTL 64.
//!
//! `lb_tc` sends a packet out of a resolved next hop's interface with `bpf_redirect`, or,
//! for a translated packet (NAT both ways, ICMP errors; not a DSR tunnel packet, whose
//! decapsulator may sit at the peer's XDP hook, which only the veth's transmit runs), with
//! `bpf_redirect_peer` when `VETH_PEERS` holds the interface: a veth or netkit device whose
//! peer is in another network namespace (a container's, a backend's), whose ingress then
//! gets the packet in the same pass, without the transmit and the backlog queue between the
//! two ends. The kernel drops a peer redirect to any other device, or to a peer in the
//! balancer's own namespace, so the daemon writes only such devices (it asks the kernel:
//! `IFLA_LINK_NETNSID` is present) and only those `lb_tc` is attached to. A devmap hash,
//! though nothing redirects through it: the kernel deletes a devmap's entry for an interface
//! that is unregistered, so a later device that gets the same index is never taken for the
//! veth. Not pinned: each daemon writes it for the program it loaded. `lb_xdp` does not read
//! it.
//!
//! When the route leads into a Linux bridge, `lb_tc` sends the packet straight to the bridge
//! port that the bridge itself would forward it to, as of the daemon's last copy of the
//! bridge's forwarding database: `BRIDGE_FDB` maps the bridge's ifindex and the next hop's
//! Ethernet address to the port's ifindex. The daemon copies it about every second for each
//! bridge `lb_tc` is attached to (a service's `interface` or `backend_interfaces`): learned
//! and static entries of ports in the forwarding state, never the bridge's own local
//! addresses, and no bridge with VLAN filtering on. An address that moves, or a port that
//! leaves the bridge or stops forwarding, is followed to the old port until the next copy.
//! The port is used only while `BRIDGE_PORTS` holds it (a devmap hash, for the same reason
//! as `VETH_PEERS`: a deleted port leaves the map at once, and its packets go through the
//! bridge again). Why: the bridge device offers no tunnel offloads, so a DSR tunnel
//! super-packet sent to it is segmented and checksummed in software; its ports (a veth)
//! take it whole. Skipped on the way: the bridge's own transmit (its qdisc, its `tx`
//! counters, a capture on it, bridge-family netfilter output rules). A port in `VETH_PEERS`
//! (the daemon lists the bridge's veth ports whose peer is in another namespace) takes
//! translated packets by peer redirect as above. Not pinned. `lb_xdp` does not read them.
//!
//! ## Conntrack ageing
//!
//! Each `CONNTRACK` entry holds when its flow was last seen ([`CtEntry::seen_s`], whole
//! seconds of `CLOCK_MONOTONIC_COARSE`, `bpf_ktime_get_coarse_ns`). A packet that finds its
//! entry rewrites that field in place (one aligned 32-bit store, no map update) only when the
//! stored time is [`CT_REFRESH_SECS`] or more old; the other packets only read it. (One
//! exception: a `nat` packet that renewed the time and was then stopped by the route lookup
//! sets it [`CT_REFRESH_SECS`] back, so that the next packet renews it and checks the flow's
//! SNAT port; see "SNAT ports".) An entry
//! whose stored time is older than its service's [`Limits::idle_timeout_s`] (the daemon
//! writes the service's `idle_timeout`) plus `CT_REFRESH_SECS + 1` (the most the stored time
//! can trail the flow's last packet: refreshed every `CT_REFRESH_SECS`, truncated to
//! seconds) is *aged*, and a packet that would start a flow on it is placed anew by the live
//! table like a packet that found no entry (and is subject to the per-client limits like
//! one):
//!
//! - UDP: any packet. A client reusing its source port after the timeout gets the backend
//!   the table gives now, as a new session would on the proxy.
//! - TCP: only a SYN without ACK. Every other packet of an aged entry keeps its backend and
//!   refreshes the entry: a long-idle connection that is still open lives only on its
//!   backend, and moving it would break it. A SYN on a fresh entry (not closed, not aged) is
//!   taken for a retransmission and keeps its backend too.
//!
//! An aged entry that held a connection slot ([`CT_F_COUNTED`] without [`CT_F_CLOSED`])
//! gives it back when a packet replaces it, exactly once (the same atomic [`CT_F_CLOSED`]
//! step a FIN takes). Entries are never deleted for age: an aged entry stays until a packet
//! replaces it or the LRU evicts it. With [`Limits::idle_timeout_s`] 0 (an entry never
//! written) entries never age.
//!
//! ## Per-client limits
//!
//! `LIMITS` holds each service's `[service.limits]` ([`Limits`]; all zero, the default of an
//! entry never written, means no limit) and its conntrack idle timeout. It is its own array
//! rather than fields of [`Service`] because it changes on another schedule (a reload, not a
//! health change) and is read only for new flows and for entries due a refresh (at most
//! once per [`CT_REFRESH_SECS`] per flow, or per packet while a `nat` flow's route fails,
//! see "Conntrack ageing"): the `SERVICES` flip protocol stays about
//! `active_half` alone, and the per-packet path does not read fields it never needs. Write
//! it before the VIP is published and again whenever it changes; each field is read on its
//! own, so a packet may see half of an update, which only mixes two valid settings for one
//! packet.
//!
//! The limits apply to flows a client starts: a TCP SYN without ACK, or a UDP packet, that
//! finds no `CONNTRACK` entry (or, for a SYN, an entry whose flow was closed
//! [`CT_F_CLOSED`], aged, pinned to a draining backend, or made in mid-stream
//! [`CT_F_MIDSTREAM`]). TCP packets without SYN that miss conntrack (evicted entries) and
//! flows re-placed because their backend went down are never limited. State per client address and
//! service lives in `CLIENTS` ([`ClientKey`] → [`ClientState`]):
//!
//! - **Rate**: a token bucket of [`Limits::burst_ns`]` / `[`Limits::interval_ns`] tokens
//!   refilled one per `interval_ns`, kept as the time it will be full again
//!   ([`ClientState::full_at_ns`], `bpf_ktime_get_ns` clock; the generic cell rate
//!   algorithm, which is exactly a token bucket with integer arithmetic only): a new flow at
//!   `now` is admitted if `max(full_at_ns, now) + interval_ns - now <= burst_ns`, and
//!   `full_at_ns` moves to that sum. Refused flows are counted in
//!   [`Stat::RefusedClientRate`](crate::Stat::RefusedClientRate). The update is not atomic: two
//!   CPUs admitting the same client at the same instant may both take the same token, so a
//!   client gets at most one extra flow per CPU racing with it.
//! - **Connections** (TCP only): a client holding [`ClientState::connections`]` >=`
//!   [`Limits::max_connections`] flows is refused
//!   ([`Stat::RefusedClientConnections`](crate::Stat::RefusedClientConnections)); an admitted flow
//!   adds one (atomically) and gets [`CT_F_COUNTED`]. The first end of a counted flow the
//!   balancer sees sets [`CT_F_CLOSED`] and subtracts one, once per flow: on `nat` the
//!   backend's FIN or RST (in its reply) or the client's RST, but not the client's FIN (a
//!   half-close, after which the backend may go on sending: counting it would let a client
//!   free its slots by half-closing every connection); on `dsr`, whose replies bypass the
//!   balancer, the client's FIN or RST. The program tracks no sequence numbers, so a client
//!   that forges RSTs outside the window (which the backend ignores) frees slots it still
//!   uses; the proxy, which counts sockets, has no such gap. The check and the add are two steps,
//!   so CPUs admitting one client at the same instant can each pass a check at `max - 1`
//!   (at most one extra flow per racing CPU). A UDP flow has no end the balancer can see,
//!   so the daemon keeps UDP services with `max_connections_per_client` on the proxy.
//!
//! A counted flow whose `CONNTRACK` entry the LRU evicts before its FIN or RST never gives
//! its slot back, nor does one that ends unseen (a SYN the backend refused or never
//! answered, a client gone without a word). The daemon bounds both leaks: every few seconds
//! it counts, per client, the entries of `CONNTRACK` with [`CT_F_COUNTED`], without
//! [`CT_F_CLOSED`], whose slot has not expired ([`slot_expired`]: idle past their service's
//! idle timeout and [`CT_SLOT_GRACE_SECS`] more), and lowers each client's `connections` to
//! that count (never raises it). A counted flow whose slot expired thus gives it back
//! through the sweep alone: the program clears its [`CT_F_COUNTED`] without subtracting
//! when it meets the entry again (a packet of the flow, which goes on uncounted, as the
//! proxy would have closed it; or a SYN replacing it), so that no later FIN or RST gives the
//! slot back twice. Idle age only grows until the program refreshes it, and the program
//! takes the mark off before it refreshes the time, so the two do not both act on one
//! entry while the idle timeout stays as it is. A reload that raises it makes entries
//! expired under the old timeout unexpired again, and a daemon of an earlier release
//! adopting the pinned maps does not know the rule: either can give one such slot back
//! twice (the client may then hold one flow more than its limit, until its flows end).
//! Within the grace a SYN replacing an aged entry gives its slot back at once (a client
//! reusing its port is not refused for the time of two sweeps). A client whose `CLIENTS`
//! entry the LRU evicts starts again from a full bucket and zero connections; size
//! [`CLIENTS_SIZE`] so that the clients that matter fit.
//!
//! A refused TCP SYN is answered with a RST+ACK built in place (addresses, ports and MACs
//! swapped, no options, no payload) and sent back out of the ingress interface with
//! `XDP_TX`, so the client fails at once as with the proxy's reset; a SYN with IPv4 options
//! is dropped instead. A refused UDP packet is dropped.
//!
//! VLAN: packets with one 802.1Q tag are balanced like untagged ones and keep their tag; the
//! route lookup does not consult VLAN sub-interfaces, so tagged traffic is forwarded only when
//! the route leads out of an interface in `DEVMAP` or back out of the ingress one.
//!
//! ICMP: an error a backend (or a router before it) sends to `local_addr` about a `nat`
//! flow, quoting a packet whose reversed 5-tuple is in `NAT_REVERSE` (IPv4 destination
//! unreachable, fragmentation needed among them; ICMPv6 destination unreachable and packet
//! too big), is translated back as from the VIP to the client, quote included, and sent on
//! like a reply ([`Stat::IcmpTranslated`](crate::Stat::IcmpTranslated)), so path MTU
//! discovery of the client → backend direction works through the balancer. The same errors
//! sent by a router on the client's side to a `nat` VIP about a reply (the quote's source is
//! the VIP and a port of a `nat` service in `VIPS`, and the quote reversed, client → VIP, is
//! in `CONNTRACK` with a SNAT port) are translated towards the flow's backend, as from
//! `local_addr` about the backend's own reply (quoted backend:port → `local_addr`:SNAT port),
//! and sent on like a client packet
//! ([`Stat::IcmpToBackend`](crate::Stat::IcmpToBackend)), so the backend learns the client's
//! path MTU. The outer source becomes `local_addr`, not the router's address, which the
//! backend may have no route back to (a reverse-path filter would drop it). Such an error
//! that claims a path MTU below [`MIN_REPLY_PATH_MTU`] is dropped
//! ([`Stat::DropIcmpLowMtu`](crate::Stat::DropIcmpLowMtu)): the backend keeps one path MTU
//! towards `local_addr` for all its NAT'ed flows, and one client must not lower it for all.
//! Every other ICMP message passes untouched, among them errors about `dsr` replies (they
//! never passed the balancer).
//!
//! A client's packet that would not fit the backend link's MTU (`nat`: as it is; `dsr`: once
//! encapsulated; the route's MTU, found by the lookup that forwards it, made before the
//! packet takes a SNAT port or is encapsulated) is answered instead of dropped: IPv4 with DF gets
//! an ICMP "fragmentation needed", IPv6 an ICMPv6 "packet too big", from the VIP to the client,
//! announcing the MTU (less the outer header) and quoting the packet's start (IPv4: 128 bytes,
//! IPv6: 512), so the client lowers its path MTU and resends (RFC 1191, RFC 8201), as Katran
//! does. At most [`TOO_BIG_PER_SECOND`] a second per CPU
//! ([`Stat::TooBigSent`](crate::Stat::TooBigSent)); the rest, and IPv4 packets without DF
//! (XDP cannot fragment), are dropped ([`Stat::DropMtu`](crate::Stat::DropMtu)).
//!
//! Not handled: IPv4 fragments and IPv6 packets with extension headers. Addressed to a VIP
//! (its address in `VIP_ADDRS`, which the daemon keeps equal to the addresses in `VIPS`)
//! they are dropped ([`Stat::DropFragment`](crate::Stat::DropFragment),
//! [`Stat::DropIpv6ExtHeaders`](crate::Stat::DropIpv6ExtHeaders)): the VIP is not an address
//! of the balancer host, so the kernel would route them onward (back out, or along its default
//! route) instead of to a backend. Addressed elsewhere they pass untouched
//! ([`Stat::PassFragment`](crate::Stat::PassFragment),
//! [`Stat::PassIpv6ExtHeaders`](crate::Stat::PassIpv6ExtHeaders)).
//!
//! ## Attaching, detaching
//!
//! Nothing is pinned: the maps live as long as the loader's file descriptors and the attached
//! programs. Attached through a BPF link (aya does so on kernels >= 5.9), a program is detached
//! by the kernel when the daemon exits or crashes. A program attached through plain netlink
//! stays after a crash, forwarding with a table nobody updates: remove it with
//! `ip link set dev IF xdp off` (or `xdpgeneric off`).

use core::net::{IpAddr, SocketAddr};

use crate::FlowKey;

/// Name of the balancer program (XDP), attached to client-facing and backend-facing interfaces.
pub const PROG_BALANCER: &str = "lb_xdp";
/// Name of the balancer program at the tc ingress hook (a `classifier`): the same balancer as
/// [`PROG_BALANCER`] on socket buffers, sharing every map, for interfaces where XDP cannot
/// deliver (bridges) or costs more than it saves (veth).
pub const PROG_TC: &str = "lb_tc";
/// Name of the DSR decapsulation program (XDP), attached on backend hosts.
pub const PROG_DECAP: &str = "lb_decap";
/// Name of the DSR decapsulation program at the tc ingress hook: [`PROG_DECAP`] on socket
/// buffers, for backends on veth or bridge ports, whose peers keep GSO.
pub const PROG_DECAP_TC: &str = "lb_decap_tc";

/// Map name: [`VipKey`] → [`VipValue`].
pub const VIPS: &str = "VIPS";
/// Map name: service id → [`Service`].
pub const SERVICES: &str = "SERVICES";
/// Map name: backend id → [`Backend`].
pub const BACKENDS: &str = "BACKENDS";
/// Map name: [`table_index`] → backend id (`u32`), every service's two table halves.
pub const TABLES: &str = "TABLES";
/// Map name: client flow [`FlowKey`] → [`CtEntry`].
pub const CONNTRACK: &str = "CONNTRACK";
/// Map name: NAT reply [`FlowKey`] → [`NatReverse`].
pub const NAT_REVERSE: &str = "NAT_REVERSE";
/// Map name: ifindex → ifindex (`u32`), the targets of `XDP_REDIRECT`.
pub const DEVMAP: &str = "DEVMAP";
/// Map name: ifindex → `u32` (unread), the veths `lb_tc` hands packets to the peer of
/// (`bpf_redirect_peer`).
pub const VETH_PEERS: &str = "VETH_PEERS";
/// Map name: [`BridgeFdbKey`] → ifindex (`u32`) of the bridge port the address is behind.
pub const BRIDGE_FDB: &str = "BRIDGE_FDB";
/// Map name: ifindex → `u32` (unread), the bridge ports `BRIDGE_FDB` may name.
pub const BRIDGE_PORTS: &str = "BRIDGE_PORTS";
/// Map name: [`BRIDGES_LEN`] `u64` words, one bit per ifindex modulo 1,024 ([`bridge_bit`]):
/// set while some key of `BRIDGE_FDB` names a bridge with that bit. `lb_tc` looks
/// `BRIDGE_FDB` up only for an egress interface whose bit is set, so a packet sent out of
/// anything else (a DSR tunnel packet on a veth, a bond, a VLAN, a physical port) skips that
/// hash lookup. Two interfaces can share a bit: the other one then pays the lookup, which
/// misses, as before. Set after a bridge's first entry is added, cleared after its last is
/// removed; a bridge whose bit is clear gets packets through the bridge device, as while it
/// has no entries. Not pinned, like `BRIDGE_FDB`.
pub const BRIDGES: &str = "BRIDGES";
/// Words of [`BRIDGES`]: 1,024 bits.
pub const BRIDGES_LEN: u32 = 1_024 / 64;

/// The word of [`BRIDGES`] that holds `ifindex`'s bit, and the bit: with `slot = ifindex %
/// 1024`, `(slot / 64, 1 << slot % 64)`. Two bridges whose ifindexes differ by a multiple of
/// 1,024 share a bit (a packet out of the one with no entries then costs a lookup that misses).
#[inline(always)]
pub const fn bridge_bit(ifindex: u32) -> (u32, u64) {
    let slot = ifindex % (BRIDGES_LEN * 64);
    (slot / 64, 1 << (slot % 64))
}
/// Map name: service id → [`Limits`].
pub const LIMITS: &str = "LIMITS";
/// Map name: [`ClientKey`] → [`ClientState`].
pub const CLIENTS: &str = "CLIENTS";
/// Map name: [`DecapAddr`] → ifindex (`u32`), the outer destinations `lb_decap` accepts.
pub const DECAP_ADDRS: &str = "DECAP_ADDRS";
/// Map name: [`DecapAddr`] → `u32` (unread): every address some entry of `VIPS` has, so
/// that a packet the balancer cannot place (a fragment, IPv6 extension headers) is known to
/// be a VIP's without a port.
pub const VIP_ADDRS: &str = "VIP_ADDRS";
/// Map name: [`VIP_PORTS_LEN`] `u64` words, one bit per port ([`vip_port_bit`]): a port's
/// bit is set while some key of `VIPS` has that port (any address, protocol or family). The
/// program looks `VIPS` up only for a packet whose destination port has its bit, so a NAT
/// reply (to a SNAT port) and traffic the balancer passes skip that hash lookup. The daemon
/// sets a bit after the `VIPS` key that needs it is added and clears it after the last such
/// key is removed: a new VIP is taken from the moment its bit is set. Not pinned: each
/// daemon builds it from `VIPS` before it attaches its program.
pub const VIP_PORTS: &str = "VIP_PORTS";
/// Words of [`VIP_PORTS`]: 64 ports each, 65,536 ports in all.
pub const VIP_PORTS_LEN: u32 = 65_536 / 64;

/// The word of [`VIP_PORTS`] that holds `port`'s bit (`port` in host byte order), and the
/// bit: `(port / 64, 1 << port % 64)`.
#[inline(always)]
pub const fn vip_port_bit(port: u16) -> (u32, u64) {
    ((port / 64) as u32, 1 << (port % 64))
}

/// Map name: [`DecapAddr`] → `u32` (unread), the outer sources `lb_decap` accepts: the
/// balancers' `local_address`es.
pub const DECAP_SOURCES: &str = "DECAP_SOURCES";
/// Map name: the SNAT source addresses of `nat` services with more than one (see "Several
/// local addresses").
pub const LOCAL_ADDRS: &str = "LOCAL_ADDRS";
/// Map name: global per-CPU `u64` counters indexed by [`Stat`](crate::Stat).
pub const STATS: &str = "STATS";
/// Map name: per-CPU [`Counters`](crate::Counters) per service id.
pub const SERVICE_STATS: &str = "SERVICE_STATS";
/// Map name: per-CPU [`Counters`](crate::Counters) per backend id.
pub const BACKEND_STATS: &str = "BACKEND_STATS";

/// The layout of the maps the daemon pins (`[global] bpf_pin_dir`, see [`PINNED_MAPS`]): a
/// daemon adopts a pinned set only of its own layout version, and replaces (cuts) any other.
/// Bump it with any change to a pinned map's type, size, key or value layout, or to what a
/// field means; the pinned set then lives in another directory (`v{LAYOUT_VERSION}`).
pub const LAYOUT_VERSION: u32 = 3;

/// The maps pinned under `bpf_pin_dir/v{LAYOUT_VERSION}/` (one file per map, by name): the
/// state that must outlive the daemon for flows to outlive it. The per-CPU scratch maps, the
/// next-hop cache (`NEXT_HOPS`), the maps the daemon rebuilds at start from the host and from
/// `VIPS` (`VETH_PEERS`, `BRIDGE_FDB`, `BRIDGE_PORTS`, `BRIDGES`, `VIP_PORTS`) and the
/// decapsulator's maps (`lb-daemon decap` has its own) are not pinned.
pub const PINNED_MAPS: [&str; 14] = [
    VIPS,
    VIP_ADDRS,
    SERVICES,
    BACKENDS,
    TABLES,
    CONNTRACK,
    NAT_REVERSE,
    DEVMAP,
    LIMITS,
    CLIENTS,
    LOCAL_ADDRS,
    STATS,
    SERVICE_STATS,
    BACKEND_STATS,
];

/// Number of services (VIPs) the maps hold; service ids are `0..MAX_SERVICES`.
pub const MAX_SERVICES: u32 = 64;
/// Number of backends over all services; backend ids are `0..MAX_BACKENDS`.
pub const MAX_BACKENDS: u32 = 4096;
/// Largest Maglev table (slots per half) a service can use on XDP: the daemon's default M.
pub const MAX_TABLE_SIZE: u32 = 65537;
/// Table halves per service: the active one and the one being written.
pub const TABLE_HALVES: u32 = 2;
/// Entries of `TABLES`: every service's two halves of [`MAX_TABLE_SIZE`] slots (32 MiB).
pub const TABLES_LEN: u32 = MAX_SERVICES * TABLE_HALVES * MAX_TABLE_SIZE;
/// Flows `CONNTRACK` remembers; the least recently used are evicted beyond this.
pub const CONNTRACK_SIZE: u32 = 131_072;
/// NAT'ed flows `NAT_REVERSE` remembers; the least recently used are evicted beyond this.
pub const NAT_REVERSE_SIZE: u32 = 131_072;
/// Clients (address and service) `CLIENTS` remembers; the least recently used are evicted
/// beyond this.
pub const CLIENTS_SIZE: u32 = 65_536;
/// Interfaces `DEVMAP` can hold.
pub const DEVMAP_SIZE: u32 = 64;
/// Veths `VETH_PEERS` can hold (those `lb_tc` is attached to and the bridge ports).
pub const VETH_PEERS_SIZE: u32 = 1024;
/// Ethernet addresses behind bridge ports `BRIDGE_FDB` can hold (all bridges together).
pub const BRIDGE_FDB_SIZE: u32 = 4096;
/// Bridge ports `BRIDGE_PORTS` can hold (all bridges together).
pub const BRIDGE_PORTS_SIZE: u32 = 1024;
/// Local addresses `DECAP_ADDRS` can hold.
pub const DECAP_ADDRS_SIZE: u32 = 256;
/// Balancer addresses `DECAP_SOURCES` can hold.
pub const DECAP_SOURCES_SIZE: u32 = 64;
/// SNAT source addresses a `nat` service can have (its `local_address` list).
pub const MAX_LOCAL_ADDRS: u32 = 16;
/// Entries of `LOCAL_ADDRS`: [`MAX_LOCAL_ADDRS`] per service id.
pub const LOCAL_ADDRS_LEN: u32 = MAX_SERVICES * MAX_LOCAL_ADDRS;

/// Index into `LOCAL_ADDRS` of local address `i` of service `service`.
#[inline(always)]
pub const fn local_addr_index(service: u32, i: u32) -> u32 {
    service * MAX_LOCAL_ADDRS + i
}

/// Which of its `local_addrs` addresses (`0..n`, 0 being [`Service::local_addr`]) a `nat`
/// flow with flow hash `hash` (`crate::flow_hash` of its client → VIP 5-tuple) is translated
/// from: by the hash's high half, as the port probes start from the whole hash. `n` of 0 or 1
/// is address 0.
#[inline(always)]
pub const fn snat_addr_index(hash: u32, n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        let n = if n > MAX_LOCAL_ADDRS {
            MAX_LOCAL_ADDRS
        } else {
            n
        };
        (hash >> 16) % n
    }
}

/// Index into `TABLES` of `slot` in `half` (0 or 1) of `service`'s table:
/// `(service * 2 + half) * MAX_TABLE_SIZE + slot`. The caller keeps `service < MAX_SERVICES`,
/// `half < 2` and `slot < MAX_TABLE_SIZE`.
#[inline(always)]
pub const fn table_index(service: u32, half: u32, slot: u32) -> u32 {
    (service * TABLE_HALVES + half) * MAX_TABLE_SIZE + slot
}

/// Address family value for IPv4 (in [`VipKey::family`], [`Backend::family`]...).
pub const FAMILY_V4: u8 = 4;
/// Address family value for IPv6.
pub const FAMILY_V6: u8 = 6;

/// [`Service::mode`]: full NAT (DNAT to the backend, SNAT to the balancer).
pub const MODE_NAT: u8 = 1;
/// [`Service::mode`]: direct server return through IPIP / IP6IP6 encapsulation.
pub const MODE_DSR: u8 = 2;

/// [`Backend::flags`] bit: the backend is down; conntrack entries pointing at it are ignored
/// and their flows re-placed by the active table. Clear for up and for draining backends.
pub const BACKEND_F_DOWN: u8 = 1;
/// [`Backend::flags`] bit: the backend is draining (weight 0, removed and kept for its
/// pinned flows, or waiting for its first health check): its conntrack entries hold, but a
/// TCP SYN (without ACK) that meets one is a new connection reusing an old 4-tuple, and is
/// placed by the active table instead.
pub const BACKEND_F_DRAINING: u8 = 2;

/// [`CtEntry::flags`] bit: the flow holds one of its client's connection slots
/// ([`ClientState::connections`]); set when the flow was admitted under a
/// [`Limits::max_connections`].
pub const CT_F_COUNTED: u16 = 1;
/// [`CtEntry::flags`] bit: a FIN or RST of the flow was seen and, if it was
/// [`CT_F_COUNTED`], its slot given back. A later SYN on the same 5-tuple starts a new flow.
pub const CT_F_CLOSED: u16 = 2;
/// [`CtEntry::flags`] bit: the entry was made by a TCP segment without SYN, a flow met in
/// mid-stream (its entry was evicted, the balancer restarted, or the client sent an ACK
/// first): no SYN of it went through the per-client limits. A SYN without ACK that meets it
/// starts a new flow, admitted like any other; else a bare ACK would open an entry that the
/// client's SYN then slips past the limits on (on `dsr`, which records such entries).
pub const CT_F_MIDSTREAM: u16 = 4;

/// `addr` in [`FlowKey`]'s address layout: the address bytes in network order, four bytes per
/// word read with `u32::from_ne_bytes`; an IPv4 address fills word 0 and leaves 1..4 zero.
pub fn addr_words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// The address `words` hold in [`FlowKey`]'s layout (the inverse of [`addr_words`]), for
/// `family` [`FAMILY_V4`] or [`FAMILY_V6`]; `None` for another family (an unused entry).
pub fn words_addr(family: u8, words: &[u32; 4]) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::from(words[0].to_ne_bytes())),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::from(o))
        }
        _ => None,
    }
}

/// [`FAMILY_V4`] or [`FAMILY_V6`] for `addr`.
pub fn family_of(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => FAMILY_V4,
        IpAddr::V6(_) => FAMILY_V6,
    }
}

impl VipKey {
    /// The key for a service listening on `vip` (address and port) for `protocol`
    /// ([`IPPROTO_TCP`](crate::flow::IPPROTO_TCP) or [`IPPROTO_UDP`](crate::flow::IPPROTO_UDP)).
    pub fn new(vip: SocketAddr, protocol: u8) -> VipKey {
        VipKey {
            addr: addr_words(vip.ip()),
            port: vip.port(),
            protocol,
            family: family_of(vip.ip()),
        }
    }
}

impl Backend {
    /// An up backend at `addr` (for `dsr` the port is ignored).
    pub fn new(addr: SocketAddr) -> Backend {
        Backend {
            addr: addr_words(addr.ip()),
            port: addr.port(),
            family: family_of(addr.ip()),
            flags: 0,
        }
    }

    /// The backend's address and port; `None` for an unused id (family 0).
    pub fn address(&self) -> Option<SocketAddr> {
        words_addr(self.family, &self.addr).map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl VipKey {
    /// The VIP (address and port) of the key; `None` for a family that is neither.
    pub fn address(&self) -> Option<SocketAddr> {
        words_addr(self.family, &self.addr).map(|ip| SocketAddr::new(ip, self.port))
    }
}

/// Key of `VIPS`: what a packet must be addressed to for the balancer to take it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// The VIP, in [`FlowKey`]'s address layout.
    pub addr: [u32; 4],
    /// Destination port, host byte order.
    pub port: u16,
    /// IP protocol number: [`IPPROTO_TCP`](crate::flow::IPPROTO_TCP) or
    /// [`IPPROTO_UDP`](crate::flow::IPPROTO_UDP).
    pub protocol: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}

/// Value of `VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipValue {
    /// The service id: index into `SERVICES`, `TABLES` and `SERVICE_STATS`.
    pub service: u32,
}

/// [`Service::flags`]: the node announces the service's VIP among others (`[announce]`,
/// ECMP). A SYN that finds no eligible backend is then dropped (`drop_no_backend`), not
/// refused with a RST: the node withdraws the VIP as its last backend goes down, and the
/// client's resent SYN reaches another node, where a RST would have failed the connection
/// in the moments before the withdrawal reached the router.
pub const SERVICE_F_ANNOUNCED: u8 = 1;

/// Value of `SERVICES`: how a service forwards, and which table half is live.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// [`MODE_NAT`] or [`MODE_DSR`]; anything else drops the service's packets.
    pub mode: u8,
    /// The VIP's family, [`FAMILY_V4`] or [`FAMILY_V6`]; backends and `local_addr` match it.
    pub family: u8,
    /// `nat`: how many SNAT source addresses the service has in `LOCAL_ADDRS` (see "Several
    /// local addresses"), `1..=MAX_LOCAL_ADDRS`; 0 and 1 both mean `local_addr` alone.
    pub local_addrs: u8,
    /// Bits: [`SERVICE_F_ANNOUNCED`].
    pub flags: u8,
    /// The live table half, 0 or 1. The flip: see the module docs.
    pub active_half: u32,
    /// Slots in use in each half (the Maglev M of that table), `1..=MAX_TABLE_SIZE`; 0 means
    /// no backend is eligible and the service's new flows are dropped.
    pub table_size: [u32; 2],
    /// The balancer's address: SNAT source for `nat`, outer source for `dsr`.
    pub local_addr: [u32; 4],
    /// First SNAT port (`nat` only), host byte order, inclusive.
    pub snat_port_min: u16,
    /// Last SNAT port (`nat` only), host byte order, inclusive; `>= snat_port_min`.
    pub snat_port_max: u16,
    /// Seconds a SNAT port stays out of use after a flow that may have left the backend in
    /// TIME_WAIT (its FIN came first, or the flow idled out) before another flow towards the
    /// same backend address and port may take it (`nat` only; see "SNAT ports" in the module
    /// docs). Other ends hold it `min(snat_hold_s, SNAT_QUIET_S)`. `lb-daemon` writes the
    /// service's `snat_port_hold`, rounded up to whole seconds.
    pub snat_hold_s: u32,
}

/// Value of `BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// The backend's address, in [`FlowKey`]'s layout.
    pub addr: [u32; 4],
    /// The backend's port, host byte order (`nat`: the new destination port; `dsr`: unused).
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`]; 0 marks an unused id (packets placed on it are dropped).
    pub family: u8,
    /// Bits: [`BACKEND_F_DOWN`], [`BACKEND_F_DRAINING`].
    pub flags: u8,
}

/// Value of `CONNTRACK`, keyed by the client's flow as it arrives (client → VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// The backend id the flow is pinned to.
    pub backend: u32,
    /// The SNAT port chosen for the flow (`nat` only; 0 for `dsr`), host byte order.
    pub snat_port: u16,
    /// Bits: [`CT_F_COUNTED`], [`CT_F_CLOSED`], [`CT_F_MIDSTREAM`]; the others are zero.
    pub flags: u16,
    /// When a packet of the flow was last seen, in whole seconds of
    /// `bpf_ktime_get_coarse_ns` (`CLOCK_MONOTONIC_COARSE`: [`ct_seconds`] of its
    /// nanoseconds), to within [`CT_REFRESH_SECS`]. See "Conntrack ageing" in the module docs.
    pub seen_s: u32,
}

/// How long the program keeps a resolved route lookup (egress interface, Ethernet addresses)
/// for the packets that follow on the same route, per CPU, in nanoseconds: 100 ms. A change
/// of routes, neighbours, MTUs, interfaces or of `forwarding` reaches forwarded packets this
/// much later at most (see `next_hop` in lb-ebpf for what happens meanwhile).
pub const NEXT_HOP_TTL_NS: u64 = 100_000_000;

/// [`CtEntry::seen_s`] is rewritten only when it is at least this many seconds old, so a
/// busy flow costs one write to its entry per this many seconds, not one per packet.
/// Idle times are therefore measured to within this many seconds.
pub const CT_REFRESH_SECS: u32 = 2;

/// The [`CtEntry::seen_s`] clock (and [`NatReverse::state`]'s): seconds of the
/// `bpf_ktime_get_coarse_ns` clock (`CLOCK_MONOTONIC_COARSE`, which the program reads once per
/// packet: the fine clock's TSC read cost a tenth of a packet) at `ns` nanoseconds, truncated
/// to 32 bits (it wraps after 136 years of uptime). Whoever ages these times reads the same
/// clock, and takes ages with [`ct_age`].
#[inline(always)]
pub const fn ct_seconds(ns: u64) -> u32 {
    (ns / 1_000_000_000) as u32
}

/// Seconds from `then` to `now` ([`ct_seconds`] times, wrapping), or 0 when `then` lies ahead
/// of `now`: a time stamped by a clock that runs ahead of this one, as the fine
/// `CLOCK_MONOTONIC` an older lb-ebpf stamped with does by up to a tick, while both
/// programs share the maps during an upgrade. Without the floor such an age wraps to years:
/// a live flow's entry would look aged and its SNAT port free.
#[inline(always)]
pub const fn ct_age(now: u32, then: u32) -> u32 {
    let age = now.wrapping_sub(then);
    // All ones when the difference is negative as a signed number (`then` ahead), else 0.
    let ahead = ((age as i32) >> 31) as u32;
    age & !ahead
}

/// How long past its service's idle timeout (and the lag of the stored time, as for ageing)
/// a counted TCP flow keeps its client's connection slot, in seconds: from then on it no
/// longer holds it ([`slot_expired`]; "Per-client limits"). Until then a SYN reusing its
/// 5-tuple gives the slot back at once, as its FIN would.
pub const CT_SLOT_GRACE_SECS: u32 = 60;

/// Whether a counted TCP flow last seen `idle` seconds ago ([`ct_age`]) in a service whose
/// idle timeout is `timeout_s` seconds (0: never) no longer holds its client's connection
/// slot: idle longer than the timeout, [`CT_REFRESH_SECS`]` + 1` and
/// [`CT_SLOT_GRACE_SECS`]. The program and the daemon's sweep decide by this one rule.
#[inline(always)]
pub const fn slot_expired(idle: u32, timeout_s: u32) -> bool {
    timeout_s != 0
        && idle
            > timeout_s
                .saturating_add(CT_REFRESH_SECS + 1)
                .saturating_add(CT_SLOT_GRACE_SECS)
}

/// The smallest path MTU an ICMP error about a NAT reply may claim and still be translated
/// towards the backend (see [`Stat::DropIcmpLowMtu`](crate::Stat::DropIcmpLowMtu)): the IPv6
/// minimum link MTU, which IPv4 paths of today carry too.
pub const MIN_REPLY_PATH_MTU: u32 = 1280;

/// Per CPU and second, the most ICMP "fragmentation needed" / "packet too big" answers to
/// client packets too big for the backend link ([`Stat::TooBigSent`](crate::Stat::TooBigSent)); the
/// rest are dropped and counted as [`Stat::DropMtu`](crate::Stat::DropMtu). The same order as
/// Linux's own ICMP rate limit (`net.ipv4.icmp_msgs_per_sec`, 1000 by default).
pub const TOO_BIG_PER_SECOND: u32 = 1000;

/// Key of `BRIDGE_FDB`: an Ethernet address in a bridge's forwarding database.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BridgeFdbKey {
    /// The bridge's ifindex (what `bpf_fib_lookup` answers as the egress interface).
    pub bridge: u32,
    /// The Ethernet address, in wire order.
    pub mac: [u8; 6],
    /// Explicit padding; zero.
    pub _pad: [u8; 2],
}

/// Key of `DECAP_ADDRS`: an address `lb_decap` accepts as the outer destination of an
/// encapsulated packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DecapAddr {
    /// The address, in [`FlowKey`]'s layout.
    pub addr: [u32; 4],
    /// [`FAMILY_V4`] or [`FAMILY_V6`] (an IPv4 address and the IPv6 `x::` share a layout).
    pub family: u8,
    /// Explicit padding; zero.
    pub _pad: [u8; 3],
}

impl DecapAddr {
    /// The key of `addr`.
    pub fn new(addr: IpAddr) -> DecapAddr {
        DecapAddr {
            addr: addr_words(addr),
            family: family_of(addr),
            _pad: [0; 3],
        }
    }
}

/// Value of `LIMITS`: a service's per-client limits. Zero in a field means no such limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Nanoseconds per token: `1e9 / new_connections_per_second`, rounded, at least 1; 0
    /// means no rate limit.
    pub interval_ns: u64,
    /// The bucket's size in nanoseconds of refill: `burst * interval_ns` (saturating).
    pub burst_ns: u64,
    /// Concurrent TCP flows one client address may hold; 0 means no limit.
    pub max_connections: u32,
    /// Seconds after which an idle `CONNTRACK` entry of the service no longer pins a flow
    /// that starts again (see "Conntrack ageing" in the module docs): the service's
    /// `idle_timeout`. 0 means entries never age.
    pub idle_timeout_s: u32,
}

/// Key of `CLIENTS`: one client address within one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The service id.
    pub service: u32,
    /// The client's address, in [`FlowKey`]'s layout (a service has one family, so the
    /// layout is unambiguous).
    pub addr: [u32; 4],
}

/// Value of `CLIENTS`: one client's token bucket and open flows (see the module docs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientState {
    /// When the bucket is full again, `bpf_ktime_get_ns` time; 0 (or any past time) means
    /// full.
    pub full_at_ns: u64,
    /// Counted ([`CT_F_COUNTED`]) TCP flows not yet closed. 64 bits because BPF's atomic
    /// operations are 64-bit.
    pub connections: u64,
}

/// Value of `NAT_REVERSE`, keyed by the reply's 5-tuple as it arrives at the balancer
/// (backend addr:port → local_addr:snat_port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReverse {
    /// The client's address: the reply's new destination.
    pub client_addr: [u32; 4],
    /// The VIP: the reply's new source.
    pub vip_addr: [u32; 4],
    /// The client's port, host byte order.
    pub client_port: u16,
    /// The VIP's port, host byte order.
    pub vip_port: u16,
    /// The service id, for counters.
    pub service: u32,
    /// The SNAT port's life, one word so that a flow taking over a free port can
    /// compare-and-swap it whole (see "SNAT ports" in the module docs): bits 0..32 the time
    /// the flow was last seen, or for an ended flow when it ended ([`ct_seconds`] clock,
    /// refreshed every second or two, see "SNAT ports"); bits 32..64 the `NAT_F_*` flags.
    /// Build and read it with [`nat_state`], [`nat_seen`] and [`nat_flags`].
    pub state: u64,
}

/// [`NatReverse::state`] flag: the client's FIN was seen.
pub const NAT_F_FIN_CLIENT: u32 = 1;
/// [`NatReverse::state`] flag: the backend's FIN was seen.
pub const NAT_F_FIN_BACKEND: u32 = 2;
/// [`NatReverse::state`] flag: the flow ended (both FINs, or an RST either way) at the state's
/// time; the port is free once its hold has passed since (see "SNAT ports" in the module
/// docs).
pub const NAT_F_ENDED: u32 = 4;
/// [`NatReverse::state`] flag: the flow ended with the backend's FIN first, so the backend
/// holds the 4-tuple in TIME_WAIT; the port is held for the whole [`Service::snat_hold_s`].
pub const NAT_F_TIME_WAIT: u32 = 8;
/// [`NatReverse::state`] flag: a CPU won the compare-and-swap for the port and is replacing
/// the entry; no other CPU may take it meanwhile.
pub const NAT_F_CLAIMED: u32 = 16;
/// [`NatReverse::state`] flag (TCP): the backend answered the flow (a SYN-ACK, or any reply
/// but an RST; or a client segment without SYN re-made the entry after an eviction, so the
/// flow was past its handshake). An RST before it is the backend refusing the connection:
/// the program drops it so that the client retries
/// ([`Stat::DropRefusedSyn`](crate::Stat::DropRefusedSyn)).
pub const NAT_F_ANSWERED: u32 = 32;

/// Seconds a backend's socket stays in TIME_WAIT after it closed first (Linux's
/// `TCP_TIMEWAIT_LEN`). A free SNAT port whose flow left a TIME_WAIT ([`NAT_F_TIME_WAIT`])
/// less than this ago is taken only when no probed port is without entry: a SYN from another
/// client on that 4-tuple may stall a second (see "Why the hold, and its default").
pub const SNAT_TIME_WAIT_S: u32 = 60;

/// Seconds a SNAT port whose flow ended without TIME_WAIT on the backend (the client's FIN
/// first, or an RST) stays out of use, at most [`Service::snat_hold_s`]: enough for the
/// backend's last ACK or a retransmitted FIN still in flight to find the old flow.
pub const SNAT_QUIET_S: u32 = 2;

/// The [`NatReverse::state`] word of a flow last seen (or ended) at `seen_s` with `flags`.
#[inline(always)]
pub const fn nat_state(seen_s: u32, flags: u32) -> u64 {
    (flags as u64) << 32 | seen_s as u64
}

/// The time half of a [`NatReverse::state`] word, [`ct_seconds`] clock.
#[inline(always)]
pub const fn nat_seen(state: u64) -> u32 {
    state as u32
}

/// The `NAT_F_*` flags of a [`NatReverse::state`] word.
#[inline(always)]
pub const fn nat_flags(state: u64) -> u32 {
    (state >> 32) as u32
}

/// Compile-time layout checks: these sizes are what the BPF object's maps were built with.
const _: () = {
    assert!(core::mem::size_of::<VipKey>() == 20);
    assert!(core::mem::size_of::<VipValue>() == 4);
    assert!(core::mem::size_of::<Service>() == 40);
    assert!(core::mem::size_of::<Backend>() == 20);
    assert!(core::mem::size_of::<CtEntry>() == 12);
    // The program sets CT_F_CLOSED with a 64-bit atomic OR on the entry's first 8 bytes:
    // bits 48..64. `seen_s` lies outside them, so its refresh never races with the OR.
    assert!(core::mem::offset_of!(CtEntry, flags) == 6);
    assert!(core::mem::offset_of!(CtEntry, seen_s) == 8);
    assert!(core::mem::size_of::<NatReverse>() == 48);
    // The claim's compare-and-swap needs the state word 8-byte aligned in the map value.
    assert!(core::mem::offset_of!(NatReverse, state) == 40);
    assert!(core::mem::size_of::<Limits>() == 24);
    assert!(core::mem::size_of::<ClientKey>() == 20);
    assert!(core::mem::size_of::<ClientState>() == 16);
    assert!(core::mem::size_of::<DecapAddr>() == 20);
    assert!(core::mem::size_of::<BridgeFdbKey>() == 12);
    assert!(core::mem::size_of::<FlowKey>() == 40);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): `#[repr(C)]`, only integer fields, no implicit padding (the sizes are
    // asserted above), so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipValue {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::NatReverse {}
    unsafe impl aya::Pod for super::Limits {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::ClientState {}
    unsafe impl aya::Pod for super::DecapAddr {}
    unsafe impl aya::Pod for super::BridgeFdbKey {}
    unsafe impl aya::Pod for crate::FlowKey {}
    unsafe impl aya::Pod for crate::Counters {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn every_port_has_its_own_bit_within_the_vip_ports_words() {
        assert_eq!(vip_port_bit(0), (0, 1));
        assert_eq!(vip_port_bit(63), (0, 1 << 63));
        assert_eq!(vip_port_bit(64), (1, 1));
        assert_eq!(vip_port_bit(80), (1, 1 << 16));
        assert_eq!(vip_port_bit(65_535), (VIP_PORTS_LEN - 1, 1 << 63));
    }

    #[test]
    fn a_bridge_bit_is_its_ifindex_modulo_1024_within_the_bridges_words() {
        assert_eq!(bridge_bit(0), (0, 1));
        assert_eq!(bridge_bit(65), (1, 1 << 1));
        assert_eq!(bridge_bit(1_023), (BRIDGES_LEN - 1, 1 << 63));
        assert_eq!(bridge_bit(1_024), bridge_bit(0), "1,024 wraps to bit 0");
        assert_eq!(bridge_bit(2_047), bridge_bit(1_023));
        assert_eq!(bridge_bit(u32::MAX), (BRIDGES_LEN - 1, 1 << 63));
    }

    #[test]
    fn an_age_is_the_wrapping_difference_and_never_negative() {
        assert_eq!(ct_age(100, 97), 3);
        assert_eq!(ct_age(100, 100), 0);
        // A time stamped a second ahead (a finer clock, mid-upgrade) is no age, not years.
        assert_eq!(ct_age(100, 101), 0);
        // Across the 32-bit wrap, a time just before it is still a few seconds old.
        assert_eq!(ct_age(2, u32::MAX - 1), 4);
        assert_eq!(
            ct_age(u32::MAX, 0),
            0,
            "2^32 - 1 seconds back reads as 1 s ahead"
        );
    }

    #[test]
    fn addresses_use_the_flow_key_layout() {
        let v4 = addr_words(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(v4, [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0]);
        let v6 = addr_words(IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10)));
        assert_eq!(v6[0], u32::from_ne_bytes([0xfd, 0, 0, 0]));
        assert_eq!(v6[3], u32::from_ne_bytes([0, 0, 0, 0x10]));
        let key = VipKey::new(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 80),
            6,
        );
        assert_eq!((key.port, key.protocol, key.family), (80, 6, FAMILY_V4));
    }

    #[test]
    fn addresses_read_back_from_their_words() {
        for addr in [
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 80),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 2, 3, 4, 5, 6, 7)), 443),
        ] {
            assert_eq!(Backend::new(addr).address(), Some(addr));
            assert_eq!(VipKey::new(addr, 6).address(), Some(addr));
        }
        assert_eq!(Backend::default().address(), None, "family 0: an unused id");
    }

    #[test]
    fn table_halves_do_not_overlap() {
        assert_eq!(table_index(0, 1, 0), MAX_TABLE_SIZE);
        assert_eq!(table_index(1, 0, 0), 2 * MAX_TABLE_SIZE);
        assert_eq!(
            table_index(MAX_SERVICES - 1, 1, MAX_TABLE_SIZE - 1),
            TABLES_LEN - 1
        );
    }
}
