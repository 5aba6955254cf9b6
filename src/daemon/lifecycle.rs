//! The daemon's end: the drain after SIGTERM (or any cancellation of its token), within
//! `drain_timeout_s`, and the goodbye to the broker.
//!
//! No new work is taken: the main loop has stopped reading from the broker, and inbound
//! messages not yet journaled stay unacknowledged, so the broker delivers them again
//! after the restart. Exchanges already running on a channel finish (a switch is never
//! cut off between its ACTION and its read-back), and their answers are still taken
//! through the engine, journaled and published; whatever is left when the bound passes
//! stays resumable in the journal (a command that was executing is re-verified by a relay
//! read at the next start). Channels release their associations as they stop. Then the
//! retained `status` says offline, and the session ends with a DISCONNECT.

use std::time::Duration;

use crate::mqtt::QoS;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::turn::Committed;
use super::{json, Daemon, DaemonError};
use crate::command::Input;
use crate::contract::StatusMessage;

/// Time the goodbye to the broker may take after the drain.
const GOODBYE: Duration = Duration::from_secs(3);

impl Daemon {
    /// Wait for the channels to finish what they are executing, at most until `deadline`,
    /// taking their answers through the engine (unless the journal failed: then nothing
    /// more is recorded, and the restart re-verifies). Nothing new is sent to a channel:
    /// an execution the engine asks for now (a retry) stays in the journal for the restart.
    pub(super) async fn drain_channels(
        &mut self,
        answers: &mut mpsc::UnboundedReceiver<Input>,
        committed: &mut mpsc::UnboundedReceiver<Committed>,
        channel_tasks: Vec<JoinHandle<()>>,
        deadline: Instant,
        journal_ok: bool,
    ) -> Result<(), DaemonError> {
        let all_stopped = async {
            for t in channel_tasks {
                let _ = t.await;
            }
        };
        tokio::pin!(all_stopped);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("drain bound reached: unfinished commands stay in the journal for the restart");
                    return Ok(());
                }
                _ = &mut all_stopped => break,
                Some(input) = answers.recv(), if journal_ok => self.take_answer(input).await?,
                // Turns committing when the loop stopped, and the drain's own.
                Some(done) = committed.recv() => self.after_commit(done)?,
            }
        }
        // The channels are gone: take what they answered last.
        while let Some(input) = answers.try_recv().ok().filter(|_| journal_ok) {
            self.take_answer(input).await?;
        }
        Ok(())
    }

    async fn take_answer(&mut self, input: Input) -> Result<(), DaemonError> {
        self.turn(Vec::new(), vec![input]).await
    }

    /// Publish the retained offline status and end the MQTT session cleanly (so the last
    /// will is not needed), then let the connection task end.
    pub(super) async fn go_offline(&mut self, mut poller: JoinHandle<()>, poll_stop: CancellationToken) {
        let deadline = Instant::now() + GOODBYE;
        let offline = json(&StatusMessage::last_will());
        let said = tokio::time::timeout_at(deadline, async {
            self.client.publish(self.topics.status(), QoS::AtLeastOnce, true, offline).await?;
            self.client.disconnect().await
        })
        .await;
        if !matches!(said, Ok(Ok(()))) {
            tracing::warn!("could not say goodbye to the broker; the last will says offline");
        }
        // The connection task ends once the DISCONNECT is written.
        if tokio::time::timeout_at(deadline, &mut poller).await.is_err() {
            poll_stop.cancel();
            let _ = poller.await;
        }
    }
}
