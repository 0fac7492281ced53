//! The transport conformance suite: one set of tests, written against [`Transport`], that
//! every transport runs on itself to prove it is interchangeable with the others.
//!
//! A transport crate implements [`Harness`] (how to make endpoints that reach each other) and
//! expands [`conformance_tests!`](crate::conformance_tests) in an integration test:
//!
//! ```ignore
//! struct Bus;
//! #[async_trait::async_trait]
//! impl aqe_core::conformance::Harness for Bus {
//!     async fn endpoints(&self, n: usize) -> Vec<std::sync::Arc<dyn aqe_core::Transport>> { .. }
//! }
//! aqe_core::conformance_tests!(Bus);
//! ```
//!
//! Each case panics with a message when the transport breaks the contract.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::plumbing::{Inbox, inbox};
use crate::{
    AgentId, Channel, ChannelKind, Envelope, Error, Event, Inbound, MessageKind, Recipient,
    Registration, StreamFailure, StreamHeader, StreamId, StreamOptions, Transport,
};

/// Makes endpoints for the suite.
#[async_trait]
pub trait Harness: Send + Sync {
    /// `n` fresh endpoints that can reach each other (for an in-process bus, the same bus
    /// `n` times). Each call returns endpoints no other case uses.
    async fn endpoints(&self, n: usize) -> Vec<Arc<dyn Transport>>;
}

/// Generates one `#[tokio::test]` per conformance case, each calling the case with `$harness`.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@cases $harness;
            unicast_ordered_reliable_is_exactly_once_in_order,
            unicast_unordered_reliable_delivers_each_once,
            batches_arrive_whole_in_order_and_are_counted,
            every_accepted_message_is_confirmed_once_taken,
            confirmed_send_resolves_when_the_receiver_has_it,
            messages_left_unread_by_a_stopping_receiver_are_reported,
            messages_whose_ttl_ran_out_unread_are_reported_expired,
            a_full_inbox_drops_by_its_channels_policy_and_reports_the_drops,
            unreliable_channel_never_duplicates,
            request_response_is_correlated,
            concurrent_requests_are_correlated,
            bursts_of_large_messages_and_requests_keep_the_link,
            error_responses_pass_through,
            unanswered_request_times_out_and_is_cancelled,
            unknown_peer_is_a_typed_error,
            unknown_channel_is_a_typed_error,
            oversize_payload_is_refused_and_nothing_is_lost,
            broadcast_reports_each_peer,
            agents_on_lists_the_listeners_of_a_channel,
            confirmed_broadcast_reports_each_recipients_outcome,
            stream_delivers_open_data_and_end_in_order,
            stream_close_without_final_ends_the_stream,
            stream_to_a_dropped_receiver_fails,
            stream_dropped_by_its_writer_fails_for_the_reader,
            discovery_sees_remote_agents_and_departures,
            stats_count_traffic,
            attaching_twice_is_refused,
            shutdown_fails_further_calls
        );
    };
    (@cases $harness:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::conformance::$case(&$harness).await;
            }
        )*
    };
}

const WAIT: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    limited(WAIT, what, f).await
}

/// For what must not wait for a delivery deadline (10 s by default).
async fn soon<T>(what: &str, f: impl Future<Output = T>) -> T {
    limited(Duration::from_secs(4), what, f).await
}

async fn limited<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: nothing within {limit:?}"),
    }
}

fn registration(id: &str, channels: Vec<Channel>) -> Registration {
    let mut r = Registration::new(id, "conformance").with_capability("testing");
    r.channels = channels;
    r
}

fn all_channels() -> Vec<Channel> {
    vec![
        Channel::coordination(),
        Channel::results(),
        Channel::metrics(),
        Channel::new("small", ChannelKind::Unicast).with_max_message_size(1024),
    ]
}

/// Attaches `id` with the given channels and returns its inbox.
async fn attach(t: &Arc<dyn Transport>, id: &str, channels: Vec<Channel>) -> Inbox {
    attach_holding(t, id, channels, 4096).await
}

/// Attaches `id` with the given channels and an inbox of `capacity` items.
async fn attach_holding(
    t: &Arc<dyn Transport>,
    id: &str,
    channels: Vec<Channel>,
    capacity: usize,
) -> Inbox {
    let (tx, rx) = inbox(AgentId::from(id), capacity);
    t.attach(registration(id, channels), tx)
        .await
        .expect("attach");
    rx
}

/// Waits until `t` lists every agent of `ids` among its peers.
async fn await_peers(t: &Arc<dyn Transport>, ids: &[&str]) {
    let mut events = t.subscribe();
    within("peers to be discovered", async {
        loop {
            let known: HashSet<_> = t.peers().into_iter().map(|p| p.id).collect();
            if ids.iter().all(|id| known.contains(*id)) {
                return;
            }
            // Any event may be the one that completes the set; re-check after each.
            let _ = events.recv().await;
        }
    })
    .await
}

/// Two endpoints, `a` on the first and `b` on the second, each knowing the other.
async fn pair(h: &dyn Harness) -> (Arc<dyn Transport>, Inbox, Arc<dyn Transport>, Inbox) {
    let eps = h.endpoints(2).await;
    let a = attach(&eps[0], "a", all_channels()).await;
    let b = attach(&eps[1], "b", all_channels()).await;
    await_peers(&eps[0], &["a", "b"]).await;
    await_peers(&eps[1], &["a", "b"]).await;
    (eps[0].clone(), a, eps[1].clone(), b)
}

fn direct(from: &str, to: &str, channel: &str, payload: impl Into<Bytes>) -> Envelope {
    let mut e = Envelope::new(
        from.into(),
        Recipient::Agent(to.into()),
        channel.into(),
        MessageKind::Direct,
        payload.into(),
    );
    if let Some(c) = Channel::preset(channel) {
        e.priority = c.priority;
    }
    e
}

fn request(from: &str, to: &str, payload: impl Into<Bytes>) -> Envelope {
    let mut e = direct(from, to, "coordination", payload);
    e.kind = MessageKind::Request;
    e
}

