//! QUIC as a provider: the `quicConfig` section of a definition (asked for by `enableQUIC`).

use std::any::Any;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aqe_core::provider::{read_section, relative_to};
use aqe_core::{Provider, Result, Started, TransportConfig, TransportKind};

use crate::{QuicConfig, QuicTransport};

/// The registration of the QUIC transport (see [`aqe_core::Provider`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Quic;

impl Provider for Quic {
    fn kind(&self) -> TransportKind {
        QuicTransport::KIND
    }

    fn section(&self) -> &'static str {
        "quicConfig"
    }

    fn flag(&self) -> Option<&'static str> {
        Some("enableQUIC")
    }

    fn parse(
        &self,
        section: serde_json::Value,
        base: Option<&Path>,
    ) -> Result<Arc<dyn TransportConfig>> {
        let mut c: QuicConfig = read_section(section)?;
        let s = &mut c.security;
        for p in [&mut s.cert_path, &mut s.key_path, &mut s.ca_path] {
            relative_to(base, p);
        }
        c.validate()?;
        Ok(Arc::new(c))
    }
}

#[async_trait::async_trait]
impl TransportConfig for QuicConfig {
    fn kind(&self) -> TransportKind {
        QuicTransport::KIND
    }

    fn shares_with(&self, other: &dyn TransportConfig) -> bool {
        other
            .as_any()
            .downcast_ref::<QuicConfig>()
            .is_some_and(|o| o.host == self.host && o.port == self.port)
    }

    fn delivery_deadline(&self) -> Duration {
        self.delivery_deadline
    }

    async fn start(&self) -> Result<Started> {
        let quic = QuicTransport::bind(self.clone()).await?;
        tracing::info!(listen = %quic.local_addr(), "QUIC endpoint started");
        Ok(Started::new(quic))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
