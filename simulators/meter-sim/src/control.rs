//! The disconnect-control state machine (IEC 62056-6-2, interface class 70).
//!
//! Transitions, as the Blue Book names them:
//!
//! | | from | to | trigger |
//! |---|---|---|---|
//! | a | disconnected | connected | remote_reconnect |
//! | b | connected | disconnected | remote_disconnect |
//! | c | ready_for_reconnection | disconnected | remote_disconnect |
//! | d | disconnected | ready_for_reconnection | remote_reconnect |
//! | e | ready_for_reconnection | connected | manual_reconnect (the button) |
//! | f | connected | ready_for_reconnection | manual_disconnect (the button) |
//! | g | connected | ready_for_reconnection | local_disconnect (not simulated) |
//! | h | ready_for_reconnection | connected | local_reconnect (not simulated) |
//!
//! and which of them each control mode allows:
//!
//! | mode | remote disconnect | manual disconnect | remote reconnect | manual reconnect |
//! |---|---|---|---|---|
//! | 0 | — (always connected, methods refused) | — | — | — |
//! | 1 | b, c | f | d | e |
//! | 2 | b, c | f | a | e |
//! | 3 | b, c | — | d | e |
//! | 4 | b, c | — | a | e |
//! | 5 | b, c | f | d | e |
//! | 6 | b, c | — | d | e |
//!
//! A request whose transition the table does not list (remote_disconnect while already
//! disconnected, remote_reconnect while ready_for_reconnection, ...) leaves the state as it
//! is and still succeeds: the method is idempotent, which is what a head-end retrying a
//! command after a lost answer needs.

use serde::{Deserialize, Serialize};

/// Attribute 3 of the disconnect-control object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlState {
    /// 0: the relay is open.
    Disconnected,
    /// 1: the relay is closed.
    Connected,
    /// 2: the relay is open and the customer may close it with the button.
    ReadyForReconnection,
}

impl ControlState {
    /// The enum value on the wire.
    #[must_use]
    pub const fn as_u8(self) -> u8 {
        match self {
            Self::Disconnected => 0,
            Self::Connected => 1,
            Self::ReadyForReconnection => 2,
        }
    }

    /// Attribute 2 (output_state) that goes with this control state.
    #[must_use]
    pub const fn relay_closed(self) -> bool {
        matches!(self, Self::Connected)
    }
}

/// What asks the relay to move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Method 1, remote_disconnect.
    RemoteDisconnect,
    /// Method 2, remote_reconnect.
    RemoteReconnect,
    /// The customer's button.
    Button,
    /// A Modbus coil write: Modbus meters switch directly, in both directions.
    DirectConnect,
    /// A Modbus coil write to open.
    DirectDisconnect,
}

/// Why a trigger was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Mode 0: the meter has no switchable disconnector.
    ModeZero,
}

/// An accepted trigger's effect: the new state (possibly unchanged) and its log code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The state after the trigger.
    pub state: ControlState,
    /// The disconnector-control event code to log, when the state moved.
    pub event: Option<u8>,
}

/// Event codes of the disconnector control log (the IDIS list).
pub mod event {
    /// Disconnector ready for manual reconnection.
    pub const READY_FOR_MANUAL_RECONNECTION: u8 = 59;
    /// Manual disconnection.
    pub const MANUAL_DISCONNECTION: u8 = 60;
    /// Manual connection.
    pub const MANUAL_CONNECTION: u8 = 61;
    /// Remote disconnection.
    pub const REMOTE_DISCONNECTION: u8 = 62;
    /// Remote connection.
    pub const REMOTE_CONNECTION: u8 = 63;
}

/// Whether the button may disconnect in this mode (transition f).
#[must_use]
pub const fn manual_disconnect_allowed(mode: u8) -> bool {
    matches!(mode, 1 | 2 | 5)
}

/// Whether remote_reconnect closes the relay directly in this mode (transition a).
#[must_use]
pub const fn direct_reconnect(mode: u8) -> bool {
    matches!(mode, 2 | 4)
}

