//! Pieces shared by the deterministic simulations (`replication/tests/simulation.rs`,
//! `cloud/tests/hub_simulation.rs`): an in-order link pipe with delays, and a seed runner.
//! Test support, public so that other crates' tests can use it; nothing in the product uses it.

use std::collections::VecDeque;

/// One direction of a simulated link: messages in order (as one QUIC stream gives them), each
/// with the step it may be delivered at.
#[derive(Debug)]
pub struct Pipe<T> {
    queue: VecDeque<(u64, T)>,
}

impl<T> Default for Pipe<T> {
    fn default() -> Self {
        Pipe {
            queue: VecDeque::new(),
        }
    }
}

impl<T> Pipe<T> {
    /// Queues `message` sent at step `now`, to arrive `delay` steps later but never before the
    /// message ahead of it.
    pub fn push(&mut self, now: u64, delay: u64, message: T) {
        let at = self.queue.back().map_or(0, |(t, _)| *t).max(now + delay);
        self.queue.push_back((at, message));
    }

    /// The next message if it has arrived by step `now`.
    pub fn pop_ready(&mut self, now: u64) -> Option<T> {
        if self.queue.front().is_some_and(|(t, _)| *t <= now) {
            return self.queue.pop_front().map(|(_, m)| m);
        }
        None
    }

    /// Messages in flight.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Loses everything in flight (the connection and its streams are gone).
    pub fn clear(&mut self) {
        self.queue.clear();
    }
}

/// The seeds to run: `SIM_SEED=S` runs only S; `SIM_SEEDS=N` runs 0..N (default 1,000).
///
/// # Panics
/// If either variable is not a number.
pub fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("SIM_SEED") {
        return vec![seed.parse().expect("SIM_SEED is a number")];
    }
    let count: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .map(|n| n.parse().expect("SIM_SEEDS is a number"))
        .unwrap_or(1_000);
    (0..count).collect()
}

/// Runs `run` for every seed, on as many threads as the machine has. `run` returns (steps,
/// messages delivered) and panics on a failed check.
///
/// # Errors
/// The seeds whose run panicked (at most one per thread: a thread stops at its first).
pub fn run_seeds(
    seeds: &[u64],
    run: impl Fn(u64) -> (u64, u64) + Sync,
) -> Result<(u64, u64), Vec<u64>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let run = &run;
    let results: Vec<Result<(u64, u64), u64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let chunk: Vec<u64> = seeds.iter().copied().skip(t).step_by(threads).collect();
                scope.spawn(move || {
                    let mut total = (0, 0);
                    for seed in chunk {
                        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(seed))) {
                            Ok((steps, delivered)) => {
                                total.0 += steps;
                                total.1 += delivered;
                            }
                            Err(_) => return Err(seed),
                        }
                    }
                    Ok(total)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("simulation thread"))
            .collect()
    });
    let failed: Vec<u64> = results.iter().filter_map(|r| r.err()).collect();
    if !failed.is_empty() {
        return Err(failed);
    }
    Ok(results
        .iter()
        .filter_map(|r| r.ok())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)))
}
