//! The fallback policy at work: an operation the primary cannot complete goes to the secondary.

use std::sync::Arc;
use std::time::Duration;

use aqe_agent::{Agent, EventBus, Fallback, FallbackPolicy, HandlerError};
use aqe_core::plumbing::inbox;
use aqe_core::{Event, Inbound, Registration, RequestOptions, Transport};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

async fn collector(t: Arc<dyn Transport>, id: &str) -> (Agent, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let a = Agent::builder()
        .id(id)
        .agent_type("t")
        .transport(t)
        .on_message(move |_a, env| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(env.decode::<String>().expect("string"));
            }
        })
        .start()
        .await
        .expect("start");
    (a, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_over_primary_goes_over_secondary_and_is_counted() {
    let (primary, secondary) = (Arc::new(EventBus::new()), Arc::new(EventBus::new()));
    let both: Arc<dyn Transport> = Fallback::new(
        primary.clone(),
        secondary.clone(),
        FallbackPolicy::default(),
    );
    let sender = Agent::builder()
        .id("sender")
        .agent_type("t")
        .transport(both.clone())
        .start()
        .await
        .expect("start");
    let mut events = sender.events();
    // The receiver is only on the secondary: over the primary it is unknown.
    let (_receiver, mut got) = collector(secondary.clone(), "receiver").await;
    sender
        .send_to_agent(&"receiver".into(), &"via fallback", "coordination")
        .await
        .expect("delivered by the secondary");
    assert_eq!(
        tokio::time::timeout(WAIT, got.recv())
            .await
            .expect("in time")
            .expect("open"),
        "via fallback"
    );
    assert_eq!(sender.stats().fallbacks_used, 1);
    loop {
        match tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("event")
            .expect("open")
        {
            Event::FallbackUsed {
                operation, peer, ..
            } => {
                assert_eq!(
                    (operation, peer.as_ref().map(|p| p.as_str())),
                    ("send", Some("receiver"))
                );
                break;
            }
            _ => continue,
        }
    }
    // Unknown everywhere: the primary's error comes back, nothing is counted.
    let err = sender
        .send_to_agent(&"ghost".into(), &"x", "coordination")
        .await
        .expect_err("unknown");
    assert!(matches!(err, aqe_core::Error::PeerNotFound { .. }), "{err}");
    assert_eq!(sender.stats().fallbacks_used, 1);
    // A problem with the message itself never falls back.
    let err = sender
        .send_to_agent(&"receiver".into(), &vec![0u8; 2 << 20], "coordination")
        .await
        .expect_err("too big");
    assert!(
        matches!(err, aqe_core::Error::MessageTooLarge { .. }),
        "{err}"
    );
    assert_eq!(sender.stats().fallbacks_used, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_times_out_over_primary_is_answered_over_secondary() {
    let (primary, secondary) = (Arc::new(EventBus::new()), Arc::new(EventBus::new()));
    let both: Arc<dyn Transport> = Fallback::new(
        primary.clone(),
        secondary.clone(),
        FallbackPolicy::default(),
    );
    // Over the primary, "analyzer" is a dead end: something holds its requests unanswered.
    let (tx, mut dead_end) = inbox("analyzer".into(), 16);
    primary
        .attach(
            Registration {
                channels: aqe_core::default_channels(),
                ..Registration::new("analyzer", "t")
            },
            tx,
        )
        .await
        .expect("attach");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(item) = dead_end.recv().await {
            if let Inbound::Request { responder, .. } = item {
                held.push(responder);
            }
        }
    });
    let _analyzer = Agent::builder()
        .id("analyzer")
        .agent_type("t")
        .transport(secondary.clone())
        .on_request(|_a, _req| async { Ok::<_, HandlerError>(87u32) })
        .start()
        .await
        .expect("start");
    let executor = Agent::builder()
        .id("executor")
        .agent_type("t")
        .transport(both)
        .start()
        .await
        .expect("start");
    let opts = RequestOptions::default().with_timeout(Duration::from_millis(100));
    let coverage: u32 = executor
        .request_from_agent(&"analyzer".into(), &(), opts)
        .await
        .expect("answered over the secondary");
    assert_eq!(coverage, 87);
    assert_eq!(executor.stats().fallbacks_used, 1);
    let no_timeouts: Arc<dyn Transport> = Fallback::new(
        primary.clone(),
        secondary.clone(),
        FallbackPolicy {
            on_timeout: false,
            ..FallbackPolicy::default()
        },
    );
    let strict = Agent::builder()
        .id("strict")
        .agent_type("t")
        .transport(no_timeouts)
        .start()
        .await
        .expect("start");
    let err = strict
        .request_from_agent::<_, u32>(
            &"analyzer".into(),
            &(),
            RequestOptions::default().with_timeout(Duration::from_millis(100)),
        )
        .await;
    assert!(
        matches!(err, Err(aqe_core::Error::Timeout { .. })),
        "{err:?}"
    );
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_falls_back_per_peer() {
    let (primary, secondary) = (Arc::new(EventBus::new()), Arc::new(EventBus::new()));
    let both: Arc<dyn Transport> = Fallback::new(
        primary.clone(),
        secondary.clone(),
        FallbackPolicy::default(),
    );
    let (_on_both, mut g1) = collector(both.clone(), "on-both").await;
    let (_only_secondary, mut g2) = collector(secondary.clone(), "only-secondary").await;
    let cmd = Agent::builder()
        .id("cmd")
        .agent_type("t")
        .transport(both)
        .start()
        .await
        .expect("start");
    let opts = aqe_core::BroadcastOptions::default().including([
        "on-both".into(),
        "only-secondary".into(),
        "ghost".into(),
    ]);
    let report = cmd
        .broadcast_to_fleet(&"hello fleet", opts)
        .await
        .expect("broadcast");
    let mut delivered: Vec<_> = report.delivered.iter().map(|p| p.to_string()).collect();
    delivered.sort();
    assert_eq!(delivered, ["on-both", "only-secondary"]);
    assert!(
        matches!(report.failed.as_slice(), [(id, aqe_core::Error::PeerNotFound { .. })] if id.as_str() == "ghost")
    );
    assert_eq!(
        tokio::time::timeout(WAIT, g1.recv())
            .await
            .expect("in time")
            .expect("open"),
        "hello fleet"
    );
    assert_eq!(
        tokio::time::timeout(WAIT, g2.recv())
            .await
            .expect("in time")
            .expect("open"),
        "hello fleet"
    );
    assert_eq!(
        cmd.stats().fallbacks_used,
        1,
        "only the peer missing from the primary fell back"
    );
}
