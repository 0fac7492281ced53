//! `cargo xtask bench [--quick] [criterion arguments]`: runs the guide benchmarks
//! (`benches/benches/guide.rs`) pinned to CPU 0 with `taskset` when available (a wake-up that
//! crosses CPUs costs tens of microseconds on a small VM), then prints the comparison and
//! writes `target/aqe-bench/report.md`, `report.json` and `report.svg`.
//!
//! `--quick` shortens criterion's warm-up and measurement (under 5 minutes on 2 cores once
//! built); the default takes criterion's usual times (about 15 minutes). `--check` then exits
//! non-zero when a target is missed or a ratio to its floor got worse than in
//! `benches/baseline.json` by more than [`TOLERANCE`]; `--save-baseline` makes this run the
//! baseline.
//!
//! Ratios: for latencies, aqe's median over its floor's (lower is better); for throughput and
//! bulk, aqe's rate over its floor's (higher is better).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// The floor each aqe figure is compared with, by operation and transport.
fn floor_of(op: &str, transport: &str, concurrency: Option<u64>) -> Option<&'static str> {
    Some(match (op, transport) {
        (_, "bus") if op.starts_with("broadcast") => "floor_tokio_broadcast",
        ("bulk" | "setup", "bus") => return None,
        (_, "bus") => "floor_tokio_mpsc",
        ("direct" | "throughput", "quic") => "floor_s2n_stream",
        ("request_response", "quic") if concurrency.is_some() => "floor_s2n_new_stream",
        ("request_response", "quic") => "floor_s2n_same_stream",
        ("stream1000", "quic") => "floor_s2n_write_each",
        (_, "quic") if op.starts_with("broadcast") => "floor_s2n_fanout",
        ("bulk", _) => "floor_s2n_stream",
        ("setup", "quic") => "floor_s2n_handshake",
        ("direct" | "throughput" | "stream1000", "nats") => "floor_nats_publish",
        ("request_response", "nats") => "floor_nats_request",
        (_, "nats") if op.starts_with("broadcast") => "floor_nats_fanout",
        ("setup", "nats") => "floor_nats_connect",
        ("priority_request", "quic") => "floor_unloaded",
        _ => return None,
    })
}

/// The guide's claimed range for an operation, ms: (event bus, QUIC).
fn guide_claim(op: &str) -> Option<((f64, f64), (f64, f64))> {
    Some(match op {
        "direct" => ((5.0, 10.0), (1.0, 2.0)),
        "broadcast10" => ((50.0, 100.0), (5.0, 10.0)),
        "request_response" => ((15.0, 30.0), (3.0, 5.0)),
        "stream1000" => ((500.0, 1000.0), (100.0, 200.0)),
        _ => return None,
    })
}

/// The channel column of the batched throughput rows (as the benchmark writes it).
const BATCHED_ORDERED: &str = "ordered, send_many";
/// The same, unordered.
const BATCHED_UNORDERED: &str = "unordered, send_many";

fn is_volume(op: &str) -> bool {
    op == "throughput" || op == "bulk"
}

