//! xe-node: composition of a node — store, overlay host, roles.
#![forbid(unsafe_code)]

pub mod gateway;
