//! The balancer's path for one packet: parse, VIP lookup, placement, NAT or DSR, next hop.
//! Also the reverse path of NAT replies (and of DSR replies the host routes: `dsr_reply`), and
//! the split between it and ICMP (`icmp`).

use lb_common::{
    flow::{IPPROTO_TCP, IPPROTO_UDP},
    flow_hash,
    maps::{
        ct_seconds, vip_port_bit, Service, VipKey, CT_F_CLOSED, CT_F_MIDSTREAM, MAX_SERVICES,
        MODE_DSR, MODE_NAT, SERVICE_F_ANNOUNCED,
    },
    FlowKey, Stat,
};

use crate::{
    clock, conntrack, dsr_reply, encap,
    fib::{self, Out},
    frame::Frame,
    icmp, limits,
    maps::{SERVICES, VIPS, VIP_PORTS},
    nat,
    parse::{self, Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    reset, stats, too_big,
};

/// The action for a packet that ends on counter `stat`: the `Pass*` rules hand it to the
/// kernel untouched, `Drop*` drop it (the hook's own return values, `C::PASS` / `C::DROP`).
#[inline(always)]
pub fn action_for<C: Frame>(stat: Stat) -> u32 {
    match stat {
        Stat::PassNotVip
        | Stat::PassFragment
        | Stat::PassMalformed
        | Stat::PassIpv6ExtHeaders
        | Stat::FibPass => C::PASS,
        _ => C::DROP,
    }
}

/// Handles one packet; `Ok` is the action of a packet sent on (its counter already counted),
/// `Err` the counter that decides the action by [`action_for`].
///
/// ICMP and everything else go through two BPF subprograms (functions not inlined), each
/// parsing the packet itself, so that neither path's stack adds to the other's. The verifier
/// allows 512 bytes of stack for a whole call chain (every frame rounded up to 32 bytes), and
/// LLVM gives a function one frame for all its paths, which barely shares slots between them:
/// inlined together, the balancing path (about 430 bytes) and the ICMP translation went over
/// the limit. Only a tiny frame (this function's) sits under either subprogram.
#[inline(always)]
pub fn handle<C: Frame>(ctx: &C) -> Result<u32, Stat> {
    if parse::is_icmp(ctx) {
        icmp::handle(ctx)
    } else {
        balance(ctx)
    }
}

/// A packet that is not ICMP: balanced if it is for a VIP, translated back if it is a NAT
/// reply, sent on if it is a DSR reply the hook takes (`dsr_reply`), else passed. A BPF
/// subprogram of its own (see [`handle`]).
#[inline(never)]
fn balance<C: Frame>(ctx: &C) -> Result<u32, Stat> {
    let frame_len = ctx.len() as u64;
    let p = parse::parse(ctx)?;
    match vip_service(&p) {
        Some(service) => to_backend(ctx, &p, service, frame_len),
        None => from_backend(ctx, &p),
    }
}

/// The service id of the VIP `p` is addressed to, if it is one.
#[inline(always)]
fn vip_service(p: &Parsed) -> Option<u32> {
    service_at(&p.key.dst_addr, p.key.dst_port, p.key.protocol, p.family)
}

/// The service id of the VIP `addr`:`port` (`protocol`, `family`; the port in host order), if
/// it is one. `VIPS` is looked up only when some VIP has the port (`VIP_PORTS`): a NAT reply,
/// addressed to a SNAT port, and traffic to the host skip hashing a 20-byte key that could
/// only miss.
#[inline(always)]
pub fn service_at(addr: &[u32; 4], port: u16, protocol: u8, family: u8) -> Option<u32> {
    let (word, bit) = vip_port_bit(port);
    if VIP_PORTS.get(word).is_none_or(|w| *w & bit == 0) {
        return None;
    }
    let vip = VipKey {
        addr: *addr,
        port,
        protocol,
        family,
    };
    // SAFETY: a live map value, copied out at once.
    VIPS.get_ptr(&vip).map(|v| unsafe { (*v).service })
}

/// The TCP flags of a client's segment that end its flow for the per-client limits. On `nat`
/// the backend's FIN comes back through the balancer, so the client's own FIN (a half-close:
/// the backend may go on sending) frees nothing, and a client cannot free its slots by
/// half-closing its connections; its RST does (an in-window one ends the connection without
/// a word from the backend). On `dsr` replies bypass the balancer: the client's FIN or RST is
/// all it sees. A client that forges RSTs outside the window (which the backend ignores, RFC
/// 5961) frees slots it still uses: the program does not track sequence numbers.
#[inline(always)]
fn client_ends(mode: u8) -> u8 {
    if mode == MODE_NAT {
        TCP_RST
    } else {
        TCP_FIN | TCP_RST
    }
}

/// Client → VIP: place the flow, translate or encapsulate, send to the backend.
#[inline(always)]
fn to_backend<C: Frame>(ctx: &C, p: &Parsed, service_id: u32, frame_len: u64) -> Result<u32, Stat> {
    if service_id >= MAX_SERVICES {
        return Err(Stat::DropBadService);
    }
    // Read in place, not copied: the balancer's stack is tight (512 bytes). Only
    // `active_half` changes while packets run, as one aligned word (see the flip protocol in
    // `lb_common::maps`), so reading the fields one by one is safe.
    let service: &Service = SERVICES.get(service_id).ok_or(Stat::DropBadService)?;
    if service.family != p.family {
        return Err(Stat::DropBadService);
    }
    let tcp = p.key.protocol == IPPROTO_TCP;
    if tcp && p.tcp_flags & TCP_SYN != 0 && p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        return Err(Stat::DropSynFin);
    }
    // NAT forwards like a router (`nat::rewrite` decrements the TTL): checked before the flow
    // takes anything. DSR sends the packet on unchanged inside a new header.
    if service.mode == MODE_NAT && parse::hop_limit(ctx, p) <= 1 {
        return Err(Stat::DropTtlExpired);
    }
    let now_ns = clock::now_ns();
    let mut placed = match conntrack::place(&p.key, p.tcp_flags, service_id, service, now_ns) {
        Ok(placed) => placed,
        // A flow that had an entry (its backend went down, and no other is left) ends here;
        // so does a SYN, unless another node may take it once this one withdrew the VIP.
        Err(Stat::DropNoBackend)
            if tcp && (p.tcp_flags & TCP_SYN == 0 || service.flags & SERVICE_F_ANNOUNCED == 0) =>
        {
            return end_flow(
                ctx,
                p,
                service_id,
                Stat::RefusedNoBackend,
                ct_seconds(now_ns),
            )
        }
        Err(stat) => return Err(stat),
    };
    if placed.fresh {
        // Before the SNAT port is taken: a refused flow must hold nothing.
        match limits::admit(&p.key, service_id) {
            Ok(flags) => placed.entry.flags = flags,
            Err(stat) => return refuse(ctx, p, stat),
        }
    } else if !placed.new_flow
        && p.key.protocol == IPPROTO_TCP
        && p.tcp_flags & client_ends(service.mode) != 0
        && placed.entry.flags & CT_F_CLOSED == 0
    {
        limits::closed(&p.key, service_id, placed.now);
    }
    let backend = placed.backend;

    // The route first, for the length the packet will have: a packet too big for the
    // backend link is answered while it is still the client's (the answer quotes it), before
    // it takes a SNAT port or is encapsulated (see `too_big`).
    let nat = service.mode == MODE_NAT;
    if !nat && service.mode != MODE_DSR {
        return Err(Stat::DropBadService);
    }
    let (protocol, outer_hdr) = if nat {
        (p.key.protocol, 0)
    } else if p.family == lb_common::maps::FAMILY_V4 {
        (parse::IPPROTO_IPIP, 20)
    } else {
        (parse::IPPROTO_IPV6, 40)
    };
    let src = if nat {
        nat::flow_local(service_id, service, &p.key).ok_or(Stat::DropBadService)?
    } else {
        &service.local_addr
    };
    if let Err(stat) = fib::lookup(
        ctx,
        p.family,
        protocol,
        src,
        &backend.addr,
        p.ip_len.wrapping_add(outer_hdr),
        now_ns,
    ) {
        // No SNAT port, no conntrack entry yet: a fresh flow's connection slot goes back, or
        // each resent SYN of a client whose backend has no route would take one more.
        if placed.fresh {
            limits::unadmit(&p.key.src_addr, service_id, placed.entry.flags);
        }
        // A renewal of an established flow's time spent on a packet that does not reach the
        // port check: the next packet renews (and checks) instead (see `keeps_port`; a UDP
        // flow checks anyway, and `tcp` here costs the verifier more paths than it saves).
        if nat && placed.refreshed && !placed.new_flow {
            conntrack::renew_next(&p.key, placed.now);
        }
        if stat != Stat::DropMtu {
            return Err(stat);
        }
        let action = too_big::answer(ctx, p, outer_hdr)?;
        stats::increment(Stat::TooBigSent);
        return Ok(action);
    }

    let out = if nat {
        // Only a packet that starts a flow may take a port: a TCP segment without SYN that
        // finds no port of its own was never seen by the backend (see `nat::snat_port`).
        let starts = !tcp || p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let port = if tcp && keeps_port(p, &placed) {
            Ok(placed.entry.snat_port)
        } else {
            nat::snat_port(
                &p.key,
                &backend.addr,
                backend.port,
                service_id,
                service,
                placed.entry.snat_port,
                p.tcp_flags,
                starts,
                placed.now,
            )
        };
        let port = match port {
            Ok(port) => port,
            Err(stat) => {
                // The flow holds nothing: a connection slot the limits gave it goes back.
                // A fresh flow's was given by this packet; an older flow's (its backend went
                // down, its port was taken over, a resent SYN found no port) goes back
                // through its conntrack entry, once, as for its FIN: the RST ends it, and no
                // FIN or RST of the client's will follow to do it.
                if placed.fresh {
                    limits::unadmit(&p.key.src_addr, service_id, placed.entry.flags);
                    return match stat {
                        Stat::DropNatPortsExhausted if tcp => {
                            refuse(ctx, p, Stat::RefusedNatPortsExhausted)
                        }
                        Stat::ResetNatNoFlow | Stat::ResetNatPortReclaimed => refuse(ctx, p, stat),
                        _ => Err(stat),
                    };
                }
                return match stat {
                    Stat::DropNatPortsExhausted if tcp => end_flow(
                        ctx,
                        p,
                        service_id,
                        Stat::RefusedNatPortsExhausted,
                        placed.now,
                    ),
                    Stat::ResetNatNoFlow | Stat::ResetNatPortReclaimed => {
                        end_flow(ctx, p, service_id, stat, placed.now)
                    }
                    _ => Err(stat),
                };
            }
        };
        if placed.new_flow || port != placed.entry.snat_port {
            placed.entry.snat_port = port;
            conntrack::record(&p.key, &placed.entry);
        }
        // Looked up again, not kept from the lookup: the verifier would otherwise carry one
        // state per kind of address (the service's own, or one of `LOCAL_ADDRS`) through the
        // port probes.
        let local = nat::flow_local(service_id, service, &p.key).ok_or(Stat::DropBadService)?;
        nat::rewrite(ctx, p, local, port, &backend.addr, backend.port)?;
        fib::send(ctx, fib::Peer::Allowed)?
    } else {
        if placed.new_flow {
            conntrack::record(&p.key, &placed.entry);
        }
        encap::encapsulate(
            ctx,
            p,
            &service.local_addr,
            &backend.addr,
            flow_hash(&p.key),
        )?;
        fib::send(ctx, fib::Peer::Transmit)?
    };
    let action = match out {
        Out::Sent(action) => {
            stats::increment(Stat::Forwarded);
            action
        }
        Out::Pass => {
            stats::increment(Stat::FibPass);
            C::PASS
        }
    };
    stats::forwarded(service_id, placed.backend_id, frame_len, placed.new_flow);
    Ok(action)
}

