//! Medians and ranges of repeated measurements.

use serde::Serialize;

/// The median and range of one figure's samples (one sample per round).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// The median; for an even count, the mean of the two middle samples.
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
    /// How many samples there were.
    pub n: usize,
}

/// Summarizes `samples`, ignoring NaN and infinite ones (a failed measurement).
///
/// Returns `None` when no finite sample is left.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// The `q`-quantile (0.0..=1.0) of `sorted` by the nearest-rank method; `None` when empty.
///
/// `sorted` must be in ascending order (latency samples sorted once, read twice).
pub fn quantile(sorted: &[u32], q: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_an_odd_count_is_the_middle_sample() {
        let s = summarize(&[3.0, 1.0, 2.0]).expect("three samples");
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
    }

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let s = summarize(&[4.0, 1.0, 2.0, 10.0]).expect("four samples");
        assert_eq!(s.median, 3.0, "median of 1, 2, 4, 10");
        assert_eq!((s.min, s.max), (1.0, 10.0));
    }

    #[test]
    fn failed_samples_are_left_out_and_none_left_means_no_figure() {
        let s = summarize(&[f64::NAN, 5.0, f64::INFINITY]).expect("one finite sample");
        assert_eq!((s.median, s.n), (5.0, 1));
        assert_eq!(
            summarize(&[f64::NAN]),
            None,
            "no finite sample gives no figure"
        );
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), Some(50));
        assert_eq!(quantile(&v, 0.99), Some(99));
        assert_eq!(quantile(&v, 1.0), Some(100));
        assert_eq!(quantile(&[7], 0.99), Some(7));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
