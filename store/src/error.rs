//! The store's error, and reading stored values into it: a value that does
//! not decode is reported as corruption under its key.

use crate::codec::decode_event;
use crate::directory::DirectoryError;
use crate::lease::{EventError, LeaseEvent};
use crate::pending::{PendingEntry, PendingRefused};

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The event was refused; nothing was written.
    #[error(transparent)]
    Rejected(#[from] EventError),
    /// The directory entry was refused; nothing was written.
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    /// The event would wait for its lease, and its source, signer or
    /// lease (or the node) already holds its share of waiting events;
    /// nothing was written (see [`crate::pending`]).
    #[error(transparent)]
    PendingRefused(#[from] PendingRefused),
    /// Another process holds the store's lock.
    #[error(
        "the ledger in {} is in use by another process (most likely another `xe node` with the same --data): stop that node, or give this one its own --data directory",
        .0.display()
    )]
    InUse(std::path::PathBuf),
    /// sled failed.
    #[error("store: {0}")]
    Db(#[from] sled::Error),
    /// A stored value did not decode (corruption or a format change).
    #[error("store: corrupt record under {key}: {detail}")]
    Corrupt {
        /// The key.
        key: String,
        /// Decode error.
        detail: String,
    },
}

pub(crate) fn corrupt(key: &[u8], detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: hex::encode(key),
        detail: detail.into(),
    }
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    key: &[u8],
    v: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| corrupt(key, e.to_string()))
}

/// A pending entry as stored (see [`crate::pending`]).
pub(crate) fn decode_pending(key: &[u8], v: &[u8]) -> Result<PendingEntry, StoreError> {
    PendingEntry::decode(v).map_err(|d| corrupt(key, d))
}

/// An event as stored (see [`crate::codec`]).
pub(crate) fn decode_ev(key: &[u8], v: &[u8]) -> Result<LeaseEvent, StoreError> {
    decode_event(v).map_err(|d| corrupt(key, d))
}

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("ledger types always serialise")
}
