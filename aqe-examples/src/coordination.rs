//! The coordination demo: a fleet started from definition files runs the guide's patterns.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use aqe_agent::{Agent, AgentBuilder, Fleet, HandlerError};
use std::collections::HashSet;

use aqe_agent::AgentDefinition;
use aqe_core::{
    AgentId, BroadcastOptions, DiscoveryOptions, Health, RequestOptions, Stats, StreamOptions,
    Transport,
};
use tokio::sync::{mpsc, oneshot};

use crate::protocol::{
    FleetMsg, MetricSample, Query, Task, TaskResult, WorkerMetrics, count_primes,
};

/// How many shards the commander hands out, and how large each is.
pub const TASKS: u32 = 12;
/// How many times the aggregator asks before reporting incomplete views.
const MAX_ROUNDS: u32 = 100;

/// Numbers per task.
pub const SHARD: u64 = 5_000;

/// What the demo did, for printing and for checking.
#[derive(Debug)]
pub struct Report {
    /// Executors the commander discovered.
    pub workers: Vec<String>,
    /// Primes counted by the fleet.
    pub primes: u64,
    /// Primes counted directly, to check the fleet.
    pub expected_primes: u64,
    /// Each executor's answer to the aggregator.
    pub metrics: Vec<WorkerMetrics>,
    /// How many rounds of queries it took for every executor to know every result.
    pub rounds: u32,
    /// Samples the commander received over the monitor's stream.
    pub samples: Vec<MetricSample>,
    /// Health and statistics of every agent.
    pub health: Vec<(String, Health, Stats)>,
    /// How long the patterns took.
    pub elapsed: Duration,
    /// The fleet's QUIC endpoints: listen address and how many endpoints each is connected to.
    pub endpoints: Vec<(String, usize)>,
}

#[derive(Default)]
struct WorkerState {
    revision: u32,
    run: u32,
    known: BTreeMap<u32, u64>,
}

/// Adds each agent type's handlers to its builder.
fn customize(
    def: &AgentDefinition,
    builder: AgentBuilder,
    done_tx: &mpsc::UnboundedSender<u32>,
    samples_tx: &Arc<Mutex<Option<oneshot::Sender<Vec<MetricSample>>>>>,
) -> AgentBuilder {
    match def.agent_type.as_str() {
        "test-executor" => executor(builder),
        "fleet-commander" => {
            let done_tx = done_tx.clone();
            let samples_tx = samples_tx.clone();
            builder
                .on_message(move |_agent, env| {
                    let done_tx = done_tx.clone();
                    async move {
                        if let Ok(FleetMsg::Done { task }) = env.decode() {
                            let _ = done_tx.send(task);
                        }
                    }
                })
                .on_stream(move |_agent, mut stream| {
                    let samples_tx = samples_tx.clone();
                    async move {
                        let mut samples = Vec::new();
                        while let Some(Ok(chunk)) = stream.next().await {
                            if !chunk.data.is_empty() {
                                match aqe_core::decode::<MetricSample>(&chunk.data) {
                                    Ok(s) => samples.push(s),
                                    Err(e) => tracing::warn!(error = %e, "bad metric sample"),
                                }
                            }
                            if chunk.fin {
                                break;
                            }
                        }
                        if let Some(tx) =
                            samples_tx.lock().unwrap_or_else(|p| p.into_inner()).take()
                        {
                            let _ = tx.send(samples);
                        }
                    }
                })
        }
        _ => builder,
    }
}

