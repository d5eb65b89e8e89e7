//! A service's `[service.health]`: the check kind, its own keys, counts and timings.

use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawCheckKind, RawHealth};
use super::validate::Validator;
use super::{CheckKind, ConfigError, HealthCheck, Protocol, DEFAULT_PASSIVE_TIMEOUT};

impl RawCheckKind {
    /// The config spelling of `kind`.
    fn name(self) -> &'static str {
        match self {
            RawCheckKind::Tcp => "tcp",
            RawCheckKind::Http => "http",
            RawCheckKind::Udp => "udp",
            RawCheckKind::None => "none",
        }
    }
}

impl Validator<'_> {
    /// Service `i`'s health checking. Without the table: a `tcp` check for TCP, passive
    /// failures alone for UDP. With it, in this order: keys of another kind, `rise`, `fall`,
    /// `interval`, `timeout`, `passive_timeout`, then the kind against the protocol and its
    /// own keys.
    pub(super) fn health(
        &self,
        i: usize,
        protocol: Protocol,
        raw: Option<Spanned<RawHealth>>,
    ) -> Result<HealthCheck, ConfigError> {
        let f = |k: &str| format!("service[{i}].health.{k}");
        let default_kind = match protocol {
            Protocol::Tcp => RawCheckKind::Tcp,
            Protocol::Udp => RawCheckKind::None,
        };
        let Some(raw) = raw else {
            return Ok(HealthCheck {
                kind: match default_kind {
                    RawCheckKind::Tcp => CheckKind::Tcp,
                    _ => CheckKind::None,
                },
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                rise: 2,
                fall: 3,
                passive_timeout: DEFAULT_PASSIVE_TIMEOUT,
            });
        };
        let mut raw = raw.into_inner();
        let (kind_raw, span) = match &raw.kind {
            Some(k) => (*k.get_ref(), k.span()),
            None => (default_kind, 0..0),
        };
        self.stray_health_keys(i, kind_raw, &raw)?;
        let rise = self.check_count(i, raw.rise.take(), 2, "rise")?;
        let fall = self.check_count(i, raw.fall.take(), 3, "fall")?;
        let interval = self.positive(raw.interval.take(), Duration::from_secs(2), || {
            f("interval")
        })?;
        let timeout = self.positive(raw.timeout.take(), Duration::from_secs(1), || f("timeout"))?;
        let passive_timeout =
            self.positive(raw.passive_timeout.take(), DEFAULT_PASSIVE_TIMEOUT, || {
                f("passive_timeout")
            })?;
        let kind = self.check_kind(i, protocol, kind_raw, span, raw)?;
        Ok(HealthCheck {
            kind,
            interval,
            timeout,
            rise,
            fall,
            passive_timeout,
        })
    }

    /// A key that the check kind does not use is a mistake (a forgotten `kind`, most likely):
    /// say so rather than ignore it. The keys are checked in the order listed.
    fn stray_health_keys(
        &self,
        i: usize,
        kind: RawCheckKind,
        raw: &RawHealth,
    ) -> Result<(), ConfigError> {
        let stray = [
            (
                "path",
                raw.path.as_ref().map(Spanned::span),
                RawCheckKind::Http,
            ),
            (
                "expect_status",
                raw.expect_status.as_ref().map(Spanned::span),
                RawCheckKind::Http,
            ),
            (
                "host",
                raw.host.as_ref().map(Spanned::span),
                RawCheckKind::Http,
            ),
            (
                "send",
                raw.send.as_ref().map(Spanned::span),
                RawCheckKind::Udp,
            ),
            (
                "expect",
                raw.expect.as_ref().map(Spanned::span),
                RawCheckKind::Udp,
            ),
            // Active checks are what bring a backend back there, not a hold-off.
            (
                "passive_timeout",
                raw.passive_timeout.as_ref().map(Spanned::span),
                RawCheckKind::None,
            ),
        ];
        for (key, span, needs) in stray {
            if let Some(span) = span.filter(|_| kind != needs) {
                return Err(self.invalid(
                    span,
                    format!("service[{i}].health.{key}"),
                    format!("`{key}` applies only to kind = \"{}\"", needs.name()),
                ));
            }
        }
        Ok(())
    }

    /// `rise` or `fall`: `1..=100`, `default` when absent.
    fn check_count(
        &self,
        i: usize,
        v: Option<Spanned<u32>>,
        default: u32,
        key: &str,
    ) -> Result<u32, ConfigError> {
        match v {
            None => Ok(default),
            Some(v) if (1..=100).contains(v.get_ref()) => Ok(v.into_inner()),
            Some(v) => Err(self.invalid(
                v.span(),
                format!("service[{i}].health.{key}"),
                format!("{} is out of range 1..=100", v.get_ref()),
            )),
        }
    }

    /// The check `kind` (at `span`, or `0..0` when defaulted) must suit the service's
    /// protocol; then its own keys.
    fn check_kind(
        &self,
        i: usize,
        protocol: Protocol,
        kind: RawCheckKind,
        span: Range<usize>,
        raw: RawHealth,
    ) -> Result<CheckKind, ConfigError> {
        let wrong_protocol = |message: &str| {
            Err(self.invalid(
                span.clone(),
                format!("service[{i}].health.kind"),
                message.into(),
            ))
        };
        match kind {
            RawCheckKind::Tcp => {
                if protocol == Protocol::Udp {
                    return wrong_protocol(
                        "a `tcp` check cannot check a UDP service; use `udp` or `none`",
                    );
                }
                Ok(CheckKind::Tcp)
            }
            RawCheckKind::Http => {
                if protocol == Protocol::Udp {
                    return wrong_protocol(
                        "an `http` check cannot check a UDP service; use `udp` or `none`",
                    );
                }
                self.http_check(i, raw)
            }
            RawCheckKind::Udp => {
                if protocol == Protocol::Tcp {
                    return wrong_protocol(
                        "a `udp` check cannot check a TCP service; use `tcp`, `http` or `none`",
                    );
                }
                Ok(CheckKind::Udp {
                    send: raw
                        .send
                        .map_or_else(|| "ping".into(), Spanned::into_inner)
                        .into_bytes(),
                    expect: raw.expect.map(|e| e.into_inner().into_bytes()),
                })
            }
            RawCheckKind::None => Ok(CheckKind::None),
        }
    }

    /// An `http` check's `path` (starts with `/`, default `/`), then `expect_status` (an
    /// HTTP status, default 200), then `host` (the `Host` header's value, printable ASCII
    /// without spaces, default the backend's address).
    fn http_check(&self, i: usize, raw: RawHealth) -> Result<CheckKind, ConfigError> {
        let f = |k: &str| format!("service[{i}].health.{k}");
        let path = match raw.path {
            None => "/".to_string(),
            Some(p) if p.get_ref().starts_with('/') => p.into_inner(),
            Some(p) => {
                return Err(self.invalid(
                    p.span(),
                    f("path"),
                    format!("`{}` must start with `/`", p.get_ref()),
                ))
            }
        };
        let expect_status = match raw.expect_status {
            None => 200,
            Some(s) if (100..=599).contains(s.get_ref()) => s.into_inner(),
            Some(s) => {
                return Err(self.invalid(
                    s.span(),
                    f("expect_status"),
                    format!("{} is not an HTTP status (100..=599)", s.get_ref()),
                ))
            }
        };
        // A header value: no space or control byte may split or end it.
        let is_host = |h: &str| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic());
        let host = match raw.host {
            None => None,
            Some(h) if is_host(h.get_ref()) => Some(h.into_inner()),
            Some(h) => {
                let why = format!(
                    "{:?} is not a host name: printable ASCII without spaces, e.g. \"app.example\"",
                    h.get_ref()
                );
                return Err(self.invalid(h.span(), f("host"), why));
            }
        };
        Ok(CheckKind::Http {
            path,
            expect_status,
            host,
        })
    }
}
