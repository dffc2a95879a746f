//! export-sidecar: a reverse proxy in front of a dataset server that passes every request
//! through and adds streamed whole-collection exports under `/export/...`.
//!
//! # Layout
//! - [`config`]: `proxy.toml` schema, defaults and validation.
//! - [`server`]: assembles the pingora server (public and internal listeners) and runs it.
//! - [`shutdown`]: SIGTERM marks the process draining, waits out the drain delay, lets
//!   in-flight requests finish, then exits.
//! - [`public`]: the public listener's connections: event streams asked for first on a
//!   connection are served on the socket, the rest go to [`proxy`].
//! - [`proxy`]: the public listener's `ProxyHttp`: routes `/export`, passes the rest through.
//! - [`admin`]: the internal listener (webhooks, health, readiness, metrics).
//! - [`readiness`]: what `/readyz` checks (listener, dataset server, journal, draining).
//! - [`export`]: the export API: routing, sync planning, the record and zip pipelines
//!   (the fetch window adapted to upstream latency, chunks, encoders, content coding, the zip
//!   writer, attachment spooling), event streams, and the cap on exports running at once.
//! - [`upstream`]: the dataset-server client (listing, records), credentials forwarded.
//! - [`cache`]: record values by (collection, recordID, version), so repeated exports skip U2.
//! - [`journal`]: the SQLite version journal behind pull-sync (`after=` / `at=`).
//! - [`changes`]: webhooks, polling and pruning: how new versions reach the journal, and the
//!   change feed's fan-out to subscribers.
//! - [`collection`]: collection and record names and their escaped upstream paths.
//! - [`codec`]: CBOR validation and the CBOR→JSON mapping.
//! - [`error`]: client-facing errors and their JSON bodies.
//! - [`metrics`]: the Prometheus metrics served on the internal listener.
//! - [`reference`]: the reference dataset server used by `demo` and the tests.
//!
//! A request flows one way: public listener → proxy → export route → upstream listing → journal (record the
//! version, plan the sync) → record pipeline (cache or fetch → encode → compress) → response body.

pub mod admin;
pub mod cache;
pub mod changes;
pub mod codec;
pub mod collection;
pub mod config;
pub mod error;
pub mod export;
pub mod journal;
pub mod metrics;
pub mod proxy;
pub mod public;
pub mod readiness;
pub mod reference;
pub mod server;
pub mod shutdown;
pub mod upstream;