/// An executor: runs tasks, shares results with its peers, merges theirs, answers queries.
fn executor(builder: AgentBuilder) -> AgentBuilder {
    let state = Arc::new(Mutex::new(WorkerState::default()));
    let on_request_state = state.clone();
    builder
        .on_message(move |agent, env| {
            let state = state.clone();
            async move {
                let msg: FleetMsg = match env.decode() {
                    Ok(m) => m,
                    Err(e) => return tracing::warn!(agent = %agent.id(), error = %e, "undecodable message"),
                };
                match msg {
                    FleetMsg::Config { revision } => state.lock().unwrap_or_else(|p| p.into_inner()).revision = revision,
                    FleetMsg::Execute(task) => {
                        // CPU work goes to the blocking pool, never onto a runtime thread.
                        let primes = tokio::task::spawn_blocking(move || count_primes(task.start, task.end))
                            .await
                            .unwrap_or_default();
                        {
                            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                            s.run += 1;
                            s.known.insert(task.id, primes);
                        }
                        let result = TaskResult { task: task.id, worker: agent.id().to_string(), primes };
                        // Peer-to-peer: share the result with every executor on `findings`.
                        match agent.broadcast_to_fleet(&FleetMsg::Share(result), BroadcastOptions::on("findings")).await {
                            Ok(report) if report.is_complete() => {}
                            Ok(report) => tracing::warn!(failed = ?report.failed, "some peers missed a result"),
                            Err(e) => tracing::warn!(error = %e, "sharing a result failed"),
                        }
                        if let Err(e) = agent.send_to_agent(&env.from, &FleetMsg::Done { task: task.id }, "results").await {
                            tracing::warn!(error = %e, "reporting completion failed");
                        }
                    }
                    FleetMsg::Share(r) => {
                        state.lock().unwrap_or_else(|p| p.into_inner()).known.insert(r.task, r.primes);
                    }
                    FleetMsg::Done { .. } => {}
                }
            }
        })
        .on_request(move |agent, req| {
            let state = on_request_state.clone();
            async move {
                match req.decode::<Query>()? {
                    Query::Metrics => {
                        let s = state.lock().unwrap_or_else(|p| p.into_inner());
                        Ok::<_, HandlerError>(WorkerMetrics {
                            worker: agent.id().to_string(),
                            config_revision: s.revision,
                            tasks_run: s.run,
                            results_known: s.known.len() as u32,
                            primes_known: s.known.values().sum(),
                        })
                    }
                }
            }
        })
}

/// Waits until every agent sees every other one and, over QUIC, until every endpoint knows
/// every agent hosted on QUIC (bootstrap dials and peer exchange take a moment; until then
/// the bus would carry the traffic as fallback).
async fn await_mesh(fleet: &Fleet) -> anyhow::Result<()> {
    let others = fleet.agents().len().saturating_sub(1);
    for a in fleet.agents() {
        let mut events = a.events();
        let meshed = tokio::time::timeout(Duration::from_secs(30), async {
            while a.discover_peers(&DiscoveryOptions::default()).len() < others {
                if events.recv().await.is_none() {
                    return false;
                }
            }
            true
        })
        .await;
        ensure!(
            matches!(meshed, Ok(true)),
            "{} did not discover the whole fleet in 30 s",
            a.id()
        );
    }
    let quic: Vec<_> = fleet.endpoints::<aqe_agent::QuicTransport>().collect();
    let on_quic =
        |q: &aqe_agent::QuicTransport| q.peers().into_iter().map(|p| p.id).collect::<HashSet<_>>();
    let all: HashSet<AgentId> = quic.iter().flat_map(|q| on_quic(q)).collect();
    for q in &quic {
        let mut events = q.subscribe();
        let meshed = tokio::time::timeout(Duration::from_secs(30), async {
            while on_quic(q).len() < all.len() {
                let _ = events.recv().await;
            }
        })
        .await;
        ensure!(
            meshed.is_ok(),
            "QUIC endpoint {} did not learn of every agent in 30 s",
            q.local_addr()
        );
    }
    Ok(())
}

fn agent<'a>(fleet: &'a Fleet, id: &str) -> anyhow::Result<&'a Agent> {
    fleet
        .get(&id.into())
        .with_context(|| format!("the fleet has no agent {id:?}"))
}

/// Starts the fleet defined in `agents_dir` on `transport`, runs the four patterns, and
/// shuts the fleet down.
///
/// # Errors
/// When an agent cannot start, a pattern fails, or the fleet's answer is wrong.
pub async fn run(agents_dir: &Path, transport: Arc<dyn Transport>) -> anyhow::Result<Report> {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let (samples_tx, samples_rx) = oneshot::channel();
    let samples_tx = Arc::new(Mutex::new(Some(samples_tx)));
    let fleet = Fleet::from_dir(agents_dir, transport, |def, b| {
        customize(def, b, &done_tx, &samples_tx)
    })
    .await
    .with_context(|| format!("starting the fleet from {}", agents_dir.display()))?;
    let outcome = patterns(&fleet, &mut done_rx, samples_rx).await;
    fleet.shutdown().await;
    outcome
}

