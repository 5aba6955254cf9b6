//! One meter's state, shared by every link it is reachable over, and the fleet around it.
//!
//! Per-meter state is small on purpose (a few hundred bytes, no task, no stored profile
//! rows) so that 100,000 meters fit in one process; sessions exist only per open
//! association, on the links.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::clock::Clock;
use crate::config::{Faults, MeterSpec, SimProtocol};
use crate::control::{self, ControlState, Refused, Trigger};
use crate::load::{LoadModel, MJ_PER_WH};

/// How many disconnector events a meter keeps (profile_entries of 0.0.99.98.2.255).
pub const LOG_DEPTH: usize = 100;
/// Relay-open intervals kept verbatim before old ones are folded into a constant.
const KEEP_INTERVALS: usize = 32;

/// Everything simulated, shared by all tasks.
pub(crate) struct Fleet {
    pub meters: Vec<Meter>,
    pub by_id: HashMap<String, usize>,
    pub clock: Arc<dyn Clock>,
    pub utc_offset_min: i16,
    pub period_s: u32,
    pub depth_days: u32,
    /// True time the energy registers were at their initial values.
    pub start_ms: i64,
    pub events: broadcast::Sender<SimEvent>,
}

impl Fleet {
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    pub fn meter(&self, id: &str) -> Option<&Meter> {
        self.by_id.get(id).and_then(|&i| self.meters.get(i))
    }

    /// The customer presses a meter's button (see [`crate::Simulator::press_button`]).
    pub fn press_button(&self, id: &str) -> Result<(), crate::SimError> {
        let meter = self.meter(id).ok_or_else(|| crate::SimError::UnknownMeter(id.to_owned()))?;
        meter.record(self, Activity::Button);
        // Mode 0 ignores the button; that is not an error for the person pressing it.
        let _ = meter.trigger(self, Trigger::Button);
        Ok(())
    }

    /// Replace a meter's faults.
    pub fn set_faults(&self, id: &str, faults: Faults) -> Result<(), crate::SimError> {
        let meter = self.meter(id).ok_or_else(|| crate::SimError::UnknownMeter(id.to_owned()))?;
        meter.set_faults(self, faults);
        Ok(())
    }

    /// Tell subscribers, building the event only when somebody listens.
    pub fn emit(&self, meter: &Meter, kind: impl FnOnce() -> SimEventKind) {
        if self.events.receiver_count() > 0 {
            // No receiver left between the check and the send is harmless.
            let _ = self.events.send(SimEvent { meter: meter.spec.id.clone(), kind: kind() });
        }
    }
}

/// Something that happened in the simulator, for tests and UIs that wait on events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SimEvent {
    /// The meter's id.
    pub meter: String,
    /// What happened.
    pub kind: SimEventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SimEventKind {
    /// The disconnect-control state moved.
    Switched {
        /// Relay closed.
        output_state: bool,
        /// The new control state.
        control_state: ControlState,
        /// The disconnector-control log code recorded.
        event_code: u8,
    },
    /// A request was served (or refused); `what` as in [`MeterView::last_request`].
    Request {
        /// A one-line description.
        what: String,
    },
    /// A request got no answer because of a fault: `offline` (not even heard) or `lost`
    /// (served, answer dropped).
    Unanswered {
        /// `offline` or `lost`.
        why: String,
    },
    /// The meter's faults were replaced.
    FaultsChanged,
}

/// What a meter was last asked, kept compactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activity {
    Associated { sap: u8, mechanism: u8 },
    AssociationRefused { sap: u8, diagnostic: u8 },
    Released,
    Get { class: u16, obis: [u8; 6], attr: i8, result: u8 },
    Set { class: u16, obis: [u8; 6], attr: i8, result: u8 },
    Action { class: u16, obis: [u8; 6], method: i8, result: u8 },
    ModbusRead { function: u8, address: u16, quantity: u16 },
    ModbusWrite { function: u8, address: u16 },
    Button,
}

fn obis(o: &[u8; 6]) -> String {
    format!("{}-{}:{}.{}.{}.{}", o[0], o[1], o[2], o[3], o[4], o[5])
}

