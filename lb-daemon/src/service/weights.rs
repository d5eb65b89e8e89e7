//! A backend's weight: the configured one, an admin override, a drain, and slow start.
//!
//! - The base weight is the admin API's when one was set, else the configured one; a new
//!   configured weight (a reload, or a DNS name that now gives another) clears the admin one.
//! - The effective weight, the one the scheduler gets, counts in [`WEIGHT_SCALE`]ths of a
//!   configured unit: 0 while drained, else `WEIGHT_SCALE` × the base weight, ramping from 1
//!   to that during slow start (HAProxy's `slowstart`, nginx's `slow_start`). Scaled so that
//!   a backend of weight 1, the default, ramps too (HAProxy scales its weights by 16 for the
//!   same reason); every scheduler and the Maglev table go by ratios of weights, which the
//!   scale leaves as they are.
//! - Pure: time is passed in, and whether the backend is up or leaving is the caller's to
//!   apply.

use std::time::{Duration, Instant};

/// Effective weights per unit of configured weight (see the module docs).
pub const WEIGHT_SCALE: u32 = 16;

/// The weight state of one backend (kept under the service's lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Weight {
    /// The weight of the backend's first source (see [`super::BackendSource`]): the config
    /// file's for a static address, else its first DNS name's.
    configured: u32,
    /// A weight set through the admin API; cleared when the configured one changes.
    admin: Option<u32>,
    /// Drained through the admin API: weight 0 until enabled.
    drained: bool,
    /// Slow start began here (the backend came up, was enabled or added).
    ramp_start: Option<Instant>,
}

impl Weight {
    /// A backend at `configured` weight, not drained, not ramping.
    pub(super) fn new(configured: u32) -> Weight {
        Weight {
            configured,
            admin: None,
            drained: false,
            ramp_start: None,
        }
    }

    /// The weight its first source gives it.
    pub(super) fn configured(&self) -> u32 {
        self.configured
    }

    /// The admin API's weight if one was set, else the configured one.
    pub(super) fn base(&self) -> u32 {
        self.admin.unwrap_or(self.configured)
    }

    /// Whether the admin API drained the backend.
    pub(super) fn drained(&self) -> bool {
        self.drained
    }

    /// The weight the admin API set, if any.
    pub(super) fn admin(&self) -> Option<u32> {
        self.admin
    }

    /// Takes on what an older daemon's admin API set (an upgrade): `drained`, and `admin`
    /// (the admin weight and the configured weight it was set over) unless this backend's
    /// configured weight is another one now. No slow start: the backend was serving so.
    pub(super) fn carry_over(&mut self, drained: bool, admin: Option<(u32, u32)>) {
        self.drained |= drained;
        if let Some((weight, over)) = admin {
            if over == self.configured {
                self.admin = Some(weight);
            }
        }
    }

    /// Records the configured weight; a different one clears the admin weight.
    pub(super) fn set_configured(&mut self, weight: u32) {
        if weight != self.configured {
            self.configured = weight;
            self.admin = None;
        }
    }

    /// Starts slow start at `now` (the backend came up, returned or was added).
    pub(super) fn start_ramp(&mut self, now: Instant) {
        self.ramp_start = Some(now);
    }

    /// Drains the backend: weight 0 until [`Weight::enable`].
    pub(super) fn drain(&mut self) {
        self.drained = true;
    }

    /// Ends a drain, by [`Weight::drain`] or by an admin weight of 0 (the configured weight
    /// counts again); the weight then ramps up again from `now`. No change otherwise: a
    /// configured weight of 0 stays.
    pub(super) fn enable(&mut self, now: Instant) {
        let was_out = self.effective(None, now) == 0;
        self.drained = false;
        if self.admin == Some(0) {
            self.admin = None;
        }
        if was_out && self.effective(None, now) > 0 {
            self.ramp_start = Some(now);
        }
    }

    /// Sets the admin weight. Going from an effective 0 to a positive weight is a return to
    /// service, like [`Weight::enable`]: it ramps from `now`.
    pub(super) fn set_admin(&mut self, weight: u32, now: Instant) {
        if self.effective(None, now) == 0 && weight > 0 {
            self.ramp_start = Some(now);
        }
        self.admin = Some(weight);
    }

    /// Ends slow start once the ramp ran its length, or at once when `slow_start` is off.
    pub(super) fn finish_ramp(&mut self, slow_start: Option<Duration>, now: Instant) {
        match (self.ramp_start, slow_start) {
            (Some(t), Some(ramp)) if now.duration_since(t) >= ramp => self.ramp_start = None,
            (_, None) => self.ramp_start = None,
            _ => {}
        }
    }

    /// The weight the scheduler gets now (if the backend is up and not leaving), in
    /// [`WEIGHT_SCALE`]ths: 0 while drained, else the base weight × `WEIGHT_SCALE`, ramping
    /// from 1 to that during `slow_start` (`None`: off).
    pub(super) fn effective(&self, slow_start: Option<Duration>, now: Instant) -> u32 {
        if self.drained {
            return 0;
        }
        // At most MAX_WEIGHT × 16 = 4096.
        let full = self.base() * WEIGHT_SCALE;
        match (slow_start, self.ramp_start) {
            (Some(ramp), Some(t)) if full > 0 && now.duration_since(t) < ramp => {
                let part = now.duration_since(t).as_secs_f64() / ramp.as_secs_f64();
                ((f64::from(full) * part) as u32).clamp(1, full)
            }
            _ => full,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_configured_weight_clears_the_admin_weight_and_the_same_one_keeps_it() {
        let now = Instant::now();
        let mut w = Weight::new(10);
        w.set_admin(3, now);
        w.set_configured(10);
        assert_eq!(
            w.base(),
            3,
            "an unchanged configured weight must keep the admin one"
        );
        w.set_configured(20);
        assert_eq!(
            w.base(),
            20,
            "a new configured weight must clear the admin one"
        );
    }

    #[test]
    fn an_admin_weight_from_zero_ramps_and_one_between_two_weights_does_not() {
        let t0 = Instant::now();
        let ramp = Some(Duration::from_secs(10));
        let mut w = Weight::new(0);
        w.set_admin(100, t0);
        assert_eq!(
            w.effective(ramp, t0),
            1,
            "weight 0 -> 100 is a return: it ramps"
        );
        let mut w = Weight::new(50);
        w.set_admin(100, t0);
        assert_eq!(
            w.effective(ramp, t0),
            100 * WEIGHT_SCALE,
            "weight 50 -> 100 applies at once"
        );
    }

    #[test]
    fn a_ramp_ends_after_its_length_or_at_once_without_slow_start() {
        let t0 = Instant::now();
        let ramp = Some(Duration::from_secs(10));
        let mut w = Weight::new(100);
        w.start_ramp(t0);
        w.finish_ramp(ramp, t0 + Duration::from_secs(9));
        assert_eq!(
            w.effective(ramp, t0 + Duration::from_secs(5)),
            50 * WEIGHT_SCALE
        );
        w.finish_ramp(ramp, t0 + Duration::from_secs(10));
        assert_eq!(
            w.effective(ramp, t0 + Duration::from_secs(5)),
            100 * WEIGHT_SCALE
        );
        w.start_ramp(t0);
        w.finish_ramp(None, t0);
        assert_eq!(
            w.effective(ramp, t0),
            100 * WEIGHT_SCALE,
            "slow start turned off ends a ramp"
        );
    }
}
