//! `cargo xtask lab`: aqe over QUIC between separate processes on separate (namespaced)
//! hosts, under packet loss and with a receiver killed by SIGKILL, accounted message by
//! message.
//!
//! Two hosts (`aqe-lab-h1` at 10.77.0.1, `aqe-lab-h2` at 10.77.0.2) hang off a bridge in a
//! third namespace, over veth links. Each host drops a share of the packets it sends with an
//! nftables rule in its output hook (`numgen random mod 100 < PCT drop`; this kernel has no
//! netem). The receiver (`aqe-probe receive`, on h2) prints every message it takes before
//! acknowledging it; the sender (`aqe-probe send`, on h1, one process per run) reports every
//! message it sent as accepted, refused, or failed; at each loss rate, broadcasts to 8 agents
//! of one receiver process are accounted copy by copy. Root only.
//!
//! The last scenario runs both probes on the chain QUIC, NATS, bus, with a `nats-server` on h1:
//! a mixed load (messages, requests, broadcasts) starts over QUIC, then UDP between the hosts
//! is dropped (TCP to the NATS server is not), then allowed again; every operation must be
//! accounted for, carried by NATS while UDP is blocked, and by QUIC again afterwards. Then the
//! same with nothing but the `aqe` command and definition files: `aqe node` on h1, UDP
//! blocked, `aqe request` from h2 answered over NATS.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

const H1: &str = "aqe-lab-h1";
const H2: &str = "aqe-lab-h2";
const BR: &str = "aqe-lab-br";
const IP1: &str = "10.77.0.1";
const IP2: &str = "10.77.0.2";
const RECEIVER_PORT: u16 = 7000;
const SENDER_PORT: u16 = 7001;
const LOSSES: [u32; 4] = [0, 1, 5, 10];
const MESSAGES: u32 = 5000;
const REQUESTS: u32 = 1000;
/// Broadcasts per loss rate, to this many agents of the receiver's process.
const BROADCASTS: u32 = 1000;
const BROADCAST_AGENTS: usize = 8;
const KILL_MESSAGES: u32 = 10_000;
/// The slow-consumer row: messages, the receiver's time per message, their time-to-live.
const SLOW_MESSAGES: u32 = 3000;
const SLOW_HANDLER: Duration = Duration::from_millis(1);
const SLOW_TTL: Duration = Duration::from_millis(300);
/// The slow receiver's inbox on the dropping channel, in items.
const SLOW_INBOX: usize = 64;
const NATS_PORT: u16 = 4222;
/// The mixed load of the UDP-blocked scenario: messages, paced 10 per 40 ms (24 s).
const MIX_MESSAGES: u32 = 6000;
/// When UDP is blocked, after the sender starts, and for how long.
const BLOCK_AFTER: Duration = Duration::from_secs(3);
const BLOCK_FOR: Duration = Duration::from_secs(6);
/// Where broadcast numbers start in the mixed load (`aqe_examples::probe::BROADCAST_BASE`).
const BROADCAST_BASE: u32 = 1_000_000;

/// Where a probe's stderr goes: with `AQE_LAB_LOGS=DIR`, a file per process in DIR (set
/// `RUST_LOG` too, e.g. `aqe_session=debug`), to see why a row looks as it does.
fn probe_log(role: &str) -> Stdio {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let Some(dir) = std::env::var_os("AQE_LAB_LOGS") else {
        return Stdio::null();
    };
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = Path::new(&dir).join(format!("{n:03}-{role}.log"));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::File::create(&path)) {
        Ok(f) => Stdio::from(f),
        Err(_) => Stdio::null(),
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(args))
}

fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

/// The namespaces; removed when dropped.
struct Lab;

impl Lab {
    fn create() -> anyhow::Result<Lab> {
        Self::remove();
        for ns in [BR, H1, H2] {
            ip(&["netns", "add", ns])?;
            in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
        }
        let lab = Lab;
        in_ns(BR, &["ip", "link", "add", "br0", "type", "bridge"])?;
        in_ns(BR, &["ip", "link", "set", "br0", "up"])?;
        for (n, (ns, addr)) in [(H1, IP1), (H2, IP2)].iter().enumerate() {
            let (host_end, bridge_end) = (format!("aqelab{n}"), format!("aqelab{n}br"));
            ip(&[
                "link",
                "add",
                &host_end,
                "type",
                "veth",
                "peer",
                "name",
                &bridge_end,
            ])?;
            ip(&["link", "set", &host_end, "netns", ns])?;
            ip(&["link", "set", &bridge_end, "netns", BR])?;
            in_ns(BR, &["ip", "link", "set", &bridge_end, "master", "br0"])?;
            in_ns(BR, &["ip", "link", "set", &bridge_end, "up"])?;
            in_ns(
                ns,
                &["ip", "addr", "add", &format!("{addr}/24"), "dev", &host_end],
            )?;
            in_ns(ns, &["ip", "link", "set", &host_end, "up"])?;
        }
        Ok(lab)
    }

