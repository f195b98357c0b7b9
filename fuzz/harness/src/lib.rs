//! The bodies of the fuzz targets in `fuzz/` (see `FUZZING.md`).
//!
//! Each target in `fuzz/fuzz_targets/` is one line that calls a function
//! here with libFuzzer's bytes; the same functions replay the committed
//! corpora (`fuzz/corpus/<target>/`) as ordinary tests on stable
//! (`tests/corpus.rs`), so a crash input once committed stays a
//! regression test without nightly.
//!
//! A function returns normally for any input; it panics only when the code
//! under test panicked (in this thread or in a task it spawned), hung past
//! a bound, or broke a stated property (a round trip, an oracle).
//!
//! # Layout
//! - [`store`]: lease JSON, hex ids, stored forms, ledger apply order.
//! - [`net`]: gossip, the sync codec, reconciliation messages, the tunnel
//!   handshake (both sides), the Noise-AES-GCM handshake and frames.
//! - [`http`]: raw bytes into the HTTP API of a node on loopback.
//! - [`ssh`]: raw bytes into the SSH gateway on loopback.
//! - [`seeds`]: the seed corpora, built from real encodings.
#![forbid(unsafe_code)]

pub mod http;
pub mod net;
mod rt;
pub mod seeds;
pub mod ssh;
pub mod store;

/// One target's body: libFuzzer's bytes in, a panic on a finding.
pub type Body = fn(&[u8]);

/// Every target: its name (the file in `fuzz/fuzz_targets/` and the
/// folder in `fuzz/corpus/`) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("lease_json", store::lease_json),
    ("ids", store::ids),
    ("stored_forms", store::stored_forms),
    ("ledger_order", store::ledger_order),
    ("gossip", net::gossip),
    ("sync_codec", net::sync_codec),
    ("recon", net::recon),
    ("tunnel", net::tunnel),
    ("noise", net::noise),
    ("http_api", http::http_api),
    ("ssh_gateway", ssh::ssh_gateway),
];
