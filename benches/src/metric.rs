//! The figures the harness measures, their units and which way is better.

use serde::Serialize;

/// One measured figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Bulk TCP throughput, one flow, Gbit/s.
    Bulk1,
    /// Bulk TCP throughput, 8 flows together, Gbit/s.
    Bulk8,
    /// New TCP connections per second, each with one 64-byte request and reply.
    ConnRate,
    /// 64-byte request/reply exchanges per second on kept-alive TCP connections.
    KeepAliveRate,
    /// UDP request/reply datagrams answered per second.
    UdpRate,
    /// UDP request/reply latency, median, µs.
    UdpP50,
    /// UDP request/reply latency, 99th percentile, µs.
    UdpP99,
    /// 64-byte frames (18-byte UDP payloads) from many flows, one way, sent as fast as
    /// `sendmmsg` goes: datagrams the backends received per second.
    PacketRate,
    /// CPU time of the balancer's processes per GB relayed in the bulk tests, ms.
    CpuPerGb,
    /// CPU time of the balancer's processes per 1,000 connections in the connection test, ms.
    CpuPer1kConn,
    /// Softirq time of the whole machine per GB in the bulk tests, ms (every namespace's
    /// stack work, not only the balancer's).
    SoftirqPerGb,
    /// Peak resident memory of the balancer's processes (sum of VmHWM), MiB.
    PeakRss,
    /// lb's BPF program in the bulk tests: its run time over its runs (one per packet at
    /// XDP, one per socket buffer at tc, where a GSO super-packet is one run), ns.
    ProgramNsBulk,
    /// lb's BPF program in the 64-byte packet test, ns per run, as [`Metric::ProgramNsBulk`].
    ProgramNsPacket,
}

impl Metric {
    /// Every metric, in table order.
    pub const ALL: [Metric; 14] = [
        Metric::Bulk1,
        Metric::Bulk8,
        Metric::ConnRate,
        Metric::KeepAliveRate,
        Metric::UdpRate,
        Metric::UdpP50,
        Metric::UdpP99,
        Metric::PacketRate,
        Metric::CpuPerGb,
        Metric::CpuPer1kConn,
        Metric::SoftirqPerGb,
        Metric::PeakRss,
        Metric::ProgramNsBulk,
        Metric::ProgramNsPacket,
    ];

    /// A short column heading with the unit.
    pub fn heading(self) -> &'static str {
        match self {
            Metric::Bulk1 => "bulk 1 flow Gbit/s",
            Metric::Bulk8 => "bulk 8 flows Gbit/s",
            Metric::ConnRate => "new conn/s",
            Metric::KeepAliveRate => "kept-alive req/s",
            Metric::UdpRate => "UDP dgram/s",
            Metric::UdpP50 => "UDP p50 µs",
            Metric::UdpP99 => "UDP p99 µs",
            Metric::PacketRate => "64-byte pkt/s",
            Metric::CpuPerGb => "LB CPU ms/GB",
            Metric::CpuPer1kConn => "LB CPU ms/1k conn",
            Metric::SoftirqPerGb => "softirq ms/GB (all ns)",
            Metric::PeakRss => "LB peak RSS MiB",
            Metric::ProgramNsBulk => "program ns/run, bulk",
            Metric::ProgramNsPacket => "program ns/run, 64-byte pkts",
        }
    }

    /// Whether a larger value is better (throughput, rates) or worse (latency, cost).
    pub fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::Bulk1
                | Metric::Bulk8
                | Metric::ConnRate
                | Metric::KeepAliveRate
                | Metric::UdpRate
                | Metric::PacketRate
        )
    }

    /// Whether this is a cost figure (CPU, memory, program time): reported beside the rates
    /// and latencies, never a target (`direct` has no balancer to cost anything, and softirq
    /// time is machine-wide).
    pub fn is_cost(self) -> bool {
        matches!(
            self,
            Metric::CpuPerGb
                | Metric::CpuPer1kConn
                | Metric::SoftirqPerGb
                | Metric::PeakRss
                | Metric::ProgramNsBulk
                | Metric::ProgramNsPacket
        )
    }

    /// `a` is better than `b` for this metric.
    pub fn better(self, a: f64, b: f64) -> bool {
        if self.higher_is_better() {
            a > b
        } else {
            a < b
        }
    }
}