    fn remove() {
        for ns in [H1, H2, BR] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Each host drops `pct` percent of the packets it sends to the other.
    fn set_loss(&self, pct: u32) -> anyhow::Result<()> {
        for ns in [H1, H2] {
            let _ = in_ns(ns, &["nft", "delete", "table", "inet", "aqelab"]);
            if pct == 0 {
                continue;
            }
            in_ns(ns, &["nft", "add", "table", "inet", "aqelab"])?;
            in_ns(
                ns,
                &[
                    "nft",
                    "add chain inet aqelab out { type filter hook output priority 0 ; }",
                ],
            )?;
            in_ns(
                ns,
                &[
                    "nft",
                    &format!(
                        "add rule inet aqelab out ip daddr 10.77.0.0/24 numgen random mod 100 < {pct} drop"
                    ),
                ],
            )?;
        }
        Ok(())
    }
}

impl Lab {
    /// Drops (or stops dropping) every UDP packet either host sends to the other; TCP passes.
    fn block_udp(&self, block: bool) -> anyhow::Result<()> {
        for ns in [H1, H2] {
            let _ = in_ns(ns, &["nft", "delete", "table", "inet", "aqelabudp"]);
            if !block {
                continue;
            }
            in_ns(ns, &["nft", "add", "table", "inet", "aqelabudp"])?;
            in_ns(
                ns,
                &[
                    "nft",
                    "add chain inet aqelabudp out { type filter hook output priority 0 ; }",
                ],
            )?;
            in_ns(
                ns,
                &[
                    "nft",
                    "add rule inet aqelabudp out ip daddr 10.77.0.0/24 meta l4proto udp drop",
                ],
            )?;
        }
        Ok(())
    }
}

/// A nats-server on h1; stopped when dropped.
struct NatsServer(Child);

impl NatsServer {
    fn start() -> anyhow::Result<Option<NatsServer>> {
        let Some(binary) = aqe_nats::testing::nats_server_binary() else {
            return Ok(None);
        };
        let child = Command::new("ip")
            .args(["netns", "exec", H1])
            .arg(binary)
            .args(["-a", IP1, "-p", &NATS_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server on h1")?;
        let server = NatsServer(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Ready when h2 can open a TCP connection to it.
        let probe = format!("exec 3<>/dev/tcp/{IP1}/{NATS_PORT}");
        while in_ns(H2, &["bash", "-c", &probe]).is_err() {
            if Instant::now() > deadline {
                bail!("nats-server on h1 did not come up");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Some(server))
    }

    fn url() -> String {
        format!("nats://{IP1}:{NATS_PORT}")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        Self::remove();
    }
}

/// What a receiver printed, by kind.
#[derive(Default)]
struct Taken {
    /// Messages per channel, in the order taken, with the redelivered flag.
    messages: HashMap<String, Vec<(u32, bool)>>,
    /// The same messages per agent that took them.
    agents: HashMap<String, Vec<(u32, bool)>>,
    requests: Vec<u32>,
}

/// A receiver process on h2.
struct Receiver {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Receiver {
    fn start(
        probe: &Path,
        certs: &Path,
        dial_back: bool,
        extra: &[&str],
    ) -> anyhow::Result<Receiver> {
        let listen = format!("{IP2}:{RECEIVER_PORT}");
        let peer = format!("{IP1}:{SENDER_PORT}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", H2])
            .arg(probe)
            .args(["receive", "--listen", &listen, "--certs"])
            .arg(certs)
            .args(["--liveness-ms", "2000", "--deadline-ms", "10000"]);
        if dial_back {
            cmd.args(["--peer", &peer]);
        }
        cmd.args(extra);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(probe_log("receiver"))
            .spawn()
            .context("starting the receiver")?;
        let stdout = child.stdout.take().context("receiver stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let r = Receiver { child, lines };
        match r.lines.recv_timeout(Duration::from_secs(20)) {
            Ok(l) if l.starts_with("READY") => Ok(r),
            other => bail!("receiver not ready: {other:?}"),
        }
    }

    /// Collects what arrived, waiting for more until `quiet` passes with nothing new.
    fn collect(&self, into: &mut Taken, quiet: Duration) {
        self.collect_until(into, quiet, |_| false);
    }

    /// As [`Receiver::collect`], stopping early once `enough` says so.
    fn collect_until(&self, into: &mut Taken, quiet: Duration, enough: impl Fn(&Taken) -> bool) {
        while !enough(into)
            && let Ok(line) = self.lines.recv_timeout(quiet)
        {
            let mut w = line.split_whitespace();
            match (w.next(), w.next(), w.next(), w.next()) {
                (Some("M"), Some(ch), Some(n), Some(r)) => {
                    if let Ok(n) = n.parse() {
                        into.messages
                            .entry(ch.to_owned())
                            .or_default()
                            .push((n, r == "1"));
                        if let Some(agent) = w.next() {
                            into.agents
                                .entry(agent.to_owned())
                                .or_default()
                                .push((n, r == "1"));
                        }
                    }
                }
                (Some("R"), Some(n), ..) => {
                    if let Ok(n) = n.parse() {
                        into.requests.push(n);
                    }
                }
                _ => {}
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL, then everything it printed, to the end of its output (a line still in the
    /// pipe was printed before its message was acknowledged, and counts).
    fn kill_and_collect(&mut self, into: &mut Taken) {
        self.kill();
        // The reader stops at the end of the output, which the dead process closed.
        self.collect(into, Duration::from_secs(10));
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A sender's report (the JSON `aqe-probe send` prints).
#[derive(Debug, Default)]
struct Report {
    accepted: Vec<u32>,
    refused: Vec<u32>,
    failed: Vec<(u32, String)>,
    unconfirmed: u64,
    /// Unreliable messages the sender dropped itself (its datagram queue was full).
    dropped: u64,
    /// Mixed load: requests answered; requests failed (number, error).
    requests_answered: usize,
    requests_failed: Vec<(u32, String)>,
    /// Mixed load: broadcasts that reached the receiver; that did not.
    broadcasts: Vec<u32>,
    broadcasts_failed: Vec<(u32, String)>,
    /// Operations a fallback carried, by transport.
    fallbacks: Vec<(String, u64)>,
    /// Progress lines: (ms since the sender started, operations, fallbacks so far).
    progress: Vec<(u64, u64, u64)>,
    /// Broadcast runs: copies accepted (number, target); copies failed (number, target,
    /// reason).
    copies: Vec<(u32, String)>,
    copies_failed: Vec<(u32, String, String)>,
}

fn sender(probe: &Path, certs: &Path, args: &[&str]) -> anyhow::Result<Child> {
    let listen = format!("{IP1}:{SENDER_PORT}");
    let peer = format!("{IP2}:{RECEIVER_PORT}");
    Command::new("ip")
        .args(["netns", "exec", H1])
        .arg(probe)
        .args(["send", "--listen", &listen, "--peer", &peer, "--certs"])
        .arg(certs)
        .args([
            "--to",
            "sink",
            "--liveness-ms",
            "2000",
            "--deadline-ms",
            "10000",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(probe_log("sender"))
        .spawn()
        .context("starting the sender")
}

fn report_of(child: Child) -> anyhow::Result<Report> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("the sender printed no report ({})", out.status))?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let nums = |k: &str| -> Vec<u32> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect()
            })
            .unwrap_or_default()
    };
    let failed = v["failed"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[0].as_u64()? as u32, p[1].as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let pairs = |k: &str| -> Vec<(u32, String)> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| Some((p[0].as_u64()? as u32, p[1].as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    };
    let progress = text
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("P ")?.split_whitespace();
            Some((
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
            ))
        })
        .collect();
    Ok(Report {
        accepted: nums("accepted"),
        refused: nums("refused"),
        failed,
        unconfirmed: v["unconfirmed"].as_u64().unwrap_or(0),
        dropped: v["dropped"].as_u64().unwrap_or(0),
        requests_answered: v["requests_answered"].as_u64().unwrap_or(0) as usize,
        requests_failed: pairs("requests_failed"),
        broadcasts: nums("broadcasts"),
        broadcasts_failed: pairs("broadcasts_failed"),
        fallbacks: v["fallbacks"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default(),
        progress,
        copies: pairs("copies"),
        copies_failed: v["copies_failed"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| {
                        Some((
                            p[0].as_u64()? as u32,
                            p[1].as_str()?.to_owned(),
                            p[2].as_str()?.to_owned(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// One row of the results table.
struct Row {
    scenario: String,
    sent: usize,
    received: usize,
    duplicated: usize,
    reordered: Option<usize>,
    failed: usize,
    refused: usize,
    unaccounted: Option<usize>,
    note: String,
}

impl Row {
    fn print_header() {
        println!(
            "{:<34} {:>6} {:>8} {:>5} {:>9} {:>6} {:>7} {:>11}  note",
            "scenario", "sent", "received", "dup", "reordered", "failed", "refused", "unaccounted"
        );
    }

    fn print(&self) {
        let opt = |v: Option<usize>| v.map_or("-".to_owned(), |v| v.to_string());
        println!(
            "{:<34} {:>6} {:>8} {:>5} {:>9} {:>6} {:>7} {:>11}  {}",
            self.scenario,
            self.sent,
            self.received,
            self.duplicated,
            opt(self.reordered),
            self.failed,
            self.refused,
            opt(self.unaccounted),
            self.note
        );
    }
}

fn duplicates(ns: &[u32]) -> usize {
    let mut seen = HashSet::new();
    ns.iter().filter(|n| !seen.insert(**n)).count()
}

fn inversions(ns: &[u32]) -> usize {
    ns.windows(2).filter(|w| w[1] < w[0]).count()
}

/// A reliable message run: sent = accepted; unaccounted = accepted that were neither
/// received nor reported failed (must be 0).
fn message_row(scenario: String, report: &Report, taken: &[(u32, bool)], ordered: bool) -> Row {
    let numbers: Vec<u32> = taken.iter().map(|(n, _)| *n).collect();
    let received: HashSet<u32> = numbers.iter().copied().collect();
    let failed: HashSet<u32> = report.failed.iter().map(|(n, _)| *n).collect();
    let unaccounted = report
        .accepted
        .iter()
        .filter(|n| !received.contains(n) && !failed.contains(n))
        .count();
    let in_doubt = report
        .failed
        .iter()
        .filter(|(n, _)| received.contains(n))
        .count();
    Row {
        scenario,
        sent: report.accepted.len(),
        received: received.len(),
        duplicated: duplicates(&numbers),
        reordered: ordered.then(|| inversions(&numbers)),
        failed: failed.len(),
        refused: report.refused.len(),
        unaccounted: Some(unaccounted + report.unconfirmed as usize),
        note: {
            let mut notes = Vec::new();
            if !report.failed.is_empty() {
                notes.push(format!("failed: {}", reasons(&report.failed)));
            }
            if in_doubt > 0 {
                notes.push(format!(
                    "{in_doubt} failed as unconfirmed were taken before the crash"
                ));
            }
            notes.join("; ")
        },
    }
}

/// A broadcast run, copy by copy (a copy is a broadcast's number and a target agent):
/// sent = copies accepted; duplicates and inversions counted per agent; unaccounted = copies
/// neither taken by their agent nor reported failed for it (must be 0).
fn broadcast_row(
    scenario: String,
    report: &Report,
    taken: &HashMap<String, Vec<(u32, bool)>>,
) -> Row {
    let mut received: HashSet<(&str, u32)> = HashSet::new();
    let (mut duplicated, mut reordered) = (0, 0);
    for (agent, got) in taken {
        let numbers: Vec<u32> = got.iter().map(|(n, _)| *n).collect();
        duplicated += duplicates(&numbers);
        reordered += inversions(&numbers);
        received.extend(numbers.iter().map(|n| (agent.as_str(), *n)));
    }
    let failed: HashSet<(&str, u32)> = report
        .copies_failed
        .iter()
        .map(|(n, to, _)| (to.as_str(), *n))
        .collect();
    let unaccounted = report
        .copies
        .iter()
        .filter(|(n, to)| {
            !received.contains(&(to.as_str(), *n)) && !failed.contains(&(to.as_str(), *n))
        })
        .count();
    let agents: HashSet<&str> = report.copies.iter().map(|(_, to)| to.as_str()).collect();
    Row {
        scenario,
        sent: report.copies.len(),
        received: received.len(),
        duplicated,
        reordered: Some(reordered),
        failed: failed.len(),
        refused: report.refused.len(),
        unaccounted: Some(unaccounted + report.unconfirmed as usize),
        note: format!(
            "{} broadcasts to {} agents of one process",
            report.accepted.len(),
            agents.len()
        ),
    }
}

/// How many failed for each reason, most first: "1020 unconfirmed, 4 expired".
fn reasons(failed: &[(u32, String)]) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for (_, why) in failed {
        match counts.iter_mut().find(|(w, _)| w == why) {
            Some((_, n)) => *n += 1,
            None => counts.push((why.clone(), 1)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    counts
        .iter()
        .map(|(w, n)| format!("{n} {w}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs every scenario, or only the UDP-blocked one with `only_udp`.
pub(crate) fn lab(root: &Path, only_udp: bool) -> anyhow::Result<()> {
    let uid = run(Command::new("id").arg("-u")).unwrap_or_default();
    if uid.trim() != "0" {
        println!(
            "cargo xtask lab: skipped: it creates network namespaces and nftables rules, which needs root"
        );
        return Ok(());
    }
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            println!(
                "cargo xtask lab: skipped: `{tool}` is missing (apt-get install iproute2 nftables)"
            );
            return Ok(());
        }
    }
    let status = Command::new("cargo")
        .current_dir(root)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "aqe-examples",
            "--bin",
            "aqe-probe",
            "-p",
            "aqe-cli",
            "--bin",
            "aqe",
        ])
        .status()?;
    if !status.success() {
        bail!("building aqe-probe and aqe failed");
    }
    let probe = root.join("target/release/aqe-probe");
    let certs: PathBuf = root.join("target/aqe-lab/certs");
    // A fresh CA and fresh node certificates each run: certificates of an earlier run are
    // signed by another CA.
    if certs.exists() {
        std::fs::remove_dir_all(&certs).context("removing the last run's certificates")?;
    }
    run(Command::new(&probe)
        .arg("certs")
        .arg(&certs)
        .args([IP1, IP2]))?;
    let lab = Lab::create()?;
    println!(
        "aqe lab: hosts {H1} ({IP1}) and {H2} ({IP2}) over veth and a bridge; loss by nftables on each host's output"
    );
    Row::print_header();
    let mut problems = Vec::new();
    let count = MESSAGES.to_string();
    let requests = REQUESTS.to_string();
    let losses: &[u32] = if only_udp { &[] } else { &LOSSES };
    for &loss in losses {
        lab.set_loss(loss)?;
        let receiver = Receiver::start(&probe, &certs, false, &[])?;
        let mut taken = Taken::default();
        for (channel, ordered) in [("coordination", true), ("results", false)] {
            let started = Instant::now();
            let report = report_of(sender(
                &probe,
                &certs,
                &["--channel", channel, "--count", &count],
            )?)?;
            receiver.collect(&mut taken, Duration::from_millis(300));
            let kind = if ordered { "ordered" } else { "unordered" };
            let mut row = message_row(
                format!("{loss:>2}% loss, {kind} ({channel})"),
                &report,
                taken.messages.get(channel).map_or(&[][..], Vec::as_slice),
                ordered,
            );
            if row.duplicated > 0 {
                problems.push(format!("{}: {} duplicates", row.scenario, row.duplicated));
            }
            if ordered && row.reordered.unwrap_or(0) > 0 {
                problems.push(format!("{}: reordered", row.scenario));
            }
            row.note = format!("{:.1} s {}", started.elapsed().as_secs_f64(), row.note);
            check_row(&row, &mut problems);
        }
        // Unreliable: datagrams, at most once; what is lost is lost, never duplicated.
        let report = report_of(sender(
            &probe,
            &certs,
            &["--channel", "metrics", "--count", &count],
        )?)?;
        receiver.collect(&mut taken, Duration::from_millis(300));
        let got: Vec<u32> = taken
            .messages
            .get("metrics")
            .map(|v| v.iter().map(|(n, _)| *n).collect())
            .unwrap_or_default();
        let row = Row {
            scenario: format!("{loss:>2}% loss, unreliable (metrics)"),
            sent: report.accepted.len(),
            received: got.iter().collect::<HashSet<_>>().len(),
            duplicated: duplicates(&got),
            reordered: None,
            failed: 0,
            refused: report.refused.len(),
            unaccounted: None,
            note: format!(
                "at most once; {} dropped by the sender's queue, the rest lost in the network or evicted by a QUIC datagram queue",
                report.dropped
            ),
        };
        if row.duplicated > 0 {
            problems.push(format!("{}: duplicates", row.scenario));
        }
        row.print();
        // Requests: answered, or failed with an error the caller sees.
        let report = report_of(sender(
            &probe,
            &certs,
            &["--requests", "--count", &requests],
        )?)?;
        receiver.collect(&mut taken, Duration::from_millis(300));
        let row = Row {
            scenario: format!("{loss:>2}% loss, requests"),
            sent: REQUESTS as usize,
            received: taken.requests.iter().collect::<HashSet<_>>().len(),
            duplicated: duplicates(&taken.requests),
            reordered: None,
            failed: report.refused.len(),
            refused: 0,
            unaccounted: Some(REQUESTS as usize - report.accepted.len() - report.refused.len()),
            note: format!("{} answered", report.accepted.len()),
        };
        if row.duplicated > 0 {
            problems.push(format!("{}: a handler ran twice", row.scenario));
        }
        check_row(&row, &mut problems);
        drop(receiver);
        // Broadcasts to several agents of one process: each broadcast's copies for them
        // travel in one frame, and each copy is accounted on its own.
        let agents = BROADCAST_AGENTS.to_string();
        let receiver = Receiver::start(&probe, &certs, false, &["--agents", &agents])?;
        let report = report_of(sender(
            &probe,
            &certs,
            &[
                "--broadcast",
                "--to",
                "sink-0",
                "--count",
                &BROADCASTS.to_string(),
            ],
        )?)?;
        let mut taken = Taken::default();
        receiver.collect(&mut taken, Duration::from_millis(300));
        let row = broadcast_row(
            format!("{loss:>2}% loss, broadcast (coordination)"),
            &report,
            &taken.agents,
        );
        if row.duplicated > 0 {
            problems.push(format!("{}: duplicates", row.scenario));
        }
        if row.reordered.unwrap_or(0) > 0 {
            problems.push(format!("{}: reordered", row.scenario));
        }
        if row.sent != BROADCASTS as usize * BROADCAST_AGENTS {
            problems.push(format!(
                "{}: {} copies accepted, not one per agent and broadcast",
                row.scenario, row.sent
            ));
        }
        check_row(&row, &mut problems);
        drop(receiver);
    }
    // A slow consumer on a lossy link, messages with a time-to-live, then on a channel whose
    // full inbox drops: each is taken, or expired (dropped) and reported so; none both,
    // none unaccounted.
    if !only_udp {
        lab.set_loss(5)?;
        let handler_us = SLOW_HANDLER.as_micros().to_string();
        let ttl_ms = SLOW_TTL.as_millis().to_string();
        let inbox = SLOW_INBOX.to_string();
        let count = SLOW_MESSAGES.to_string();
        let slow = format!("slow receiver ({} ms a message)", SLOW_HANDLER.as_millis());
        let cases = [
            (
                format!(" 5% loss, {slow}, TTL {} ms", SLOW_TTL.as_millis()),
                vec!["--handler-us", &handler_us],
                vec!["--channel", "results", "--ttl-ms", &ttl_ms],
                "Expired",
                "expired",
            ),
            (
                format!(" 5% loss, {slow}, inbox {SLOW_INBOX}, dropNewest"),
                vec!["--handler-us", &handler_us, "--inbox", &inbox],
                vec!["--channel", "drops"],
                "Dropped",
                "dropped",
            ),
        ];
        for (scenario, receiving, sending, reason, what) in cases {
            let receiver = Receiver::start(&probe, &certs, false, &receiving)?;
            let mut args = vec!["--count", &count];
            args.extend(sending);
            let report = report_of(sender(&probe, &certs, &args)?)?;
            let mut taken = Taken::default();
            receiver.collect(&mut taken, Duration::from_millis(500));
            let channel = if what == "dropped" {
                "drops"
            } else {
                "results"
            };
            let got = taken.messages.get(channel).map_or(&[][..], Vec::as_slice);
            let mut row = message_row(scenario, &report, got, false);
            let ended: HashSet<u32> = report
                .failed
                .iter()
                .filter(|(_, why)| why == reason)
                .map(|(n, _)| *n)
                .collect();
            let late = got.iter().filter(|(n, _)| ended.contains(n)).count();
            if late > 0 {
                problems.push(format!(
                    "{}: {late} taken and reported {what}",
                    row.scenario
                ));
            }
            if ended.is_empty() {
                problems.push(format!(
                    "{}: nothing {what}: the policy went untested",
                    row.scenario
                ));
            }
            row.note = format!(
                "{} taken, {} {what} and reported; {}",
                row.received,
                ended.len(),
                row.note
            );
            check_row(&row, &mut problems);
            drop(receiver);
        }
    }
    // A receiver killed mid-stream with SIGKILL, without and with a restart.
    lab.set_loss(1)?;
    let restarts: &[bool] = if only_udp { &[] } else { &[false, true] };
    for &restart in restarts {
        let mut first = Receiver::start(&probe, &certs, true, &[])?;
        let kill_count = KILL_MESSAGES.to_string();
        let send = sender(
            &probe,
            &certs,
            &[
                "--count",
                &kill_count,
                "--pace",
                "50:5000",
                "--settle-ms",
                "30000",
            ],
        )?;
        let mut before = Taken::default();
        first.collect_until(&mut before, Duration::from_secs(20), |t| {
            t.messages.get("coordination").map_or(0, Vec::len) >= 3000
        });
        first.kill_and_collect(&mut before);
        let mut after = Taken::default();
        let mut second = if restart {
            Some(Receiver::start(&probe, &certs, true, &[])?)
        } else {
            None
        };
        let report = report_of(send)?;
        if let Some(second) = &mut second {
            second.kill_and_collect(&mut after);
        }
        let r1 = before.messages.remove("coordination").unwrap_or_default();
        let r2 = after.messages.remove("coordination").unwrap_or_default();
        let both: HashSet<u32> = r1
            .iter()
            .map(|(n, _)| *n)
            .collect::<HashSet<_>>()
            .intersection(&r2.iter().map(|(n, _)| *n).collect())
            .copied()
            .collect();
        let unflagged = r2.iter().filter(|(n, r)| both.contains(n) && !r).count();
        let mut taken: Vec<(u32, bool)> = r1.clone();
        taken.extend(r2.iter().filter(|(n, _)| !both.contains(n)));
        let mut row = message_row(
            format!(
                " 1% loss, SIGKILL{}",
                if restart { " + restart" } else { "" }
            ),
            &report,
            &taken,
            false,
        );
        row.reordered = Some(
            inversions(&r1.iter().map(|(n, _)| *n).collect::<Vec<_>>())
                + inversions(&r2.iter().map(|(n, _)| *n).collect::<Vec<_>>()),
        );
        row.duplicated = duplicates(&r1.iter().map(|(n, _)| *n).collect::<Vec<_>>())
            + duplicates(&r2.iter().map(|(n, _)| *n).collect::<Vec<_>>());
        row.note = format!(
            "first took {}, {}{}",
            r1.len(),
            if restart {
                format!(
                    "restarted took {} ({} flagged redelivered, {} taken by both)",
                    r2.len(),
                    r2.iter().filter(|(_, r)| *r).count(),
                    both.len()
                )
            } else {
                "no restart".to_owned()
            },
            if row.note.is_empty() {
                String::new()
            } else {
                format!("; {}", row.note)
            }
        );
        if unflagged > 0 {
            problems.push(format!(
                "{}: {unflagged} redelivered copies not flagged",
                row.scenario
            ));
        }
        if row.duplicated > 0 || row.reordered.unwrap_or(0) > 0 {
            problems.push(format!(
                "{}: duplicates or reordering within one receiver",
                row.scenario
            ));
        }
        check_row(&row, &mut problems);
    }
    lab.set_loss(0)?;
    udp_blocked(&lab, &probe, &certs, &mut problems)?;
    command_over_nats(&lab, root, &mut problems)?;
    drop(lab);
    println!(
        "\nsent = accepted sends; refused = sends that returned an error (nothing else is reported about them);\n\
         unaccounted = accepted messages neither taken by a receiver nor reported failed (must be 0);\n\
         dup and reordered count within one receiver process."
    );
    if problems.is_empty() {
        println!(
            "every scenario: sent = received + reported failed, no duplicate or reordering on reliable channels"
        );
        Ok(())
    } else {
        bail!("the lab found problems:\n  {}", problems.join("\n  "))
    }
}

/// QUIC, then UDP blocked between the hosts while TCP to the NATS server stays up, then UDP
/// allowed again, under a mixed load on the chain QUIC, NATS, bus.
fn udp_blocked(
    lab: &Lab,
    probe: &Path,
    certs: &Path,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let Some(_server) = NatsServer::start()? else {
        println!("UDP blocked: skipped: nats-server is missing (apt-get install nats-server)");
        return Ok(());
    };
    let url = NatsServer::url();
    let receiver = Receiver::start(probe, certs, false, &["--nats", &url])?;
    let count = MIX_MESSAGES.to_string();
    let started = Instant::now();
    let send = sender(
        probe,
        certs,
        &[
            "--nats",
            &url,
            "--mix",
            "--count",
            &count,
            "--pace",
            "10:40000",
            "--settle-ms",
            "30000",
        ],
    )?;
    let mut taken = Taken::default();
    receiver.collect_until(&mut taken, Duration::from_secs(20), |_| {
        started.elapsed() >= BLOCK_AFTER
    });
    lab.block_udp(true)?;
    let blocked_at = started.elapsed();
    receiver.collect_until(&mut taken, Duration::from_secs(20), |_| {
        started.elapsed() >= BLOCK_AFTER + BLOCK_FOR
    });
    lab.block_udp(false)?;
    let unblocked_at = started.elapsed();
    let report = report_of(send)?;
    receiver.collect(&mut taken, Duration::from_millis(500));
    drop(receiver);
    let all = taken.messages.remove("coordination").unwrap_or_default();
    let (broadcasts, messages): (Vec<_>, Vec<_>) =
        all.into_iter().partition(|(n, _)| *n >= BROADCAST_BASE);
    let label = format!("UDP blocked {} s, NATS up", BLOCK_FOR.as_secs());
    // When the fallbacks stopped: the first progress line after which the count stays put.
    let last = report.progress.last().map_or(0, |p| p.2);
    let settled_ms = report
        .progress
        .iter()
        .rev()
        .take_while(|p| p.2 == last)
        .last()
        .map(|p| p.0);
    let fell_back: u64 = report.fallbacks.iter().map(|(_, n)| n).sum();
    let via: Vec<String> = report
        .fallbacks
        .iter()
        .map(|(k, n)| format!("{n} via {k}"))
        .collect();
    let back_on_quic = settled_ms.map(|ms| Duration::from_millis(ms).saturating_sub(unblocked_at));
    let mut row = message_row(format!("{label}: messages"), &report, &messages, true);
    row.note = format!(
        "blocked at {:.1} s, allowed at {:.1} s; {}; {}",
        blocked_at.as_secs_f64(),
        unblocked_at.as_secs_f64(),
        if via.is_empty() {
            "no fallback".to_owned()
        } else {
            via.join(", ")
        },
        match back_on_quic {
            Some(d)
                if settled_ms.is_some_and(|ms| ms < report.progress.last().map_or(0, |p| p.0)) =>
            {
                format!(
                    "no fallback from {:.1} s after UDP returned (back on QUIC)",
                    d.as_secs_f64()
                )
            }
            _ => "still falling back at the end".to_owned(),
        }
    );
    if row.duplicated > 0 || row.reordered.unwrap_or(0) > 0 || row.failed > 0 || row.refused > 0 {
        problems.push(format!(
            "{}: loss, duplicates, reordering or refusals",
            row.scenario
        ));
    }
    if fell_back == 0 || report.fallbacks.iter().any(|(k, _)| k != "NATS") {
        problems.push(format!(
            "{}: not carried by NATS while UDP was blocked",
            row.scenario
        ));
    }
    let last_ms = report.progress.last().map_or(0, |p| p.0);
    if settled_ms.is_none_or(|ms| ms >= last_ms) {
        problems.push(format!("{}: never back on QUIC", row.scenario));
    }
    check_row(&row, problems);
    let numbers: Vec<u32> = broadcasts.iter().map(|(n, _)| *n).collect();
    let received: HashSet<u32> = numbers.iter().copied().collect();
    let row = Row {
        scenario: format!("{label}: broadcasts"),
        sent: report.broadcasts.len(),
        received: received.len(),
        duplicated: duplicates(&numbers),
        reordered: Some(inversions(&numbers)),
        failed: report.broadcasts_failed.len(),
        refused: 0,
        unaccounted: Some(
            report
                .broadcasts
                .iter()
                .filter(|n| !received.contains(n))
                .count(),
        ),
        note: report
            .broadcasts_failed
            .first()
            .map(|(n, e)| format!("first failure: {n}: {e}"))
            .unwrap_or_default(),
    };
    if row.duplicated > 0 || row.failed > 0 {
        problems.push(format!("{}: duplicates or failures", row.scenario));
    }
    check_row(&row, problems);
    let asked = (MIX_MESSAGES as usize).div_ceil(10);
    let row = Row {
        scenario: format!("{label}: requests"),
        sent: asked,
        received: taken.requests.iter().collect::<HashSet<_>>().len(),
        duplicated: duplicates(&taken.requests),
        reordered: None,
        failed: report.requests_failed.len(),
        refused: 0,
        unaccounted: Some(asked - report.requests_answered - report.requests_failed.len()),
        note: format!(
            "{} answered{}",
            report.requests_answered,
            report
                .requests_failed
                .first()
                .map(|(n, e)| format!("; first failure: {n}: {e}"))
                .unwrap_or_default()
        ),
    };
    if row.duplicated > 0 || row.failed > 0 {
        problems.push(format!(
            "{}: a handler ran twice, or requests failed",
            row.scenario
        ));
    }
    check_row(&row, problems);
    Ok(())
}

/// The second quickstart, across the lab's hosts: `aqe node` on h1 with a definition that
/// has QUIC and NATS, UDP blocked between the hosts, and `aqe request` from h2 joining with
/// the same kind of definition file: answered over NATS.
fn command_over_nats(lab: &Lab, root: &Path, problems: &mut Vec<String>) -> anyhow::Result<()> {
    let Some(_server) = NatsServer::start()? else {
        println!("aqe over NATS: skipped: nats-server is missing (apt-get install nats-server)");
        return Ok(());
    };
    let aqe = root.join("target/release/aqe");
    let dir = root.join("target/aqe-lab/cli");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).context("removing the last run's files")?;
    }
    std::fs::create_dir_all(dir.join("fleet")).context("creating the definition folder")?;
    let certs = dir.join("certs");
    let certs_arg = certs.to_string_lossy().into_owned();
    run(Command::new(&aqe).args(["certs", "init", &certs_arg]))?;
    run(Command::new(&aqe).args(["certs", "issue", &certs_arg, "node-a", "--ip", IP1]))?;
    run(Command::new(&aqe).args(["certs", "issue", &certs_arg, "cli-b"]))?;
    let url = NatsServer::url();
    std::fs::write(
        dir.join("fleet/worker.json"),
        format!(
            r#"{{"id": "worker", "type": "qe-test-executor", "enableQUIC": true,
  "quicConfig": {{"host": "{IP1}", "port": 9000,
    "security": {{"certPath": "../certs/node-a.pem", "keyPath": "../certs/node-a.key",
                 "caPath": "../certs/ca.pem", "verifyPeer": true}}}},
  "natsConfig": {{"servers": ["{url}"], "fleet": "qe"}}}}"#
        ),
    )?;
    // Host B's definition: how to join (its certificate, the node's address, the server).
    std::fs::write(
        dir.join("cli-b.json"),
        format!(
            r#"{{"type": "cli", "enableQUIC": true,
  "quicConfig": {{"security": {{"certPath": "certs/cli-b.pem", "keyPath": "certs/cli-b.key",
                              "caPath": "certs/ca.pem", "verifyPeer": true}}}},
  "natsConfig": {{"servers": ["{url}"], "fleet": "qe"}}}}"#
        ),
    )?;
    let start_node = || -> anyhow::Result<Child> {
        let mut node = Command::new("ip")
            .args(["netns", "exec", H1])
            .arg(&aqe)
            .args(["node"])
            .arg(dir.join("fleet"))
            .stdout(Stdio::piped())
            .stderr(probe_log("aqe-node"))
            .spawn()
            .context("starting aqe node on h1")?;
        let mut out = BufReader::new(node.stdout.take().context("node stdout")?);
        let mut line = String::new();
        while !line.starts_with("agent ") {
            line.clear();
            if out.read_line(&mut line)? == 0 {
                let _ = node.kill();
                bail!("aqe node on h1 ended before starting its agent");
            }
        }
        Ok(node)
    };
    let mut node = start_node()?;
    lab.block_udp(true)?;
    let started = Instant::now();
    let definition = dir.join("cli-b.json");
    let asked = Command::new("ip")
        .args(["netns", "exec", H2])
        .arg(&aqe)
        .args(["request", "worker", r#"{"task":"lint"}"#, "--bootstrap"])
        .arg(format!("{IP1}:9000"))
        .arg("--definition")
        .arg(&definition)
        .args(["--wait", "5"])
        .output()
        .context("running aqe request on h2")?;
    let took = started.elapsed();
    lab.block_udp(false)?;
    let answered = asked.status.success()
        && String::from_utf8_lossy(&asked.stdout).trim() == r#"{"task":"lint"}"#;
    let row = Row {
        scenario: "aqe request, UDP blocked, NATS up".to_owned(),
        sent: 1,
        received: usize::from(answered),
        duplicated: 0,
        reordered: None,
        failed: usize::from(!answered),
        refused: 0,
        unaccounted: Some(0),
        note: if answered {
            format!(
                "answered in {:.2} s over NATS (the QUIC bootstrap dials in the background)",
                took.as_secs_f64()
            )
        } else {
            format!(
                "exit {:?}: {}",
                asked.status.code(),
                String::from_utf8_lossy(&asked.stderr).trim()
            )
        },
    };
    if !answered {
        problems.push(format!("{}: not answered", row.scenario));
    }
    check_row(&row, problems);

    // `aqe listen` on h2 outlives the node: SIGKILL, a new node on the same address, and the
    // listener is back and takes the next message.
    let join = |cmd: &mut Command| {
        cmd.arg("--bootstrap")
            .arg(format!("{IP1}:9000"))
            .arg("--certs")
            .arg(&certs)
            .args(["--name", "cli-b"]);
    };
    let mut listen = Command::new("ip");
    listen
        .args(["netns", "exec", H2])
        .arg(&aqe)
        .args(["listen", "inbox"]);
    join(&mut listen);
    let mut listener = listen
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting aqe listen on h2")?;
    let (said, heard) = mpsc::channel::<String>();
    for pipe in [
        listener
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        listener
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let said = said.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = said.send(line);
            }
        });
    }
    let wait_for = |what: &str, within: Duration| -> bool {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match heard.recv_timeout(left) {
                Ok(line) if line.contains(what) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    };
    let send = |text: &str| -> bool {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", H2])
            .arg(&aqe)
            .args(["send", "inbox", text]);
        join(&mut c);
        c.output().is_ok_and(|o| o.status.success())
    };
    let mut steps = Vec::new();
    let ready = wait_for("listening at", Duration::from_secs(10));
    let first = ready && send("before") && wait_for("before", Duration::from_secs(5));
    let _ = node.kill();
    let _ = node.wait();
    let killed = Instant::now();
    let lost = first && wait_for("lost the connection", Duration::from_secs(10));
    steps.push(format!(
        "lost after {:.1} s",
        killed.elapsed().as_secs_f64()
    ));
    node = start_node()?;
    let restarted = Instant::now();
    let back = lost && wait_for("again", Duration::from_secs(15));
    let back_after = restarted.elapsed();
    steps.push(format!(
        "back {:.1} s after the restart",
        back_after.as_secs_f64()
    ));
    let after = back && send("after") && wait_for("after", Duration::from_secs(5));
    let _ = listener.kill();
    let _ = listener.wait();
    let _ = node.kill();
    let _ = node.wait();
    let row = Row {
        scenario: "aqe listen, node SIGKILLed + restarted".to_owned(),
        sent: 2,
        received: usize::from(first) + usize::from(after),
        duplicated: 0,
        reordered: None,
        failed: 2 - usize::from(first) - usize::from(after),
        refused: 0,
        unaccounted: Some(0),
        note: steps.join("; "),
    };
    if !after {
        problems.push(format!(
            "{}: the listener did not come back (ready {ready}, first {first}, lost {lost}, back {back})",
            row.scenario
        ));
    }
    check_row(&row, problems);
    Ok(())
}

fn check_row(row: &Row, problems: &mut Vec<String>) {
    row.print();
    if row.unaccounted.unwrap_or(0) > 0 {
        problems.push(format!(
            "{}: {} unaccounted",
            row.scenario,
            row.unaccounted.unwrap_or(0)
        ));
    }
}
