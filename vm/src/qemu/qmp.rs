//! A minimal QMP client over QEMU's standard input and output (`-qmp
//! stdio`).
//!
//! Pipes rather than a unix socket: nobody but the provider that spawned
//! QEMU can reach the monitor, there is no socket path to clean up or to
//! fit into `sun_path`'s 108 bytes (lease directories are long), and the
//! channel ends with the process. QMP is line-delimited JSON: a greeting,
//! then one reply per command, with asynchronous events interleaved.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout};

/// One QMP reply must arrive within this; QEMU answers in microseconds
/// unless its main loop is wedged.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A line longer than this is not QMP we asked for.
const MAX_LINE: usize = 64 * 1024;

/// The monitor of one QEMU process.
pub(crate) struct Qmp {
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Qmp {
    /// Read the greeting and leave capabilities negotiation mode.
    pub(crate) async fn connect(input: ChildStdin, output: ChildStdout) -> Result<Qmp, String> {
        let mut qmp = Qmp {
            input,
            output: BufReader::new(output),
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(format!("expected the QMP greeting, got {greeting}"));
        }
        qmp.execute("qmp_capabilities").await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let read = tokio::time::timeout(REPLY_TIMEOUT, async {
            loop {
                line.clear();
                let n = (&mut self.output)
                    .take(MAX_LINE as u64)
                    .read_line(&mut line)
                    .await
                    .map_err(|e| format!("reading QMP: {e}"))?;
                if n == 0 {
                    return Err("QEMU closed its monitor (the process exited)".to_string());
                }
                if !line.trim().is_empty() {
                    return Ok(());
                }
            }
        })
        .await;
        match read {
            Err(_) => Err(format!("no QMP message within {REPLY_TIMEOUT:?}")),
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => serde_json::from_str(&line)
                .map_err(|e| format!("QMP sent something that is not JSON ({e})")),
        }
    }

    /// Run one argument-less command; events before its reply are skipped.
    pub(crate) async fn execute(&mut self, command: &str) -> Result<Value, String> {
        let msg = serde_json::json!({ "execute": command }).to_string() + "\n";
        self.input
            .write_all(msg.as_bytes())
            .await
            .map_err(|e| format!("writing QMP {command}: {e}"))?;
        self.input
            .flush()
            .await
            .map_err(|e| format!("writing QMP {command}: {e}"))?;
        loop {
            let reply = self.read_message().await?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(format!("QMP {command} failed: {err}"));
            }
            // {"event": …}: not ours.
        }
    }
}
