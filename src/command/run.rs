//! The engine's transitions (the types are in the parent module).

use super::*;

impl Live {
    pub(super) fn new(cmd: Command) -> Self {
        Self {
            cmd,
            status: Status::Accepted,
            attempts: 0,
            running: None,
            deadline_ms: None,
            queued: false,
            wake_ms: None,
            not_before_ms: None,
            booked_ms: None,
            needs_verify: false,
            last_error: None,
            latest: None,
        }
    }

    /// In the middle of an attempt, or owing a relay read from before a restart: a newer
    /// intent must wait for it rather than replace it.
    pub(super) fn busy(&self) -> bool {
        self.running.is_some() || self.needs_verify
    }
}

fn live_attempts(live: &HashMap<CommandId, Live>, id: &CommandId) -> u32 {
    live.get(id).map_or(0, |l| l.attempts)
}

const QUARANTINED: &str = "disconnects are quarantined until an operator lifts the quarantine";

impl Engine {
    /// An engine with nothing in flight.
    pub fn new(cfg: CommandsConfig, registry: Registry, policy: PolicyConfig) -> Self {
        Self {
            cfg,
            registry,
            policy: Policy::new(policy),
            live: HashMap::new(),
            slots: HashMap::new(),
            timers: BTreeSet::new(),
            cleared: HashMap::new(),
            links: HashMap::new(),
        }
    }