impl fmt::Display for Activity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Associated { sap, mechanism } => write!(f, "AARQ sap={sap} mechanism={mechanism}: accepted"),
            Self::AssociationRefused { sap, diagnostic } => {
                write!(f, "AARQ sap={sap}: refused (diagnostic {diagnostic})")
            }
            Self::Released => f.write_str("release"),
            Self::Get { class, obis: o, attr, result } => {
                write!(f, "GET {class}/{}/{attr}: result {result}", obis(o))
            }
            Self::Set { class, obis: o, attr, result } => {
                write!(f, "SET {class}/{}/{attr}: result {result}", obis(o))
            }
            Self::Action { class, obis: o, method, result } => {
                write!(f, "ACTION {class}/{}/{method}: result {result}", obis(o))
            }
            Self::ModbusRead { function, address, quantity } => {
                write!(f, "modbus fc{function} read {address}+{quantity}")
            }
            Self::ModbusWrite { function, address } => write!(f, "modbus fc{function} write {address}"),
            Self::Button => f.write_str("button"),
        }
    }
}

/// What a link should do with a request, given the meter's faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The meter is offline: it does not even hear the request.
    Offline,
    /// The request is served but its answer is lost on the way back.
    Lost,
    /// Answer after `delay_ms`, corrupted when `corrupt`.
    Answer { corrupt: bool, delay_ms: u32 },
}

/// One meter.
pub(crate) struct Meter {
    pub spec: MeterSpec,
    pub index: usize,
    pub load: LoadModel,
    /// The DLMS server system title: "SIM" and the meter number, big-endian.
    pub system_title: [u8; 8],
    state: Mutex<MeterState>,
}

pub(crate) struct MeterState {
    pub control: ControlState,
    pub mode: u8,
    /// True time the relay opened, while it is open.
    open_since_ms: Option<i64>,
    /// Closed periods [opened, closed) in true time, oldest first.
    open_intervals: Vec<(i64, i64)>,
    folded_import_mj: i128,
    folded_export_mj: i128,
    /// (meter-clock ms, event code), oldest first.
    pub log: VecDeque<(i64, u8)>,
    pub faults: Faults,
    pub requests: u64,
    /// `requests` when the faults were last set: "every n-th" counts from there.
    fault_epoch: u64,
    pub last: Option<(i64, Activity)>,
    /// The last invocation counter this meter's management server used.
    pub server_ic: u32,
    /// Whose invocation counters were last accepted on the management client, and the
    /// highest one.
    pub mgmt_peer: Option<([u8; 8], u32)>,
}

/// What energy depends on, copied out of the lock.
#[derive(Debug, Clone)]
pub(crate) struct EnergyBasis {
    load: LoadModel,
    offset_min: i16,
    initial_wh: u64,
    start_ms: i64,
    folded_import_mj: i128,
    folded_export_mj: i128,
    intervals: Vec<(i64, i64)>,
    pub drift_ms: i64,
}

impl EnergyBasis {
    fn removed(&self, t: i64, f: impl Fn(i64) -> i128, folded: i128) -> i128 {
        let mut removed = folded;
        for &(a, b) in &self.intervals {
            if a < t {
                removed += f(b.min(t)) - f(a);
            }
        }
        removed
    }

    /// Import register in Wh at true time `t`.
    pub fn import_wh(&self, t: i64) -> u64 {
        let f = |t| self.load.import_mj(t, self.offset_min);
        let gained = f(t) - f(self.start_ms) - self.removed(t, f, self.folded_import_mj);
        let wh = i128::from(self.initial_wh) + gained.div_euclid(MJ_PER_WH);
        u64::try_from(wh.max(0)).unwrap_or(u64::MAX)
    }

    /// Export register in Wh at true time `t`. Starts at zero at simulator start.
    pub fn export_wh(&self, t: i64) -> u64 {
        let f = |t| self.load.export_mj(t, self.offset_min);
        let gained = f(t) - f(self.start_ms) - self.removed(t, f, self.folded_export_mj);
        u64::try_from(gained.div_euclid(MJ_PER_WH).max(0)).unwrap_or(u64::MAX)
    }

