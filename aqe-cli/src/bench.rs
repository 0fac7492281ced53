//! `aqe bench AGENT`: request/response latency (percentiles, at a chosen concurrency) and
//! one-way throughput to an agent of the fleet, between processes or hosts, like `nats bench`.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aqe_agent::Agent;
use aqe_core::{AgentId, Payload, RequestOptions};

use crate::cli::BenchArgs;
use crate::error::CliError;
use crate::join;

/// Prints `done` of `total` on stderr about once a second, on one line, until dropped.
struct Progress {
    stop: tokio::sync::watch::Sender<bool>,
}

impl Progress {
    fn start(what: &'static str, total: u64, done: Arc<AtomicU64>) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        // A line rewritten in place is for a person watching, not for a pipe or a file.
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return Self { stop };
        }
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let n = done.load(Ordering::Relaxed);
                eprint!(
                    "\r{what}: {n}/{total} ({:.0}/s)   ",
                    n as f64 / started.elapsed().as_secs_f64()
                );
                let _ = std::io::stderr().flush();
            }
            eprint!("\r{:60}\r", "");
        });
        Self { stop }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) async fn run(a: BenchArgs) -> Result<(), CliError> {
    if a.concurrency == 0 {
        return Err(CliError::Usage("--concurrency must be at least 1"));
    }
    if cfg!(debug_assertions) {
        eprintln!(
            "aqe bench: this is a debug build, many times slower than a release one; build with --release for figures that mean something"
        );
    }
    let transport = join::transport(&a.join, false).await?.transport;
    let me = Agent::builder()
        .agent_type("cli")
        .transport(transport)
        .start()
        .await?;
    let to = AgentId::from(a.to.as_str());
    let outcome = measure(&me, &to, &a).await;
    me.shutdown().await;
    me.transport().shutdown().await;
    let figures = outcome?;
    match a.format {
        crate::cli::Format::Text => figures.print(),
        crate::cli::Format::Json => println!("{}", crate::ops::json(&figures)),
    }
    Ok(())
}

/// What a run measured.
#[derive(serde::Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct Figures {
    size: usize,
    concurrency: usize,
    requests: Option<RequestFigures>,
    one_way: Option<OneWayFigures>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct RequestFigures {
    count: usize,
    seconds: f64,
    per_second: f64,
    min_us: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    max_us: f64,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct OneWayFigures {
    count: u64,
    seconds: f64,
    per_second: f64,
    megabytes_per_second: f64,
    failed: u64,
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl Figures {
    fn print(&self) {
        if let Some(r) = &self.requests {
            println!(
                "request/response: {} requests of {} B, {} at once, in {:.2} s ({:.0} req/s)",
                r.count, self.size, self.concurrency, r.seconds, r.per_second
            );
            println!(
                "  latency min {:.1} us  p50 {:.1} us  p90 {:.1} us  p99 {:.1} us  max {:.1} us",
                r.min_us, r.p50_us, r.p90_us, r.p99_us, r.max_us
            );
        }
        if let Some(m) = &self.one_way {
            println!(
                "one-way: {} messages of {} B taken in {:.2} s: {:.0} msgs/s, {:.1} MB/s{}",
                m.count,
                self.size,
                m.seconds,
                m.per_second,
                m.megabytes_per_second,
                if m.failed > 0 {
                    format!(", {} failed", m.failed)
                } else {
                    String::new()
                }
            );
        }
    }
}

async fn measure(me: &Agent, to: &AgentId, a: &BenchArgs) -> Result<Figures, CliError> {
    let mut figures = Figures {
        size: a.size,
        concurrency: a.concurrency,
        ..Figures::default()
    };
    join::agent_known(me, to, &a.join).await?;
    let payload = Payload::raw(vec![0x61u8; a.size]);
    let options = RequestOptions {
        channel: a.channel.as_str().into(),
        ..RequestOptions::default()
    };
    // A few requests first: connections, streams and caches warm.
    for _ in 0..a.requests.min(100) {
        me.request_payload(to, payload.clone(), options.clone())
            .await?;
    }
    if a.requests > 0 {
        let done = Arc::new(AtomicU64::new(0));
        let progress = Progress::start("requests", a.requests, done.clone());
        let started = Instant::now();
        let per_worker = a.requests.div_ceil(a.concurrency as u64);
        let workers = (0..a.concurrency).map(|w| {
            let (payload, options, done) = (payload.clone(), options.clone(), done.clone());
            let n = per_worker.min(a.requests.saturating_sub(w as u64 * per_worker));
            async move {
                let mut times = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let t = Instant::now();
                    me.request_payload(to, payload.clone(), options.clone())
                        .await?;
                    times.push(t.elapsed());
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, aqe_core::Error>(times)
            }
        });
        let results = futures::future::join_all(workers).await;
        let elapsed = started.elapsed();
        drop(progress);
        let mut times = Vec::new();
        for r in results {
            times.extend(r?);
        }
        times.sort_unstable();
        figures.requests = Some(RequestFigures {
            count: times.len(),
            seconds: elapsed.as_secs_f64(),
            per_second: times.len() as f64 / elapsed.as_secs_f64(),
            min_us: micros(percentile(&times, 0.0)),
            p50_us: micros(percentile(&times, 0.5)),
            p90_us: micros(percentile(&times, 0.9)),
            p99_us: micros(percentile(&times, 0.99)),
            max_us: micros(percentile(&times, 1.0)),
        });
    }
    if a.messages > 0 {
        let done = Arc::new(AtomicU64::new(0));
        let progress = Progress::start("messages", a.messages, done.clone());
        let started = Instant::now();
        for _ in 0..a.messages {
            me.send_payload(to, payload.clone(), a.channel.as_str())
                .await?;
            done.fetch_add(1, Ordering::Relaxed);
        }
        // Until the receiver has taken them all: throughput is what arrived.
        let deadline = Instant::now() + Duration::from_secs(60);
        while me.stats().messages_unconfirmed > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = started.elapsed();
        drop(progress);
        figures.one_way = Some(OneWayFigures {
            count: a.messages,
            seconds: elapsed.as_secs_f64(),
            per_second: a.messages as f64 / elapsed.as_secs_f64(),
            megabytes_per_second: (a.messages * a.size as u64) as f64 / elapsed.as_secs_f64() / 1e6,
            failed: me.stats().messages_failed,
        });
    }
    Ok(figures)
}