async fn patterns(
    fleet: &Fleet,
    done_rx: &mut mpsc::UnboundedReceiver<u32>,
    samples_rx: oneshot::Receiver<Vec<MetricSample>>,
) -> anyhow::Result<Report> {
    await_mesh(fleet).await?;
    let started = Instant::now();
    let commander = agent(fleet, "commander")?;
    let aggregator = agent(fleet, "aggregator")?;
    let monitor = agent(fleet, "monitor")?;

    // 1. Hierarchical: discover the executors, configure them, hand out tasks round-robin.
    let workers = commander.discover_peers(
        &DiscoveryOptions::default()
            .with_filter(|p| p.agent_type.as_str() == "test-executor")
            .with_max_peers(10),
    );
    ensure!(!workers.is_empty(), "no executor discovered");
    let config = commander
        .broadcast_to_fleet(
            &FleetMsg::Config { revision: 2 },
            BroadcastOptions::default(),
        )
        .await?;
    ensure!(
        config.is_complete(),
        "configuration broadcast failed for {:?}",
        config.failed
    );
    for id in 0..TASKS {
        let task = Task {
            id,
            start: u64::from(id) * SHARD,
            end: u64::from(id + 1) * SHARD,
        };
        let worker = &workers[id as usize % workers.len()].id;
        commander
            .send_to_agent(worker, &FleetMsg::Execute(task), "coordination")
            .await?;
    }
    let mut done = 0;
    while done < TASKS {
        match tokio::time::timeout(Duration::from_secs(30), done_rx.recv()).await {
            Ok(Some(_)) => done += 1,
            Ok(None) => bail!("the commander stopped"),
            Err(_) => bail!("only {done} of {TASKS} tasks finished in 30 s"),
        }
    }

    // 2. Peer-to-peer results were shared by the executors; 3. the aggregator asks every
    // executor, in parallel, what it knows. Shares travel on other paths than the queries (over
    // QUIC, other connections), so a query can overtake a share still in flight: the
    // aggregator asks again until every view is complete, as a fleet converges.
    let peers = aggregator.discover_peers(&DiscoveryOptions::default().with_channel("findings"));
    let opts = RequestOptions::default()
        .with_timeout(Duration::from_secs(2))
        .with_retries(1);
    let mut rounds = 0;
    let metrics = loop {
        rounds += 1;
        let answers = futures::future::join_all(peers.iter().map(|p| {
            aggregator.request_from_agent::<_, WorkerMetrics>(&p.id, &Query::Metrics, opts.clone())
        }))
        .await;
        let metrics = answers.into_iter().collect::<aqe_core::Result<Vec<_>>>()?;
        if metrics.iter().all(|m| m.results_known == TASKS) || rounds == MAX_ROUNDS {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let primes = metrics.iter().map(|m| m.primes_known).max().unwrap_or(0);
    let expected_primes = count_primes(0, u64::from(TASKS) * SHARD);

    // 4. Streaming: the monitor streams samples to the commander on the metrics channel.
    let stream = monitor
        .open_stream(
            commander.id(),
            StreamOptions::default().with_channel("metrics"),
        )
        .await?;
    for seq in 0..5 {
        let sample = MetricSample {
            seq,
            peers: monitor.discover_peers(&DiscoveryOptions::default()).len() as u32,
            messages_received: monitor.stats().messages_received,
        };
        monitor
            .write_stream(stream, aqe_core::encode(&sample)?, false)
            .await?;
    }
    monitor.close_stream(stream).await?;
    let samples = tokio::time::timeout(Duration::from_secs(10), samples_rx)
        .await
        .context("stream end")??;
    let elapsed = started.elapsed();

    let health = fleet
        .agents()
        .iter()
        .map(|a| (a.id().to_string(), a.health(), a.stats()))
        .collect();
    let endpoints = fleet
        .endpoints::<aqe_agent::QuicTransport>()
        .map(|q| (q.local_addr().to_string(), q.connections()))
        .collect();
    Ok(Report {
        workers: workers.into_iter().map(|p| p.id.to_string()).collect(),
        primes,
        expected_primes,
        metrics,
        rounds,
        samples,
        health,
        elapsed,
        endpoints,
    })
}
