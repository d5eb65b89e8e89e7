//! The XDP balancer (`lb_xdp`) and decapsulator (`lb_decap`) on crafted packets, through
//! BPF_PROG_TEST_RUN (aya's `TestRun`), one module per feature.
//!
//! Each test builds a [`Lab`](lb_tests::xdp::testrun::Lab): it loads the lb-ebpf object named
//! by `LB_EBPF_OBJ` (set by `cargo xtask test`), so the kernel's verifier checks both
//! programs, makes a namespace for `bpf_fib_lookup` to route in, fills the maps the way
//! `lb_common::maps` tells the daemon to, runs packets, and compares each output frame byte for
//! byte with the frame built from scratch by `lb_tests::packet`, whose checksums are computed
//! there from nothing (and checked once more on the output on their own).

mod ageing;
mod conntrack;
mod decap;
mod dsr;
mod fuzz;
mod icmp_errors;
mod limits;
mod local_addrs;
mod nat;
mod pass_rules;
mod snat_ports;
mod too_big;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    flow::{IPPROTO_TCP, IPPROTO_UDP},
    flow_hash,
    maps::{
        addr_words as words, ClientKey, CtEntry, DecapAddr, Limits, BACKEND_F_DOWN,
        BACKEND_F_DRAINING, CT_F_CLOSED, CT_F_COUNTED, CT_REFRESH_SECS, MIN_REPLY_PATH_MTU,
        MODE_DSR, MODE_NAT, PROG_BALANCER, PROG_DECAP,
    },
    Counters, FlowKey, Stat,
};
use lb_tests::{
    netns::Netns,
    packet::{
        self, assert_same, l4_source_port, tcp_flags_of, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    },
    require_root,
    xdp::{
        bpf_object,
        testrun::{
            action_name, flow, lab, Lab, B1_4, B1_6, B1_MAC, B2_4, B2_MAC, CLIENT4, CLIENT6,
            CLIENT_MAC, LOCAL4, LOCAL6, SNAT_MAX, SNAT_MIN, VB_MAC, VC_MAC, VIP4, VIP6, XDP_DROP,
            XDP_PASS, XDP_REDIRECT, XDP_TX,
        },
        Decap,
    },
};