async fn next_message(inbox: &mut Inbox) -> Envelope {
    match within("a message", inbox.recv()).await {
        Some(Inbound::Message { envelope, .. }) => envelope,
        Some(other) => panic!("expected a message, got {other:?}"),
        None => panic!("inbox closed"),
    }
}

/// Answers every request arriving in `inbox` with its own payload, until the inbox closes.
fn spawn_echo(mut inbox: Inbox, me: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(item) = inbox.recv().await {
            if let Inbound::Request {
                envelope,
                responder,
            } = item
            {
                let reply =
                    envelope.reply(me.into(), MessageKind::Response, envelope.payload.clone());
                let _ = responder.respond(reply).await;
            }
        }
    })
}

fn counter(i: u32) -> Bytes {
    Bytes::copy_from_slice(&i.to_be_bytes())
}

fn read_counter(b: &Bytes) -> u32 {
    let arr: [u8; 4] = b[..4].try_into().expect("4-byte payload");
    u32::from_be_bytes(arr)
}

/// Sends a last message from a to b on `coordination`: it must be the next b gets, else
/// `why`.
async fn end_comes_next(ta: &Arc<dyn Transport>, b: &mut Inbox, why: &str) {
    ta.send(direct(
        "a",
        "b",
        "coordination",
        Bytes::from_static(b"end!"),
    ))
    .await
    .expect("send");
    assert_eq!(&next_message(b).await.payload[..], b"end!", "{why}");
}

/// Reliable ordered channel: every message once, in send order.
pub async fn unicast_ordered_reliable_is_exactly_once_in_order(h: &dyn Harness) {
    let (ta, _a, _tb, mut b) = pair(h).await;
    const N: u32 = 500;
    let sender = tokio::spawn(async move {
        for i in 0..N {
            ta.send(direct("a", "b", "coordination", counter(i)))
                .await
                .expect("send");
        }
        ta
    });
    for i in 0..N {
        let e = next_message(&mut b).await;
        assert_eq!(
            read_counter(&e.payload),
            i,
            "ordered channel delivered out of order"
        );
        assert_eq!(e.from.as_str(), "a");
        assert_eq!(e.channel.as_str(), "coordination");
    }
    let ta = sender.await.expect("sender task");
    end_comes_next(&ta, &mut b, "a message was duplicated").await;
}

/// Reliable unordered channel: every message exactly once, any order.
pub async fn unicast_unordered_reliable_delivers_each_once(h: &dyn Harness) {
    let (ta, _a, _tb, mut b) = pair(h).await;
    const N: u32 = 300;
    let sender = tokio::spawn(async move {
        for i in 0..N {
            ta.send(direct("a", "b", "results", counter(i)))
                .await
                .expect("send");
        }
    });
    let mut seen = HashSet::new();
    for _ in 0..N {
        let e = next_message(&mut b).await;
        assert!(seen.insert(read_counter(&e.payload)), "duplicate message");
    }
    sender.await.expect("sender task");
    assert_eq!(seen, (0..N).collect::<HashSet<_>>());
}

/// A batch (`send_many`) larger than a window arrives whole, once each, in order on an
/// ordered channel, and is counted as that many sends; a batch mixing recipients is refused
/// with nothing sent.
pub async fn batches_arrive_whole_in_order_and_are_counted(h: &dyn Harness) {
    let (ta, _a, _tb, mut b) = pair(h).await;
    const N: u32 = 3000;
    let batch = |from: u32, to: u32| -> Vec<Envelope> {
        (from..to)
            .map(|i| direct("a", "b", "coordination", counter(i)))
            .collect()
    };
    let sender = {
        let ta = ta.clone();
        tokio::spawn(async move {
            ta.send_many(batch(0, N / 2)).await.expect("first batch");
            ta.send_many(batch(N / 2, N)).await.expect("second batch");
        })
    };
    for i in 0..N {
        let e = next_message(&mut b).await;
        assert_eq!(read_counter(&e.payload), i, "a batch arrived out of order");
    }
    sender.await.expect("sender task");
    let mut mixed = batch(0, 2);
    mixed.push(direct("a", "nobody", "coordination", counter(2)));
    let err = ta.send_many(mixed).await.expect_err("mixed recipients");
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    end_comes_next(&ta, &mut b, "the refused batch sent something").await;
    let stats = ta.stats(&"a".into());
    assert_eq!(stats.messages_sent, u64::from(N) + 1, "counted as sends");
    await_stats(&ta, "a", |s| s.messages_unconfirmed == 0).await;
}

