//! A node's parts stop in stages, and a part that ends on its own (or
//! panics) while the node runs is reported, not discarded.

use std::time::Duration;

use xe_node::{Node, NodeConfig, TaskEnd};

/// The bound on a broken implementation; the waits end on events.
const BOUND: Duration = Duration::from_secs(30);

async fn start(dir: &std::path::Path) -> Node {
    let mut cfg = NodeConfig::new(dir.to_path_buf());
    cfg.net.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    Node::start(cfg).await.expect("start node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doors_stop_first_while_the_network_still_carries_what_they_drain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = start(dir.path()).await;
    let net = node.net.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    node.attach("probe", move |cancel| async move {
        cancel.cancelled().await;
        // Draining, as the HTTP API's open tunnels do: is the network there?
        let _ = tx.send(net.p2p_addrs().await.is_ok());
        Ok::<(), String>(())
    });
    assert!(!node.is_shutdown());
    let panicked = tokio::time::timeout(BOUND, node.shutdown())
        .await
        .expect("shutdown is bounded");
    assert!(panicked.is_empty(), "{panicked:?}");
    assert!(node.is_shutdown());
    assert_eq!(
        rx.await,
        Ok(true),
        "the network was up while the door drained"
    );
    assert!(node.net.p2p_addrs().await.is_err(), "and is down after");
    assert!(
        node.shutdown().await.is_empty(),
        "a second call does nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_that_panics_or_quits_while_the_node_runs_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = start(dir.path()).await;
    node.attach("boom", |_cancel| async {
        let armed = true;
        if armed {
            panic!("boom at start");
        }
        Ok::<(), String>(())
    });
    let end = tokio::time::timeout(BOUND, node.failed())
        .await
        .expect("the panic is reported");
    assert_eq!(
        end,
        TaskEnd {
            task: "boom",
            panic: Some("boom at start".into())
        }
    );
    assert_eq!(end.to_string(), "boom panicked: boom at start");

    node.attach("quitter", |_cancel| async { Ok::<(), String>(()) });
    let end = tokio::time::timeout(BOUND, node.failed())
        .await
        .expect("the early end is reported");
    assert_eq!(end.to_string(), "quitter stopped");
    assert!(!node.is_shutdown(), "reporting is not shutting down");
    assert!(node.shutdown().await.is_empty());
}
