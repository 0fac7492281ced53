//! The demo is part of the test suite: it must run and reach the right answer, on the bus
//! and over QUIC (where QUIC must carry everything, with no fallback to the bus).

use std::path::Path;
use std::sync::Arc;

use aqe_agent::EventBus;
use aqe_core::{HealthStatus, Transport};
use aqe_examples::coordination::{Report, TASKS, run};

fn check(report: &Report) {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_fleet_runs_every_pattern_on_the_bus() {
    let bus = Arc::new(EventBus::new());
    let report = run(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("agents"),
        bus.clone(),
    )
    .await
    .expect("demo");
    check(&report);
    assert!(report.endpoints.is_empty());
    assert!(bus.peers().is_empty(), "the fleet shut down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_fleet_runs_every_pattern_over_quic() {
    // `RUST_LOG=aqe_agent=info` says why anything fell back.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let bus = Arc::new(EventBus::new());
    let report = run(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("agents-quic"),
        bus.clone(),
    )
    .await
    .expect("demo");
    check(&report);
    assert_eq!(report.endpoints.len(), 3, "a hub and two zones");
    assert!(
        report.endpoints.iter().all(|(_, conns)| *conns == 2),
        "a full mesh: {:?}",
        report.endpoints
    );
    for (id, _, stats) in &report.health {
        assert_eq!(stats.fallbacks_used, 0, "{id} fell back to the bus");
        assert!(
            stats.rtt.samples > 0 && stats.congestion_window.is_some(),
            "{id}: QUIC figures"
        );
    }
    assert!(bus.peers().is_empty(), "the fleet shut down");
}
