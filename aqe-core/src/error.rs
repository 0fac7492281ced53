//! The one error type of aqe-core, shared by every transport and the runtime.

use std::path::PathBuf;
use std::time::Duration;

use crate::{Address, AgentId, ChannelKind, ChannelName, StreamId};

/// A boxed error from a layer below aqe (I/O, TLS, QUIC), kept as the source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in aqe, as one closed set of cases.
///
/// The variants carry what a caller needs to act (which peer, which channel, how large,
/// how long) and keep the lower-level cause as `source` where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A connection to a remote endpoint could not be established.
    #[error("connection to {addr} failed")]
    ConnectionFailed {
        /// The address that was dialed.
        addr: Address,
        /// What the layer below reported.
        #[source]
        source: BoxError,
    },
    /// A connection attempt did not complete within the configured connection timeout.
    #[error("connection to {addr} timed out after {after:?}")]
    ConnectionTimeout {
        /// The address that was dialed.
        addr: Address,
        /// The connection timeout that expired.
        after: Duration,
    },
    /// An established connection went away (peer closed it, idle timeout, network failure).
    #[error("connection to {addr} lost")]
    ConnectionLost {
        /// The remote endpoint's address.
        addr: Address,
        /// Why the connection ended, as reported by the layer below.
        #[source]
        source: BoxError,
    },
    /// No agent with this id is known to the transport.
    #[error("peer {peer} not found")]
    PeerNotFound {
        /// The id that was looked up.
        peer: AgentId,
    },
    /// The agent named here has no channel of that name.
    #[error("agent {agent} has no channel {channel:?}")]
    ChannelNotFound {
        /// The channel that was asked for.
        channel: ChannelName,
        /// The agent that lacks it (the sender or the receiver).
        agent: AgentId,
    },
    /// The operation needs a channel of another kind (a fleet broadcast on a unicast channel).
    #[error("channel {channel:?} is not a {expected:?} channel")]
    WrongChannelKind {
        /// The channel used.
        channel: ChannelName,
        /// The kind the operation needs.
        expected: ChannelKind,
    },
    /// The payload or frame is larger than the channel or wire allows; nothing was sent.
    #[error("message of {size} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge {
        /// Size of the rejected payload or frame, in bytes.
        size: usize,
        /// The limit that applies.
        max: usize,
    },
    /// The message could not be handed to the receiver.
    #[error("send to {to} failed: {reason}")]
    SendFailed {
        /// The intended receiver.
        to: AgentId,
        /// Why.
        reason: SendFailure,
    },
    /// A batch of messages was accepted in part: the first `accepted` of them were (each
    /// then ends taken or reported, as any accepted message), the rest were not, for the
    /// reason `source` gives.
    #[error("{accepted} messages of the batch accepted, the rest not: {source}")]
    PartlyAccepted {
        /// How many of the batch, from its start, were accepted.
        accepted: usize,
        /// Why the next one was not.
        source: Box<Error>,
    },
    /// A reliable message was accepted but did not reach its receiver (a confirmed send).
    #[error("message to {to} not delivered: {reason}")]
    DeliveryFailed {
        /// The intended receiver.
        to: AgentId,
        /// Why, and whether it may have been processed.
        reason: DeliveryFailure,
    },
    /// The receiver has too many requests in hand to take another now; nothing was run.
    /// Try again later.
    #[error("{peer} is busy: too many requests in hand")]
    Busy {
        /// The agent that refused the request.
        peer: AgentId,
    },
    /// A request got no response in time, after every retry.
    #[error("request timed out after {after:?} ({attempts} attempt(s))")]
    Timeout {
        /// The per-attempt timeout.
        after: Duration,
        /// How many attempts were made.
        attempts: u32,
    },
    /// A stream operation failed.
    #[error("stream {stream} failed: {reason}")]
    Stream {
        /// The stream concerned.
        stream: StreamId,
        /// Why.
        reason: StreamFailure,
    },
    /// Protocol error: a frame announced a length above the wire limit.
    #[error("protocol error: frame of {size} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// The announced frame length.
        size: usize,
        /// The maximum frame length accepted.
        max: usize,
    },
    /// Protocol error: a frame carries a wire version this build does not speak.
    #[error(
        "protocol error: wire version {found} is not supported (this build speaks {supported})"
    )]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
        /// The version this build speaks.
        supported: u8,
    },
    /// Protocol error: bytes that do not decode as the expected value.
    #[error("protocol error: malformed {what}")]
    Malformed {
        /// What was being decoded (a frame, a payload, a hello...).
        what: &'static str,
        /// The decoder's complaint.
        #[source]
        source: BoxError,
    },
    /// A payload that is not a value of the type asked for, in the encoding its envelope
    /// says it has.
    #[error("cannot decode the {encoding} payload as {into}: {source}")]
    Undecodable {
        /// How the payload says it is encoded.
        encoding: crate::Encoding,
        /// The type asked for.
        into: &'static str,
        /// Why not.
        #[source]
        source: BoxError,
    },
    /// Protocol error: input ended before a complete value.
    #[error("protocol error: truncated {what}: {have} of {needed} bytes")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// Protocol error: the peer broke a rule of the protocol.
    #[error("protocol error: {detail}")]
    Protocol {
        /// The rule that was broken.
        detail: &'static str,
    },
    /// A value could not be encoded (for example a map with non-string keys in a payload).
    #[error("could not encode {what}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The encoder's complaint.
        #[source]
        source: BoxError,
    },
    /// Authentication or encryption failed: untrusted certificate, wrong token, TLS failure.
    #[error("security error: {kind}")]
    Security {
        /// Which check failed.
        kind: SecurityFailure,
        /// The lower-level cause, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// A configuration value or file is invalid.
    #[error("configuration error{}: {field}: {message}", file.as_ref().map(|f| format!(" in {}", f.display())).unwrap_or_default())]
    Configuration {
        /// The file being read, if the configuration came from one.
        file: Option<PathBuf>,
        /// The offending field, as a path (`quicConfig.channels[1].priority`).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The remote agent answered a request with an error.
    #[error("agent {agent} answered with an error ({kind}): {message}")]
    Remote {
        /// The agent that answered.
        agent: AgentId,
        /// The class of failure.
        kind: RemoteErrorKind,
        /// The remote side's description.
        message: String,
    },
    /// The agent or transport is shutting down or has shut down.
    #[error("shut down")]
    Shutdown,
    /// The transport does not offer this operation.
    #[error("{operation} is not supported by this transport")]
    Unsupported {
        /// The operation asked for.
        operation: &'static str,
    },
}

/// Why a send failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendFailure {
    /// The receiver's queue stayed full for the whole send timeout (reliable channels).
    #[error("receiver queue full for {0:?}")]
    QueueFull(Duration),
    /// The receiver is gone (stopped or detached).
    #[error("receiver closed")]
    ReceiverClosed,
}