/// Waits until `t`'s counters for `agent` satisfy `done`.
async fn await_stats(
    t: &Arc<dyn Transport>,
    agent: &str,
    done: impl Fn(&crate::Stats) -> bool,
) -> crate::Stats {
    within("the sender's accounting to settle", async {
        loop {
            let s = t.stats(&agent.into());
            if done(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// Delivery accounting: reliable messages taken by the receiver leave nothing unconfirmed
/// and nothing failed at the sender, on both reliable channels.
pub async fn every_accepted_message_is_confirmed_once_taken(h: &dyn Harness) {
    let (ta, _a, _tb, mut b) = pair(h).await;
    const N: u32 = 200;
    for i in 0..N {
        let channel = if i % 2 == 0 {
            "coordination"
        } else {
            "results"
        };
        ta.send(direct("a", "b", channel, counter(i)))
            .await
            .expect("send");
    }
    for _ in 0..N {
        // Dropping the message acknowledges it.
        next_message(&mut b).await;
    }
    let s = await_stats(&ta, "a", |s| s.messages_unconfirmed == 0).await;
    assert_eq!(s.messages_failed, 0, "nothing failed");
    assert!(s.messages_sent >= u64::from(N));
}

/// A confirmed send resolves only once the receiving agent has taken the message; on an
/// unreliable channel it is refused, since nothing is acknowledged there.
pub async fn confirmed_send_resolves_when_the_receiver_has_it(h: &dyn Harness) {
    let (ta, _a, _tb, mut b) = pair(h).await;
    let sender = ta.clone();
    let mut confirmed = tokio::spawn(async move {
        sender
            .send_confirmed(direct("a", "b", "coordination", Bytes::from_static(b"c1")))
            .await
    });
    // Not confirmed while the message sits in b's inbox.
    let early = tokio::time::timeout(Duration::from_millis(200), &mut confirmed).await;
    assert!(
        early.is_err(),
        "confirmed before the receiver took the message"
    );
    let got = match within("the message", b.recv()).await {
        Some(Inbound::Message { envelope, receipt }) => {
            drop(receipt);
            envelope
        }
        other => panic!("expected a message, got {other:?}"),
    };
    assert_eq!(&got.payload[..], b"c1");
    within("the confirmation", confirmed)
        .await
        .expect("join")
        .expect("confirmed");
    let err = ta
        .send_confirmed(direct("a", "b", "metrics", Bytes::new()))
        .await
        .expect_err("nothing to confirm on an unreliable channel");
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
}

/// Reliable messages still in a receiver's inbox when it stops are reported to the sender,
/// by id, and counted as failed; the confirmed one among them fails with the reason.
pub async fn messages_left_unread_by_a_stopping_receiver_are_reported(h: &dyn Harness) {
    let (ta, _a, tb, mut b) = pair(h).await;
    let mut events = ta.subscribe();
    let mut sent = Vec::new();
    for i in 0..5u32 {
        let e = direct("a", "b", "coordination", counter(i));
        sent.push(e.id);
        ta.send(e).await.expect("send");
    }
    let last = direct("a", "b", "coordination", counter(5));
    sent.push(last.id);
    let confirmed = {
        let ta = ta.clone();
        tokio::spawn(async move { ta.send_confirmed(last).await })
    };
    // b takes the first message, then stops with the rest unread.
    let first = next_message(&mut b).await;
    assert_eq!(read_counter(&first.payload), 0);
    // Let the rest arrive before b stops.
    within("the rest to arrive", async {
        while tb.stats(&"b".into()).messages_received < 6 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    tb.detach(&"b".into()).await.expect("detach");
    drop(b);
    // The receiver said it stopped: well before the delivery deadline.
    reported_failed(
        &ta,
        &mut events,
        sent[1..].to_vec(),
        crate::DeliveryFailure::ReceiverStopped,
        confirmed,
    )
    .await;
}

/// Waits until exactly the messages `ids` from a to b are reported failed for `reason`,
/// once each.
async fn reported(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    ids: &mut [crate::MessageId],
    reason: crate::DeliveryFailure,
) {
    let mut failed = Vec::new();
    soon("the failure reports", async {
        while failed.len() < ids.len() {
            match events.recv().await {
                Ok(Event::DeliveryFailed {
                    from,
                    to,
                    ids,
                    reason: why,
                    ..
                }) => {
                    assert_eq!((from.as_str(), to.as_str()), ("a", "b"));
                    assert_eq!(why, reason);
                    failed.extend(ids);
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream: {e}"),
            }
        }
    })
    .await;
    failed.sort();
    ids.sort();
    assert_eq!(failed, ids, "exactly these messages are reported, once");
}

/// Waits until exactly `ids` (sent from a to b) are reported failed for `reason`, soon, and
/// the confirmed send among them returned that failure; then a's counters agree.
async fn reported_failed(
    ta: &Arc<dyn Transport>,
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    mut ids: Vec<crate::MessageId>,
    reason: crate::DeliveryFailure,
    confirmed: tokio::task::JoinHandle<crate::Result<()>>,
) {
    reported(events, &mut ids, reason).await;
    let err = within("the confirmed send", confirmed)
        .await
        .expect("join")
        .expect_err("not delivered");
    assert!(
        matches!(err, Error::DeliveryFailed { reason: r, .. } if r == reason),
        "{err}"
    );
    let s = await_stats(ta, "a", |s| s.messages_unconfirmed == 0).await;
    assert_eq!(s.messages_failed, ids.len() as u64);
}

/// A reliable message whose time-to-live runs out before its agent takes it is never handed
/// out: its sender hears `DeliveryFailed(Expired)` (a confirmed send returns it), and what
/// follows it on an ordered channel still arrives.
pub async fn messages_whose_ttl_ran_out_unread_are_reported_expired(h: &dyn Harness) {
    let (ta, _a, tb, mut b) = pair(h).await;
    let mut events = ta.subscribe();
    let ttl = Duration::from_millis(150);
    let mut stale = Vec::new();
    for i in 0..2u32 {
        let e = direct("a", "b", "coordination", counter(i)).with_ttl(ttl);
        stale.push(e.id);
        ta.send(e).await.expect("send");
    }
    let confirmed = direct("a", "b", "coordination", counter(2)).with_ttl(ttl);
    stale.push(confirmed.id);
    let confirmed = {
        let ta = ta.clone();
        tokio::spawn(async move { ta.send_confirmed(confirmed).await })
    };
    end_after_ttl(&ta, &tb, ttl, &mut b).await;
    reported_failed(
        &ta,
        &mut events,
        stale,
        crate::DeliveryFailure::Expired,
        confirmed,
    )
    .await;
}

/// A receiver whose inbox is full (its agent reads nothing) treats what comes on as its
/// channel's slow-consumer policy says: `dropNewest` drops what arrives, `dropOldest` the
/// oldest waiting; each dropped message's sender hears `DeliveryFailed(Dropped)` (a
/// confirmed send returns it), the inbox never holds more than its capacity, and what it
/// kept is handed out.
pub async fn a_full_inbox_drops_by_its_channels_policy_and_reports_the_drops(h: &dyn Harness) {
    let channels = || {
        vec![
            Channel::new("newest", ChannelKind::Unicast)
                .with_slow_consumer(crate::SlowConsumer::DropNewest),
            Channel::new("oldest", ChannelKind::Unicast)
                .with_slow_consumer(crate::SlowConsumer::DropOldest),
        ]
    };
    let eps = h.endpoints(2).await;
    let (ta, tb) = (eps[0].clone(), eps[1].clone());
    let _a = attach(&ta, "a", channels()).await;
    let mut b = attach_holding(&tb, "b", channels(), 2).await;
    await_peers(&ta, &["a", "b"]).await;
    await_peers(&tb, &["a", "b"]).await;
    let mut events = ta.subscribe();
    let mut slow = tb.subscribe();
    // dropNewest: two fill the inbox, the next two are dropped.
    let mut dropped = Vec::new();
    for i in 0..3u32 {
        let e = direct("a", "b", "newest", counter(i));
        if i == 2 {
            dropped.push(e.id);
        }
        ta.send(e).await.expect("send");
    }
    let last = direct("a", "b", "newest", counter(3));
    dropped.push(last.id);
    let confirmed = {
        let ta = ta.clone();
        tokio::spawn(async move { ta.send_confirmed(last).await })
    };
    reported(&mut events, &mut dropped, crate::DeliveryFailure::Dropped).await;
    // The receiving side names the slow agent and its channel, with the counts.
    let mut told = 0;
    soon("the slow-consumer events", async {
        while told < 2 {
            if let Ok(Event::SlowConsumer {
                agent,
                channel,
                dropped,
                total,
                waiting,
            }) = slow.recv().await
            {
                assert_eq!((agent.as_str(), channel.as_ref()), ("b", "newest"));
                assert_eq!(waiting, 2, "never more than the capacity");
                told += dropped;
                assert_eq!(total, told);
            }
        }
    })
    .await;
    for i in 0..2 {
        assert_eq!(read_counter(&next_message(&mut b).await.payload), i);
    }
    let err = within("the confirmed send", confirmed)
        .await
        .expect("join")
        .expect_err("dropped");
    assert!(
        matches!(
            err,
            Error::DeliveryFailed {
                reason: crate::DeliveryFailure::Dropped,
                ..
            }
        ),
        "{err}"
    );
    // dropOldest: the two waiting make room for the two newest.
    let mut oldest = Vec::new();
    for i in 4..7u32 {
        let e = direct("a", "b", "oldest", counter(i));
        if i < 6 {
            oldest.push(e.id);
        }
        ta.send(e).await.expect("send");
    }
    let last = direct("a", "b", "oldest", counter(7));
    let confirmed = {
        let ta = ta.clone();
        tokio::spawn(async move { ta.send_confirmed(last).await })
    };
    reported(&mut events, &mut oldest, crate::DeliveryFailure::Dropped).await;
    for i in 6..8 {
        assert_eq!(read_counter(&next_message(&mut b).await.payload), i);
    }
    within("the confirmed newest", confirmed)
        .await
        .expect("join")
        .expect("the newest is taken");
    let s = await_stats(&ta, "a", |s| s.messages_unconfirmed == 0).await;
    assert_eq!(s.messages_failed, 4);
    assert!(b.try_recv().is_none(), "never more than the capacity");
    assert_eq!(b.dropped(), 4);
}

/// Sends a message without a TTL once everything b received has outlived `ttl`: it is the
/// first thing b reads.
async fn end_after_ttl(
    ta: &Arc<dyn Transport>,
    tb: &Arc<dyn Transport>,
    ttl: Duration,
    b: &mut Inbox,
) {
    within("the messages to arrive", async {
        while tb.stats(&"b".into()).messages_received < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    tokio::time::sleep(ttl * 2).await;
    end_comes_next(ta, b, "expired messages are never handed out").await;
}

/// Unreliable channel: what arrives arrives once, and a send never fails for lack of room.
pub async fn unreliable_channel_never_duplicates(h: &dyn Harness) {
    let (ta, _a, _tb, mut b) = pair(h).await;
    const N: u32 = 100;
    for i in 0..N {
        ta.send(direct("a", "b", "metrics", counter(i)))
            .await
            .expect("unreliable send never waits or fails");
    }
    ta.send(direct(
        "a",
        "b",
        "coordination",
        Bytes::from_static(b"done"),
    ))
    .await
    .expect("send");
    let mut seen = HashSet::new();
    let mut done = false;
    // Datagrams and the reliable marker race; read until both the marker and a quiet period.
    while !done || seen.len() < N as usize {
        let item = tokio::time::timeout(Duration::from_millis(500), b.recv()).await;
        let Ok(Some(Inbound::Message { envelope: e, .. })) = item else {
            break;
        };
        if e.channel.as_str() == "coordination" {
            done = true;
        } else {
            assert!(
                seen.insert(read_counter(&e.payload)),
                "unreliable channel duplicated a message"
            );
        }
    }
    assert!(done, "the reliable marker never arrived");
    assert!(!seen.is_empty(), "no unreliable message arrived at all");
    // Every unreliable send is accounted for by the sender: carried, or dropped and counted.
    let stats = ta.stats(&"a".into());
    assert_eq!(
        stats.messages_sent + stats.messages_dropped,
        u64::from(N) + 1,
        "sender accounting: {} sent + {} dropped for {} offered",
        stats.messages_sent,
        stats.messages_dropped,
        N + 1
    );
}

/// A request gets the response its handler sent, correlated to it.
pub async fn request_response_is_correlated(h: &dyn Harness) {
    let (ta, _a, _tb, b) = pair(h).await;
    let _echo = spawn_echo(b, "b");
    for i in 0..20 {
        let req = request("a", "b", counter(i));
        let id = req.id;
        let rsp = ta.request(req, WAIT).await.expect("response");
        assert_eq!(rsp.kind, MessageKind::Response);
        assert_eq!(rsp.correlation_id, Some(id));
        assert_eq!(rsp.from.as_str(), "b");
        assert_eq!(read_counter(&rsp.payload), i);
    }
}

/// Many requests in flight at once each get their own answer.
pub async fn concurrent_requests_are_correlated(h: &dyn Harness) {
    let (ta, _a, _tb, b) = pair(h).await;
    let _echo = spawn_echo(b, "b");
    let calls = (0..64u32).map(|i| {
        let ta = ta.clone();
        async move { (i, ta.request(request("a", "b", counter(i)), WAIT).await) }
    });
    for (i, rsp) in futures::future::join_all(calls).await {
        assert_eq!(read_counter(&rsp.expect("response").payload), i);
    }
}

/// Bursts of large payloads, each within its channel's limit: more than a window's worth of
/// unordered messages, sent back to back, all arrive once; forty requests at once, echoed
/// (more than a responder may hold), are each answered or refused `Busy` (nothing ran), never
/// an error of the link, which serves on.
pub async fn bursts_of_large_messages_and_requests_keep_the_link(h: &dyn Harness) {
    const SIZE: usize = 900_000;
    let (ta, _a, _tb, mut b) = pair(h).await;
    let large = |i: u32| {
        let mut p = vec![0; SIZE];
        p[..4].copy_from_slice(&i.to_be_bytes());
        Bytes::from(p)
    };
    let messages = 24;
    let sender = tokio::spawn({
        let ta = ta.clone();
        async move {
            for i in 0..messages {
                ta.send(direct("a", "b", "results", large(i)))
                    .await
                    .expect("send");
            }
        }
    });
    let mut seen = HashSet::new();
    for _ in 0..messages {
        let e = next_message(&mut b).await;
        assert_eq!(e.payload.len(), SIZE);
        assert!(seen.insert(read_counter(&e.payload)), "duplicate message");
    }
    sender.await.expect("sender task");
    let _echo = spawn_echo(b, "b");
    let calls = (0..40u32).map(|i| {
        let ta = ta.clone();
        async move { (i, ta.request(request("a", "b", large(i)), WAIT).await) }
    });
    let mut answered = 0;
    for (i, outcome) in within("the burst's answers", futures::future::join_all(calls)).await {
        match outcome {
            Ok(rsp) => {
                assert_eq!((rsp.payload.len(), read_counter(&rsp.payload)), (SIZE, i));
                answered += 1;
            }
            Err(Error::Busy { .. }) => {}
            Err(e) => panic!("request {i} failed with {e}"),
        }
    }
    assert!(answered > 0, "some of the burst fits");
    let rsp = ta
        .request(request("a", "b", large(99)), WAIT)
        .await
        .expect("the link serves on");
    assert_eq!(read_counter(&rsp.payload), 99);
}

/// An error response reaches the requester as such.
pub async fn error_responses_pass_through(h: &dyn Harness) {
    let (ta, _a, _tb, mut b) = pair(h).await;
    tokio::spawn(async move {
        if let Some(Inbound::Request {
            envelope,
            responder,
        }) = b.recv().await
        {
            let body = crate::encode(&crate::ErrorBody {
                kind: crate::RemoteErrorKind::HandlerFailed,
                message: "no coverage yet".into(),
            })
            .expect("encode");
            let _ = responder
                .respond(envelope.reply("b".into(), MessageKind::Error, body))
                .await;
        }
        b
    });
    let rsp = ta
        .request(request("a", "b", Bytes::new()), WAIT)
        .await
        .expect("an error response is a response");
    assert_eq!(rsp.kind, MessageKind::Error);
    let body: crate::ErrorBody = rsp.decode().expect("error body");
    assert_eq!(body.message, "no coverage yet");
}

/// A request nobody answers times out; the responder learns the requester gave up, and a
/// late answer is refused.
pub async fn unanswered_request_times_out_and_is_cancelled(h: &dyn Harness) {
    let (ta, _a, _tb, mut b) = pair(h).await;
    let started = tokio::time::Instant::now();
    let timeout = Duration::from_millis(200);
    let call =
        tokio::spawn(async move { ta.request(request("a", "b", Bytes::new()), timeout).await });
    let Some(Inbound::Request {
        envelope,
        mut responder,
    }) = within("the request", b.recv()).await
    else {
        panic!("expected a request");
    };
    let err = call.await.expect("join").expect_err("nobody answered");
    assert!(
        matches!(err, Error::Timeout { .. }),
        "expected a timeout, got {err}"
    );
    assert!(started.elapsed() >= timeout, "timed out early");
    within(
        "the responder to learn of the cancellation",
        responder.cancelled(),
    )
    .await;
    let late = responder
        .respond(envelope.reply("b".into(), MessageKind::Response, Bytes::new()))
        .await;
    assert!(late.is_err(), "a late answer must be refused");
}

/// Sending to or requesting from an agent nobody knows is `PeerNotFound`.
pub async fn unknown_peer_is_a_typed_error(h: &dyn Harness) {
    let (ta, _a, _tb, _b) = pair(h).await;
    let err = ta
        .send(direct("a", "ghost", "coordination", Bytes::new()))
        .await
        .expect_err("unknown");
    assert!(
        matches!(err, Error::PeerNotFound { ref peer } if peer.as_str() == "ghost"),
        "{err}"
    );
    let err = ta
        .request(request("a", "ghost", Bytes::new()), WAIT)
        .await
        .expect_err("unknown");
    assert!(matches!(err, Error::PeerNotFound { .. }), "{err}");
    let header = StreamHeader {
        id: StreamId::next(),
        from: "a".into(),
        to: "ghost".into(),
        options: StreamOptions::default(),
    };
    assert!(matches!(
        ta.open_stream(header).await,
        Err(Error::PeerNotFound { .. })
    ));
    let err = ta
        .send(direct("nobody", "b", "coordination", Bytes::new()))
        .await
        .expect_err("sender unknown");
    assert!(
        matches!(err, Error::PeerNotFound { ref peer } if peer.as_str() == "nobody"),
        "{err}"
    );
}

/// A channel the sender or the receiver lacks is `ChannelNotFound`, naming who lacks it.
pub async fn unknown_channel_is_a_typed_error(h: &dyn Harness) {
    let eps = h.endpoints(2).await;
    let _a = attach(&eps[0], "a", all_channels()).await;
    let _c = attach(&eps[1], "c", vec![Channel::coordination()]).await;
    await_peers(&eps[0], &["c"]).await;
    let err = eps[0]
        .send(direct("a", "c", "nope", Bytes::new()))
        .await
        .expect_err("sender lacks it");
    assert!(
        matches!(err, Error::ChannelNotFound { ref agent, .. } if agent.as_str() == "a"),
        "{err}"
    );
    let err = eps[0]
        .send(direct("a", "c", "results", Bytes::new()))
        .await
        .expect_err("receiver lacks it");
    assert!(
        matches!(err, Error::ChannelNotFound { ref agent, .. } if agent.as_str() == "c"),
        "{err}"
    );
}

/// A payload above the channel's limit is refused before anything is sent.
pub async fn oversize_payload_is_refused_and_nothing_is_lost(h: &dyn Harness) {
    let (ta, _a, _tb, mut b) = pair(h).await;
    let err = ta
        .send(direct("a", "b", "small", vec![0u8; 1025]))
        .await
        .expect_err("too large");
    assert!(
        matches!(
            err,
            Error::MessageTooLarge {
                size: 1025,
                max: 1024
            }
        ),
        "{err}"
    );
    ta.send(direct("a", "b", "small", vec![7u8; 1024]))
        .await
        .expect("at the limit is fine");
    let e = next_message(&mut b).await;
    assert_eq!(e.payload.len(), 1024, "the refused message must not arrive");
    let mut req = request("a", "b", vec![0u8; 2048]);
    req.channel = "small".into();
    assert!(matches!(
        ta.request(req, WAIT).await,
        Err(Error::MessageTooLarge { .. })
    ));
}

/// A broadcast reaches each target once and reports who got it: targets on one endpoint
/// (which a transport may serve together), on another, and on the sender's own.
pub async fn broadcast_reports_each_peer(h: &dyn Harness) {
    let eps = h.endpoints(3).await;
    let _a = attach(&eps[0], "a", all_channels()).await;
    let mut a2 = attach(&eps[0], "a2", all_channels()).await;
    let mut b = attach(&eps[1], "b", all_channels()).await;
    let mut b2 = attach(&eps[1], "b2", all_channels()).await;
    let mut c = attach(&eps[2], "c", all_channels()).await;
    await_peers(&eps[0], &["b", "b2", "c"]).await;
    await_peers(&eps[1], &["a"]).await;
    await_peers(&eps[2], &["a"]).await;
    // A new envelope each time (a copy keeps its id, and would be taken for a duplicate).
    let broadcast_of = |payload: &'static [u8]| {
        let mut e = Envelope::new(
            "a".into(),
            Recipient::Fleet,
            "coordination".into(),
            MessageKind::Broadcast,
            Bytes::from_static(payload),
        );
        e.priority = Channel::coordination().priority;
        e
    };
    let e = broadcast_of(b"hi");
    let targets: Vec<AgentId> = ["b", "b2", "c", "a2", "ghost"].map(AgentId::from).into();
    let report = eps[0]
        .broadcast(e.clone(), &targets)
        .await
        .expect("broadcast");
    assert_eq!(report.id, e.id, "the report names the message");
    let mut delivered: Vec<_> = report.delivered.iter().map(|p| p.to_string()).collect();
    delivered.sort();
    assert_eq!(delivered, ["a2", "b", "b2", "c"]);
    assert_eq!(report.failed.len(), 1);
    assert!(matches!(&report.failed[0], (p, Error::PeerNotFound { .. }) if p.as_str() == "ghost"));
    let again = broadcast_of(b"again");
    let report = eps[0]
        .broadcast(again.clone(), &targets[..4])
        .await
        .expect("broadcast");
    assert_eq!(report.delivered.len(), 4, "{:?}", report.failed);
    assert_eq!(report.id, again.id);
    // Each has the first once, then the second (the channel is ordered and reliable: a
    // second copy of the first would come before it), addressed to itself.
    for (name, inbox) in [
        ("b", &mut b),
        ("b2", &mut b2),
        ("c", &mut c),
        ("a2", &mut a2),
    ] {
        for (want, id) in [(&b"hi"[..], e.id), (b"again", again.id)] {
            let got = next_message(inbox).await;
            assert_eq!((got.kind, &got.payload[..]), (MessageKind::Broadcast, want));
            assert_eq!(got.to, Recipient::Agent(name.into()), "{name}");
            assert_eq!(got.id, id, "every copy carries the broadcast's id");
        }
    }
    let mut wrong = e.clone();
    wrong.channel = "results".into();
    let err = eps[0]
        .broadcast(wrong, &["b".into()])
        .await
        .expect_err("unicast channel");
    assert!(matches!(err, Error::WrongChannelKind { .. }), "{err}");
    let mut unknown = e;
    unknown.channel = "nope".into();
    let err = eps[0]
        .broadcast(unknown, &["b".into()])
        .await
        .expect_err("unknown channel");
    assert!(matches!(err, Error::ChannelNotFound { .. }), "{err}");
}

/// [`Transport::agents_on`] lists the known agents, local and remote, that listen on the
/// channel: the same as [`Transport::peers`] says.
pub async fn agents_on_lists_the_listeners_of_a_channel(h: &dyn Harness) {
    let eps = h.endpoints(2).await;
    let _a = attach(&eps[0], "a", all_channels()).await;
    let _a2 = attach(&eps[0], "a2", vec![Channel::metrics()]).await;
    let _b = attach(&eps[1], "b", all_channels()).await;
    let _b2 = attach(&eps[1], "b2", vec![Channel::metrics()]).await;
    await_peers(&eps[0], &["b", "b2"]).await;
    let sorted = |mut v: Vec<AgentId>| {
        v.sort();
        v
    };
    for (channel, want) in [
        ("coordination", &["a", "b"][..]),
        ("metrics", &["a", "a2", "b", "b2"][..]),
        ("nope", &[][..]),
    ] {
        let channel = crate::ChannelName::from(channel);
        let on = sorted(eps[0].agents_on(&channel));
        let want: Vec<AgentId> = want.iter().map(|&id| AgentId::from(id)).collect();
        assert_eq!(on, want, "agents on {channel}");
        let described = eps[0]
            .peers()
            .into_iter()
            .filter(|p| p.channels.contains(&channel))
            .map(|p| p.id)
            .collect();
        assert_eq!(
            on,
            sorted(described),
            "as peers() describes them, on {channel}"
        );
    }
}

/// A confirmed broadcast resolves to each recipient's outcome: taken, or failed with the
/// reason (its agent stopped before taking it; unknown).
pub async fn confirmed_broadcast_reports_each_recipients_outcome(h: &dyn Harness) {
    let eps = h.endpoints(3).await;
    let _a = attach(&eps[0], "a", all_channels()).await;
    let mut b = attach(&eps[1], "b", all_channels()).await;
    let c = attach(&eps[2], "c", all_channels()).await;
    await_peers(&eps[0], &["b", "c"]).await;
    await_peers(&eps[1], &["a"]).await;
    await_peers(&eps[2], &["a"]).await;
    let mut e = Envelope::new(
        "a".into(),
        Recipient::Fleet,
        "coordination".into(),
        MessageKind::Broadcast,
        Bytes::from_static(b"hi"),
    );
    e.priority = Channel::coordination().priority;
    let report = {
        let (t, e) = (eps[0].clone(), e.clone());
        tokio::spawn(async move {
            t.broadcast_confirmed(e, &["b".into(), "c".into(), "ghost".into()])
                .await
        })
    };
    // b takes it; c's agent stops with it unread.
    let got = next_message(&mut b).await;
    assert_eq!(&got.payload[..], b"hi");
    within("c to have it", async {
        while eps[2].stats(&"c".into()).messages_received < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    eps[2].detach(&"c".into()).await.expect("detach");
    drop(c);
    let report = soon("the confirmed broadcast", report)
        .await
        .expect("join")
        .expect("broadcast");
    let delivered: Vec<_> = report.delivered.iter().map(|p| p.to_string()).collect();
    assert_eq!(delivered, ["b"], "taken by b only");
    let mut failed: Vec<(String, String)> = report
        .failed
        .iter()
        .map(|(p, e)| (p.to_string(), format!("{e:?}")))
        .collect();
    failed.sort();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(
        matches!(
            report.failed.iter().find(|(p, _)| p.as_str() == "c"),
            Some((
                _,
                Error::DeliveryFailed {
                    reason: crate::DeliveryFailure::ReceiverStopped,
                    ..
                }
            ))
        ),
        "{failed:?}"
    );
    assert!(
        matches!(
            report.failed.iter().find(|(p, _)| p.as_str() == "ghost"),
            Some((_, Error::PeerNotFound { .. }))
        ),
        "{failed:?}"
    );
    let mut unreliable = e;
    unreliable.channel = "metrics".into();
    let err = eps[0]
        .broadcast_confirmed(unreliable, &["b".into()])
        .await
        .expect_err("nothing is acknowledged on an unreliable channel");
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
}

async fn open(t: &Arc<dyn Transport>, to: &str) -> (StreamId, Box<dyn crate::StreamSink>) {
    let id = StreamId::next();
    let header = StreamHeader {
        id,
        from: "a".into(),
        to: to.into(),
        options: StreamOptions::default(),
    };
    (id, t.open_stream(header).await.expect("open stream"))
}

async fn incoming(inbox: &mut Inbox) -> crate::IncomingStream {
    match within("a stream", inbox.recv()).await {
        Some(Inbound::Stream(s)) => s,
        other => panic!("expected a stream, got {other:?}"),
    }
}

/// The receiver sees the open, every chunk in order, then the final mark.
pub async fn stream_delivers_open_data_and_end_in_order(h: &dyn Harness) {
    let (ta, _a, _tb, mut b) = pair(h).await;
    let (id, mut sink) = open(&ta, "b").await;
    let writer = tokio::spawn(async move {
        for i in 0..200u32 {
            // Half without waiting where the transport can take them so (the order holds
            // across both ways of writing).
            match if i % 2 == 0 {
                sink.try_write(counter(i))
            } else {
                Err(counter(i))
            } {
                Ok(written) => written.expect("write at once"),
                Err(data) => sink.write(data, false).await.expect("write"),
            }
        }
        sink.write(Bytes::from_static(b"last"), true)
            .await
            .expect("final write");
        let again = sink.write(Bytes::from_static(b"more"), false).await;
        assert!(
            matches!(
                again,
                Err(Error::Stream {
                    reason: StreamFailure::Finished,
                    ..
                })
            ),
            "write after final"
        );
    });
    let mut s = incoming(&mut b).await;
    assert_eq!(
        (
            s.header().id,
            s.header().from.as_str(),
            s.header().to.as_str()
        ),
        (id, "a", "b")
    );
    let mut data = Vec::new();
    loop {
        let chunk = within("a chunk", s.next())
            .await
            .expect("chunk before end")
            .expect("no error");
        data.extend_from_slice(&chunk.data);
        if chunk.fin {
            break;
        }
    }
    assert!(s.next().await.is_none(), "nothing after the final chunk");
    writer.await.expect("writer");
    let mut expected: Vec<u8> = (0..200u32).flat_map(|i| i.to_be_bytes()).collect();
    expected.extend_from_slice(b"last");
    assert_eq!(data, expected, "stream data out of order or incomplete");
}

/// Closing without a final write still ends the stream cleanly for the receiver.
pub async fn stream_close_without_final_ends_the_stream(h: &dyn Harness) {
    let (ta, _a, _tb, mut b) = pair(h).await;
    let (_id, mut sink) = open(&ta, "b").await;
    sink.write(Bytes::from_static(b"x"), false)
        .await
        .expect("write");
    sink.close().await.expect("close");
    let mut s = incoming(&mut b).await;
    let mut data = Vec::new();
    let mut ended = false;
    while let Some(chunk) = within("a chunk", s.next()).await {
        let chunk = chunk.expect("a clean end, not an error");
        data.extend_from_slice(&chunk.data);
        ended |= chunk.fin;
    }
    assert!(ended, "the final mark must arrive");
    assert_eq!(data, b"x");
}

/// Writing to a stream whose receiver dropped it fails with a stream error.
pub async fn stream_to_a_dropped_receiver_fails(h: &dyn Harness) {
    let (ta, _a, _tb, mut b) = pair(h).await;
    let (_id, mut sink) = open(&ta, "b").await;
    sink.write(Bytes::from_static(b"first"), false)
        .await
        .expect("write");
    drop(incoming(&mut b).await);
    let failed = within("a write to fail", async {
        loop {
            if let Err(e) = sink.write(Bytes::from_static(b"more"), false).await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(matches!(failed, Error::Stream { .. }), "{failed}");
}

/// A stream whose writer goes away before its end reaches the reader as an error, after
/// the data written before it: never as a clean end.
pub async fn stream_dropped_by_its_writer_fails_for_the_reader(h: &dyn Harness) {
    let (ta, _a, _tb, mut b) = pair(h).await;
    let (_id, mut sink) = open(&ta, "b").await;
    for i in 0..50u32 {
        sink.write(counter(i), false).await.expect("write");
    }
    let mut s = incoming(&mut b).await;
    let first = within("a chunk", s.next())
        .await
        .expect("a chunk")
        .expect("no error yet");
    assert_eq!(&first.data[..], &counter(0)[..]);
    drop(sink);
    let end = within("the stream to end", async {
        loop {
            match s.next().await {
                Some(Ok(chunk)) => assert!(!chunk.fin, "a dropped writer sent no final chunk"),
                other => return other,
            }
        }
    })
    .await;
    assert!(
        matches!(
            end,
            Some(Err(Error::Stream {
                reason: StreamFailure::Cancelled,
                ..
            }))
        ),
        "{end:?}"
    );
}

/// Peers on other endpoints are listed with their type, capabilities and channels; a
/// departure is announced and the peer is then unknown (at once on one transport; over a
/// chain, once its slowest link heard of it).
pub async fn discovery_sees_remote_agents_and_departures(h: &dyn Harness) {
    let (ta, _a, tb, b) = pair(h).await;
    let peer = ta
        .peers()
        .into_iter()
        .find(|p| p.id.as_str() == "b")
        .expect("b is listed");
    assert_eq!(peer.agent_type.as_str(), "conformance");
    assert_eq!(peer.capabilities, vec![crate::Capability::from("testing")]);
    assert!(peer.channels.contains(&"coordination".into()));
    assert_eq!(peer.state, crate::PeerState::Connected);
    let mut events = ta.subscribe();
    tb.detach(&"b".into()).await.expect("detach");
    drop(b);
    within("b's departure", async {
        loop {
            match events.recv().await {
                Ok(Event::PeerLeft(id)) if id.as_str() == "b" => return,
                Ok(_) => {}
                Err(e) => panic!("event stream: {e}"),
            }
        }
    })
    .await;
    // Over a chain of links, a slower link can still be learning of b when a faster one
    // reports its departure (FALLBACK.md, Membership): the listing settles within the wait.
    within("b to be unlisted", async {
        while ta.peers().iter().any(|p| p.id.as_str() == "b") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let err = ta
        .send(direct("a", "b", "coordination", Bytes::new()))
        .await
        .expect_err("gone");
    assert!(matches!(err, Error::PeerNotFound { .. }), "{err}");
    assert!(matches!(
        tb.detach(&"b".into()).await,
        Err(Error::PeerNotFound { .. })
    ));
}

/// Sent and received messages and bytes are counted per agent.
pub async fn stats_count_traffic(h: &dyn Harness) {
    let (ta, _a, tb, mut b) = pair(h).await;
    for i in 0..10 {
        ta.send(direct("a", "b", "coordination", vec![i as u8; 100]))
            .await
            .expect("send");
    }
    for _ in 0..10 {
        next_message(&mut b).await;
    }
    let sa = ta.stats(&"a".into());
    let sb = tb.stats(&"b".into());
    assert!(sa.messages_sent >= 10, "sent {}", sa.messages_sent);
    assert!(sa.bytes_sent >= 1000, "bytes sent {}", sa.bytes_sent);
    assert!(
        sb.messages_received >= 10,
        "received {}",
        sb.messages_received
    );
    assert!(
        sb.bytes_received >= 1000,
        "bytes received {}",
        sb.bytes_received
    );
    assert!(sa.last_activity.is_some());
}

/// One id attaches once per endpoint.
pub async fn attaching_twice_is_refused(h: &dyn Harness) {
    let eps = h.endpoints(1).await;
    let _a = attach(&eps[0], "a", all_channels()).await;
    let (tx, _rx) = inbox("a".into(), 8);
    let err = eps[0]
        .attach(registration("a", all_channels()), tx)
        .await
        .expect_err("duplicate id");
    assert!(matches!(err, Error::Configuration { .. }), "{err}");
}

/// After shutdown, calls fail with `Shutdown` and the endpoint hosts nobody. Inboxes stay
/// open: they belong to the agents, which may still be reached over another transport.
pub async fn shutdown_fails_further_calls(h: &dyn Harness) {
    let (ta, _a, _tb, _b) = pair(h).await;
    ta.shutdown().await;
    let err = ta
        .send(direct("a", "b", "coordination", Bytes::new()))
        .await
        .expect_err("shut down");
    assert!(matches!(err, Error::Shutdown), "{err}");
    let err = ta
        .request(request("a", "b", Bytes::new()), WAIT)
        .await
        .expect_err("shut down");
    assert!(matches!(err, Error::Shutdown), "{err}");
    assert!(
        ta.peers().iter().all(|p| p.id.as_str() != "a"),
        "a shut-down endpoint hosts nobody"
    );
    let (tx, _rx) = inbox("late".into(), 8);
    assert!(matches!(
        ta.attach(registration("late", all_channels()), tx).await,
        Err(Error::Shutdown)
    ));
}
