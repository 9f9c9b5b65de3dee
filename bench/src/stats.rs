//! The few statistics the benchmark needs. Samples are at most a few thousand per round, so
//! sorting a `Vec` is exact and fast enough; no histogram needed.

use std::time::Duration;

/// The nearest-rank `quantile` (0..=1) of `samples`; zero for no samples.
pub fn percentile(samples: &mut [Duration], quantile: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = (quantile * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

pub fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// The median of per-round numbers (the mean of the middle two for an even count); `None`
/// for no rounds.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    })
}

/// About the events/s a stream of one persistence id reaches with `window` events unanswered,
/// inserted one batch at a time by a writer that sends everything queued when an insert
/// completes, from two measured insert rates of one id (`small` events per insert at
/// `small_rate` events/s, `large` at `large_rate`), taking an insert of `s` events to last
/// `a + b·s`. When a batch completes, what is queued is the window minus that batch, so two
/// consecutive batches hold the whole window between them and the stream runs at
/// `window / (2a + window·b)`, however the window splits. `None` when the two rates do not
/// give a positive `a` and `b` (a noisy run).
pub fn window_estimate(
    small: f64,
    small_rate: f64,
    large: f64,
    large_rate: f64,
    window: f64,
) -> Option<f64> {
    let small_insert = small / small_rate;
    let large_insert = large / large_rate;
    let per_event = (large_insert - small_insert) / (large - small);
    let fixed = small_insert - small * per_event;
    (per_event > 0.0 && fixed > 0.0 && window > 0.0)
        .then(|| window / (2.0 * fixed + window * per_event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_estimate_from_two_insert_rates() {
        // Inserts of 1 ms + 10 µs per event: 100 events in 2 ms, 1,000 in 11 ms.
        let bound = window_estimate(100.0, 50_000.0, 1000.0, 1000.0 / 0.011, 800.0).unwrap();
        // 800 / (2 ms + 8 ms)
        assert!((bound - 80_000.0).abs() < 1e-6, "{bound}");
        // Larger inserts no faster per event than small ones: no fixed cost to share.
        assert_eq!(
            window_estimate(100.0, 50_000.0, 1000.0, 40_000.0, 800.0),
            None
        );
        assert_eq!(
            window_estimate(100.0, 50_000.0, 1000.0, 50_000.0, 800.0),
            None
        );
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&mut samples, 0.50), Duration::from_millis(50));
        assert_eq!(percentile(&mut samples, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&mut samples, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&mut samples, 0.0), Duration::from_millis(1));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