/// Why an accepted reliable message was not delivered.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, thiserror::Error,
)]
#[non_exhaustive]
pub enum DeliveryFailure {
    /// The receiving agent stopped (or left its endpoint) before taking the message, and did
    /// not come back before the delivery deadline. It was not processed.
    #[error("the receiver stopped before taking it")]
    ReceiverStopped,
    /// The receiver could not be reached before the delivery deadline and the message was
    /// never handed to it. It was not processed.
    #[error("the receiver was unreachable until the delivery deadline")]
    Unreachable,
    /// The message was handed to the receiver's endpoint, which went away (crashed, or the
    /// network failed) before confirming it, and the receiver did not come back before the
    /// delivery deadline. It may or may not have been processed.
    #[error("sent, but the receiver went away before confirming it (it may have been processed)")]
    Unconfirmed,
    /// The receiving endpoint refused the message: its sender is not an agent the sending
    /// endpoint announced, or the sending endpoint exceeded a limit the receiver set. It was
    /// not processed.
    #[error("refused by the receiving endpoint")]
    Refused,
    /// The message's time-to-live ran out before its receiving agent took it: it was dropped
    /// where it waited, never handed to a handler late. It was not processed.
    #[error("its time-to-live ran out before the receiver took it")]
    Expired,
    /// The receiving agent's inbox was full and its channel's slow-consumer policy
    /// (`dropOldest`, `dropNewest`, `fail`) dropped the message unread. It was not
    /// processed.
    #[error("the receiver's inbox was full and its channel drops")]
    Dropped,
}

