//! export-sidecar: a reverse proxy in front of a dataset server that passes every request
//! through and adds streamed whole-collection exports under `/export/...`.
//!
//! # Layout
//! - [`config`]: `proxy.toml` schema, defaults and validation.
//! - [`server`]: assembles the pingora server (public and internal listeners) and runs it.
//! - [`proxy`]: the public listener's `ProxyHttp`: routes `/export`, passes the rest through.
//! - [`admin`]: the internal listener (webhooks, health and readiness).
//! - [`export`]: the export API: routing, the record pipeline, encoders, content coding.
//! - [`upstream`]: the dataset-server client (listing, records), credentials forwarded.
//! - [`journal`]: the SQLite version journal behind pull-sync (`after=` / `at=`).
//! - [`changes`]: webhooks, polling and pruning: how new versions reach the journal.
//! - [`collection`]: collection and record names and their escaped upstream paths.
//! - [`codec`]: CBOR validation and the CBOR→JSON mapping.
//! - [`error`]: client-facing errors and their JSON bodies.
//! - [`reference`]: the reference dataset server used by `demo` and the tests.
//!
//! A request flows one way: proxy → export route → upstream listing → journal (record the
//! version, plan the sync) → record pipeline (fetch → encode → compress) → response body.

pub mod admin;
pub mod changes;
pub mod codec;
pub mod collection;
pub mod config;
pub mod error;
pub mod export;
pub mod journal;
pub mod proxy;
pub mod reference;
pub mod server;
pub mod upstream;
