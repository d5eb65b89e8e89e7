//! The `[service.health]` rules: the check kind each protocol allows, its keys, and the
//! counts and durations.

use std::time::Duration;

use toml::Spanned;

use super::raw::{RawCheckKind, RawHealth};
use super::validate::Validator;
use super::{CheckKind, ConfigError, HealthCheck, Protocol, DEFAULT_PASSIVE_TIMEOUT};

impl Validator<'_> {
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
        let raw = raw.into_inner();
        let (kind_raw, span) = match raw.kind {
            Some(k) => (*k.get_ref(), k.span()),
            None => (default_kind, 0..0),
        };
        let count = |v: Option<Spanned<u32>>, default: u32, key: &str| match v {
            None => Ok(default),
            Some(v) if (1..=100).contains(v.get_ref()) => Ok(v.into_inner()),
            Some(v) => Err(self.invalid(
                v.span(),
                f(key),
                format!("{} is out of range 1..=100", v.get_ref()),
            )),
        };
        // A key that the check kind does not use is a mistake (a forgotten `kind`, most
        // likely): say so rather than ignore it.
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
            if let Some(span) = span.filter(|_| kind_raw != needs) {
                let needs = match needs {
                    RawCheckKind::Http => "http",
                    RawCheckKind::Udp => "udp",
                    _ => "none",
                };
                return Err(self.invalid(
                    span,
                    f(key),
                    format!("`{key}` applies only to kind = \"{needs}\""),
                ));
            }
        }
        let rise = count(raw.rise, 2, "rise")?;
        let fall = count(raw.fall, 3, "fall")?;
        let interval = self.positive(raw.interval, Duration::from_secs(2), || f("interval"))?;
        let timeout = self.positive(raw.timeout, Duration::from_secs(1), || f("timeout"))?;
        let passive_timeout =
            self.positive(raw.passive_timeout, DEFAULT_PASSIVE_TIMEOUT, || {
                f("passive_timeout")
            })?;
        let kind = match kind_raw {
            RawCheckKind::Tcp => {
                if protocol == Protocol::Udp {
                    return Err(self.invalid(
                        span,
                        f("kind"),
                        "a `tcp` check cannot check a UDP service; use `udp` or `none`".into(),
                    ));
                }
                CheckKind::Tcp
            }
            RawCheckKind::Http => {
                if protocol == Protocol::Udp {
                    return Err(self.invalid(
                        span,
                        f("kind"),
                        "an `http` check cannot check a UDP service; use `udp` or `none`".into(),
                    ));
                }
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
                CheckKind::Http {
                    path,
                    expect_status,
                }
            }
            RawCheckKind::Udp => {
                if protocol == Protocol::Tcp {
                    return Err(self.invalid(
                        span,
                        f("kind"),
                        "a `udp` check cannot check a TCP service; use `tcp`, `http` or `none`"
                            .into(),
                    ));
                }
                CheckKind::Udp {
                    send: raw
                        .send
                        .map_or_else(|| "ping".into(), Spanned::into_inner)
                        .into_bytes(),
                    expect: raw.expect.map(|e| e.into_inner().into_bytes()),
                }
            }
            RawCheckKind::None => CheckKind::None,
        };
        Ok(HealthCheck {
            kind,
            interval,
            timeout,
            rise,
            fall,
            passive_timeout,
        })
    }
}
