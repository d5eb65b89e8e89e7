//! Daemon configs for tests, built in code and written as TOML (see `lb-daemon/src/config/`
//! for the keys): `dataplane = "proxy"` by default (or `$LB_TEST_DATAPLANE`), so tests run
//! without XDP.

use std::net::SocketAddr;

use toml::{Table, Value};

/// One `[[service]]` with its `[service.health]` and `[[service.backend]]` tables.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    table: Table,
    health: Table,
    backends: Vec<Table>,
}

impl ServiceConfig {
    /// A TCP service `name` on `listen`, on the userspace proxy.
    pub fn tcp(name: &str, listen: SocketAddr) -> ServiceConfig {
        Self::new(name, listen, "tcp")
    }

    /// A UDP service `name` on `listen`, on the userspace proxy.
    pub fn udp(name: &str, listen: SocketAddr) -> ServiceConfig {
        Self::new(name, listen, "udp")
    }

    fn new(name: &str, listen: SocketAddr, protocol: &str) -> ServiceConfig {
        let mut table = Table::new();
        table.insert("name".into(), name.into());
        table.insert("listen".into(), listen.to_string().into());
        table.insert("protocol".into(), protocol.into());
        // LB_TEST_DATAPLANE=auto runs the same tests through `auto`, which must fall back to
        // the proxy for these loopback services (issue 3).
        let dataplane = std::env::var("LB_TEST_DATAPLANE").unwrap_or_else(|_| "proxy".into());
        table.insert("dataplane".into(), dataplane.into());
        ServiceConfig {
            table,
            health: Table::new(),
            backends: Vec::new(),
        }
    }

    /// The service's `listen` address.
    pub fn listen(&self) -> SocketAddr {
        self.table["listen"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("`listen` is set from a SocketAddr in the constructor")
    }

    /// `scheduler = "{kind}"` (`maglev`, `round_robin`, `weighted_round_robin`, `least_conn`,
    /// `random_two`, `source_hash`).
    pub fn scheduler(self, kind: &str) -> Self {
        self.set("scheduler", kind)
    }

    /// Any other service key, e.g. `.set("retries", 2)` or `.set("connect_timeout", "1s")`.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.table.insert(key.into(), value.into());
        self
    }

    /// A `[service.health]` key, e.g. `.health("kind", "http")`, `.health("interval", "200ms")`.
    pub fn health(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.health.insert(key.into(), value.into());
        self
    }

    /// Drops `[service.health]` key `key`, one a helper set (`path` before `kind = "none"`).
    pub fn without_health(mut self, key: &str) -> Self {
        self.health.remove(key);
        self
    }

    /// Fast active checks of `kind` (`tcp`, `http` on `/health`, `udp`, `none`): every 200 ms,
    /// 500 ms timeout, rise 2, fall 2.
    pub fn fast_health(self, kind: &str) -> Self {
        let s = self
            .health("kind", kind)
            .health("interval", "200ms")
            .health("timeout", "500ms")
            .health("rise", 2)
            .health("fall", 2);
        if kind == "http" {
            s.health("path", "/health")
        } else {
            s
        }
    }

    /// A `[[service.backend]]` at `address` with `weight`.
    pub fn backend(mut self, address: SocketAddr, weight: u32) -> Self {
        let mut b = Table::new();
        b.insert("address".into(), address.to_string().into());
        b.insert("weight".into(), i64::from(weight).into());
        self.backends.push(b);
        self
    }

    /// A `[[service.backend]]` given as `name:port`, resolved by the daemon (DNS discovery).
    pub fn backend_named(mut self, address: &str, weight: u32) -> Self {
        let mut b = Table::new();
        b.insert("address".into(), address.into());
        b.insert("weight".into(), i64::from(weight).into());
        self.backends.push(b);
        self
    }

    fn into_table(self) -> Table {
        let mut t = self.table;
        if !self.health.is_empty() {
            t.insert("health".into(), Value::Table(self.health));
        }
        t.insert(
            "backend".into(),
            Value::Array(self.backends.into_iter().map(Value::Table).collect()),
        );
        t
    }
}

/// A whole config: `[global]` and the services.
#[derive(Debug, Clone, Default)]
pub struct DaemonConfig {
    global: Table,
    admin: Table,
    announce: Table,
    services: Vec<ServiceConfig>,
}

impl DaemonConfig {
    /// An empty config with `workers = 2`, `drain_timeout = "5s"` and the admin API on a
    /// free loopback port (`[admin] listen = "127.0.0.1:0"`; see `Daemon::admin_addr`), so
    /// daemons of parallel tests do not fight over the default 127.0.0.1:9100.
    pub fn new() -> DaemonConfig {
        DaemonConfig::default()
            .global("workers", 2)
            .global("drain_timeout", "5s")
            .admin("listen", "127.0.0.1:0")
    }

    /// An `[admin]` key.
    pub fn admin(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.admin.insert(key.into(), value.into());
        self
    }

    /// A `[global]` key.
    pub fn global(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.global.insert(key.into(), value.into());
        self
    }

    /// An `[announce]` key (the table is written once it has one).
    pub fn announce(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.announce.insert(key.into(), value.into());
        self
    }

    /// Adds a service.
    pub fn service(mut self, s: ServiceConfig) -> Self {
        self.services.push(s);
        self
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let mut root = Table::new();
        if !self.global.is_empty() {
            root.insert("global".into(), Value::Table(self.global.clone()));
        }
        if !self.admin.is_empty() {
            root.insert("admin".into(), Value::Table(self.admin.clone()));
        }
        if !self.announce.is_empty() {
            root.insert("announce".into(), Value::Table(self.announce.clone()));
        }
        root.insert(
            "service".into(),
            Value::Array(
                self.services
                    .iter()
                    .cloned()
                    .map(|s| Value::Table(s.into_table()))
                    .collect(),
            ),
        );
        toml::to_string(&root).expect("a table of strings, integers and tables serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_services_backends_and_health_as_toml_tables() {
        let vip: SocketAddr = "127.0.0.1:18080".parse().unwrap();
        let text = DaemonConfig::new()
            .service(
                ServiceConfig::tcp("web", vip)
                    .scheduler("round_robin")
                    .set("retries", 2)
                    .fast_health("http")
                    .backend("127.0.0.1:19001".parse().unwrap(), 1)
                    .backend("127.0.0.1:19002".parse().unwrap(), 3),
            )
            .to_toml();
        let back: Table = toml::from_str(&text).expect("valid TOML");
        let svc = &back["service"].as_array().unwrap()[0];
        assert_eq!(svc["listen"].as_str(), Some("127.0.0.1:18080"));
        let s = ServiceConfig::udp("dns", vip);
        assert_eq!(s.listen(), vip);
        assert_eq!(svc["scheduler"].as_str(), Some("round_robin"));
        assert_eq!(svc["dataplane"].as_str(), Some("proxy"));
        assert_eq!(svc["health"]["path"].as_str(), Some("/health"));
        assert_eq!(svc["backend"][1]["weight"].as_integer(), Some(3));
        assert_eq!(back["global"]["drain_timeout"].as_str(), Some("5s"));
        assert!(text.contains("[[service]]"), "{text}");
    }
}
