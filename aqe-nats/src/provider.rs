//! NATS as a provider: the `natsConfig` section of a definition (its presence asks for it).

use std::any::Any;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aqe_core::provider::{read_section, relative_to};
use aqe_core::{Provider, Result, Started, TransportConfig, TransportKind};

use crate::{NatsConfig, NatsTransport};

/// The registration of the NATS transport (see [`aqe_core::Provider`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Nats;

impl Provider for Nats {
    fn kind(&self) -> TransportKind {
        NatsTransport::KIND
    }

    fn section(&self) -> &'static str {
        "natsConfig"
    }

    fn parse(
        &self,
        section: serde_json::Value,
        base: Option<&Path>,
    ) -> Result<Arc<dyn TransportConfig>> {
        let mut c: NatsConfig = read_section(section)?;
        let t = &mut c.tls;
        for p in [
            &mut c.credentials,
            &mut t.ca_path,
            &mut t.cert_path,
            &mut t.key_path,
        ] {
            relative_to(base, p);
        }
        c.validate()?;
        Ok(Arc::new(c))
    }
}

#[async_trait::async_trait]
impl TransportConfig for NatsConfig {
    fn kind(&self) -> TransportKind {
        NatsTransport::KIND
    }

    fn shares_with(&self, other: &dyn TransportConfig) -> bool {
        other
            .as_any()
            .downcast_ref::<NatsConfig>()
            .is_some_and(|o| o == self)
    }

    fn delivery_deadline(&self) -> Duration {
        self.delivery_deadline
    }

    async fn start(&self) -> Result<Started> {
        let nats = NatsTransport::connect(self.clone()).await?;
        tracing::info!(server = %nats.server(), fleet = %self.fleet, "NATS connection started");
        Ok(Started::new(nats))
    }

    async fn start_persistent(&self) -> Result<Started> {
        let nats = NatsTransport::connect_in_background(self.clone()).await?;
        Ok(Started::new(nats))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
