//! Restart recovery: rebuild the engine from what the journal kept.

use super::*;

impl Engine {
    /// Rebuild from the journal after a restart. Every non-final command resumes; one
    /// that was executing is first re-verified by reading the relay ([`Op::VerifyRelay`]).
    pub fn restore(
        cfg: CommandsConfig,
        registry: Registry,
        policy: PolicyConfig,
        rec: Recovered,
        now_ms: i64,
    ) -> (Self, Vec<Output>) {
        let mut e = Self::new(cfg, registry, policy);
        let mut out = Vec::new();
        e.policy.restore_quarantine(rec.quarantine);
        e.cleared.extend(rec.cleared);
        for m in rec.meters {
            let slot = e.slots.entry(m.meter).or_default();
            slot.relay = Some(m.relay);
            slot.cut_reason = m.cut_reason;
            slot.since_ms = m.since_ms;
        }
        let mut order = Vec::new();
        for sc in rec.commands {
            let id = sc.command.id().clone();
            if e.live.contains_key(&id) || sc.status.is_final() {
                continue;
            }
            let switches = sc.command.request.action.switches_relay();
            let executing = sc.status == Status::Executing;
            let mut live = Live::new(sc.command);
            live.status = sc.status;
            live.attempts = sc.attempts;
            // A read cut short by the restart is simply run again: it changes nothing.
            live.wake_ms = if executing { None } else { sc.wake_ms };
            live.not_before_ms = if sc.status == Status::Deferred { sc.wake_ms } else { None };
            live.needs_verify = executing && switches;
            live.last_error = sc.latest.as_ref().and_then(|m| m.error.clone());
            let never_announced = sc.latest.is_none();
            live.latest = sc.latest;
            e.timers.insert((live.cmd.expires_ms, id.clone()));
            e.live.insert(id.clone(), live);
            if never_announced {
                e.emit(&id, Status::Accepted, now_ms, Extra::default(), &mut out);
            }
            if switches {
                e.restore_intent(&id, now_ms, &mut out);
            }
            order.push(id);
        }
        for id in order {
            let Some(live) = e.live.get(&id) else { continue };
            if !e.is_turn(&id) {
                continue;
            }
            match live.wake_ms {
                Some(w) if w > now_ms && !live.needs_verify => {
                    e.timers.insert((w, id));
                }
                _ => e.dispatch(&id, now_ms, &mut out),
            }
        }
        // Payments whose reconnects were lost in a crash: derived ids are deterministic
        // and the engine skips a reconnect already live, so feeding one again is safe.
        for (payment, received_ms) in rec.payments {
            e.on_payment(&payment, received_ms, now_ms, &mut out);
        }
        (e, out)
    }

    /// Like [`Engine::enqueue`] at restart: supersede what must be, dispatch nothing.
    fn restore_intent(&mut self, id: &CommandId, now: i64, out: &mut Vec<Output>) {
        let Some(meter) = self.live.get(id).map(|l| l.cmd.meter.clone()) else { return };
        let by = || Extra { by: Some(Supersessor::Command(id.clone())), ..Extra::default() };
        match self.slot(&meter).current.clone() {
            None => self.slot(&meter).current = Some(id.clone()),
            Some(cur) if self.live.get(&cur).is_some_and(Live::busy) => {
                if let Some(old) = self.slot(&meter).next.replace(id.clone()) {
                    self.finish(&old, Status::Superseded, now, by(), out);
                }
            }
            Some(cur) => {
                self.slot(&meter).current = Some(id.clone());
                self.finish(&cur, Status::Superseded, now, by(), out);
            }
        }
    }
}
