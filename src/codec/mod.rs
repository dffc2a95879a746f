//! CBOR record values: strict validation of upstream bytes, and their JSON mapping (SPEC.md §2).
//! Shared by every export encoding; no I/O here, only bytes in and bytes out.

pub mod cbor;
pub mod json;

pub use cbor::{validate, CborError, MAX_DEPTH};
pub use json::{write_json_string, JsonConverter, JsonStyle};
