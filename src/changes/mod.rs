//! Change sources: how the sidecar learns that a collection changed (webhooks, polling),
//! and the coalesced listing re-reads that record each new version in the journal.

pub mod poller;
pub mod refresh;
pub mod webhook;
