//! The transport conformance suite, run on a `Fallback` of two buses: a transport made of two
//! transports must keep the same contract as each of them.

use std::sync::Arc;

use aqe_agent::{EventBus, Fallback, FallbackPolicy};
use aqe_core::Transport;
use aqe_core::conformance::Harness;

struct TwoBuses;

#[async_trait::async_trait]
impl Harness for TwoBuses {
    async fn endpoints(&self, n: usize) -> Vec<Arc<dyn Transport>> {
        let t: Arc<dyn Transport> = Fallback::new(
            Arc::new(EventBus::new()),
            Arc::new(EventBus::new()),
            FallbackPolicy::default(),
        );
        vec![t; n]
    }
}

aqe_core::conformance_tests!(TwoBuses);