pub(crate) fn bench(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let check = args.iter().any(|a| a == "--check");
    let save = args.iter().any(|a| a == "--save-baseline");
    let extra: Vec<&String> = args
        .iter()
        .filter(|a| !["--quick", "--check", "--save-baseline"].contains(&a.as_str()))
        .collect();
    let out_dir = root.join("target").join("aqe-bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let raw = out_dir.join("raw.json");
    let _ = std::fs::remove_file(&raw);

    // Built first on every CPU; only the run is pinned.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let bench_args = ["bench", "--locked", "-p", "aqe-benches", "--bench", "guide"];
    let status = Command::new(&cargo)
        .current_dir(root)
        .args(bench_args)
        .arg("--no-run")
        .status()
        .context("building the benchmarks")?;
    if !status.success() {
        bail!("building the benchmarks failed: {status}");
    }
    let pinned = Command::new("taskset")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let mut cmd = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", &cargo]);
        c
    } else {
        eprintln!("taskset not found: running unpinned (figures are then much noisier)");
        Command::new(&cargo)
    };
    cmd.current_dir(root)
        .env("AQE_BENCH_OUT", &raw)
        .args(bench_args)
        .arg("--");
    if quick {
        cmd.args([
            "--warm-up-time",
            "0.2",
            "--measurement-time",
            "0.6",
            "--nresamples",
            "2000",
            "--noplot",
        ]);
    }
    cmd.args(extra);
    let status = cmd.status().context("running cargo bench")?;
    if !status.success() {
        bail!("cargo bench failed: {status}");
    }
    let text =
        std::fs::read_to_string(&raw).with_context(|| format!("reading {}", raw.display()))?;
    let raw: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", raw.display()))?;
    let report = Report::build(&raw, pinned, quick);
    let md = report.markdown();
    println!("\n{md}");
    std::fs::write(out_dir.join("report.md"), &md)?;
    std::fs::write(
        out_dir.join("report.json"),
        serde_json::to_string_pretty(&report.json())?,
    )?;
    std::fs::write(out_dir.join("report.svg"), report.svg())?;
    println!(
        "written: {0}/report.md, {0}/report.json, {0}/report.svg",
        out_dir.display()
    );
    let baseline = root.join("benches").join("baseline.json");
    if save {
        std::fs::write(&baseline, serde_json::to_string_pretty(&report.json())?)?;
        println!("baseline saved: {}", baseline.display());
    }
    if check {
        let base: Value = serde_json::from_str(
            &std::fs::read_to_string(&baseline)
                .with_context(|| format!("reading {}", baseline.display()))?,
        )
        .with_context(|| format!("parsing {}", baseline.display()))?;
        let mut problems: Vec<String> = report
            .targets()
            .into_iter()
            .filter(|t| t.met != Some(true))
            .map(|t| {
                format!(
                    "target missed: {} (goal {}, measured {})",
                    t.what, t.goal, t.measured
                )
            })
            .collect();
        problems.extend(report.regressions(&base));
        if !problems.is_empty() {
            bail!(
                "--check: {} problem(s):\n  {}",
                problems.len(),
                problems.join("\n  ")
            );
        }
        println!(
            "--check: every target met, no figure regressed past {TOLERANCE:.0}%",
            TOLERANCE = TOLERANCE * 100.0
        );
    }
    Ok(())
}

/// How far a ratio to its floor may move the wrong way from the baseline before `--check`
/// calls it a regression: quick runs of the same code on the 2-vCPU machine differ by up to
/// about a fifth in these ratios.
const TOLERANCE: f64 = 0.25;

/// One figure of the report.
#[derive(Clone)]
struct Row {
    entry: Value,
    op: String,
    transport: String,
    payload: u64,
    channel: Option<String>,
    concurrency: Option<u64>,
    median_us: f64,
    p99_us: f64,
    msgs_per_s: Option<f64>,
    mb_per_s: Option<f64>,
    floor: Option<(String, f64)>,
}

impl Row {
    fn is_floor(&self) -> bool {
        self.transport.starts_with("floor_")
    }

    fn label(&self) -> String {
        let mut s = format!("{} {} {}", self.op, size(self.payload), self.transport);
        if let Some(c) = &self.channel {
            s.push_str(&format!(" {c}"));
        }
        if let Some(n) = self.concurrency {
            s.push_str(&format!(" x{n}"));
        }
        s
    }

    /// The report's ratio and floor cells: a paired ratio with its rounds' range.
    fn ratio_cells(&self) -> (String, String) {
        let Some((f, x)) = &self.floor else {
            return (String::new(), String::new());
        };
        let paired = &self.entry["paired"];
        match (paired["low"].as_f64(), paired["high"].as_f64()) {
            (Some(lo), Some(hi)) => (format!("{x:.2}x (paired, {lo:.2}-{hi:.2})"), f.clone()),
            _ => (format!("{x:.2}x"), f.clone()),
        }
    }

    /// The figure a ratio compares: rate for volume operations, median otherwise.
    fn figure(&self) -> f64 {
        if is_volume(&self.op) {
            self.mb_per_s.unwrap_or(0.0)
        } else {
            self.median_us
        }
    }
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

fn time(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1e3)
    } else if us >= 1_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{us:.1} us")
    }
}

/// A target on a ratio to the floor: (what, op, transport, payload, channel, bound, whether
/// the bound is a maximum).
type RatioTarget = (
    &'static str,
    &'static str,
    &'static str,
    u64,
    Option<&'static str>,
    f64,
    bool,
);

