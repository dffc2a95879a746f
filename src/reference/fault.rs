//! Injected U1/U2 failures (a test hook): a listing or record can answer with an error status,
//! slowly, with other bytes, or with a body that stops or breaks half-way.

use std::io;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::stream::{self, StreamExt};

use super::StopSignal;

/// How one record's U2 misbehaves, set with [`Store::set_fault`](super::Store::set_fault), or a
/// collection's U1, set with [`Store::set_listing_fault`](super::Store::set_listing_fault).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordFault {
    /// Answer with this status and a small JSON error body instead of the record.
    Status(u16),
    /// Wait this long, then answer normally: a slow upstream.
    Delay(Duration),
    /// Send the head and the first half of the value, then never finish (until the server stops).
    HangAfterHead,
    /// Send the head and the first half of the value, then drop the connection.
    ResetMidBody,
    /// Answer 200 with these bytes as the CBOR body instead: a listing that is not a map, or a
    /// value that is not CBOR, without storing anything.
    Body(Bytes),
}

/// The pause before a reset, so the half body really leaves before the connection drops.
const RESET_AFTER: Duration = Duration::from_millis(50);

/// A body for `value` that breaks as the fault says; `None` when the body is served whole.
pub(super) fn broken_body(fault: &RecordFault, value: Bytes, stop: StopSignal) -> Option<Body> {
    let half = value.slice(..value.len() / 2);
    let head = stream::once(async move { Ok::<_, io::Error>(half) });
    match fault {
        RecordFault::HangAfterHead => {
            let never = stream::once(async move {
                stop.wait().await;
                Err(io::Error::other("reference server stopping"))
            });
            Some(Body::from_stream(head.chain(never)))
        }
        RecordFault::ResetMidBody => {
            let reset = stream::once(async {
                tokio::time::sleep(RESET_AFTER).await;
                Err(io::Error::new(io::ErrorKind::ConnectionReset, "injected reset"))
            });
            Some(Body::from_stream(head.chain(reset)))
        }
        RecordFault::Status(_) | RecordFault::Delay(_) | RecordFault::Body(_) => None,
    }
}
