//! Describing and starting an agent.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use serde::Serialize;

use aqe_core::plumbing::DEFAULT_INBOX_CAPACITY;
use aqe_core::{
    AgentId, AgentType, Capability, Channel, Envelope, Error, HealthThresholds, IncomingStream,
    Registration, Result, Transport,
};

use crate::AgentDefinition;

use crate::handler::{self, HandlerError, Handlers};
use crate::{Agent, dispatch};

/// Describes an agent, then starts it with [`AgentBuilder::start`].
///
/// Only the type and a transport are required; without channels the agent gets the three
/// presets (`coordination`, `results`, `metrics`), and without an id one is generated.
#[must_use]
pub struct AgentBuilder {
    id: Option<AgentId>,
    agent_type: Option<AgentType>,
    capabilities: Vec<Capability>,
    channels: Vec<Channel>,
    metadata: BTreeMap<String, String>,
    transport: Option<Arc<dyn Transport>>,
    thresholds: HealthThresholds,
    handlers: Handlers,
    inbox_capacity: usize,
    max_concurrent_handlers: usize,
    max_concurrent_streams: usize,
    event_capacity: usize,
}

impl Default for AgentBuilder {
    fn default() -> Self {
        Self {
            id: None,
            agent_type: None,
            capabilities: Vec::new(),
            channels: Vec::new(),
            metadata: BTreeMap::new(),
            transport: None,
            thresholds: HealthThresholds::default(),
            handlers: Handlers::default(),
            inbox_capacity: DEFAULT_INBOX_CAPACITY,
            max_concurrent_handlers: 256,
            max_concurrent_streams: 256,
            event_capacity: 1024,
        }
    }
}

impl AgentBuilder {
    /// Takes id, type, capabilities, channels, labels and health thresholds from a definition.
    pub fn definition(mut self, def: &AgentDefinition) -> Self {
        let reg = def.registration();
        self.id = Some(reg.id);
        self.agent_type = Some(reg.agent_type);
        self.capabilities = reg.capabilities;
        self.channels = reg.channels;
        self.metadata = reg.metadata;
        self.thresholds = def.health.clone();
        self
    }

    /// Sets the id (default: generated from the type).
    pub fn id(mut self, id: impl Into<AgentId>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the type (required).
    pub fn agent_type(mut self, agent_type: impl Into<AgentType>) -> Self {
        self.agent_type = Some(agent_type.into());
        self
    }

    /// Adds a capability.
    pub fn capability(mut self, capability: impl Into<Capability>) -> Self {
        self.capabilities.push(capability.into());
        self
    }

    /// Adds a channel (replacing the default presets).
    pub fn channel(mut self, channel: Channel) -> Self {
        self.channels.push(channel);
        self
    }

    /// Adds a label visible to peers.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the transport (required). To combine QUIC and the bus, pass a
    /// [`Fallback`](crate::Fallback).
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Sets the health thresholds.
    pub fn health_thresholds(mut self, thresholds: HealthThresholds) -> Self {
        self.thresholds = thresholds;
        self
    }

    /// Items the inbox holds before reliable senders wait and unreliable ones drop.
    /// Default 1024.
    pub fn inbox_capacity(mut self, capacity: usize) -> Self {
        self.inbox_capacity = capacity;
        self
    }

    /// Request handlers running at once; up to four times as many more wait their turn, and
    /// requests beyond that are answered "busy" (the requester gets
    /// [`Error::Busy`](aqe_core::Error::Busy)). Default 256.
    pub fn max_concurrent_handlers(mut self, n: usize) -> Self {
        self.max_concurrent_handlers = n;
        self
    }

    /// Stream handlers running at once, apart from request handlers (idle streams never keep
    /// requests waiting); up to four times as many more streams wait their turn, and streams
    /// beyond that are refused. Default 256.
    pub fn max_concurrent_streams(mut self, n: usize) -> Self {
        self.max_concurrent_streams = n;
        self
    }

    /// Runs `f` for each one-way message, one at a time in arrival order (highest priority
    /// first), so ordered channels stay ordered. Without one, messages are only counted and
    /// announced as events.
    pub fn on_message<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Agent, Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handlers.message = Some(handler::message(f));
        self
    }

    /// Runs `f` for each request, concurrently; its value is sent back as the response, its
    /// error as an error response. If the requester gives up, `f` is cancelled. Without
    /// one, requests are answered with a "no handler" error.
    pub fn on_request<F, Fut, T>(mut self, f: F) -> Self
    where
        F: Fn(Agent, Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<T, HandlerError>> + Send + 'static,
        T: Serialize,
    {
        self.handlers.request = Some(handler::request(f));
        self
    }

    /// Like [`AgentBuilder::on_request`], for a handler that chooses its response's encoding
    /// (JSON for a tool, raw bytes from a command): it returns a [`aqe_core::Payload`].
    pub fn on_request_payload<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Agent, Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<aqe_core::Payload, HandlerError>> + Send + 'static,
    {
        self.handlers.request = Some(handler::request_payload(f));
        self
    }

    /// Runs `f` for each stream a peer opens, concurrently. With one, the agent announces
    /// [`aqe_core::STREAM_CAPABILITY`]; without, openers refuse at once
    /// ([`aqe_core::StreamFailure::NotTaken`]), and a stream that comes anyway is dropped.
    pub fn on_stream<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Agent, IncomingStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handlers.stream = Some(handler::stream(f));
        self
    }

    /// Attaches the agent to its transport and starts it.
    ///
    /// # Errors
    /// [`Error::Configuration`] when the type or transport is missing, a channel is invalid,
    /// or the id is taken on the transport.
    pub async fn start(self) -> Result<Agent> {
        let missing = |field: &str| Error::Configuration {
            file: None,
            field: field.to_owned(),
            message: "is required".to_owned(),
        };
        let agent_type = self.agent_type.ok_or_else(|| missing("agentType"))?;
        let transport = self.transport.ok_or_else(|| missing("transport"))?;
        let id = self.id.unwrap_or_else(|| AgentId::generate(&agent_type));
        let channels = if self.channels.is_empty() {
            aqe_core::default_channels()
        } else {
            self.channels
        };
        let mut capabilities = self.capabilities;
        if self.handlers.stream.is_some()
            && !capabilities
                .iter()
                .any(|c| c.as_str() == aqe_core::STREAM_CAPABILITY)
        {
            capabilities.push(aqe_core::Capability::from(aqe_core::STREAM_CAPABILITY));
        }
        let reg = Registration {
            id: id.clone(),
            agent_type,
            capabilities,
            channels,
            metadata: self.metadata,
        };
        reg.validate()?;
        let (tx, inbox) = aqe_core::plumbing::inbox(id, self.inbox_capacity);
        let agent = Agent::new(
            reg.clone(),
            transport.clone(),
            self.thresholds,
            tx.clone(),
            self.event_capacity,
        );
        if let Err(e) = transport.attach(reg, tx).await {
            agent.shutdown().await;
            return Err(e);
        }
        let limits = dispatch::Limits {
            requests: self.max_concurrent_handlers.max(1),
            streams: self.max_concurrent_streams.max(1),
        };
        // Everything the agent's handlers do logs under its span.
        let span = tracing::info_span!("agent", id = %agent.id(), transport = %transport.kind());
        agent.own_task(tokio::spawn(tracing::Instrument::instrument(
            dispatch::run(agent.clone(), inbox, self.handlers, limits),
            span,
        )));
        tracing::debug!(agent = %agent.id(), transport = %transport.kind(), "agent started");
        Ok(agent)
    }
}
