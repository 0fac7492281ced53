//! What each benchmark measured, per operation: criterion drives the runs (warm-up, sample
//! counts, its own statistics and reports), and every timed operation is also recorded here so
//! that the report gives true per-operation medians and 99th percentiles, which criterion's
//! per-sample means cannot.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::BenchmarkGroup;
use criterion::measurement::WallTime;
use serde::Serialize;
use tokio::runtime::Runtime;

/// What one benchmark is: the fields of a `report.json` entry that name it.
#[derive(Debug, Clone, Serialize)]
pub struct Spec {
    /// The guide's operation: `direct`, `broadcast10`, `request_response`, ...
    pub op: &'static str,
    /// `bus`, `quic`, `nats`, or a floor (`floor_...`).
    pub transport: &'static str,
    /// Bytes of payload per message.
    pub payload_bytes: usize,
    /// `ordered` or `unordered`, where the operation depends on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<&'static str>,
    /// Concurrent requesters, for request/response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
}

impl Spec {
    /// Whether `other` names the same benchmark.
    fn same(&self, other: &Spec) -> bool {
        self.op == other.op
            && self.transport == other.transport
            && self.payload_bytes == other.payload_bytes
            && self.channel == other.channel
            && self.concurrency == other.concurrency
    }

    /// A latency benchmark of `op` on `transport` with `payload_bytes` of payload.
    pub fn new(op: &'static str, transport: &'static str, payload_bytes: usize) -> Self {
        Self {
            op,
            transport,
            payload_bytes,
            channel: None,
            concurrency: None,
        }
    }

    /// On an `ordered` or `unordered` channel.
    pub fn channel(mut self, channel: &'static str) -> Self {
        self.channel = Some(channel);
        self
    }

    /// With `n` concurrent requesters.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(n);
        self
    }

    /// The criterion id within its group.
    fn id(&self) -> String {
        let mut id = format!("{}/{}B", self.transport, self.payload_bytes);
        if let Some(c) = self.channel {
            id.push('/');
            id.push_str(c);
        }
        if let Some(n) = self.concurrency {
            id.push_str(&format!("/x{n}"));
        }
        id
    }
}

/// One line of the results: a [`Spec`] and what was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// What was measured.
    #[serde(flatten)]
    pub spec: Spec,
    /// Median time per operation (per batch, for throughput and bulk), microseconds.
    pub median_us: f64,
    /// 99th percentile of the same.
    pub p99_us: f64,
    /// Messages per second (throughput).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msgs_per_s: Option<f64>,
    /// Megabytes (10^6 bytes) of payload per second (throughput and bulk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mb_per_s: Option<f64>,
    /// Operations timed.
    pub samples: usize,
    /// Allocations per message (volume benchmarks): one more run after criterion's,
    /// counted by the binary's global allocator on every thread, sender and receiver alike.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocs_per_msg: Option<f64>,
    /// Its ratio to its floor measured in alternating rounds ([`Bench::paired`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paired: Option<Paired>,
}

/// A ratio to a floor measured in rounds that alternate the two sides, a fraction of a second
/// each: this VM's speed drifts by up to 1.7x over minutes, and two blocks measured minutes
/// apart (criterion's) compare the drift as much as the code. Oriented as the report's ratio:
/// aqe's time over the floor's for latencies, the floor's over aqe's for volumes (rates).
#[derive(Debug, Clone, Serialize)]
pub struct Paired {
    /// The floor it was paired with.
    pub floor: &'static str,
    /// The median of the rounds' ratios.
    pub ratio: f64,
    /// The lowest round's ratio.
    pub low: f64,
    /// The highest round's ratio.
    pub high: f64,
    /// Rounds run.
    pub rounds: usize,
}

/// Memory figures, measured outside criterion.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// What was counted: `idle_agent` or `connection`.
    pub what: &'static str,
    /// Where: `bus` or `quic`.
    pub transport: &'static str,
    /// How many were created.
    pub count: usize,
    /// Resident memory added per item, KiB.
    pub kib_each: f64,
}

/// Everything measured in this run, written to `raw.json` at the end.
#[derive(Default, Serialize)]
pub struct Results {
    /// Latency and volume figures.
    pub results: Vec<Measured>,
    /// Memory figures.
    pub memory: Vec<Memory>,
    /// Benchmarks skipped, and why.
    pub skipped: Vec<String>,
}

