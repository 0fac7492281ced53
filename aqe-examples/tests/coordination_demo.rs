//! The demo is part of the test suite: it must run and reach the right answer.

use std::path::Path;
use std::sync::Arc;

use aqe_agent::EventBus;
use aqe_core::HealthStatus;
use aqe_examples::coordination::{TASKS, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_fleet_runs_every_pattern_correctly() {
    let bus = Arc::new(EventBus::new());
    let report = run(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("agents"),
        bus.clone(),
    )
    .await
    .expect("demo");
    assert_eq!(report.workers.len(), 4);
    assert_eq!(report.primes, report.expected_primes);
    assert_eq!(report.expected_primes, 6057, "primes below 60 000");
    assert_eq!(report.metrics.len(), 4);
    for m in &report.metrics {
        assert_eq!((m.results_known, m.config_revision), (TASKS, 2), "{m:?}");
    }
    assert_eq!(
        report.metrics.iter().map(|m| m.tasks_run).sum::<u32>(),
        TASKS
    );
    assert_eq!(
        report.samples.iter().map(|s| s.seq).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    assert_eq!(report.health.len(), 7);
    assert!(
        report
            .health
            .iter()
            .all(|(_, h, _)| h.status == HealthStatus::Healthy)
    );
    assert!(
        aqe_core::Transport::peers(&*bus).is_empty(),
        "the fleet shut down"
    );
}
