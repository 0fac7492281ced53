//! Runnable demonstrations of aqe's coordination patterns.
//!
//! [`coordination::run`] drives the fleet defined in `aqe-examples/agents/` through the four
//! patterns: hierarchical task distribution, peer-to-peer result sharing, request
//! aggregation and metrics streaming. The `coordination-demo` binary prints its report.
//!
//! [`probe`] is the delivery probe (`aqe-probe`): a receiving agent that prints what it
//! takes and a sender that accounts for everything it sends, run as separate processes by
//! the delivery tests and by `cargo xtask lab`.
#![warn(missing_docs, unreachable_pub)]

pub mod coordination;
pub mod probe;
pub mod protocol;

/// The README's Rust examples, compiled (and the bus one run) as doctests, so that they
/// cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeExamples;