impl Results {
    /// Where the results go: `$AQE_BENCH_OUT`, or `target/aqe-bench/raw.json`.
    pub fn path() -> PathBuf {
        std::env::var_os("AQE_BENCH_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/aqe-bench/raw.json")
            })
    }

    /// Writes them as JSON.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write(&self) -> std::io::Result<()> {
        let path = Self::path();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json)
    }
}

/// Operation times recorded while criterion runs a benchmark; the most recent are kept (the
/// measurement comes after the warm-up).
#[derive(Clone, Default)]
struct Samples(Arc<Mutex<Vec<Duration>>>);

const KEEP: usize = 200_000;

impl Samples {
    fn push(&self, d: Duration) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() >= KEEP {
            v.drain(..KEEP / 2);
        }
        v.push(d);
    }

    fn take(&self) -> Vec<Duration> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Runs `n` copies of `op` at once and returns how long each took: concurrent requesters.
pub(crate) async fn concurrently<F, Fut>(n: usize, op: F) -> Vec<Duration>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    futures::future::join_all((0..n).map(|_| {
        let fut = op();
        async move {
            let t = Instant::now();
            fut.await;
            t.elapsed()
        }
    }))
    .await
}

/// Rounds of a paired measurement: odd, so that the median is one round's.
const PAIRED_ROUNDS: usize = 9;
/// About how long one side of a paired round runs.
const PAIRED_SIDE: Duration = Duration::from_millis(100);

/// An operation a paired round times.
trait TimedOp {
    /// Runs it once: how long it took.
    async fn time(&self) -> Duration;
}

/// An operation timed from outside, as one.
struct Once<F>(F);

impl<F, Fut> TimedOp for Once<F>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    async fn time(&self) -> Duration {
        let t = Instant::now();
        (self.0)().await;
        t.elapsed()
    }
}

/// An operation that times itself; several at once take the longest.
struct Each<F>(F);

impl<F, Fut> TimedOp for Each<F>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Vec<Duration>>,
{
    async fn time(&self) -> Duration {
        (self.0)().await.into_iter().max().unwrap_or_default()
    }
}

/// The median seconds per operation of `n` runs of `op`, one after another.
async fn side(op: &impl TimedOp, n: usize) -> f64 {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        times.push(op.time().await);
    }
    times.sort_unstable();
    percentile(&times, 0.5).as_secs_f64().max(1e-12)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs benchmarks in one criterion group and keeps what they measured.
pub struct Bench<'a, 'c> {
    group: BenchmarkGroup<'c, WallTime>,
    rt: &'a Runtime,
    results: &'a mut Results,
}

impl<'a, 'c> Bench<'a, 'c> {
    /// Benchmarks in `group`, run on `rt`, recorded into `results`.
    pub fn new(
        group: BenchmarkGroup<'c, WallTime>,
        rt: &'a Runtime,
        results: &'a mut Results,
    ) -> Self {
        Self { group, rt, results }
    }

