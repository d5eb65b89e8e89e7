//! The kernel routing table the announcer writes: one blackhole route per announced VIP
//! (`/32` or `/128`), marked with the daemon's route protocol number, in a table no rule
//! points to. Nothing forwards by it; a routing daemon reads it (BIRD's `protocol kernel`
//! with `learn`, it hears of every change at once over netlink) and exports the VIPs over
//! BGP. Written with `rtnetlink`, in the daemon's network namespace.

use std::collections::BTreeSet;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol, RouteType};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

/// Why a route could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The netlink socket could not be opened.
    #[error("netlink: {0}")]
    Socket(std::io::Error),
    /// The kernel refused a request (no `CAP_NET_ADMIN`, a table it does not allow...).
    #[error("route {what} in table {table}: {source}")]
    Kernel {
        /// What was asked: `add 10.0.0.1/32`, `list`...
        what: String,
        /// The table.
        table: u32,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
}

/// One kernel routing table's routes of one protocol number.
#[derive(Clone)]
pub struct RouteTable {
    handle: Handle,
    table: u32,
    protocol: u8,
}

impl RouteTable {
    /// Opens a netlink connection (its task spawned on the current tokio runtime) for the
    /// routes of `protocol` in `table`.
    ///
    /// Returns `Err(RouteError::Socket)` when no netlink socket can be opened. Must be called
    /// inside a tokio runtime.
    pub fn open(table: u32, protocol: u8) -> Result<RouteTable, RouteError> {
        // Strict checking: the kernel filters dumps by table, protocol and type, so listing
        // our routes costs nothing on a host with a full routing table.
        let (connection, handle, _) =
            rtnetlink::new_connection_with_strict_check().map_err(RouteError::Socket)?;
        tokio::spawn(connection);
        Ok(RouteTable {
            handle,
            table,
            protocol,
        })
    }

    /// The table's id.
    pub fn table(&self) -> u32 {
        self.table
    }

    /// The route for `vip`: a blackhole host route of our protocol in our table.
    fn route(&self, vip: IpAddr) -> RouteMessage {
        let len = if vip.is_ipv4() { 32 } else { 128 };
        RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(vip, len)
            // The length always fits the address family.
            .unwrap_or_else(|_| RouteMessageBuilder::<IpAddr>::new())
            .table_id(self.table)
            .protocol(RouteProtocol::from(self.protocol))
            .kind(RouteType::BlackHole)
            .build()
    }

    /// Puts the route for `vip` in the table (replacing one that is there).
    ///
    /// Returns `Err(RouteError::Kernel)` when the kernel refuses.
    pub async fn add(&self, vip: IpAddr) -> Result<(), RouteError> {
        self.handle
            .route()
            .add(self.route(vip))
            .replace()
            .execute()
            .await
            .map_err(|source| self.refused(format!("add {vip}"), source))
    }

    /// Takes the route for `vip` out of the table; one that is not there is no error.
    ///
    /// Returns `Err(RouteError::Kernel)` when the kernel refuses.
    pub async fn remove(&self, vip: IpAddr) -> Result<(), RouteError> {
        match self.handle.route().del(self.route(vip)).execute().await {
            Ok(()) => Ok(()),
            // ESRCH: no such route.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            Err(source) => Err(self.refused(format!("remove {vip}"), source)),
        }
    }

    /// The VIPs whose routes (host routes of our protocol) are in the table now.
    ///
    /// Returns `Err(RouteError::Kernel)` when the table cannot be read.
    pub async fn list(&self) -> Result<BTreeSet<IpAddr>, RouteError> {
        let mut vips = BTreeSet::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessageBuilder::<IpAddr>::new()
                .table_id(self.table)
                .protocol(RouteProtocol::from(self.protocol))
                .kind(RouteType::BlackHole)
                .build();
            query.header.address_family = family;
            let mut routes = self.handle.route().get(query).execute();
            while let Some(route) = routes
                .try_next()
                .await
                .map_err(|source| self.refused("list".into(), source))?
            {
                if let Some(vip) = self.ours(&route) {
                    vips.insert(vip);
                }
            }
        }
        Ok(vips)
    }

    /// The VIP of `route` when it is one of ours: our table and protocol, a host route.
    fn ours(&self, route: &RouteMessage) -> Option<IpAddr> {
        let table = route
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(route.header.table));
        if table != self.table || u8::from(route.header.protocol) != self.protocol {
            return None;
        }
        let dest = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(d) => Some(d),
            _ => None,
        })?;
        let vip = match dest {
            rtnetlink::packet_route::route::RouteAddress::Inet(a) => IpAddr::V4(*a),
            rtnetlink::packet_route::route::RouteAddress::Inet6(a) => IpAddr::V6(*a),
            _ => return None,
        };
        let host = if vip.is_ipv4() { 32 } else { 128 };
        (route.header.destination_prefix_length == host).then_some(vip)
    }

    fn refused(&self, what: String, source: rtnetlink::Error) -> RouteError {
        RouteError::Kernel {
            what,
            table: self.table,
            source,
        }
    }
}
