//! Reconnect delays: exponential backoff with full jitter (AWS architecture blog's "Full
//! Jitter"). A fleet that lost its cloud at the same instant spreads its reconnects evenly over
//! the window instead of arriving in synchronized waves.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// How reconnect delays grow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffConfig {
    /// Upper bound of the first delay.
    pub initial: Duration,
    /// Upper bound no delay exceeds.
    pub max: Duration,
    /// Growth of the upper bound per failed attempt.
    pub multiplier: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(200),
            // A node must be back within seconds of the cloud's return (field report 8),
            // so the ceiling is low; full jitter still spreads a fleet's reconnects evenly
            // over it (10,000 nodes: ~2,000 handshakes a second).
            max: Duration::from_secs(5),
            multiplier: 2.0,
        }
    }
}

/// Sans-IO backoff state: ask for the next delay, reset after a good connection.
#[derive(Debug)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
    rng: SmallRng,
}

impl Backoff {
    /// Delays with randomness seeded from the OS.
    pub fn new(config: BackoffConfig) -> Self {
        Backoff::with_rng(config, SmallRng::from_os_rng())
    }

    /// Deterministic delays, for tests and simulation.
    pub fn seeded(config: BackoffConfig, seed: u64) -> Self {
        Backoff::with_rng(config, SmallRng::seed_from_u64(seed))
    }

    fn with_rng(config: BackoffConfig, rng: SmallRng) -> Self {
        Backoff {
            config,
            attempt: 0,
            rng,
        }
    }

    /// The current upper bound: `min(max, initial * multiplier^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let growth = self
            .config
            .multiplier
            .max(1.0)
            .powi(self.attempt.min(64) as i32);
        let ceiling = self.config.initial.as_secs_f64() * growth;
        Duration::from_secs_f64(ceiling.min(self.config.max.as_secs_f64()))
    }

    /// A uniformly random delay in `[0, ceiling]`; the ceiling then grows.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        if ceiling.is_zero() {
            return ceiling;
        }
        Duration::from_secs_f64(self.rng.random_range(0.0..=ceiling.as_secs_f64()))
    }

    /// Back to the initial ceiling, after a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_grows_to_max_and_delays_stay_below_it() {
        let config = BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            multiplier: 2.0,
        };
        let mut backoff = Backoff::seeded(config, 7);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay();
            assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(&ceilings[..6], &[100, 200, 400, 800, 1600, 2000]);
        assert!(ceilings[6..].iter().all(|&c| c == 2000));
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn delays_are_spread_over_the_whole_window() {
        let config = BackoffConfig {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(10),
            multiplier: 2.0,
        };
        let mut backoff = Backoff::seeded(config, 1);
        let delays: Vec<f64> = (0..1000)
            .map(|_| backoff.next_delay().as_secs_f64())
            .collect();
        let below_half = delays.iter().filter(|&&d| d < 5.0).count();
        // Uniform on [0, 10]: about half fall below 5 s (binomial, 1000 draws, seeded).
        assert!((400..600).contains(&below_half), "{below_half}");
        assert!(delays.iter().any(|&d| d < 1.0) && delays.iter().any(|&d| d > 9.0));
    }
}