/// Whether the client segment `p` of a TCP NAT flow placed as `placed` goes on with the port
/// its conntrack entry holds, without `nat::snat_port` (a `NAT_REVERSE` lookup and its
/// bookkeeping: a sixth to a fifth of an established segment's cost in the program). Such a
/// segment carries no SYN, FIN or RST, did not renew its flow's conntrack time
/// (`Placement::refreshed`), and its flow is neither ended nor made in mid-stream:
/// [`CT_F_CLOSED`] (the client's RST, the backend's FIN or RST) says its port may be taken
/// over once its hold has passed, [`CT_F_MIDSTREAM`] that its entry was lost, perhaps during a
/// close whose mark it no longer carries.
///
/// The segment that renews the time (at most every `CT_REFRESH_SECS + 1` seconds while the
/// flow is busy, and the next one if the route lookup stopped it: `conntrack::renew_next`)
/// takes the full path, as every other packet does: the port's entry must still name the flow
/// (it is re-made if evicted), its time is renewed once it is a second old (so at each check
/// it is as fresh as the conntrack time, and the idle rule cannot free a busy flow's port),
/// and FINs and RSTs mark the end. What the skipped segments give up: a port another flow
/// took over is noticed at the next check, not at once. That needs the LRU to have evicted
/// the busy flow's entry (the backend's replies, its ACKs at least, reference it and keep it
/// off the eviction end) or the flow's local address to have changed under it (a reload).
/// The segments in between reach the backend on the other connection's 4-tuple, outside its
/// sequence window. UDP has no such window: every UDP packet checks its port.
#[inline(always)]
fn keeps_port(p: &Parsed, placed: &conntrack::Placement) -> bool {
    !placed.refreshed
        && placed.entry.snat_port != 0
        && placed.entry.flags & (CT_F_CLOSED | CT_F_MIDSTREAM) == 0
        && p.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
}

