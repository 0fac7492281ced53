//! The transport conformance suite, run on the event bus.

use std::sync::Arc;

use aqe_core::Transport;
use aqe_core::conformance::Harness;
use aqe_eventbus::EventBus;

struct Bus;

#[async_trait::async_trait]
impl Harness for Bus {
    async fn endpoints(&self, n: usize) -> Vec<Arc<dyn Transport>> {
        // Every agent of a process shares one bus.
        let bus: Arc<dyn Transport> = Arc::new(EventBus::new());
        vec![bus; n]
    }
}

aqe_core::conformance_tests!(Bus);
