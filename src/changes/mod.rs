//! How the sidecar learns that a collection changed (webhooks, polling), the coalesced
//! listing re-reads that record each new version, and the fan-out to event-stream subscribers.

pub mod hub;
pub mod poller;
pub mod refresh;
pub mod webhook;
