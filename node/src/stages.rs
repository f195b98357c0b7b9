//! The node's tasks, in the stages shutdown stops them in.
//!
//! Each part of a node runs as a task in one [`Stage`]; a stage's token is
//! a child of the node's, and shutdown stops the stages one after another
//! — the doors (SSH gateway, HTTP API: stop accepting, let sessions end),
//! then the network (tunnel server, gossip, sync), then the roles (the
//! provider stops its VMs) — and flushes the store last. A session that is
//! draining still has its network; a VM outlives no tunnel into it.
//!
//! A task that ends while the node runs is a part that stopped on its own
//! (a panic included): [`Stages::failed`] reports it, with the panic's
//! message, so the process can exit instead of running without it.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, warn};

/// One stage: its tasks (each named), the token that stops them, and how
/// long they get before the rest are aborted.
pub(crate) struct Stage {
    name: &'static str,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    names: HashMap<Id, &'static str>,
    drain: Duration,
}

/// How a task of the node ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEnd {
    /// The part ("SSH gateway", "HTTP API", "p2p host", "provider").
    pub task: &'static str,
    /// Its panic message, if it panicked.
    pub panic: Option<String>,
}

impl std::fmt::Display for TaskEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.panic {
            Some(p) => write!(f, "{} panicked: {p}", self.task),
            None => write!(f, "{} stopped", self.task),
        }
    }
}

fn panic_message(e: JoinError) -> Option<String> {
    if !e.is_panic() {
        return None;
    }
    let p = e.into_panic();
    Some(
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into()),
    )
}

impl Stage {
    pub(crate) fn new(name: &'static str, drain: Duration) -> Self {
        Stage {
            name,
            // Not a child of the node's token: each stage is stopped on
            // its own, in order.
            cancel: CancellationToken::new(),
            tasks: JoinSet::new(),
            names: HashMap::new(),
            drain,
        }
    }

    /// The token this stage's tasks stop on.
    pub(crate) fn token(&self) -> CancellationToken {
        self.cancel.child_token()
    }

    /// Run `fut` as the part called `task`.
    pub(crate) fn spawn<F>(&mut self, task: &'static str, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let h = self
            .tasks
            .spawn(fut.instrument(tracing::info_span!("task", name = task)));
        self.names.insert(h.id(), task);
    }

    fn ended(&mut self, r: Result<(), JoinError>, id: Id) -> TaskEnd {
        TaskEnd {
            task: self.names.remove(&id).unwrap_or("a task"),
            panic: r.err().and_then(panic_message),
        }
    }

    /// The next task to end, if any is left.
    async fn next_end(&mut self) -> Option<TaskEnd> {
        let r = self.tasks.join_next_with_id().await?;
        let (id, r) = match r {
            Ok((id, ())) => (id, Ok(())),
            Err(e) => (e.id(), Err(e)),
        };
        Some(self.ended(r, id))
    }

    /// Cancel, wait up to the drain time, abort what is left. Returns the
    /// tasks that panicked.
    pub(crate) async fn stop(&mut self) -> Vec<TaskEnd> {
        self.cancel.cancel();
        let (name, limit) = (self.name, self.drain);
        let mut panicked = Vec::new();
        let drain = async {
            while let Some(end) = self.next_end().await {
                if end.panic.is_some() {
                    error!(stage = name, "{end}");
                    panicked.push(end);
                }
            }
        };
        if tokio::time::timeout(limit, drain).await.is_err() {
            warn!(
                stage = name,
                "tasks did not stop in {limit:?}; aborting them"
            );
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
        panicked
    }
}

/// The stages, in shutdown order.
pub(crate) struct Stages {
    /// Cancelled once shutdown begins.
    pub(crate) stopping: CancellationToken,
    pub(crate) doors: Stage,
    pub(crate) network: Stage,
    pub(crate) roles: Stage,
}

impl Stages {
    /// Doors 5 s (the API's own grace), network 5 s, roles 15 s (qemu
    /// powers its VMs down in at most 15 s): 25 s in all, below the
    /// README's `TimeoutStopSec=30`.
    pub(crate) fn new() -> Self {
        Stages {
            stopping: CancellationToken::new(),
            doors: Stage::new("doors", Duration::from_secs(5)),
            network: Stage::new("network", Duration::from_secs(5)),
            roles: Stage::new("roles", Duration::from_secs(15)),
        }
    }

    /// The first task to end on its own; pending while all run.
    pub(crate) async fn failed(&mut self) -> TaskEnd {
        loop {
            let end = tokio::select! {
                Some(e) = self.doors.next_end() => e,
                Some(e) = self.network.next_end() => e,
                Some(e) = self.roles.next_end() => e,
                else => std::future::pending().await,
            };
            if !self.stopping.is_cancelled() {
                return end;
            }
        }
    }

    /// Stop every stage in order; the tasks that panicked.
    pub(crate) async fn stop(&mut self) -> Vec<TaskEnd> {
        self.stopping.cancel();
        let mut panicked = self.doors.stop().await;
        panicked.extend(self.network.stop().await);
        panicked.extend(self.roles.stop().await);
        panicked
    }
}