struct Target {
    what: String,
    goal: String,
    measured: String,
    met: Option<bool>,
}

struct Report {
    rows: Vec<Row>,
    memory: Vec<Value>,
    skipped: Vec<String>,
    pinned: bool,
    quick: bool,
}

impl Report {
    fn build(raw: &Value, pinned: bool, quick: bool) -> Self {
        let empty = Vec::new();
        let entries = raw["results"].as_array().unwrap_or(&empty);
        let mut rows: Vec<Row> = entries
            .iter()
            .map(|e| Row {
                entry: e.clone(),
                op: e["op"].as_str().unwrap_or_default().to_owned(),
                transport: e["transport"].as_str().unwrap_or_default().to_owned(),
                payload: e["payload_bytes"].as_u64().unwrap_or(0),
                channel: e["channel"].as_str().map(str::to_owned),
                concurrency: e["concurrency"].as_u64(),
                median_us: e["median_us"].as_f64().unwrap_or(0.0),
                p99_us: e["p99_us"].as_f64().unwrap_or(0.0),
                msgs_per_s: e["msgs_per_s"].as_f64(),
                mb_per_s: e["mb_per_s"].as_f64(),
                floor: None,
            })
            .collect();
        let snapshot = rows.clone();
        for r in rows.iter_mut().filter(|r| !r.is_floor()) {
            let Some(name) = floor_of(&r.op, &r.transport, r.concurrency) else {
                continue;
            };
            let floor = snapshot.iter().find(|f| {
                f.transport == name
                    && f.op == r.op
                    && f.payload == r.payload
                    && f.concurrency == r.concurrency
            });
            if let Some(f) = floor {
                r.floor = Some((name.to_owned(), r.figure() / f.figure().max(1e-9)));
            }
            // Measured in alternating rounds against the same floor: the ratio that does not
            // compare the VM's drift between two blocks minutes apart.
            let paired = &r.entry["paired"];
            if let (Some(x), Some(name)) = (paired["ratio"].as_f64(), paired["floor"].as_str()) {
                r.floor = Some((name.to_owned(), x));
            }
        }
        Self {
            rows,
            memory: raw["memory"].as_array().cloned().unwrap_or_default(),
            skipped: raw["skipped"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            pinned,
            quick,
        }
    }

    fn find(&self, op: &str, transport: &str, payload: u64, channel: Option<&str>) -> Option<&Row> {
        self.rows.iter().find(|r| {
            r.op == op
                && r.transport == transport
                && r.payload == payload
                && r.channel.as_deref() == channel
                && r.concurrency.is_none()
        })
    }

    fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        let ratio = |op: &str, transport: &str, payload: u64, channel: Option<&str>| {
            self.find(op, transport, payload, channel)
                .and_then(|r| r.floor.as_ref().map(|(f, x)| (f.clone(), *x)))
        };
        // The hot-path issue's goals: throughput through `send_many` batches, latencies as
        // single operations.
        let ratios: [RatioTarget; 9] = [
            (
                "bus throughput 64 B (send_many) vs tokio mpsc",
                "throughput",
                "bus",
                64,
                Some(BATCHED_ORDERED),
                0.65,
                false,
            ),
            (
                "QUIC throughput 4 KiB ordered (send_many) vs raw stream",
                "throughput",
                "quic",
                4096,
                Some(BATCHED_ORDERED),
                0.85,
                false,
            ),
            (
                "QUIC throughput 4 KiB unordered (send_many) vs raw stream",
                "throughput",
                "quic",
                4096,
                Some(BATCHED_UNORDERED),
                0.85,
                false,
            ),
            (
                "QUIC 1,000-message stream 64 B vs raw write-each",
                "stream1000",
                "quic",
                64,
                None,
                1.5,
                true,
            ),
            (
                "QUIC broadcast to 10 endpoints, 64 B vs raw fan-out",
                "broadcast10",
                "quic",
                64,
                None,
                1.3,
                true,
            ),
            (
                "QUIC broadcast to 100 agents, 64 B vs raw fan-out",
                "broadcast100",
                "quic",
                64,
                None,
                2.0,
                true,
            ),
            (
                "QUIC endpoint start to first response vs raw handshake",
                "setup",
                "quic",
                64,
                None,
                3.0,
                true,
            ),
            (
                "QUIC request/response 64 B vs raw one-stream",
                "request_response",
                "quic",
                64,
                None,
                1.15,
                true,
            ),
            (
                "QUIC bulk 16 MiB vs raw stream",
                "bulk",
                "quic",
                16 << 20,
                None,
                0.85,
                false,
            ),
        ];
        for (what, op, transport, payload, channel, bound, max) in ratios {
            let r = ratio(op, transport, payload, channel);
            t.push(Target {
                what: what.to_owned(),
                goal: format!("{} {bound}x", if max { "<=" } else { ">=" }),
                measured: r
                    .as_ref()
                    .map(|(f, x)| format!("{x:.2}x {f}"))
                    .unwrap_or_else(|| "not measured".into()),
                met: r.map(|(_, x)| if max { x <= bound } else { x >= bound }),
            });
        }
        // The priority issue's goal: a priority-9 request's p99 while priority-0 traffic
        // saturates its connection, against its unloaded p99.
        let p99 = |transport: &str, channel: &str| {
            self.find("priority_request", transport, 64, Some(channel))
                .map(|r| r.p99_us)
        };
        let unloaded = p99("floor_unloaded", "priority 9");
        let high = p99("quic", "priority 9");
        let flat = p99("quic", "priority 0");
        let loaded = unloaded.zip(high).map(|(u, h)| h / u.max(1e-9));
        t.push(Target {
            what: "QUIC p99 of a priority-9 request under priority-0 load vs unloaded".into(),
            goal: "<= 2x".into(),
            measured: match (loaded, unloaded.zip(flat)) {
                (Some(x), Some((u, f))) => format!(
                    "{x:.1}x ({} vs {}; without priorities {})",
                    time(high.unwrap_or(0.0)),
                    time(u),
                    time(f)
                ),
                _ => "not measured".into(),
            },
            met: loaded.map(|x| x <= 2.0),
        });
        let rate = |transport: &str, channel: Option<&str>| {
            self.find("throughput", transport, 64, channel)
                .and_then(|r| r.msgs_per_s)
        };
        let nats_floor = rate("floor_nats_publish", None);
        let ordered = rate("quic", Some(BATCHED_ORDERED));
        let bar = 1.5e6_f64.max(nats_floor.unwrap_or(0.0));
        t.push(Target {
            what: "QUIC throughput 64 B ordered (send_many): >= 1.5 M/s and above raw NATS publish here".into(),
            goal: format!(">= {:.2} M msgs/s", bar / 1e6),
            measured: ordered
                .map(|r| format!("{:.2} M msgs/s", r / 1e6))
                .unwrap_or_else(|| "not measured".into()),
            met: ordered.map(|r| r >= bar),
        });
        let unordered = rate("quic", Some(BATCHED_UNORDERED));
        t.push(Target {
            what: "QUIC throughput 64 B unordered (send_many)".into(),
            goal: ">= 1.00 M msgs/s".into(),
            measured: unordered
                .map(|r| format!("{:.2} M msgs/s", r / 1e6))
                .unwrap_or_else(|| "not measured".into()),
            met: unordered.map(|r| r >= 1e6),
        });
        let allocs = self
            .find("throughput", "quic", 64, Some(BATCHED_ORDERED))
            .and_then(|r| r.entry["allocs_per_msg"].as_f64());
        t.push(Target {
            what: "allocations per 64 B message, QUIC ordered (send_many), both sides".into(),
            goal: "<= 1".into(),
            measured: allocs
                .map(|a| format!("{a:.1}"))
                .unwrap_or_else(|| "not measured".into()),
            met: allocs.map(|a| a <= 1.0),
        });
        let idle = self
            .memory
            .iter()
            .filter(|m| m["what"] == "idle_agent")
            .filter_map(|m| m["kib_each"].as_f64())
            .fold(None, |acc: Option<f64>, x| {
                Some(acc.map_or(x, |a| a.max(x)))
            });
        t.push(Target {
            what: "resident memory per idle agent (worst of bus/QUIC, 100/1,000 agents)".into(),
            goal: "<= 32 KiB".into(),
            measured: idle
                .map(|k| format!("{k:.1} KiB"))
                .unwrap_or_else(|| "not measured".into()),
            met: idle.map(|k| k <= 32.0),
        });
        // Every figure with a guide claim: at least 20 times better than its lower bound.
        let mut worst: Option<(f64, String)> = None;
        for r in self
            .rows
            .iter()
            .filter(|r| !r.is_floor() && r.concurrency.is_none())
        {
            let Some((bus, quic)) = guide_claim(&r.op) else {
                continue;
            };
            let claim = if r.transport == "bus" { bus.0 } else { quic.0 };
            let better = claim * 1e3 / r.median_us.max(1e-9);
            if worst.as_ref().is_none_or(|(w, _)| better < *w) {
                worst = Some((better, r.label()));
            }
        }
        t.push(Target {
            what: "every figure vs the guide's claim (lower bound)".into(),
            goal: ">= 20x better".into(),
            measured: worst
                .as_ref()
                .map(|(x, l)| format!("worst {x:.0}x ({l})"))
                .unwrap_or_else(|| "not measured".into()),
            met: worst.map(|(x, _)| x >= 20.0),
        });
        t
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## aqe benchmarks\n\n{}, {}; medians and 99th percentiles per operation; ratio = aqe / its floor in the same run (times: lower is better; rates: higher is better).\n",
            if self.pinned {
                "pinned to CPU 0"
            } else {
                "unpinned"
            },
            if self.quick {
                "quick run (`--quick`)"
            } else {
                "full run"
            }
        );
        let _ = writeln!(s, "### Latency\n");
        let _ = writeln!(
            s,
            "| operation | payload | transport | median | p99 | ratio to floor | floor | guide claims |\n|---|---|---|---|---|---|---|---|"
        );
        for r in self.rows.iter().filter(|r| !is_volume(&r.op)) {
            let op = match r.concurrency {
                Some(n) => format!("{} x{n} concurrent", r.op),
                None => r.op.clone(),
            };
            let (ratio, floor) = r.ratio_cells();
            let claim = match (guide_claim(&r.op), r.is_floor(), r.concurrency) {
                (Some((bus, quic)), false, None) => {
                    let (lo, hi) = if r.transport == "bus" { bus } else { quic };
                    format!(
                        "{lo}-{hi} ms ({:.0}x better)",
                        lo * 1e3 / r.median_us.max(1e-9)
                    )
                }
                _ => String::new(),
            };
            let transport = match &r.channel {
                Some(c) => format!("{} ({c})", r.transport),
                None => r.transport.clone(),
            };
            let _ = writeln!(
                s,
                "| {op} | {} | {transport} | {} | {} | {ratio} | {floor} | {claim} |",
                size(r.payload),
                time(r.median_us),
                time(r.p99_us)
            );
        }
        let _ = writeln!(s, "\n### Volume\n");
        let _ = writeln!(
            s,
            "| operation | payload | transport | channel | msgs/s | MB/s | ratio to floor | floor | allocations per message |\n|---|---|---|---|---|---|---|---|---|"
        );
        for r in self.rows.iter().filter(|r| is_volume(&r.op)) {
            let (ratio, floor) = r.ratio_cells();
            let msgs = match r.op.as_str() {
                "throughput" => r
                    .msgs_per_s
                    .map(|m| format!("{:.0} k", m / 1e3))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            let allocs = r.entry["allocs_per_msg"]
                .as_f64()
                .map(|a| format!("{a:.1}"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {msgs} | {:.0} | {ratio} | {floor} | {allocs} |",
                r.op,
                size(r.payload),
                r.transport,
                r.channel.as_deref().unwrap_or(""),
                r.mb_per_s.unwrap_or(0.0)
            );
        }
        let _ = writeln!(
            s,
            "\n### Memory\n\n| what | transport | count | resident KiB each |\n|---|---|---|---|"
        );
        for m in &self.memory {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} |",
                m["what"].as_str().unwrap_or_default(),
                m["transport"].as_str().unwrap_or_default(),
                m["count"],
                m["kib_each"].as_f64().unwrap_or(0.0)
            );
        }
        let _ = writeln!(
            s,
            "\n### Targets\n\n| target | goal | measured | met |\n|---|---|---|---|"
        );
        for t in self.targets() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                t.what,
                t.goal,
                t.measured,
                match t.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "?",
                }
            );
        }
        for k in &self.skipped {
            let _ = writeln!(s, "\nskipped: {k}");
        }
        let _ = writeln!(
            s,
            "\nReproduce: `cargo xtask bench --quick` (or without `--quick` for criterion's full times)."
        );
        s
    }

    /// Figures whose ratio to their floor got worse than in `base` (a `report.json`) by more
    /// than [`TOLERANCE`].
    fn regressions(&self, base: &Value) -> Vec<String> {
        let empty = Vec::new();
        let old = base["results"].as_array().unwrap_or(&empty);
        let mut out = Vec::new();
        for r in self.rows.iter().filter(|r| !r.is_floor()) {
            let Some((_, now)) = &r.floor else {
                continue;
            };
            let was = old.iter().find(|e| {
                e["op"].as_str() == Some(&r.op)
                    && e["transport"].as_str() == Some(&r.transport)
                    && e["payload_bytes"].as_u64() == Some(r.payload)
                    && e["channel"].as_str() == r.channel.as_deref()
                    && e["concurrency"].as_u64() == r.concurrency
            });
            let Some(was) = was.and_then(|e| e["ratio_to_floor"].as_f64()) else {
                continue;
            };
            let worse = if is_volume(&r.op) {
                *now < was * (1.0 - TOLERANCE)
            } else {
                *now > was * (1.0 + TOLERANCE)
            };
            if worse {
                out.push(format!(
                    "regressed: {} ratio {now:.2}x, baseline {was:.2}x",
                    r.label()
                ));
            }
        }
        out
    }

    fn json(&self) -> Value {
        let results: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let mut e = r.entry.clone();
                if let Some((f, x)) = &r.floor {
                    e["floor"] = json!(f);
                    e["ratio_to_floor"] = json!(x);
                }
                e
            })
            .collect();
        let targets: Vec<Value> = self
            .targets()
            .into_iter()
            .map(
                |t| json!({"target": t.what, "goal": t.goal, "measured": t.measured, "met": t.met}),
            )
            .collect();
        json!({
            "pinned": self.pinned,
            "quick": self.quick,
            "ratio": "latency: aqe median / floor median; throughput and bulk: aqe rate / floor rate; where an entry has `paired`, the median of its alternating rounds' ratios",
            "results": results,
            "memory": self.memory,
            "targets": targets,
            "skipped": self.skipped,
        })
    }

    /// A horizontal bar per aqe latency figure: its ratio to its floor, with a line at 1x.
    fn svg(&self) -> String {
        let rows: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| !r.is_floor() && r.floor.is_some())
            .collect();
        let (label_w, bar_w, row_h, top) = (330.0, 520.0, 16.0, 40.0);
        let max = rows
            .iter()
            .filter_map(|r| r.floor.as_ref().map(|f| f.1))
            .fold(2.0_f64, f64::max)
            .min(20.0);
        let height = top + row_h * rows.len() as f64 + 30.0;
        let width = label_w + bar_w + 80.0;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"monospace\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"14\">aqe / floor (latency: time ratio, lower is better; volume: rate ratio, higher is better)</text>\n"
        );
        let x = |v: f64| label_w + bar_w * (v.min(max) / max);
        for (i, r) in rows.iter().enumerate() {
            let y = top + row_h * i as f64;
            let ratio = r.floor.as_ref().map(|f| f.1).unwrap_or(0.0);
            let colour = match r.transport.as_str() {
                "bus" => "#4e79a7",
                "quic" => "#f28e2b",
                _ => "#59a14f",
            };
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><rect x=\"{label_w}\" y=\"{}\" width=\"{:.1}\" height=\"{}\" fill=\"{colour}\"/><text x=\"{:.1}\" y=\"{}\">{ratio:.2}x</text>",
                label_w - 6.0,
                y + 11.0,
                r.label(),
                y + 2.0,
                x(ratio) - label_w,
                row_h - 4.0,
                x(ratio) + 4.0,
                y + 11.0
            );
        }
        let one = x(1.0);
        let _ = writeln!(
            s,
            "<line x1=\"{one:.1}\" y1=\"{}\" x2=\"{one:.1}\" y2=\"{}\" stroke=\"black\" stroke-dasharray=\"4 3\"/><text x=\"{one:.1}\" y=\"{}\" text-anchor=\"middle\">1x</text>\n</svg>",
            top - 4.0,
            height - 24.0,
            height - 10.0
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::{Report, TOLERANCE};
    use serde_json::json;

    fn raw(direct_us: f64, rate: f64) -> serde_json::Value {
        json!({"results": [
            {"op": "direct", "transport": "floor_s2n_stream", "payload_bytes": 64, "median_us": 20.0, "p99_us": 30.0},
            {"op": "direct", "transport": "quic", "payload_bytes": 64, "median_us": direct_us, "p99_us": 50.0},
            {"op": "throughput", "transport": "floor_s2n_stream", "payload_bytes": 64, "median_us": 1.0, "p99_us": 1.0, "msgs_per_s": 1.0e6, "mb_per_s": 64.0},
            {"op": "throughput", "transport": "quic", "payload_bytes": 64, "channel": "ordered", "median_us": 1.0, "p99_us": 1.0, "msgs_per_s": rate, "mb_per_s": rate * 64.0 / 1e6},
        ]})
    }

    #[test]
    fn check_flags_ratios_worse_than_the_baseline_past_the_tolerance() {
        let base = Report::build(&raw(40.0, 5e5), true, true).json();
        let same = Report::build(&raw(40.0 * (1.0 + TOLERANCE / 2.0), 5e5), true, true);
        assert!(same.regressions(&base).is_empty(), "within the tolerance");
        let slower = Report::build(&raw(40.0 * (1.0 + 2.0 * TOLERANCE), 5e5), true, true);
        let found = slower.regressions(&base);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("direct"), "{found:?}");
        let fewer = Report::build(&raw(40.0, 5e5 * (1.0 - 2.0 * TOLERANCE)), true, true);
        let found = fewer.regressions(&base);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("throughput"), "{found:?}");
    }

    #[test]
    fn a_paired_ratio_stands_for_the_blocks_ratio() {
        let mut r = raw(40.0, 5e5);
        // The blocks say 2x; the alternating rounds 1.1x.
        r["results"][1]["paired"] = json!(
            {"floor": "floor_s2n_stream", "ratio": 1.1, "low": 1.0, "high": 1.3, "rounds": 9}
        );
        let report = Report::build(&r, true, true);
        let quic = report
            .rows
            .iter()
            .find(|r| r.transport == "quic" && r.op == "direct")
            .expect("the quic row");
        assert_eq!(quic.floor, Some(("floor_s2n_stream".to_owned(), 1.1)));
        assert_eq!(quic.ratio_cells().0, "1.10x (paired, 1.00-1.30)");
        assert_eq!(report.json()["results"][1]["ratio_to_floor"], json!(1.1));
        let base = Report::build(&raw(40.0, 5e5), true, true).json();
        assert!(
            report.regressions(&base).is_empty(),
            "1.1x is better than 2x"
        );
    }

    #[test]
    fn targets_read_the_batched_rows() {
        let mut r = raw(40.0, 2e6);
        r["results"].as_array_mut().expect("rows").push(json!(
            {"op": "throughput", "transport": "quic", "payload_bytes": 64, "channel": super::BATCHED_ORDERED, "median_us": 1.0, "p99_us": 1.0, "msgs_per_s": 1.6e6, "allocs_per_msg": 0.8}
        ));
        let report = Report::build(&r, true, true);
        let targets = report.targets();
        let ordered = targets
            .iter()
            .find(|t| t.what.starts_with("QUIC throughput 64 B ordered"))
            .expect("the ordered target");
        assert_eq!(ordered.met, Some(true), "{}", ordered.measured);
        let allocs = targets
            .iter()
            .find(|t| t.what.starts_with("allocations"))
            .expect("the allocation target");
        assert_eq!(allocs.met, Some(true), "{}", allocs.measured);
        let unordered = targets
            .iter()
            .find(|t| t.what.starts_with("QUIC throughput 64 B unordered"))
            .expect("the unordered target");
        assert_eq!(unordered.met, None, "not measured");
    }
}