    /// The criterion group, to configure.
    pub fn group(&mut self) -> &mut BenchmarkGroup<'c, WallTime> {
        &mut self.group
    }

    /// Times `op`, one operation per call.
    pub fn latency<F, Fut>(&mut self, spec: Spec, op: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()>,
    {
        self.timed(spec, None, move || {
            let fut = op();
            async move {
                let t = Instant::now();
                fut.await;
                vec![t.elapsed()]
            }
        });
    }

    /// Times `op`, which runs several operations and returns how long each took (concurrent
    /// requesters).
    pub fn each<F, Fut>(&mut self, spec: Spec, op: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Vec<Duration>>,
    {
        self.timed(spec, None, op);
    }

    /// Times `op`, which moves `msgs` messages carrying `bytes` bytes of payload in all.
    pub fn volume<F, Fut>(&mut self, spec: Spec, msgs: u64, bytes: u64, op: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()>,
    {
        self.group.throughput(criterion::Throughput::Bytes(bytes));
        let op = &op;
        let before = self.results.results.len();
        self.timed(spec, Some((msgs, bytes)), move || {
            let fut = op();
            async move {
                let t = Instant::now();
                fut.await;
                vec![t.elapsed()]
            }
        });
        if self.results.results.len() == before {
            return; // filtered out
        }
        let region = stats_alloc::Region::new(crate::GLOBAL);
        self.rt.block_on(op());
        let counted = region.change();
        let Some(last) = self.results.results.last_mut() else {
            return;
        };
        last.allocs_per_msg = Some(counted.allocations as f64 / msgs.max(1) as f64);
    }

    fn timed<F, Fut>(&mut self, spec: Spec, volume: Option<(u64, u64)>, op: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Vec<Duration>>,
    {
        let samples = Samples::default();
        let rec = samples.clone();
        let rt = self.rt;
        self.group.bench_function(spec.id(), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let rec = rec.clone();
                let op = &op;
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let times = op().await;
                        // Concurrent operations: the iteration costs its longest.
                        total += times.iter().max().copied().unwrap_or_default();
                        for t in times {
                            rec.push(t);
                        }
                    }
                    total
                }
            })
        });
        let mut times = samples.take();
        if times.is_empty() {
            return; // filtered out
        }
        times.sort_unstable();
        let median = percentile(&times, 0.5);
        let p99 = percentile(&times, 0.99);
        let (msgs_per_s, mb_per_s) = match volume {
            Some((msgs, bytes)) => {
                let secs = median.as_secs_f64().max(1e-9);
                (Some(msgs as f64 / secs), Some(bytes as f64 / secs / 1e6))
            }
            None => (None, None),
        };
        self.results.results.push(Measured {
            spec,
            median_us: median.as_secs_f64() * 1e6,
            p99_us: p99.as_secs_f64() * 1e6,
            msgs_per_s,
            mb_per_s,
            samples: times.len(),
            allocs_per_msg: None,
            paired: None,
        });
    }

    /// Notes a benchmark that could not run here.
    pub fn skipped(&mut self, why: impl Into<String>) {
        let why = why.into();
        eprintln!("skipped: {why}");
        self.results.skipped.push(why);
    }

    /// Measures the ratio of `aqe` (an operation measured in this group) to `floor` (its
    /// floor, also measured) again in [`PAIRED_ROUNDS`] rounds, each running one side for about
    /// [`PAIRED_SIDE`] and then the other (which goes first alternates), and records the median
    /// of the rounds' ratios on `aqe`'s entry. Each side's figure in a round is its median time
    /// per operation. Skipped when either was filtered out.
    pub fn paired<F, FF, A, AF>(&mut self, aqe: &Spec, floor: &Spec, floor_op: F, aqe_op: A)
    where
        F: Fn() -> FF,
        FF: Future<Output = ()>,
        A: Fn() -> AF,
        AF: Future<Output = ()>,
    {
        self.pair(aqe, floor, &Once(floor_op), &Once(aqe_op));
    }

    /// [`Bench::paired`] for operations that time themselves, as [`Bench::each`] takes (an
    /// operation's time is the longest it returns).
    pub fn paired_each<F, FF, A, AF>(&mut self, aqe: &Spec, floor: &Spec, floor_op: F, aqe_op: A)
    where
        F: Fn() -> FF,
        FF: Future<Output = Vec<Duration>>,
        A: Fn() -> AF,
        AF: Future<Output = Vec<Duration>>,
    {
        self.pair(aqe, floor, &Each(floor_op), &Each(aqe_op));
    }

    fn pair(&mut self, aqe: &Spec, floor: &Spec, floor_op: &impl TimedOp, aqe_op: &impl TimedOp) {
        let find = |s: &Spec| self.results.results.iter().position(|m| m.spec.same(s));
        let (Some(f), Some(a)) = (find(floor), find(aqe)) else {
            return; // filtered out
        };
        // Operations per side: about PAIRED_SIDE's worth at criterion's median, at least 3.
        let per_side = |i: usize| {
            let median = self.results.results[i].median_us.max(1.0) * 1e-6;
            ((PAIRED_SIDE.as_secs_f64() / median) as usize).clamp(3, 10_000)
        };
        let (nf, na) = (per_side(f), per_side(a));
        let volume = self.results.results[a].msgs_per_s.is_some()
            || self.results.results[a].mb_per_s.is_some();
        let mut ratios: Vec<f64> = (0..PAIRED_ROUNDS)
            .map(|round| {
                let (tf, ta) = self.rt.block_on(async {
                    if round % 2 == 0 {
                        let tf = side(floor_op, nf).await;
                        (tf, side(aqe_op, na).await)
                    } else {
                        let ta = side(aqe_op, na).await;
                        (side(floor_op, nf).await, ta)
                    }
                });
                if volume { tf / ta } else { ta / tf }
            })
            .collect();
        ratios.sort_unstable_by(f64::total_cmp);
        self.results.results[a].paired = Some(Paired {
            floor: floor.transport,
            ratio: ratios[ratios.len() / 2],
            low: ratios[0],
            high: ratios[ratios.len() - 1],
            rounds: ratios.len(),
        });
    }

    /// Ends the group.
    pub fn finish(self) {
        self.group.finish();
    }
}