    /// Whether the relay was open at any moment of (a, b] (true time).
    pub fn open_during(&self, a: i64, b: i64) -> bool {
        self.intervals.iter().any(|&(o, c)| o <= b && c > a)
    }
}

impl Meter {
    pub fn new(spec: MeterSpec, index: usize, seed: u64) -> Self {
        let mut system_title = *b"SIM\0\0\0\0\0";
        let number = (index as u64 + 1).to_be_bytes();
        system_title[3..].copy_from_slice(&number[3..]);
        let state = MeterState {
            control: ControlState::Connected,
            mode: spec.control_mode,
            open_since_ms: None,
            open_intervals: Vec::new(),
            folded_import_mj: 0,
            folded_export_mj: 0,
            log: VecDeque::new(),
            faults: Faults::default(),
            requests: 0,
            fault_epoch: 0,
            last: None,
            server_ic: 0,
            mgmt_peer: None,
        };
        Self { load: LoadModel::for_meter(seed, index), spec, index, system_title, state: Mutex::new(state) }
    }

    /// The state, even if a thread panicked while holding it: the state is plain data
    /// and every update leaves it consistent, so a poisoned lock is still usable.
    pub fn lock(&self) -> MutexGuard<'_, MeterState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults
    }

    /// The meter's own clock, in ms, at true time `now_ms`.
    pub fn meter_ms(&self, now_ms: i64) -> i64 {
        now_ms.saturating_add(self.lock().faults.clock_drift_s.saturating_mul(1000))
    }

    /// Count a request and decide, from the faults, whether and how to answer it.
    pub fn admit(&self, fleet: &Fleet) -> Verdict {
        let verdict = {
            let mut st = self.lock();
            if st.faults.offline {
                Verdict::Offline
            } else {
                st.requests += 1;
                let n = st.requests - st.fault_epoch;
                let hits = |every: u32| every != 0 && n % u64::from(every) == 0;
                if hits(st.faults.drop_every_nth) {
                    Verdict::Lost
                } else {
                    Verdict::Answer {
                        corrupt: hits(st.faults.corrupt_every_nth),
                        delay_ms: st.faults.response_delay_ms,
                    }
                }
            }
        };
        let why = match verdict {
            Verdict::Offline => "offline",
            Verdict::Lost => "lost",
            Verdict::Answer { .. } => return verdict,
        };
        fleet.emit(self, || SimEventKind::Unanswered { why: why.to_owned() });
        verdict
    }

    pub fn record(&self, fleet: &Fleet, activity: Activity) {
        let now = fleet.now_ms();
        self.lock().last = Some((now, activity));
        fleet.emit(self, || SimEventKind::Request { what: activity.to_string() });
    }

    pub fn energy(&self, fleet: &Fleet) -> EnergyBasis {
        let st = self.lock();
        let mut intervals = st.open_intervals.clone();
        if let Some(since) = st.open_since_ms {
            // Still open: open "until the end of time" for every query.
            intervals.push((since, i64::MAX));
        }
        EnergyBasis {
            load: self.load,
            offset_min: fleet.utc_offset_min,
            initial_wh: self.spec.initial_import_wh,
            start_ms: fleet.start_ms,
            folded_import_mj: st.folded_import_mj,
            folded_export_mj: st.folded_export_mj,
            intervals,
            drift_ms: st.faults.clock_drift_s.saturating_mul(1000),
        }
    }

    /// Ask the relay to move.
    ///
    /// # Errors
    /// When the mode refuses the trigger.
    pub fn trigger(&self, fleet: &Fleet, trigger: Trigger) -> Result<ControlState, Refused> {
        let now = fleet.now_ms();
        let mut st = self.lock();
        let outcome = control::apply(st.mode, st.control, trigger)?;
        if st.faults.stuck_relay || outcome.state == st.control {
            // A welded relay: the command is acknowledged and nothing happens.
            return Ok(st.control);
        }
        let event = outcome.event.unwrap_or(0);
        self.move_to(&mut st, fleet, now, outcome.state, event);
        let state = st.control;
        drop(st);
        fleet.emit(self, || SimEventKind::Switched {
            output_state: state.relay_closed(),
            control_state: state,
            event_code: event,
        });
        Ok(state)
    }

    fn move_to(&self, st: &mut MeterState, fleet: &Fleet, now: i64, to: ControlState, event: u8) {
        let was_closed = st.control.relay_closed();
        st.control = to;
        match (was_closed, to.relay_closed()) {
            (true, false) => st.open_since_ms = Some(now),
            (false, true) => {
                let since = st.open_since_ms.take().unwrap_or(now);
                st.open_intervals.push((since, now));
                self.fold_old_intervals(st, fleet, now);
            }
            _ => {}
        }
        let at = now.saturating_add(st.faults.clock_drift_s.saturating_mul(1000));
        if st.log.len() >= LOG_DEPTH {
            st.log.pop_front();
        }
        st.log.push_back((at, event));
    }

    /// Fold intervals that ended before the profile's reach into a constant, so the
    /// list stays short however often the relay moves.
    fn fold_old_intervals(&self, st: &mut MeterState, fleet: &Fleet, now: i64) {
        let horizon = now - i64::from(fleet.depth_days) * 86_400_000 - i64::from(fleet.period_s) * 1000;
        while st.open_intervals.len() > KEEP_INTERVALS {
            let Some(&(a, b)) = st.open_intervals.first() else { break };
            if b >= horizon {
                break;
            }
            st.folded_import_mj +=
                self.load.import_mj(b, fleet.utc_offset_min) - self.load.import_mj(a, fleet.utc_offset_min);
            st.folded_export_mj +=
                self.load.export_mj(b, fleet.utc_offset_min) - self.load.export_mj(a, fleet.utc_offset_min);
            st.open_intervals.remove(0);
        }
    }

    /// Change the control mode (DLMS SET of attribute 4). Mode 0 means always connected.
    pub fn set_mode(&self, fleet: &Fleet, mode: u8) {
        let now = fleet.now_ms();
        let mut st = self.lock();
        st.mode = mode;
        if mode == 0 && st.control != ControlState::Connected {
            self.move_to(&mut st, fleet, now, ControlState::Connected, control::event::REMOTE_CONNECTION);
        }
    }

    /// Set the meter clock to `meter_ms` (a clock synchronisation): becomes the drift.
    pub fn set_clock(&self, fleet: &Fleet, meter_ms: i64) {
        let drift_s = (meter_ms - fleet.now_ms()).div_euclid(1000);
        self.lock().faults.clock_drift_s = drift_s;
    }

    pub fn set_faults(&self, fleet: &Fleet, faults: Faults) {
        {
            let mut st = self.lock();
            st.faults = faults;
            st.fault_epoch = st.requests;
        }
        fleet.emit(self, || SimEventKind::FaultsChanged);
    }

    pub fn view(&self, fleet: &Fleet) -> MeterView {
        let now = fleet.now_ms();
        let basis = self.energy(fleet);
        let st = self.lock();
        MeterView {
            id: self.spec.id.clone(),
            index: self.index,
            protocol: self.spec.protocol,
            output_state: st.control.relay_closed(),
            control_state: st.control,
            control_mode: st.mode,
            import_wh: basis.import_wh(now),
            export_wh: basis.export_wh(now),
            meter_time_ms: now.saturating_add(basis.drift_ms),
            requests: st.requests,
            last_request: st.last.map(|(_, a)| a.to_string()),
            last_request_at_ms: st.last.map(|(t, _)| t),
            faults: st.faults,
            log_entries: st.log.len(),
        }
    }
}