/// A packet the balancer will not carry (`stat`): a TCP segment is answered with a RST, so the
/// client fails at once; anything else (UDP, a RST, a segment that cannot be turned around)
/// is dropped.
#[inline(always)]
fn refuse<C: Frame>(ctx: &C, p: &Parsed, stat: Stat) -> Result<u32, Stat> {
    if p.key.protocol == IPPROTO_TCP && p.tcp_flags & TCP_RST == 0 {
        if let Some(action) = reset::answer(ctx, p) {
            stats::increment(stat);
            return Ok(action);
        }
    }
    Err(stat)
}

/// A TCP flow of service `service_id` that had a conntrack entry and is refused now (`stat`):
/// answered as [`refuse`] does, and once it is over (the RST went out, or the segment was
/// the client's own RST) its entry is marked closed, which gives its client's connection
/// slot back once (`limits::closed`). Without that the slot would stay taken: no FIN or RST
/// of the client's follows to free it. A segment dropped without answer leaves the flow as
/// it is: the client sends it again, and it may yet go on (its backend back up).
#[inline(always)]
fn end_flow<C: Frame>(
    ctx: &C,
    p: &Parsed,
    service_id: u32,
    stat: Stat,
    now: u32,
) -> Result<u32, Stat> {
    let action = refuse(ctx, p, stat);
    if p.key.protocol == IPPROTO_TCP && (action.is_ok() || p.tcp_flags & TCP_RST != 0) {
        limits::closed(&p.key, service_id, now);
    }
    action
}

