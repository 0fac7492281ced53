//! Full queues on the bus: reliable senders wait then fail, unreliable messages are dropped
//! and counted; nothing disappears without a trace.

use std::time::Duration;

use aqe_core::plumbing::{Inbox, inbox};
use aqe_core::{
    Channel, Envelope, Error, Event, Inbound, MessageKind, Recipient, Registration, SendFailure,
    StreamHeader, StreamId, StreamOptions, Transport,
};
use aqe_eventbus::{BusConfig, EventBus};
use bytes::Bytes;

fn reg(id: &str) -> Registration {
    Registration::new(id, "t")
        .with_channel(Channel::coordination())
        .with_channel(Channel::metrics())
}

fn msg(channel: &str) -> Envelope {
    Envelope::new(
        "a".into(),
        Recipient::Agent("b".into()),
        channel.into(),
        MessageKind::Direct,
        Bytes::from_static(b"x"),
    )
}

/// A bus with this send timeout, agent `a` and agent `b` whose inbox holds `capacity`.
async fn a_to_b(send_timeout: Duration, capacity: usize) -> (EventBus, Inbox, Inbox) {
    let bus = EventBus::with_config(BusConfig {
        send_timeout,
        ..BusConfig::default()
    });
    let (tx, a) = inbox("a".into(), 8);
    bus.attach(reg("a"), tx).await.expect("attach");
    let (tx, b) = inbox("b".into(), capacity);
    bus.attach(reg("b"), tx).await.expect("attach");
    (bus, a, b)
}

#[tokio::test]
async fn a_full_inbox_makes_reliable_senders_wait_then_fail() {
    let (bus, _a, mut b) = a_to_b(Duration::from_millis(50), 2).await;
    bus.send(msg("coordination")).await.expect("room");
    bus.send(msg("coordination")).await.expect("room");
    let started = tokio::time::Instant::now();
    let err = bus.send(msg("coordination")).await.expect_err("full");
    assert!(
        matches!(
            err,
            Error::SendFailed {
                reason: SendFailure::QueueFull(_),
                ..
            }
        ),
        "{err}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "the sender waited the send timeout"
    );
    // Unreliable: dropped at once, and counted on the sender.
    bus.send(msg("metrics"))
        .await
        .expect("an unreliable send never fails for lack of room");
    let stats = bus.stats(&"a".into());
    assert_eq!((stats.messages_sent, stats.messages_dropped), (2, 1));
    assert!(stats.packet_loss > 0.0);
    // Once the receiver reads, reliable sends go through again.
    assert!(matches!(b.recv().await, Some(Inbound::Message { .. })));
    bus.send(msg("coordination")).await.expect("room again");
    assert_eq!(bus.stats(&"b".into()).messages_received, 3);
}

#[tokio::test]
async fn a_full_unreliable_stream_drops_chunks_but_never_the_end() {
    let bus = EventBus::with_config(BusConfig {
        stream_capacity: 2,
        ..BusConfig::default()
    });
    let (tx, _a) = inbox("a".into(), 8);
    bus.attach(reg("a"), tx).await.expect("attach");
    let (tx, mut b) = inbox("b".into(), 8);
    bus.attach(reg("b"), tx).await.expect("attach");
    let header = StreamHeader {
        id: StreamId::next(),
        from: "a".into(),
        to: "b".into(),
        options: StreamOptions::default()
            .with_channel("metrics")
            .with_reliable(false),
    };
    let mut sink = bus.open_stream(header).await.expect("open");
    for i in 0..5u8 {
        sink.write(Bytes::from(vec![i]), false)
            .await
            .expect("unreliable writes never wait");
    }
    let end = tokio::spawn(async move { sink.close().await });
    let Some(Inbound::Stream(mut s)) = b.recv().await else {
        panic!("expected a stream")
    };
    let mut data = Vec::new();
    let mut fin = false;
    while let Some(chunk) = s.next().await {
        let chunk = chunk.expect("clean end");
        data.extend_from_slice(&chunk.data);
        fin |= chunk.fin;
    }
    end.await.expect("join").expect("close");
    assert!(fin);
    assert_eq!(data, [0, 1], "the first two fit, the rest were dropped");
    assert_eq!(bus.stats(&"a".into()).messages_dropped, 3);
}

#[tokio::test]
async fn lifecycle_events_announce_agents_starting_and_stopping() {
    let bus = EventBus::new();
    let mut events = bus.subscribe();
    let (tx, _a) = inbox("a".into(), 8);
    bus.attach(reg("a"), tx).await.expect("attach");
    bus.detach(&"a".into()).await.expect("detach");
    match events.recv().await.expect("event") {
        Event::PeerDiscovered(p) => assert_eq!((p.id.as_str(), p.channels.len()), ("a", 2)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        events.recv().await.expect("event"),
        Event::PeerLeft("a".into())
    );
}

#[tokio::test]
async fn a_batch_takes_the_room_there_is_and_says_how_many_went() {
    let (bus, _a, mut b) = a_to_b(Duration::from_millis(50), 3).await;
    // Reliable: three fit, the fourth waits the send timeout, then the batch stops there.
    let batch: Vec<Envelope> = (0..5).map(|_| msg("coordination")).collect();
    let ids: Vec<_> = batch.iter().map(|e| e.id).collect();
    match bus
        .send_many(batch)
        .await
        .expect_err("no room for the rest")
    {
        Error::PartlyAccepted { accepted, source } => {
            assert_eq!(accepted, 3);
            assert!(
                matches!(
                    *source,
                    Error::SendFailed {
                        reason: SendFailure::QueueFull(_),
                        ..
                    }
                ),
                "{source}"
            );
        }
        other => panic!("expected PartlyAccepted, got {other}"),
    }
    for id in &ids[..3] {
        match b.recv().await {
            Some(Inbound::Message { envelope, .. }) => assert_eq!(envelope.id, *id, "in order"),
            other => panic!("expected a message, got {other:?}"),
        }
    }
    let stats = bus.stats(&"a".into());
    assert_eq!((stats.messages_sent, stats.messages_unconfirmed), (3, 0));
    // Unreliable: what fits goes, the rest is dropped and counted.
    let batch: Vec<Envelope> = (0..5).map(|_| msg("metrics")).collect();
    bus.send_many(batch)
        .await
        .expect("never fails for lack of room");
    let stats = bus.stats(&"a".into());
    assert_eq!((stats.messages_sent, stats.messages_dropped), (6, 2));
    // A message too large stops the batch where it stands, as its own send would fail.
    while b.try_recv().is_some() {}
    let mut batch: Vec<Envelope> = (0..3).map(|_| msg("coordination")).collect();
    batch[1].payload = Bytes::from(vec![0u8; Channel::coordination().max_message_size + 1]);
    match bus.send_many(batch).await.expect_err("too large") {
        Error::PartlyAccepted { accepted, source } => {
            assert_eq!(accepted, 1);
            assert!(matches!(*source, Error::MessageTooLarge { .. }), "{source}");
        }
        other => panic!("expected PartlyAccepted, got {other}"),
    }
    assert!(b.try_recv().is_some());
    assert!(b.try_recv().is_none(), "nothing after the refused one went");
}
