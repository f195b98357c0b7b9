//! xe-node: composition of a node — store, overlay host, roles.
//!
//! # Layout
//! - [`node`]: `Node` owns the store, the p2p host, the provider role, the
//!   SSH gateway and attached doors (the HTTP API); `stages.rs` runs their
//!   tasks and stops them in order.
//! - [`provider`]: auto-accept, provisioning, the tunnel validator,
//!   teardown on settle / cancel / expiry.
//! - [`gateway`]: the russh SSH gateway.
//! - [`vm_dialer`]: the one way this node reaches a lease's VM (in-process
//!   when it is the provider, else the overlay).
#![forbid(unsafe_code)]

pub mod gateway;
pub mod limits;
pub mod node;
pub mod provider;
mod stages;
pub mod vm_dialer;

pub use node::{Node, NodeConfig, NodeError, ProvideConfig, SshConfig, VmBackend};
pub use provider::{Capacity, Provider};
pub use stages::TaskEnd;