/// Not for a VIP: a NAT reply to translate back to VIP → client, a DSR reply to send on
/// (`dsr_reply`, tc only), or a packet to pass.
#[inline(always)]
fn from_backend<C: Frame>(ctx: &C, p: &Parsed) -> Result<u32, Stat> {
    if p.key.protocol != IPPROTO_TCP && p.key.protocol != IPPROTO_UDP {
        // ICMP took the other path (`handle`); nothing else gets through `parse`.
        return Err(Stat::PassNotVip);
    }
    if parse::hop_limit(ctx, p) <= 1 {
        // A NAT reply that cannot be decremented is dropped; anything else passes as usual.
        return Err(if nat::find(&p.key).is_some() {
            Stat::DropTtlExpired
        } else {
            Stat::PassNotVip
        });
    }
    let now_ns = clock::now_ns();
    let Some(r) = nat::reverse(&p.key, p.tcp_flags, ct_seconds(now_ns)) else {
        return dsr_reply::send(ctx, p, now_ns);
    };
    let r = r?;
    if p.key.protocol == IPPROTO_TCP && p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        // The backend ends the flow: its client's slot goes back as for the client's FIN.
        // Before the route: `reverse` has marked the port's end, and the client's flow is
        // marked closed with it even if this packet goes no further, so that its segments
        // keep checking their port (`keeps_port`), which may be taken over after its hold.
        let client = FlowKey {
            src_addr: r.client_addr,
            dst_addr: r.vip_addr,
            src_port: r.client_port,
            dst_port: r.vip_port,
            protocol: p.key.protocol,
            family: p.family,
            _pad: [0; 2],
        };
        limits::closed(&client, r.service, ct_seconds(now_ns));
    }
    // The route first: a TCP reply too big for the route to the client is answered to the
    // backend while it is still the backend's packet (the answer quotes it, and the
    // backend's kernel finds its socket by it), as a client's packet too big for the backend
    // link is. Not a UDP reply: the backend keeps the path MTU per destination, the NAT
    // address all clients share, and a UDP sender then fragments its large datagrams to
    // every client, fragments that are not translated back (`pass_fragment`); TCP only
    // lowers its segment size.
    if let Err(stat) = fib::lookup(
        ctx,
        p.family,
        p.key.protocol,
        &r.vip_addr,
        &r.client_addr,
        p.ip_len,
        now_ns,
    ) {
        if stat != Stat::DropMtu || p.key.protocol != IPPROTO_TCP {
            return Err(stat);
        }
        let action = too_big::answer(ctx, p, 0)?;
        stats::increment(Stat::TooBigSent);
        return Ok(action);
    }
    nat::rewrite(
        ctx,
        p,
        &r.vip_addr,
        r.vip_port,
        &r.client_addr,
        r.client_port,
    )?;
    match fib::send(ctx, fib::Peer::Allowed) {
        Ok(Out::Sent(action)) => {
            stats::increment(Stat::NatReplies);
            Ok(action)
        }
        // The route to the client leaves by an interface XDP cannot send to (a second
        // uplink the program is not attached to): the kernel forwards the reply, whose
        // source is now the VIP, not one of this host's addresses. A client's packet has no
        // such way out: rewritten, its source is the balancer's own address, which the
        // kernel drops as a martian (placement keeps backends' routes on the attached
        // interfaces).
        Ok(Out::Pass) | Err(Stat::DropNoDevmapEntry) => Err(Stat::FibPass),
        Err(stat) => Err(stat),
    }
}
