//! The cap on record and zip exports running at once (`export.max_concurrent`): one over it is
//! refused at once with 503 and `Retry-After`, before it costs the dataset server anything.

use crate::error::ApiError;
use crate::metrics;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Seconds a refused client is told to wait: about as long as a small export takes, so a
/// retry has a fair chance of finding a free slot without hammering.
const RETRY_AFTER_SECONDS: u64 = 5;

/// The slots of running exports. Cheap to clone; clones share the slots.
#[derive(Clone)]
pub struct ExportSlots {
    /// A semaphore rather than a counter: a slot is released by dropping it, however the
    /// export ends (finished, failed, client gone, task aborted).
    slots: Arc<Semaphore>,
}

/// One running export's slot, given back when dropped.
pub struct ExportSlot {
    _permit: OwnedSemaphorePermit,
}

impl ExportSlots {
    pub fn new(max: usize) -> ExportSlots {
        ExportSlots { slots: Arc::new(Semaphore::new(max)) }
    }

    /// A slot if one is free; otherwise the 503 the client gets.
    pub fn try_take(&self) -> Result<ExportSlot, ApiError> {
        let permit = Arc::clone(&self.slots).try_acquire_owned().map_err(|_| too_busy())?;
        metrics::get().exports_running.inc();
        Ok(ExportSlot { _permit: permit })
    }
}

impl Drop for ExportSlot {
    fn drop(&mut self) {
        metrics::get().exports_running.dec();
    }
}

fn too_busy() -> ApiError {
    ApiError::new(
        503,
        "too_busy",
        format!(
            "the sidecar is running as many exports as it is configured for; retry in {RETRY_AFTER_SECONDS} s"
        ),
    )
    .with_header("retry-after", RETRY_AFTER_SECONDS.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_free_again_once_dropped() {
        let slots = ExportSlots::new(1);
        let first = slots.try_take().expect("one slot");
        let refused = slots.try_take().err().expect("no second slot");
        assert_eq!((refused.status, refused.code), (503, "too_busy"));
        assert!(refused.headers.iter().any(|(name, value)| *name == "retry-after" && value == "5"));
        drop(first);
        slots.try_take().expect("free again");
    }
}
