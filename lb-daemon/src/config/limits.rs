//! A service's `[service.limits]`: per-client connection and new-connection-rate limits.

use super::raw::RawLimits;
use super::validate::Validator;
use super::{ClientLimits, ConfigError};

impl Validator<'_> {
    /// `max_connections_per_client`, `new_connections_per_second`, then `burst` (which needs
    /// the rate); each up to a million. No table means no limits.
    pub(super) fn limits(
        &self,
        i: usize,
        raw: Option<RawLimits>,
    ) -> Result<ClientLimits, ConfigError> {
        let f = |k: &str| format!("service[{i}].limits.{k}");
        let Some(raw) = raw else {
            return Ok(ClientLimits::default());
        };
        const MAX: u32 = 1_000_000;
        let max_connections = match raw.max_connections_per_client {
            None => None,
            Some(m) if (1..=MAX).contains(m.get_ref()) => Some(m.into_inner()),
            Some(m) => {
                return Err(self.invalid(
                    m.span(),
                    f("max_connections_per_client"),
                    format!("{} is out of range 1..={MAX}", m.get_ref()),
                ))
            }
        };
        let rate = match raw.new_connections_per_second {
            None => None,
            Some(r)
                if r.get_ref().is_finite()
                    && *r.get_ref() > 0.0
                    && *r.get_ref() <= f64::from(MAX) =>
            {
                Some(r.into_inner())
            }
            Some(r) => {
                return Err(self.invalid(
                    r.span(),
                    f("new_connections_per_second"),
                    format!("{} must be above 0 and at most {MAX}", r.get_ref()),
                ))
            }
        };
        let burst = match (raw.burst, rate) {
            (None, None) => 0,
            // Like nginx's limit_req without `burst`: no more than the rate allows.
            (None, Some(r)) => r.ceil() as u32,
            (Some(b), None) => {
                return Err(self.invalid(
                    b.span(),
                    f("burst"),
                    "burst needs new_connections_per_second".into(),
                ))
            }
            (Some(b), Some(_)) if (1..=MAX).contains(b.get_ref()) => b.into_inner(),
            (Some(b), Some(_)) => {
                return Err(self.invalid(
                    b.span(),
                    f("burst"),
                    format!("{} is out of range 1..={MAX}", b.get_ref()),
                ))
            }
        };
        Ok(ClientLimits {
            max_connections,
            rate,
            burst,
        })
    }
}