    /// Feed one input that happened at `now_ms`; carry out the outputs in order, every
    /// `Persist` committed before any `Publish` or `Execute`.
    pub fn handle(&mut self, input: Input, now_ms: i64) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Command(cmd) => self.on_command(cmd, now_ms, &mut out),
            Input::Payment { payment, received_ms } => self.on_payment(&payment, received_ms, now_ms, &mut out),
            Input::Executed { command, attempt, outcome } => {
                self.on_executed(&command, attempt, outcome, now_ms, &mut out)
            }
            Input::Tick => self.on_tick(now_ms, &mut out),
            Input::LiftQuarantine { by, why } => {
                if let Some(ev) = self.policy.lift_quarantine(&by, &why, now_ms) {
                    out.push(Output::Persist(Record::Quarantine(ev)));
                }
            }
        }
        out
    }

    /// When to send the next [`Input::Tick`] (Unix ms), if anything waits for time.
    pub fn next_wakeup(&self) -> Option<i64> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// Swap the account registry (reload); work in flight goes on.
    pub fn set_registry(&mut self, registry: Registry) {
        self.registry = registry;
    }

    /// Swap the policy configuration (reload); rate state and quarantine are kept.
    pub fn set_policy_config(&mut self, cfg: PolicyConfig) {
        self.policy.set_config(cfg);
    }

    /// Swap the command settings (reload).
    pub fn set_config(&mut self, cfg: CommandsConfig) {
        self.cfg = cfg;
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The command settings.
    pub fn config(&self) -> &CommandsConfig {
        &self.cfg
    }

    /// The policy and its state.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The status of a command that has not ended.
    pub fn status_of(&self, id: &CommandId) -> Option<Status> {
        self.live.get(id).map(|l| l.status)
    }

    /// How many commands have not ended.
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// What is known of a meter's relay.
    pub fn meter(&self, meter: &MeterId) -> Option<MeterView> {
        let s = self.slots.get(meter)?;
        Some(MeterView { relay: s.relay?, cut_reason: s.cut_reason, since_ms: s.since_ms })
    }

    /// The meter's offset from UTC: its own, else the site's.
    pub fn offset_of(&self, meter: &MeterId) -> i16 {
        self.registry.meter(meter).map_or(self.policy.config().utc_offset_minutes, |m| m.utc_offset_min)
    }

    fn on_command(&mut self, cmd: Command, now: i64, out: &mut Vec<Output>) {
        let id = cmd.id().clone();
        if let Some(l) = self.live.get(&id) {
            // The journal answers repeats before they get here; this is the guard for
            // an input fed twice.
            let same = l.cmd.same_content(&cmd.meter, &cmd.request);
            let msg = answer_repeat(&cmd.meter, &cmd.request, same, l.latest.as_ref(), now, self.offset_of(&cmd.meter));
            out.push(Output::Persist(Record::Note { meter: cmd.meter.to_string(), message: msg.clone() }));
            out.push(Output::Publish { meter: cmd.meter, message: msg });
            return;
        }
        let (meter, action, expires) = (cmd.meter.clone(), cmd.request.action, cmd.expires_ms);
        self.live.insert(id.clone(), Live::new(cmd));
        self.timers.insert((expires, id.clone()));
        self.emit(&id, Status::Accepted, now, Extra::default(), out);
        if self.registry.meter(&meter).is_none() {
            return self.finish(&id, Status::Rejected, now, err(ErrorCode::UnknownMeter, "no such meter"), out);
        }
        if now >= expires {
            return self.expire(&id, now, out);
        }
        match action {
            Action::Read => self.dispatch(&id, now, out),
            Action::Reconnect => self.enqueue(&id, now, out),
            Action::Disconnect => match self.policy.note_disconnect_request(now) {
                Arrival::Counted => self.enqueue(&id, now, out),
                Arrival::Quarantined => {
                    self.finish(&id, Status::Rejected, now, err(ErrorCode::PolicyRateLimit, QUARANTINED), out)
                }
                Arrival::Tripped(ev) => {
                    out.push(Output::Persist(Record::Quarantine(ev)));
                    let why = "this burst of disconnects tripped the quarantine";
                    self.finish(&id, Status::Rejected, now, err(ErrorCode::PolicyRateLimit, why), out);
                    self.reject_waiting_disconnects(now, out);
                }
            },
        }
    }

    /// Fail closed when the quarantine trips: every disconnect not yet in the middle of
    /// an attempt ends rejected; nothing waits for the lift to run unreviewed.
    fn reject_waiting_disconnects(&mut self, now: i64, out: &mut Vec<Output>) {
        let mut ids: Vec<(i64, CommandId)> = self
            .live
            .iter()
            .filter(|(_, l)| l.cmd.request.action == Action::Disconnect && !l.busy())
            .map(|(id, l)| (l.cmd.received_ms, id.clone()))
            .collect();
        ids.sort();
        for (_, id) in ids {
            let why = "the disconnect quarantine tripped";
            self.finish(&id, Status::Rejected, now, err(ErrorCode::PolicyRateLimit, why), out);
        }
    }

    /// Make `id` the meter's newest relay intent.
    fn enqueue(&mut self, id: &CommandId, now: i64, out: &mut Vec<Output>) {
        let Some(meter) = self.live.get(id).map(|l| l.cmd.meter.clone()) else { return };
        let current = self.slots.entry(meter.clone()).or_default().current.clone();
        let by = || Extra { by: Some(Supersessor::Command(id.clone())), ..Extra::default() };
        match current {
            None => {
                self.slot(&meter).current = Some(id.clone());
                self.dispatch(id, now, out);
            }
            Some(cur) if self.live.get(&cur).is_some_and(Live::busy) => {
                if let Some(old) = self.slot(&meter).next.replace(id.clone()) {
                    self.finish(&old, Status::Superseded, now, by(), out);
                }
            }
            Some(cur) => {
                // Detach the old one first, so that finishing it promotes nothing.
                self.slot(&meter).current = Some(id.clone());
                self.finish(&cur, Status::Superseded, now, by(), out);
                self.dispatch(id, now, out);
            }
        }
    }

    pub(super) fn slot(&mut self, meter: &MeterId) -> &mut Slot {
        self.slots.entry(meter.clone()).or_default()
    }

    /// Reads run whenever due; a relay command only when it is its meter's current one.
    pub(super) fn is_turn(&self, id: &CommandId) -> bool {
        let Some(l) = self.live.get(id) else { return false };
        !l.cmd.request.action.switches_relay()
            || self.slots.get(&l.cmd.meter).is_some_and(|s| s.current.as_ref() == Some(id))
    }

    /// Run the gates and, if they pass and the link is free, start an attempt; with the
    /// link busy, queue it there (the gates run again when the link frees).
    pub(super) fn dispatch(&mut self, id: &CommandId, now: i64, out: &mut Vec<Output>) {
        let Some(live) = self.live.get(id) else { return };
        if live.running.is_some() || live.queued {
            return;
        }
        let meter = live.cmd.meter.clone();
        if live.needs_verify {
            // Before expiry too: whether the relay moved must be known before giving up.
            if !self.take_link(id, now) {
                return;
            }
            let attempt = live_attempts(&self.live, id);
            self.start_attempt(id, attempt, Op::VerifyRelay, now);
            out.push(Output::Execute(Execution { command: id.clone(), meter, attempt, op: Op::VerifyRelay }));
            return;
        }
        if now >= live.cmd.expires_ms {
            return self.expire(id, now, out);
        }
        let Some(entry) = self.registry.meter(&meter).cloned() else {
            let e = err(ErrorCode::UnknownMeter, "the meter is no longer in the registry");
            return self.finish(id, Status::Failed, now, e, out);
        };
        let request = &live.cmd.request;
        let op = match request.action {
            Action::Disconnect => Op::Disconnect,
            Action::Reconnect => Op::Reconnect,
            Action::Read => Op::Read,
        };
        if op == Op::Disconnect {
            if self.policy.quarantine().is_some() {
                return self.finish(id, Status::Rejected, now, err(ErrorCode::PolicyRateLimit, QUARANTINED), out);
            }
            if request.is_arrears_cut() {
                let account = entry.account.as_ref();
                let case = ArrearsCase {
                    protection: account.and_then(|a| self.registry.protection(a)),
                    arrears_as_of_ms: live.cmd.arrears_as_of_ms(),
                    latest_cleared_ms: account.and_then(|a| self.cleared.get(a).copied()),
                    notice_sent_ms: request.notice_sent_at.map(Timestamp::unix_ms),
                    overridden: request.override_.is_some(),
                    utc_offset_min: entry.utc_offset_min,
                };
                match self.policy.check_arrears(&case, now) {
                    Gate::Allow => {}
                    Gate::Defer { not_before_ms } => {
                        // A rate slot booked earlier is stale by the time the window opens.
                        if let Some(l) = self.live.get_mut(id) {
                            l.booked_ms = None;
                        }
                        return self.defer(id, not_before_ms, now, out);
                    }
                    Gate::Reject { code, message } => {
                        return self.finish(id, Status::Rejected, now, err(code, message), out)
                    }
                }
            }
            let slot = match live.booked_ms {
                Some(t) => t,
                None => self.policy.book_disconnect(&entry.channel, now),
            };
            if slot > now {
                if let Some(l) = self.live.get_mut(id) {
                    l.booked_ms = Some(slot);
                }
                return self.defer(id, slot, now, out);
            }
        }
        if !self.take_link(id, now) {
            return;
        }
        let Some(l) = self.live.get_mut(id) else { return };
        l.booked_ms = None;
        l.attempts += 1;
        l.wake_ms = None;
        l.not_before_ms = None;
        let attempt = l.attempts;
        self.start_attempt(id, attempt, op, now);
        self.emit(id, Status::Executing, now, Extra::default(), out);
        out.push(Output::Execute(Execution { command: id.clone(), meter, attempt, op }));
    }

    fn defer(&mut self, id: &CommandId, until: i64, now: i64, out: &mut Vec<Output>) {
        let Some(l) = self.live.get_mut(id) else { return };
        l.wake_ms = Some(until);
        self.timers.insert((until, id.clone()));
        if l.status == Status::Deferred && l.not_before_ms == Some(until) {
            return;
        }
        l.not_before_ms = Some(until);
        self.emit(id, Status::Deferred, now, Extra::default(), out);
    }

    fn expire(&mut self, id: &CommandId, now: i64, out: &mut Vec<Output>) {
        let Some(l) = self.live.get(id) else { return };
        if l.attempts == 0 {
            return self.finish(id, Status::Expired, now, Extra::default(), out);
        }
        // It was tried and kept failing: that is `failed` with the last reason.
        let last = l.last_error.clone();
        let e = last.unwrap_or_else(|| ErrorBody::new(ErrorCode::MeterUnreachable, "gave up at expires_at"));
        self.finish(id, Status::Failed, now, Extra { error: Some(e), ..Extra::default() }, out);
    }

    pub(super) fn on_answer(
        &mut self,
        id: &CommandId,
        attempt: u32,
        outcome: Outcome,
        now: i64,
        out: &mut Vec<Output>,
    ) {
        let Some(l) = self.live.get_mut(id) else { return };
        let op = match l.running {
            Some((a, op)) if a == attempt => op,
            _ => return,
        };
        l.running = None;
        if let Some(d) = l.deadline_ms.take() {
            self.timers.remove(&(d, id.clone()));
        }
        let Some(l) = self.live.get_mut(id) else { return };
        let meter = l.cmd.meter.clone();
        match (op, outcome) {
            (Op::VerifyRelay, Outcome::Relay(state)) => {
                l.needs_verify = false;
                let action = l.cmd.request.action;
                match (action, state) {
                    (Action::Disconnect, RelayState::Disconnected) | (Action::Reconnect, RelayState::Connected) => {
                        self.complete_switch(id, SwitchOutcome::Done, now, out)
                    }
                    (Action::Reconnect, RelayState::ReadyForReconnection) => {
                        self.complete_switch(id, SwitchOutcome::Armed, now, out)
                    }
                    _ => {
                        self.learn_relay(&meter, state, now, out);
                        if !self.yield_to_next(id, now, out) {
                            self.dispatch(id, now, out);
                        }
                    }
                }
            }
            (Op::Disconnect | Op::Reconnect, Outcome::Switched(s)) => self.complete_switch(id, s, now, out),
            (Op::Read, Outcome::Read(r)) => {
                self.learn_relay(&meter, r.relay, now, out);
                let registers = r
                    .registers
                    .iter()
                    .map(|x| (x.obis.clone(), RegisterValue { value: json_number(x.value), unit: x.unit.clone() }))
                    .collect();
                let extra = Extra { registers: Some(registers), meter_clock: r.meter_clock, ..Extra::default() };
                self.finish(id, Status::Succeeded, now, extra, out);
            }
            (_, Outcome::Error(e)) => self.on_error(id, &e, now, out),
            (op, _) => {
                let e = err(ErrorCode::Internal, format!("the driver's answer does not fit {op:?}"));
                self.finish(id, Status::Failed, now, e, out);
            }
        }
    }

    fn complete_switch(&mut self, id: &CommandId, s: SwitchOutcome, now: i64, out: &mut Vec<Output>) {
        let Some(l) = self.live.get(id) else { return };
        let (meter, action, reason) = (l.cmd.meter.clone(), l.cmd.request.action, l.cmd.request.reason);
        match (action, s) {
            (Action::Disconnect, SwitchOutcome::Done) => {
                self.set_relay(&meter, RelayState::Disconnected, reason, now, out);
                self.finish(id, Status::Succeeded, now, Extra::default(), out);
            }
            (Action::Reconnect, SwitchOutcome::Done) => {
                self.set_relay(&meter, RelayState::Connected, None, now, out);
                self.finish(id, Status::Succeeded, now, Extra::default(), out);
            }
            (Action::Reconnect, SwitchOutcome::Armed) => {
                self.set_relay(&meter, RelayState::ReadyForReconnection, None, now, out);
                self.finish(id, Status::Armed, now, Extra::default(), out);
            }
            (Action::Disconnect, SwitchOutcome::Armed) => {
                self.set_relay(&meter, RelayState::ReadyForReconnection, None, now, out);
                let e = err(ErrorCode::VerifyMismatch, "asked disconnected, meter reports ready_for_reconnection");
                self.finish(id, Status::Failed, now, e, out);
            }
            (Action::Read, _) => {
                let e = err(ErrorCode::Internal, "a switch outcome for a read");
                self.finish(id, Status::Failed, now, e, out);
            }
        }
    }

    fn on_error(&mut self, id: &CommandId, e: &MeterError, now: i64, out: &mut Vec<Output>) {
        let body = ErrorBody::new(ErrorCode::of_meter_error(e), e.to_string());
        let with_error = || Extra { error: Some(body.clone()), ..Extra::default() };
        if let MeterError::VerifyMismatch { actual, .. } = e {
            if let Some(meter) = self.live.get(id).map(|l| l.cmd.meter.clone()) {
                self.learn_relay(&meter, *actual, now, out);
            }
            return self.finish(id, Status::Failed, now, with_error(), out);
        }
        if !e.is_link_failure() {
            return self.finish(id, Status::Failed, now, with_error(), out);
        }
        if self.yield_to_next(id, now, out) {
            return;
        }
        let Some(l) = self.live.get_mut(id) else { return };
        l.last_error = Some(body.clone());
        let retry_at = now.saturating_add(self.cfg.backoff_ms(l.attempts.max(1)));
        if retry_at >= l.cmd.expires_ms {
            return self.finish(id, Status::Failed, now, with_error(), out);
        }
        l.wake_ms = Some(retry_at);
        self.timers.insert((retry_at, id.clone()));
        self.emit(id, Status::Retrying, now, with_error(), out);
    }

    /// A failed or unverified relay command gives way to a newer intent waiting behind it.
    fn yield_to_next(&mut self, id: &CommandId, now: i64, out: &mut Vec<Output>) -> bool {
        let Some(meter) = self.live.get(id).map(|l| l.cmd.meter.clone()) else { return false };
        let slot = self.slot(&meter);
        if slot.current.as_ref() != Some(id) {
            return false;
        }
        let Some(next) = slot.next.take() else { return false };
        slot.current = Some(next.clone());
        let by = Extra { by: Some(Supersessor::Command(next.clone())), ..Extra::default() };
        self.finish(id, Status::Superseded, now, by, out);
        self.dispatch(&next, now, out);
        true
    }

    fn on_tick(&mut self, now: i64, out: &mut Vec<Output>) {
        let mut due = Vec::new();
        while self.timers.first().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, id)) = self.timers.pop_first() {
                due.push(id);
            }
        }
        for id in due {
            let Some(l) = self.live.get_mut(&id) else { continue };
            if let Some((attempt, _)) = l.running {
                // Expiry during an attempt: the attempt's end decides. No answer by the
                // attempt's deadline (the channel died or hangs): it failed on the link.
                if l.deadline_ms.is_some_and(|d| d <= now) {
                    let secs = self.cfg.attempt_timeout_s;
                    let e = MeterError::Timeout(secs.saturating_mul(1000));
                    tracing::warn!(command = %id, attempt, "no answer from the channel within {secs} s");
                    self.on_executed(&id, attempt, Outcome::Error(e), now, out);
                }
                continue;
            }
            if now >= l.cmd.expires_ms && !l.needs_verify {
                self.expire(&id, now, out);
            } else if l.wake_ms.is_some_and(|w| w <= now) {
                l.wake_ms = None;
                if self.is_turn(&id) {
                    self.dispatch(&id, now, out);
                }
            }
        }
    }

    pub(super) fn on_payment(&mut self, payment: &Payment, received_ms: i64, now: i64, out: &mut Vec<Output>) {
        if !payment.cleared {
            return;
        }
        out.push(Output::Persist(Record::PaymentProcessed(payment.id.clone())));
        let confirmed = payment.confirmed_at.map_or(received_ms, Timestamp::unix_ms);
        let latest = self.cleared.entry(payment.account.clone()).or_insert(confirmed);
        *latest = (*latest).max(confirmed);
        let voided = || Extra {
            by: Some(Supersessor::Payment(payment.id.clone())),
            trigger: Some(payment.id.clone()),
            ..Extra::default()
        };
        for meter in self.registry.meters_of(&payment.account).to_vec() {
            let slot = self.slots.get(&meter).cloned().unwrap_or_default();
            // A waiting arrears cut that already made an attempt may have opened the
            // relay (the ACTION went out, the read-back failed): the meter is owed a
            // reconnect all the same.
            let mut attempted_cut = false;
            for cand in [slot.next, slot.current].into_iter().flatten() {
                let waiting_cut = self.live.get(&cand).is_some_and(|l| l.cmd.request.is_arrears_cut() && !l.busy());
                if waiting_cut {
                    attempted_cut |= self.live.get(&cand).is_some_and(|l| l.attempts > 0);
                    let s = self.slot(&meter);
                    if s.next.as_ref() == Some(&cand) {
                        s.next = None;
                    }
                    if s.current.as_ref() == Some(&cand) {
                        s.current = None;
                    }
                    self.finish(&cand, Status::Superseded, now, voided(), out);
                }
            }
            let slot = self.slots.get(&meter).cloned().unwrap_or_default();
            let newest = slot.next.or(slot.current).and_then(|n| self.live.get(&n));
            let running_cut = newest.is_some_and(|l| l.cmd.request.is_arrears_cut());
            // A newer reconnect, or a cut for another reason, is a later intent than the
            // arrears cut: it stands.
            let other_intent = newest.is_some_and(|l| !l.cmd.request.is_arrears_cut());
            if other_intent || !(slot.cut_reason == Some(Reason::Arrears) || running_cut || attempted_cut) {
                continue;
            }
            let id = derived_command_id(&payment.id, &meter);
            if self.live.contains_key(&id) {
                continue;
            }
            let offset = self.offset_of(&meter);
            let expires = now.saturating_add(secs_ms(self.cfg.payment_reconnect_expiry_s));
            let request = CommandRequest {
                id,
                action: Action::Reconnect,
                reason: None,
                operator: None,
                requested_at: Some(Timestamp::from_ms(confirmed, offset)),
                arrears_as_of: None,
                notice_sent_at: None,
                expires_at: Some(Timestamp::from_ms(expires, offset)),
                override_: None,
            };
            let cmd =
                Command { meter, request, received_ms: now, expires_ms: expires, trigger: Some(payment.id.clone()) };
            out.push(Output::Persist(Record::Command(cmd.clone())));
            self.on_command(cmd, now, out);
        }
    }

    /// What a read taught about the relay: a closed relay is no longer cut for anything.
    fn learn_relay(&mut self, meter: &MeterId, relay: RelayState, now: i64, out: &mut Vec<Output>) {
        let reason = if relay == RelayState::Connected { None } else { self.slot(meter).cut_reason };
        self.set_relay(meter, relay, reason, now, out);
    }

    fn set_relay(
        &mut self,
        meter: &MeterId,
        relay: RelayState,
        cut_reason: Option<Reason>,
        now: i64,
        out: &mut Vec<Output>,
    ) {
        let s = self.slot(meter);
        if s.relay == Some(relay) && s.cut_reason == cut_reason {
            return;
        }
        if s.relay != Some(relay) {
            s.since_ms = Some(now);
        }
        s.relay = Some(relay);
        s.cut_reason = cut_reason;
        let rec = MeterRecord { meter: meter.clone(), relay, cut_reason, since_ms: s.since_ms };
        out.push(Output::Persist(Record::Meter(rec)));
    }

    /// Record and publish a status change of a live command.
    pub(super) fn emit(&mut self, id: &CommandId, status: Status, now: i64, extra: Extra, out: &mut Vec<Output>) {
        let Some(meter) = self.live.get(id).map(|l| l.cmd.meter.clone()) else { return };
        let offset = self.offset_of(&meter);
        let relay = self.slots.get(&meter).and_then(|s| s.relay);
        let Some(l) = self.live.get_mut(id) else { return };
        l.status = status;
        let mut m = ResultMessage::new(Some(id.to_string()), meter.as_str(), status, format_at(now, offset));
        m.action = Some(l.cmd.request.action);
        m.relay = relay;
        m.attempts = l.attempts;
        m.error = extra.error;
        m.not_before = l.not_before_ms.filter(|_| status == Status::Deferred).map(|t| format_at(t, offset));
        m.by = extra.by;
        m.trigger = extra.trigger.or_else(|| l.cmd.trigger.clone()).map(|payment| Trigger { payment });
        m.registers = extra.registers;
        m.meter_clock = extra.meter_clock;
        l.latest = Some(m.clone());
        let wake_ms = if status.is_final() { None } else { l.wake_ms };
        out.push(Output::Persist(Record::Status(StatusRecord {
            command: id.clone(),
            meter: meter.clone(),
            status,
            attempts: l.attempts,
            wake_ms,
            at_ms: now,
            message: m.clone(),
        })));
        out.push(Output::Publish { meter, message: m });
    }

    /// End a command; if it was its meter's current intent, the next one runs.
    pub(super) fn finish(&mut self, id: &CommandId, status: Status, now: i64, extra: Extra, out: &mut Vec<Output>) {
        self.emit(id, status, now, extra, out);
        let Some(l) = self.live.remove(id) else { return };
        let Some(slot) = self.slots.get_mut(&l.cmd.meter) else { return };
        if slot.next.as_ref() == Some(id) {
            slot.next = None;
        } else if slot.current.as_ref() == Some(id) {
            slot.current = slot.next.take();
            if let Some(next) = slot.current.clone() {
                self.dispatch(&next, now, out);
            }
        }
    }
}
