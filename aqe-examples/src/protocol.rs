//! The demo fleet's messages: typed, closed enums encoded with postcard.

use serde::{Deserialize, Serialize};

/// A shard of work: count the primes in `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Task number.
    pub id: u32,
    /// First number of the range.
    pub start: u64,
    /// One past the last number.
    pub end: u64,
}

/// What an executor found for a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The task.
    pub task: u32,
    /// Who ran it.
    pub worker: String,
    /// Primes found in the range.
    pub primes: u64,
}

/// One-way messages of the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FleetMsg {
    /// Commander to all: new settings.
    Config {
        /// A setting executors report back, to show the broadcast arrived.
        revision: u32,
    },
    /// Commander to one executor: run this.
    Execute(Task),
    /// Executor to its peers: a result to merge.
    Share(TaskResult),
    /// Executor to commander: a task is finished.
    Done {
        /// The task.
        task: u32,
    },
}

/// Requests an aggregator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// What have you done and what do you know?
    Metrics,
}

/// An executor's answer to [`Query::Metrics`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerMetrics {
    /// The executor.
    pub worker: String,
    /// Config revision it last received.
    pub config_revision: u32,
    /// Tasks it ran itself.
    pub tasks_run: u32,
    /// Results it knows, its own and merged from peers.
    pub results_known: u32,
    /// Sum of primes over the results it knows.
    pub primes_known: u64,
}

/// A sample the monitor streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSample {
    /// Sample number.
    pub seq: u32,
    /// Peers the monitor sees.
    pub peers: u32,
    /// Messages the monitor has received so far.
    pub messages_received: u64,
}

/// Counts primes in `start..end` by trial division (deliberately plain CPU work).
pub fn count_primes(start: u64, end: u64) -> u64 {
    (start..end).filter(|&n| is_prime(n)).count() as u64
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes_below_100() {
        assert_eq!(count_primes(0, 100), 25);
        assert_eq!(count_primes(0, 10) + count_primes(10, 100), 25);
    }
}
