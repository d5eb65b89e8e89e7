// The names every crafted-packet test module takes from its crate root (`use super::*`),
// shared by `xdp_packets` and `tc_packets`, which build the same modules.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    flow::{IPPROTO_TCP, IPPROTO_UDP},
    flow_hash,
    maps::{
        addr_words as words, nat_flags, nat_seen, nat_state, vip_port_bit, ClientKey, CtEntry, Limits, NatReverse,
        BACKEND_F_DOWN, NAT_F_ENDED,
        BACKEND_F_DRAINING, CT_F_CLOSED, CT_F_COUNTED, CT_F_MIDSTREAM, CT_REFRESH_SECS, CT_SLOT_GRACE_SECS, MIN_REPLY_PATH_MTU,
        MODE_DSR, MODE_NAT, PROG_BALANCER, PROG_DECAP,
    },
    Counters, FlowKey, Stat,
};
use lb_tests::{
    packet::{
        self, assert_same, l4_source_port, tcp_flags_of, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    },
    xdp::{
        testrun::{
            action_name, flow, lab_at, Hook, Lab, B1_4, B1_6, B1_MAC, B2_4, B2_MAC, CLIENT4, CLIENT6,
            CLIENT_MAC, LOCAL4, LOCAL6, SNAT_MAX, SNAT_MIN, VB_MAC, VC_MAC, VIP4, VIP6, XDP_DROP,
            XDP_PASS, XDP_REDIRECT, XDP_TX,
        },
    },
};
