//! Runnable demonstrations of aqe's coordination patterns.
//!
//! [`coordination::run`] drives the fleet defined in `aqe-examples/agents/` through the four
//! patterns: hierarchical task distribution, peer-to-peer result sharing, request
//! aggregation and metrics streaming. The `coordination-demo` binary prints its report.
#![warn(missing_docs, unreachable_pub)]

pub mod coordination;
pub mod protocol;
