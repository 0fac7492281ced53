//! The in-process event bus: a [`Transport`] for agents that share a process.
//!
//! Messages move as values, without encoding, through each agent's bounded priority
//! [`Inbox`](aqe_core::plumbing::Inbox). Full queues behave as the channel says: a reliable send waits
//! up to the bus's send timeout and then fails with [`SendFailure::QueueFull`]; an unreliable
//! send drops the message and counts it in the sender's `messages_dropped`. A reliable
//! message is acknowledged when its agent takes it (its [`Receipt`](aqe_core::Receipt)); one
//! still queued when the receiver stops is reported in [`Event::DeliveryFailed`]. Nothing is
//! lost silently.
//!
//! Agents starting and stopping are published to subscribers as [`Event::PeerDiscovered`]
//! and [`Event::PeerLeft`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> aqe_core::Result<()> {
//! use aqe_core::{Channel, Envelope, Inbound, MessageKind, Recipient, Registration, Transport};
//! use aqe_core::plumbing::inbox;
//! let bus = aqe_eventbus::EventBus::new();
//! let (tx, _a) = inbox("a".into(), 64);
//! bus.attach(Registration::new("a", "demo").with_channel(Channel::coordination()), tx).await?;
//! let (tx, mut b) = inbox("b".into(), 64);
//! bus.attach(Registration::new("b", "demo").with_channel(Channel::coordination()), tx).await?;
//! let msg = Envelope::new("a".into(), Recipient::Agent("b".into()), "coordination".into(),
//!                         MessageKind::Direct, aqe_core::encode(&"hello")?);
//! bus.send(msg).await?;
//! let Some(Inbound::Message { envelope: got, .. }) = b.recv().await else { unreachable!() };
//! assert_eq!(got.decode::<String>()?, "hello");
//! # Ok(()) }
//! ```
#![warn(missing_docs, unreachable_pub)]

mod bus;

pub use bus::{BusConfig, EventBus};

#[doc(no_inline)]
pub use aqe_core::{Event, SendFailure, Transport};
