//! Delivery accounting across processes: a receiver process (`aqe-probe receive`) is killed
//! with SIGKILL while an ordered sender streams to it, with and without a restart, over real
//! QUIC with mutual TLS on loopback. Every message the sender sent must be accounted for:
//! taken by a receiver (which prints it before acknowledging it), or reported failed, never
//! silently lost; nothing taken twice by one receiver; and a message taken by a process that
//! died before acknowledging it is reported as unconfirmed (if the receiver never comes back)
//! or redelivered flagged as such (if it does). The same holds for every copy of a broadcast
//! to several agents of the killed process (copies joined into one frame per broadcast).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use aqe_agent::{Agent, QuicTransport};
use aqe_core::{DeliveryFailure, Event, HealthStatus, RequestOptions};
use aqe_examples::probe::{self, Line, Options, Plan};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);
const COUNT: u32 = 10_000;

/// Fast timings, so that failures show within the test's patience.
fn timings(mut o: Options) -> Options {
    o.heartbeat = Duration::from_millis(100);
    o.liveness = Duration::from_millis(800);
    o.deadline = Duration::from_secs(6);
    o
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// A receiver process and the lines it prints.
struct Receiver {
    child: Child,
    lines: mpsc::UnboundedReceiver<Line>,
    addr: SocketAddr,
}

impl Receiver {
    async fn spawn(options: &Options) -> Receiver {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_aqe-probe"));
        cmd.arg("receive")
            .args(["--listen", &options.listen.to_string()])
            .args(["--certs", &options.certs.display().to_string()])
            .args(["--heartbeat-ms", &options.heartbeat.as_millis().to_string()])
            .args(["--liveness-ms", &options.liveness.as_millis().to_string()])
            .args(["--deadline-ms", &options.deadline.as_millis().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some(peer) = options.peer {
            cmd.args(["--peer", &peer.to_string()]);
        }
        if options.agents > 1 {
            cmd.args(["--agents", &options.agents.to_string()]);
        }
        let mut child = cmd.spawn().expect("start aqe-probe");
        let stdout = child.stdout.take().expect("stdout");
        // Unbounded: a test collects every line the child prints, a bounded number.
        let (tx, mut lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = reader.next_line().await {
                if let Some(line) = Line::parse(&l) {
                    let _ = tx.send(line);
                }
            }
        });
        let addr = match tokio::time::timeout(WAIT, lines.recv()).await {
            Ok(Some(Line::Ready(addr))) => addr,
            other => panic!("receiver not ready: {other:?}"),
        };
        Receiver { child, lines, addr }
    }

    /// SIGKILL: no goodbye of any kind reaches the peer.
    async fn kill(&mut self) {
        self.child.start_kill().expect("kill");
        let _ = self.child.wait().await;
    }

    /// The messages it printed, in order, until `until` or the end of its output.
    async fn take_messages(
        &mut self,
        messages: &mut Vec<(u32, bool)>,
        until: impl Fn(usize) -> bool,
    ) {
        let mut took = Vec::new();
        self.take(&mut took, until).await;
        messages.extend(took.into_iter().map(|t| (t.n, t.redelivered)));
    }

    /// As [`Receiver::take_messages`], saying which agent took each.
    async fn take(&mut self, messages: &mut Vec<Took>, until: impl Fn(usize) -> bool) {
        while !until(messages.len()) {
            match tokio::time::timeout(WAIT, self.lines.recv()).await {
                Ok(Some(Line::Message(_, n, redelivered, agent))) => messages.push(Took {
                    agent,
                    n,
                    redelivered,
                }),
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(_) => panic!("the receiver went quiet after {} messages", messages.len()),
            }
        }
    }

    /// SIGKILL, then everything it printed, to the end of its output: a line still in the
    /// pipe, or not yet passed on by the reader, was printed before its message was
    /// acknowledged, and counts.
    async fn kill_and_drain(&mut self, messages: &mut Vec<(u32, bool)>) {
        let mut took = Vec::new();
        self.kill_and_drain_took(&mut took).await;
        messages.extend(took.into_iter().map(|t| (t.n, t.redelivered)));
    }

    /// Everything it printed (all its sender knows delivered: each line comes before its
    /// acknowledgement), once SIGKILL ended it.
    async fn last_words(&mut self) -> Vec<Took> {
        let mut took = Vec::new();
        self.kill_and_drain_took(&mut took).await;
        took
    }

    /// As [`Receiver::kill_and_drain`], saying which agent took each.
    async fn kill_and_drain_took(&mut self, messages: &mut Vec<Took>) {
        self.kill().await;
        // The reader stops at the end of the output, which the dead process closed.
        self.take(messages, |_| false).await;
    }
}

/// A message a receiver printed: who took which, and whether it came flagged redelivered.
struct Took {
    agent: String,
    n: u32,
    redelivered: bool,
}

/// What each agent took, in order.
fn by_agent(took: &[Took]) -> BTreeMap<String, Vec<(u32, bool)>> {
    let mut m: BTreeMap<String, Vec<(u32, bool)>> = BTreeMap::new();
    for t in took {
        m.entry(t.agent.clone())
            .or_default()
            .push((t.n, t.redelivered));
    }
    m
}

struct Setup {
    _dir: tempfile::TempDir,
    options: Options,
    quic: QuicTransport,
    sender: Agent,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    probe::write_certs(dir.path()).expect("certificates");
    let options = timings(Options::new(loopback(), dir.path()));
    let (quic, sender) = probe::sender(&options, "source").await.expect("sender");
    Setup {
        _dir: dir,
        options,
        quic,
        sender,
    }
}

/// Options of a receiver dialing the sender.
fn receiver_options(s: &Setup, listen: SocketAddr) -> Options {
    let mut o = s.options.clone();
    o.listen = listen;
    o.peer = Some(s.quic.local_addr());
    o
}

async fn until_known(agent: &Agent, id: &str) {
    tokio::time::timeout(WAIT, async {
        while agent
            .discover_peers(&Default::default())
            .iter()
            .all(|p| p.id.as_str() != id)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("peer discovered");
}

fn plan() -> Plan {
    Plan {
        to: "sink".into(),
        channel: "coordination".into(),
        count: COUNT,
        requests: false,
        // About a second of sending, so that the kill lands mid-stream.
        pace: Some((50, Duration::from_millis(5))),
        mix: false,
        request_timeout: Duration::from_secs(2),
        ttl: None,
        broadcast: false,
    }
}

/// Agents of the receiver in the broadcast tests, and broadcasts sent.
const AGENTS: usize = 8;
const BROADCASTS: u32 = 3_000;

/// Broadcasts on `coordination` (ordered, reliable) to the receiver's [`AGENTS`] agents:
/// each broadcast's copies for them travel in one frame.
fn broadcast_plan() -> Plan {
    Plan {
        to: "sink-0".into(),
        count: BROADCASTS,
        // About a second of sending.
        pace: Some((15, Duration::from_millis(5))),
        broadcast: true,
        ..plan()
    }
}

/// The copies a broadcast plan's report says were accepted, by agent.
fn copies_by_agent(report: &probe::Report) -> BTreeMap<String, HashSet<u32>> {
    let mut m: BTreeMap<String, HashSet<u32>> = BTreeMap::new();
    for (n, to) in &report.copies {
        assert!(
            m.entry(to.to_string()).or_default().insert(*n),
            "broadcast {n} accepted twice for {to}"
        );
    }
    m
}

/// Numbers in order, each once; panics naming the first repeat.
fn once_each(taken: &[(u32, bool)], who: &str) -> HashSet<u32> {
    let mut seen = HashSet::new();
    for (n, _) in taken {
        assert!(seen.insert(*n), "{who} took message {n} twice");
    }
    seen
}

fn assert_in_order(taken: &[(u32, bool)], who: &str) {
    for w in taken.windows(2) {
        assert!(
            w[0].0 < w[1].0,
            "{who} took {} after {}: out of order",
            w[1].0,
            w[0].0
        );
    }
}

/// What `who` took before its process was killed and after its restart: each once per
/// incarnation and in order, together every one of `accepted`, and a second copy of
/// something the first incarnation took flagged redelivered (it took it without managing
/// to acknowledge it). Returns how many both took.
fn whole_across_a_restart(
    accepted: &HashSet<u32>,
    before: &[(u32, bool)],
    after: &[(u32, bool)],
    who: &str,
) -> usize {
    let (r1, r2) = (once_each(before, who), once_each(after, who));
    assert_in_order(before, who);
    assert_in_order(after, who);
    let all: HashSet<u32> = r1.union(&r2).copied().collect();
    let missing: Vec<u32> = accepted.difference(&all).copied().collect();
    assert!(
        missing.is_empty(),
        "{who}: {} accepted messages never taken: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    for (n, redelivered) in after {
        if r1.contains(n) {
            assert!(redelivered, "{who} took {n} twice, the second not flagged");
        }
    }
    r1.intersection(&r2).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_killed_mid_stream_leaves_nothing_unaccounted() {
    let s = setup().await;
    let mut receiver = Receiver::spawn(&receiver_options(&s, loopback())).await;
    until_known(&s.sender, "sink").await;
    let sending = {
        let sender = s.sender.clone();
        tokio::spawn(async move { probe::send(&sender, &plan(), WAIT).await })
    };
    let mut taken = Vec::new();
    receiver.take_messages(&mut taken, |n| n >= 3000).await;
    receiver.kill_and_drain(&mut taken).await;
    let report = sending.await.expect("join").expect("report");

    let received = once_each(&taken, "the receiver");
    assert_in_order(&taken, "the receiver");
    let accepted: HashSet<u32> = report.accepted.iter().copied().collect();
    let refused: HashSet<u32> = report.refused.iter().map(|(n, _)| *n).collect();
    let failed: BTreeMap<u32, DeliveryFailure> = report.failed.iter().copied().collect();
    assert_eq!(
        accepted.len() + refused.len(),
        COUNT as usize,
        "every send accepted or refused"
    );
    assert!(accepted.is_disjoint(&refused));
    assert_eq!(report.unconfirmed, 0, "every accepted message settled");
    assert!(
        received.is_subset(&accepted),
        "only accepted messages arrive"
    );
    // Nothing silently lost: what was not taken was reported.
    let lost: Vec<u32> = accepted
        .iter()
        .filter(|n| !received.contains(n) && !failed.contains_key(n))
        .copied()
        .collect();
    assert!(
        lost.is_empty(),
        "{} accepted messages neither taken nor reported: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    // Reported failed although taken: only those the dead process took without managing to
    // acknowledge, and they say so.
    let in_doubt: Vec<u32> = failed
        .keys()
        .filter(|n| received.contains(n))
        .copied()
        .collect();
    for n in &in_doubt {
        assert_eq!(
            failed[n],
            DeliveryFailure::Unconfirmed,
            "message {n} was taken"
        );
    }
    assert!(!failed.is_empty(), "the messages after the kill must fail");
    assert!(
        in_doubt.len() <= 1024,
        "{} in doubt: more than a window",
        in_doubt.len()
    );
    eprintln!(
        "sent {COUNT}: accepted {}, refused {}, taken {}, failed {} (unconfirmed {}, of which taken {}), lost 0",
        accepted.len(),
        refused.len(),
        received.len(),
        failed.len(),
        failed
            .values()
            .filter(|r| **r == DeliveryFailure::Unconfirmed)
            .count(),
        in_doubt.len()
    );
    s.sender.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_killed_and_restarted_gets_the_rest_redelivered() {
    let s = setup().await;
    let mut first = Receiver::spawn(&receiver_options(&s, loopback())).await;
    let addr = first.addr;
    until_known(&s.sender, "sink").await;
    let sending = {
        let sender = s.sender.clone();
        tokio::spawn(async move { probe::send(&sender, &plan(), WAIT).await })
    };
    let mut before = Vec::new();
    first.take_messages(&mut before, |n| n >= 3000).await;
    first.kill_and_drain(&mut before).await;
    // The same receiver comes back at the same address and dials the sender.
    let mut second = Receiver::spawn(&receiver_options(&s, addr)).await;
    let report = sending.await.expect("join").expect("report");
    let after: Vec<(u32, bool)> = second
        .last_words()
        .await
        .into_iter()
        .map(|t| (t.n, t.redelivered))
        .collect();

    let accepted: HashSet<u32> = report.accepted.iter().copied().collect();
    assert_eq!(report.unconfirmed, 0, "every accepted message settled");
    assert!(
        report.failed.is_empty(),
        "redelivered within the deadline: {:?}",
        &report.failed[..report.failed.len().min(10)]
    );
    let twice = whole_across_a_restart(&accepted, &before, &after, "the receiver");
    let redelivered = after.iter().filter(|(_, r)| *r).count();
    eprintln!(
        "sent {COUNT}: accepted {}, refused {}, first receiver took {}, restarted took {} ({redelivered} flagged redelivered, {} taken by both), failed 0, lost 0",
        accepted.len(),
        report.refused.len(),
        before.len(),
        after.len(),
        twice
    );
    s.sender.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peer_is_detected_within_the_liveness_bound() {
    let s = setup().await;
    let mut receiver = Receiver::spawn(&receiver_options(&s, loopback())).await;
    until_known(&s.sender, "sink").await;
    // A request works while the peer lives.
    let answer: u32 = s
        .sender
        .request_from_agent(&"sink".into(), &7u32, RequestOptions::default())
        .await
        .expect("answered");
    assert_eq!(answer, 7);
    let mut events = s.sender.events();
    receiver.kill().await;
    let killed = Instant::now();
    // A request in flight fails as soon as the peer is declared dead, not at its timeout.
    let sink = aqe_core::AgentId::from("sink");
    let request = s.sender.request_from_agent::<u32, u32>(
        &sink,
        &8u32,
        RequestOptions::default().with_timeout(Duration::from_secs(15)),
    );
    let err = tokio::time::timeout(WAIT, request)
        .await
        .expect("in time")
        .expect_err("dead");
    let failed_after = killed.elapsed();
    assert!(
        matches!(err, aqe_core::Error::ConnectionLost { .. }),
        "{err}"
    );
    let bound = s.options.liveness + 2 * s.options.heartbeat + Duration::from_millis(700);
    assert!(
        failed_after < bound,
        "request failed after {failed_after:?}, bound {bound:?}"
    );
    let mut left = None;
    let mut lost = None;
    tokio::time::timeout(WAIT, async {
        while left.is_none() || lost.is_none() {
            match events.recv().await {
                Some(Event::PeerLeft(id)) if id.as_str() == "sink" => left = Some(killed.elapsed()),
                Some(Event::ConnectionLost { .. }) => lost = Some(killed.elapsed()),
                Some(_) => {}
                None => panic!("events ended"),
            }
        }
    })
    .await
    .expect("peer left and connection lost");
    assert!(left.expect("left") < bound, "detected after {left:?}");
    let health = s.sender.health();
    assert_ne!(health.status, HealthStatus::Healthy, "{health:?}");
    assert!(health.message.contains("unreachable"), "{}", health.message);
    assert_eq!(s.sender.stats().unreachable_peers, 1);
    eprintln!(
        "liveness {:?}: request failed after {failed_after:?}, peer left after {:?}, health {:?}: {}",
        s.options.liveness,
        left.expect("left"),
        health.status,
        health.message
    );
    s.sender.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_replaces_the_dead_connection_at_once() {
    let mut s = setup().await;
    // A long liveness bound: only the restart can explain a quick replacement.
    s.options.liveness = Duration::from_secs(20);
    let (quic, sender) = probe::sender(&s.options, "source2").await.expect("sender");
    s.quic = quic;
    s.sender = sender;
    let mut first = Receiver::spawn(&receiver_options(&s, loopback())).await;
    let addr = first.addr;
    until_known(&s.sender, "sink").await;
    let mut events = s.sender.events();
    first.kill().await;
    let killed = Instant::now();
    let mut second = Receiver::spawn(&receiver_options(&s, addr)).await;
    let mut lost = false;
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Some(Event::ConnectionLost { addr: a, .. }) if a == addr.into() => lost = true,
                Some(Event::PeerDiscovered(p)) if p.id.as_str() == "sink" && lost => return,
                Some(_) => {}
                None => panic!("events ended"),
            }
        }
    })
    .await
    .expect("the old connection replaced and the agent back");
    let replaced = killed.elapsed();
    assert!(
        replaced < Duration::from_secs(5),
        "replaced after {replaced:?}"
    );
    let answer: u32 = s
        .sender
        .request_from_agent(&"sink".into(), &9u32, RequestOptions::default())
        .await
        .expect("the restarted peer answers");
    assert_eq!(answer, 9);
    assert_eq!(s.quic.connections(), 1);
    eprintln!(
        "restarted peer replaced the dead connection after {replaced:?} (liveness bound 20 s)"
    );
    second.kill().await;
    s.sender.shutdown().await;
}

/// Starts a receiver process hosting [`AGENTS`] agents, streams [`broadcast_plan`] to them,
/// and SIGKILLs it once its agents took a third of the copies. Returns what they took, the
/// sending (its report to come), and the receiver's options at its address, for a restart.
async fn broadcast_until_killed(
    s: &Setup,
) -> (
    Vec<Took>,
    tokio::task::JoinHandle<anyhow::Result<probe::Report>>,
    Options,
) {
    let mut o = receiver_options(s, loopback());
    o.agents = AGENTS;
    let mut receiver = Receiver::spawn(&o).await;
    o.listen = receiver.addr;
    for i in 0..AGENTS {
        until_known(&s.sender, &format!("sink-{i}")).await;
    }
    let sending = {
        let sender = s.sender.clone();
        tokio::spawn(async move { probe::send(&sender, &broadcast_plan(), WAIT).await })
    };
    let mut took = Vec::new();
    receiver
        .take(&mut took, |n| n >= AGENTS * BROADCASTS as usize / 3)
        .await;
    receiver.kill_and_drain_took(&mut took).await;
    (took, sending, o)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_to_agents_of_a_killed_receiver_leaves_no_copy_unaccounted() {
    let s = setup().await;
    let (took, sending, _) = broadcast_until_killed(&s).await;
    let report = sending.await.expect("join").expect("report");

    assert_eq!(report.unconfirmed, 0, "every accepted copy settled");
    let accepted = copies_by_agent(&report);
    assert_eq!(accepted.len(), AGENTS, "every agent was a target");
    let taken = by_agent(&took);
    let mut failed: BTreeMap<(String, u32), DeliveryFailure> = BTreeMap::new();
    for (n, to, reason) in &report.copies_failed {
        assert!(
            failed.insert((to.to_string(), *n), *reason).is_none(),
            "the copy of {n} for {to} reported failed twice"
        );
    }
    let (mut lost, mut in_doubt, mut total_taken) = (Vec::new(), 0, 0);
    for (agent, copies) in &accepted {
        let mine = taken.get(agent).map_or(&[][..], Vec::as_slice);
        let received = once_each(mine, agent);
        assert_in_order(mine, agent);
        total_taken += received.len();
        assert!(
            received.is_subset(copies),
            "{agent} took a copy never accepted for it"
        );
        for n in copies {
            match (received.contains(n), failed.get(&(agent.clone(), *n))) {
                (false, None) => lost.push((agent.clone(), *n)),
                (true, Some(reason)) => {
                    assert_eq!(
                        *reason,
                        DeliveryFailure::Unconfirmed,
                        "the copy of {n} for {agent} was taken"
                    );
                    in_doubt += 1;
                }
                _ => {}
            }
        }
    }
    assert!(
        lost.is_empty(),
        "{} accepted copies neither taken nor reported: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(!failed.is_empty(), "the copies after the kill must fail");
    eprintln!(
        "broadcast {BROADCASTS} to {AGENTS} agents of one process: copies accepted {}, taken {total_taken}, failed {} (of which taken, unconfirmed: {in_doubt}), lost 0",
        report.copies.len(),
        failed.len()
    );
    s.sender.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_to_agents_of_a_restarted_receiver_reaches_each_agent_whole() {
    let s = setup().await;
    let (before, sending, o) = broadcast_until_killed(&s).await;
    // The same process comes back at the same address, with the same agents.
    let mut second = Receiver::spawn(&o).await;
    let report = sending.await.expect("join").expect("report");
    let after = second.last_words().await;

    assert_eq!(report.unconfirmed, 0, "every accepted copy settled");
    let accepted = copies_by_agent(&report);
    assert_eq!(accepted.len(), AGENTS, "every agent was a target");
    // Each copy in doubt when the process died goes to the restarted one before anything
    // newer for its agent: none fails.
    assert!(
        report.copies_failed.is_empty(),
        "redelivered within the deadline: {:?}",
        &report.copies_failed[..report.copies_failed.len().min(10)]
    );
    let (t1, t2) = (by_agent(&before), by_agent(&after));
    let (mut taken_twice, mut flagged) = (0, 0);
    for (agent, copies) in &accepted {
        let none = Vec::new();
        let (b, a) = (
            t1.get(agent).unwrap_or(&none),
            t2.get(agent).unwrap_or(&none),
        );
        taken_twice += whole_across_a_restart(copies, b, a, agent);
        flagged += a.iter().filter(|(_, r)| *r).count();
    }
    eprintln!(
        "broadcast {BROADCASTS} to {AGENTS} agents, receiver killed and restarted: copies accepted {}, first took {}, restarted took {} ({flagged} flagged redelivered, {taken_twice} taken by both), failed 0, lost 0",
        report.copies.len(),
        before.len(),
        after.len(),
    );
    s.sender.shutdown().await;
}