/// Why a stream operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamFailure {
    /// No open stream has this id.
    #[error("unknown stream")]
    Unknown,
    /// The stream was already finished by a final write or a close.
    #[error("already finished")]
    Finished,
    /// The receiving side went away, or refused the stream.
    #[error("closed by peer")]
    ClosedByPeer,
    /// The writing side gave up on the stream before finishing it (it dropped the stream,
    /// or its agent stopped): what arrived is all there will be.
    #[error("cancelled by the writer")]
    Cancelled,
    /// The receiving agent takes no streams (it announces no
    /// [`STREAM_CAPABILITY`](crate::STREAM_CAPABILITY): it has no stream handler).
    #[error("the receiving agent takes no streams")]
    NotTaken,
    /// The stream was reset with an application code.
    #[error("reset with code {0}")]
    Reset(u64),
}

/// Which security check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecurityFailure {
    /// The peer's certificate is not signed by a trusted authority, or names another host.
    #[error("untrusted certificate")]
    UntrustedCertificate,
    /// A certificate or key could not be loaded.
    #[error("certificate or key could not be loaded")]
    CertificateLoad,
    /// The TLS handshake failed for another reason.
    #[error("TLS handshake failed")]
    Handshake,
    /// The peer aborted the TLS handshake. TLS stacks such as s2n-tls send the same generic
    /// alert whatever the cause, so this is how a certificate the peer did not trust looks
    /// from this side; the peer itself reports [`SecurityFailure::UntrustedCertificate`].
    #[error("the peer rejected the TLS handshake")]
    HandshakeRejected,
    /// The peer presented a token that does not match.
    #[error("token rejected")]
    TokenRejected,
    /// Token authentication is on and the peer presented none.
    #[error("token missing")]
    TokenMissing,
    /// The peer announced an endpoint id its certificate does not give: it claimed to be
    /// another endpoint.
    #[error("the peer claimed an identity its certificate does not give")]
    IdentityMismatch,
}

/// The class of an error response sent back by a remote agent.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error,
)]
#[non_exhaustive]
pub enum RemoteErrorKind {
    /// The request handler returned an error.
    #[error("handler failed")]
    HandlerFailed,
    /// The agent has no request handler.
    #[error("no request handler")]
    NoHandler,
    /// The request payload did not decode as what the handler expects.
    #[error("bad request")]
    BadRequest,
    /// The agent dropped the request without answering (it stopped, or gave up on it).
    #[error("dropped without answer")]
    Dropped,
    /// The agent holds too many requests (running and waiting) to take another; nothing was
    /// run. Try again later.
    #[error("busy")]
    Busy,
}

impl Error {
    /// Whether another transport might succeed where this one failed: the peer could not be
    /// reached or did not answer, as opposed to a problem with the message itself.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Error::ConnectionFailed { .. }
                | Error::ConnectionTimeout { .. }
                | Error::ConnectionLost { .. }
                | Error::PeerNotFound { .. }
                | Error::Timeout { .. }
                | Error::SendFailed {
                    reason: SendFailure::ReceiverClosed,
                    ..
                }
        )
    }

    /// The error of a batch whose first `accepted` messages were accepted before this one
    /// stopped it: [`Error::PartlyAccepted`], unless none was.
    #[must_use]
    pub fn after_accepted(self, accepted: usize) -> Error {
        match self {
            e if accepted == 0 => e,
            Error::PartlyAccepted {
                accepted: more,
                source,
            } => Error::PartlyAccepted {
                accepted: accepted + more,
                source,
            },
            e => Error::PartlyAccepted {
                accepted,
                source: Box::new(e),
            },
        }
    }

    /// Places a configuration error: names the file it came from (unless it names one
    /// already) and prefixes its field with `prefix` (`quicConfig.`). Other errors pass as
    /// they are.
    pub fn in_config(self, file: Option<&std::path::Path>, prefix: &str) -> Self {
        match self {
            Error::Configuration {
                file: inner,
                field,
                message,
            } => Error::Configuration {
                file: inner.or_else(|| file.map(std::path::Path::to_path_buf)),
                field: format!("{prefix}{field}"),
                message,
            },
            other => other,
        }
    }

    /// A configuration error naming `field` (the file is added by [`Error::in_config`]).
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Configuration {
            file: None,
            field: field.into(),
            message: message.into(),
        }
    }
}