/// Apply `trigger` to `state` under `mode`.
///
/// # Errors
/// [`Refused::ModeZero`] for remote triggers in mode 0.
pub fn apply(mode: u8, state: ControlState, trigger: Trigger) -> Result<Outcome, Refused> {
    use ControlState::{Connected, Disconnected, ReadyForReconnection};
    let unchanged = Ok(Outcome { state, event: None });
    let to = |state, code| Ok(Outcome { state, event: Some(code) });
    if mode == 0 {
        // Always connected: the button does nothing, every remote command is refused.
        return if trigger == Trigger::Button { unchanged } else { Err(Refused::ModeZero) };
    }
    match (trigger, state) {
        (Trigger::RemoteDisconnect | Trigger::DirectDisconnect, Connected | ReadyForReconnection) => {
            to(Disconnected, event::REMOTE_DISCONNECTION)
        }
        (Trigger::RemoteReconnect, Disconnected) if direct_reconnect(mode) => to(Connected, event::REMOTE_CONNECTION),
        (Trigger::RemoteReconnect, Disconnected) => to(ReadyForReconnection, event::READY_FOR_MANUAL_RECONNECTION),
        (Trigger::DirectConnect, Disconnected | ReadyForReconnection) => to(Connected, event::REMOTE_CONNECTION),
        (Trigger::Button, ReadyForReconnection) => to(Connected, event::MANUAL_CONNECTION),
        (Trigger::Button, Connected) if manual_disconnect_allowed(mode) => {
            to(ReadyForReconnection, event::MANUAL_DISCONNECTION)
        }
        _ => unchanged,
    }
}

#[cfg(test)]
mod tests {
    use super::ControlState::{Connected as C, Disconnected as D, ReadyForReconnection as R};
    use super::Trigger::{Button, DirectConnect, DirectDisconnect, RemoteDisconnect, RemoteReconnect};
    use super::*;

    fn next(mode: u8, state: ControlState, t: Trigger) -> ControlState {
        apply(mode, state, t).map_or(state, |o| o.state)
    }

    #[test]
    fn mode_zero_is_always_connected_and_refuses_methods() {
        for t in [RemoteDisconnect, RemoteReconnect, DirectConnect, DirectDisconnect] {
            assert_eq!(apply(0, C, t), Err(Refused::ModeZero));
        }
        assert_eq!(next(0, C, Button), C);
    }

    #[test]
    fn remote_disconnect_opens_from_any_closed_or_ready_state_in_every_mode() {
        for mode in 1..=6 {
            assert_eq!(next(mode, C, RemoteDisconnect), D, "b in mode {mode}");
            assert_eq!(next(mode, R, RemoteDisconnect), D, "c in mode {mode}");
            assert_eq!(apply(mode, D, RemoteDisconnect), Ok(Outcome { state: D, event: None }));
        }
    }

    #[test]
    fn remote_reconnect_closes_directly_only_in_modes_2_and_4() {
        for mode in 1..=6 {
            let want = if mode == 2 || mode == 4 { C } else { R };
            assert_eq!(next(mode, D, RemoteReconnect), want, "mode {mode}");
            // Already where a reconnect leads, or further: nothing moves.
            assert_eq!(next(mode, C, RemoteReconnect), C);
            assert_eq!(next(mode, R, RemoteReconnect), R);
        }
    }

    #[test]
    fn the_button_completes_a_reconnection_and_disconnects_where_allowed() {
        for mode in 1..=6 {
            assert_eq!(next(mode, R, Button), C, "e in mode {mode}");
            assert_eq!(next(mode, D, Button), D, "a remote cut cannot be undone by hand");
            let manual = next(mode, C, Button);
            assert_eq!(manual, if [1, 2, 5].contains(&mode) { R } else { C }, "f in mode {mode}");
        }
    }

    #[test]
    fn full_cycles_per_mode() {
        for mode in 1..=6 {
            let mut s = C;
            s = next(mode, s, RemoteDisconnect);
            assert_eq!(s, D);
            s = next(mode, s, RemoteReconnect);
            if s == R {
                s = next(mode, s, Button);
            }
            assert_eq!(s, C, "mode {mode} gets back to connected");
        }
    }

    #[test]
    fn direct_triggers_switch_both_ways_in_switchable_modes() {
        for mode in 1..=6 {
            assert_eq!(next(mode, C, DirectDisconnect), D);
            assert_eq!(next(mode, D, DirectConnect), C);
            assert_eq!(next(mode, R, DirectConnect), C);
        }
    }

    #[test]
    fn events_are_logged_only_on_moves() {
        assert_eq!(apply(1, D, RemoteReconnect).map(|o| o.event), Ok(Some(event::READY_FOR_MANUAL_RECONNECTION)));
        assert_eq!(apply(2, D, RemoteReconnect).map(|o| o.event), Ok(Some(event::REMOTE_CONNECTION)));
        assert_eq!(apply(3, R, Button).map(|o| o.event), Ok(Some(event::MANUAL_CONNECTION)));
        assert_eq!(apply(3, C, Button).map(|o| o.event), Ok(None));
    }
}