/// A snapshot of one meter, for tests, the console and the control API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MeterView {
    /// Logical device name / serial number.
    pub id: String,
    /// Position in [`crate::FleetConfig::meters`].
    pub index: usize,
    /// Protocol.
    pub protocol: SimProtocol,
    /// Relay closed (attribute 2 of the disconnect control).
    pub output_state: bool,
    /// Attribute 3.
    pub control_state: ControlState,
    /// Attribute 4.
    pub control_mode: u8,
    /// Import energy register, Wh.
    pub import_wh: u64,
    /// Export energy register, Wh.
    pub export_wh: u64,
    /// The meter's clock (true time plus drift), ms since the epoch.
    pub meter_time_ms: i64,
    /// Requests admitted so far (all links).
    pub requests: u64,
    /// The last thing the meter was asked, in one line.
    pub last_request: Option<String>,
    /// When (true time, ms since the epoch).
    pub last_request_at_ms: Option<i64>,
    /// Current faults.
    pub faults: Faults,
    /// Rows in the disconnector control log.
    pub log_entries: usize,
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A fleet over `specs` at UTC+1, started at the clock's current time.
    pub(crate) fn fleet(specs: Vec<MeterSpec>, clock: Arc<dyn Clock>) -> Fleet {
        let start_ms = clock.now_ms();
        let by_id = specs.iter().enumerate().map(|(i, m)| (m.id.clone(), i)).collect();
        Fleet {
            meters: specs.into_iter().enumerate().map(|(i, s)| Meter::new(s, i, 5)).collect(),
            by_id,
            clock,
            utc_offset_min: 60,
            period_s: 900,
            depth_days: 60,
            start_ms,
            events: broadcast::channel(16).0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::fleet as fleet_of;
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn energy_stops_while_the_relay_is_open() {
        let clock = Arc::new(ManualClock::new(1_717_200_000_000));
        let fleet = fleet_of(vec![MeterSpec::dlms("A", 0)], clock.clone());
        let m = &fleet.meters[0];
        assert_eq!(m.view(&fleet).import_wh, 1_000_000);
        clock.advance(3_600_000);
        let before = m.view(&fleet).import_wh;
        assert!(before > 1_000_000);
        assert_eq!(m.trigger(&fleet, Trigger::RemoteDisconnect), Ok(ControlState::Disconnected));
        clock.advance(5 * 3_600_000);
        assert_eq!(m.view(&fleet).import_wh, before, "no energy through an open relay");
        assert_eq!(m.trigger(&fleet, Trigger::RemoteReconnect), Ok(ControlState::Connected));
        clock.advance(3_600_000);
        let after = m.view(&fleet).import_wh;
        assert!(after > before);
        // The past is unchanged by later events: the basis answers for any instant.
        let basis = m.energy(&fleet);
        assert_eq!(basis.import_wh(1_717_200_000_000 + 3_600_000), before);
        assert_eq!(basis.import_wh(1_717_200_000_000 + 4 * 3_600_000), before);
        assert_eq!(m.view(&fleet).log_entries, 2);
    }

    #[test]
    fn a_stuck_relay_acknowledges_and_stays() {
        let clock = Arc::new(ManualClock::new(1_717_200_000_000));
        let fleet = fleet_of(vec![MeterSpec::dlms("A", 0)], clock);
        let m = &fleet.meters[0];
        m.set_faults(&fleet, Faults { stuck_relay: true, ..Faults::default() });
        assert_eq!(m.trigger(&fleet, Trigger::RemoteDisconnect), Ok(ControlState::Connected));
        assert!(m.view(&fleet).output_state);
    }

    #[test]
    fn faults_drop_and_corrupt_by_count() {
        let clock = Arc::new(ManualClock::new(0));
        let fleet = fleet_of(vec![MeterSpec::dlms("A", 0)], clock);
        let m = &fleet.meters[0];
        m.set_faults(&fleet, Faults { drop_every_nth: 3, corrupt_every_nth: 2, ..Faults::default() });
        let verdicts: Vec<Verdict> = (0..6).map(|_| m.admit(&fleet)).collect();
        let plain = Verdict::Answer { corrupt: false, delay_ms: 0 };
        let bad = Verdict::Answer { corrupt: true, delay_ms: 0 };
        assert_eq!(verdicts, vec![plain, bad, Verdict::Lost, bad, plain, Verdict::Lost]);
        m.set_faults(&fleet, Faults { offline: true, ..Faults::default() });
        assert_eq!(m.admit(&fleet), Verdict::Offline);
    }
}
