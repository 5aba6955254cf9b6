//! Turn-taking on links: at most one attempt in flight per link, the next pulled from
//! the engine when the link frees (reconnects first), every gate checked then; and the
//! attempt deadline that frees a link whose channel never answered.

use super::*;

impl Engine {
    /// The link a command runs or waits on (None: its meter left the registry; it then
    /// takes no turn).
    pub(super) fn link_of(&self, id: &CommandId) -> Option<String> {
        let l = self.live.get(id)?;
        self.registry.meter(&l.cmd.meter).map(|e| e.channel.clone())
    }

    /// True when `id` may start an attempt now: its link is free and nobody waits there
    /// before it. Otherwise it is queued on the link (reconnects first).
    pub(super) fn take_link(&mut self, id: &CommandId, _now: i64) -> bool {
        let Some(link) = self.link_of(id) else { return true };
        let reconnect = self.live.get(id).is_some_and(|l| l.cmd.request.action == Action::Reconnect);
        let turn = self.links.entry(link).or_default();
        if turn.busy.is_none() && turn.first.is_empty() && turn.rest.is_empty() {
            turn.busy = Some(id.clone());
            return true;
        }
        if turn.busy.as_ref() == Some(id) {
            return true;
        }
        if reconnect {
            turn.first.push_back(id.clone());
        } else {
            turn.rest.push_back(id.clone());
        }
        if let Some(l) = self.live.get_mut(id) {
            l.queued = true;
        }
        false
    }

    pub(super) fn start_attempt(&mut self, id: &CommandId, attempt: u32, op: Op, now: i64) {
        let deadline = now.saturating_add(secs_ms(self.cfg.attempt_timeout_s));
        if let Some(l) = self.live.get_mut(id) {
            l.running = Some((attempt, op));
            l.deadline_ms = Some(deadline);
        }
        self.timers.insert((deadline, id.clone()));
    }

    /// The link is free: start the first waiting command whose gates still pass (each is
    /// checked now: expired, superseded, voided by a payment, outside the window).
    pub(super) fn pump(&mut self, link: &str, now: i64, out: &mut Vec<Output>) {
        loop {
            let Some(turn) = self.links.get_mut(link) else { return };
            if turn.busy.is_some() {
                return;
            }
            let Some(id) = turn.first.pop_front().or_else(|| turn.rest.pop_front()) else {
                self.links.remove(link);
                return;
            };
            let Some(l) = self.live.get_mut(&id) else { continue };
            if !l.queued {
                continue;
            }
            l.queued = false;
            // Its turn on the link; whether it is still its meter's turn is checked too
            // (a newer intent may have taken over, then it is dispatched as that one).
            if self.is_turn(&id) {
                if let Some(t) = self.links.get_mut(link) {
                    t.busy = Some(id.clone());
                }
                self.dispatch(&id, now, out);
                // The gates may have deferred or ended it: the link is free again.
                let started = self.live.get(&id).is_some_and(|l| l.running.is_some());
                if !started {
                    if let Some(t) = self.links.get_mut(link) {
                        if t.busy.as_ref() == Some(&id) {
                            t.busy = None;
                        }
                    }
                }
            }
        }
    }

    /// Commands waiting for their link (for tests and metrics).
    pub fn queued_on_links(&self) -> usize {
        self.live.values().filter(|l| l.queued).count()
    }

    pub(super) fn on_executed(
        &mut self,
        id: &CommandId,
        attempt: u32,
        outcome: Outcome,
        now: i64,
        out: &mut Vec<Output>,
    ) {
        let ends = self.live.get(id).is_some_and(|l| matches!(l.running, Some((a, _)) if a == attempt));
        if !ends {
            // A late answer to an attempt already given up on.
            return;
        }
        let link = self.link_of(id);
        if let Some(turn) = link.as_ref().and_then(|k| self.links.get_mut(k)) {
            if turn.busy.as_ref() == Some(id) {
                turn.busy = None;
            }
        }
        self.on_answer(id, attempt, outcome, now, out);
        if let Some(link) = link {
            self.pump(&link, now, out);
        }
    }
}
