//! The DLMS/COSEM meter driver on `dlms-cosem-rs` (sans-IO engine, pinned): associations
//! (none, LLS, HLS-GMAC suite 0), GET with datablocks and selective access, ACTION on
//! the disconnect control, over the wrapper or HDLC.

mod associate;
pub mod cosem;
pub mod counter;
pub mod hdlc;
mod list;
pub mod wrapper;

use dlms_cosem_rs::axdr::Data;
use dlms_cosem_rs::client::{ClientSession, Response, SessionState};
use dlms_cosem_rs::codec::Encode;
use dlms_cosem_rs::cosem::{EntryDescriptor, RangeDescriptor};
use dlms_cosem_rs::obis::Obis;
use dlms_cosem_rs::security::{RandomSource, RustCryptoProvider};
use dlms_cosem_rs::xdlms::{
    AttributeDescriptor, AttributeDescriptorWithSelection, DataAccessResult, MethodDescriptor, SelectiveAccess,
    ServiceError,
};

use crate::config::{AuthKind, HdlcOptions};
use crate::link::Port;
use crate::meter::{
    Identity, LoadProfile, MeterClock, MeterError, MeterId, ProfileColumn, Reading, RelayState, RelayStatus,
};
use crate::secrets::MeterKeys;
use cosem::ColumnKind;
use counter::{CounterStore, Reservation};
use hdlc::HdlcLink;
use wrapper::WrapperLink;

/// The largest value collected from datablocks (a long load profile).
const MAX_VALUE: usize = 4 * 1024 * 1024;
/// The public client SAP, used to read the invocation counter object.
const PUBLIC_CLIENT: u8 = 0x10;

/// Everything needed to talk DLMS to one meter.
#[derive(Debug, Clone)]
pub struct DlmsSettings {
    /// The registry id (names the counter file).
    pub meter: MeterId,
    /// Our SAP.
    pub client_sap: u8,
    /// Wrapper wPort / HDLC upper address.
    pub logical_device: u16,
    /// HDLC lower address; `None` means the wrapper.
    pub physical_address: Option<u16>,
    /// Authentication.
    pub auth: AuthKind,
    /// Secrets, when `auth` needs them.
    pub keys: Option<MeterKeys>,
    /// Time allowed for one answer.
    pub timeout_ms: u64,
    /// HDLC parameters.
    pub hdlc: HdlcOptions,
    /// Applied to meter clocks without a deviation.
    pub utc_offset_minutes: Option<i16>,
    /// Largest APDU we accept.
    pub max_pdu_size: u16,
}

enum Transport {
    Wrapper(WrapperLink),
    Hdlc(Box<HdlcLink>),
}

/// Randomness for HLS challenges, from the operating system.
#[derive(Debug, Clone, Copy)]
pub struct OsRandom;

impl RandomSource for OsRandom {
    fn fill(&self, out: &mut [u8]) -> dlms_cosem_rs::Result<()> {
        use rand::RngCore;
        rand::rngs::OsRng
            .try_fill_bytes(out)
            .map_err(|_| dlms_cosem_rs::Error::new(dlms_cosem_rs::ErrorKind::Unsupported, 0))
    }
}

type Session = ClientSession<RustCryptoProvider<OsRandom>>;

/// Cached description of a profile (capture objects do not change between reads). Shared
/// (`Arc`) so that a read does not copy it, and kept small: a head-end holds one per meter.
#[derive(Debug)]
struct ProfileMeta {
    kinds: Box<[ColumnKind]>,
    capture_period_s: u32,
}

impl ProfileMeta {
    /// The value columns (the clock and status columns are not values).
    fn columns(&self) -> Vec<ProfileColumn> {
        self.kinds
            .iter()
            .filter_map(|k| match k {
                ColumnKind::Value { column, .. } => Some(column.clone()),
                _ => None,
            })
            .collect()
    }
}

/// A DLMS/COSEM meter.
pub struct DlmsMeter {
    settings: DlmsSettings,
    transport: Transport,
    session: Option<Box<Session>>,
    /// The port the session was opened on ([`Port::id`]).
    session_port: Option<u64>,
    /// Held while a ciphered session may spend counter values.
    counter_lock: Option<counter::CounterLock>,
    counters: CounterStore,
    reservation: Reservation,
    scalers: Vec<(Obis, i8, String)>,
    profiles: Vec<(Obis, std::sync::Arc<ProfileMeta>)>,
    /// The meter did not agree to, or refused, GET-with-list: separate GETs from now on.
    list_refused: bool,
}

impl std::fmt::Debug for DlmsMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DlmsMeter").field("meter", &self.settings.meter).finish_non_exhaustive()
    }
}

/// An ACTION's outcome or a value's encoding.
enum Answer {
    Value(Vec<u8>),
    Done,
}

impl DlmsMeter {
    /// A driver; nothing is sent until the first request.
    pub fn new(settings: DlmsSettings, counters: CounterStore) -> Self {
        let transport = match settings.physical_address {
            Some(physical) => Transport::Hdlc(Box::new(
                HdlcLink::new(
                    settings.client_sap,
                    settings.logical_device,
                    physical,
                    settings.hdlc,
                    settings.timeout_ms,
                )
                .with_max_pdu(settings.max_pdu_size),
            )),
            None => Transport::Wrapper(WrapperLink::new(
                u16::from(settings.client_sap),
                settings.logical_device,
                settings.timeout_ms,
            )),
        };
        Self {
            settings,
            transport,
            session: None,
            session_port: None,
            counter_lock: None,
            counters,
            reservation: Reservation::default(),
            scalers: Vec::new(),
            profiles: Vec::new(),
            list_refused: false,
        }
    }

    /// The meter's id.
    pub fn id(&self) -> &MeterId {
        &self.settings.meter
    }

    /// True while an association is open.
    pub fn is_associated(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.state() == SessionState::Associated)
    }

    /// The logical device name (and serial number where the meter has one).
    pub async fn read_identity(&mut self, port: &mut Port) -> Result<Identity, MeterError> {
        let name = self.read_name(port).await?;
        let serial = match self.get(port, 1, cosem::SERIAL_NUMBER, 2, None).await {
            Ok(bytes) => cosem::text_of(&cosem::decode(&bytes)?),
            Err(MeterError::Refused(_)) => None,
            Err(e) => return Err(e),
        };
        Ok(Identity { name, serial })
    }

    async fn read_name(&mut self, port: &mut Port) -> Result<String, MeterError> {
        let bytes = self.get(port, 1, cosem::LOGICAL_DEVICE_NAME, 2, None).await?;
        cosem::text_of(&cosem::decode(&bytes)?)
            .ok_or_else(|| MeterError::Protocol("logical device name is not a string".into()))
    }

    /// Check that the meter is the one registered, before switching it.
    pub async fn verify_identity(&mut self, port: &mut Port, expected: &str) -> Result<(), MeterError> {
        let actual = self.read_name(port).await?;
        if actual == expected {
            Ok(())
        } else {
            Err(MeterError::IdentityMismatch { expected: expected.to_owned(), actual })
        }
    }

    /// Output state, control state and control mode of the disconnect control.
    pub async fn read_relay(&mut self, port: &mut Port) -> Result<RelayStatus, MeterError> {
        let output = cosem::decode(&self.get(port, 70, cosem::DISCONNECT_CONTROL, 2, None).await?)?.as_bool();
        let control = match cosem::decode(&self.get(port, 70, cosem::DISCONNECT_CONTROL, 3, None).await?)? {
            Data::Enum(v) => Some(v),
            _ => None,
        };
        let mode = match cosem::decode(&self.get(port, 70, cosem::DISCONNECT_CONTROL, 4, None).await?)? {
            Data::Enum(v) => Some(crate::meter::ControlMode(v)),
            _ => None,
        };
        Ok(RelayStatus { state: cosem::relay_state(output, control), output_state: output, control_mode: mode })
    }

    /// Invoke remote_disconnect (method 1) or remote_reconnect (method 2). The ACTION's
    /// success is not proof: callers read the relay back ([`crate::driver`] does).
    pub async fn switch(&mut self, port: &mut Port, to: RelayState) -> Result<(), MeterError> {
        let method = if to == RelayState::Disconnected { 1 } else { 2 };
        self.call(port, Call::Action { class: 70, obis: cosem::DISCONNECT_CONTROL, method }).await.map(|_| ())
    }

    /// Energy import and export, scaled.
    pub async fn read_registers(&mut self, port: &mut Port) -> Result<Vec<Reading>, MeterError> {
        let mut out = Vec::new();
        for obis in [cosem::ENERGY_IMPORT, cosem::ENERGY_EXPORT] {
            let (scaler, unit) = self.scaler_unit(port, 3, obis).await?;
            let bytes = self.get(port, 3, obis, 2, None).await?;
            let value = cosem::scaled(&cosem::decode(&bytes)?, scaler)
                .ok_or_else(|| MeterError::Protocol(format!("{} is not a number", cosem::obis_text(obis))))?;
            out.push(Reading { obis: cosem::obis_text(obis), value, unit });
        }
        Ok(out)
    }

    /// The meter's clock.
    pub async fn read_clock(&mut self, port: &mut Port) -> Result<MeterClock, MeterError> {
        let bytes = self.get(port, 8, cosem::CLOCK, 2, None).await?;
        cosem::clock_of(&cosem::decode(&bytes)?, self.settings.utc_offset_minutes)
    }

    /// Set the meter's clock (class 8, attribute 2) to `unix` seconds, written in the
    /// meter's configured offset. Needs a client the meter lets write (management).
    pub async fn set_clock(&mut self, port: &mut Port, unix: i64) -> Result<(), MeterError> {
        let offset = self.settings.utc_offset_minutes.unwrap_or(0);
        let value = cosem::datetime_at(unix, offset).to_bytes().to_vec();
        self.call(port, Call::Set { class: 8, obis: cosem::CLOCK, attr: 2, value }).await.map(|_| ())
    }

    /// The load profile rows captured in `[from, to]` (Unix seconds), by range; when the
    /// meter refuses selective access by range, by entry from the newest backwards.
    pub async fn read_profile(
        &mut self,
        port: &mut Port,
        obis: Obis,
        from: i64,
        to: i64,
    ) -> Result<LoadProfile, MeterError> {
        let meta = self.profile_meta(port, obis).await?;
        let encoded = self.range_access(from, to)?;
        let rows = match self.get(port, 7, obis, 2, Some(encoded)).await {
            Ok(bytes) => cosem::profile_rows(&cosem::decode(&bytes)?, &meta.kinds, self.settings.utc_offset_minutes)?,
            Err(MeterError::Refused(why)) => {
                tracing::info!(meter = %self.settings.meter, %why, "range access refused; reading by entry");
                self.profile_by_entry(port, obis, &meta, from, to).await?
            }
            Err(e) => return Err(e),
        };
        Ok(profile_of(obis, &meta, rows, from, to))
    }

    /// Selective access by range on the clock column, `[from, to]`, encoded.
    fn range_access(&self, from: i64, to: i64) -> Result<(u8, Vec<u8>), MeterError> {
        let offset = self.settings.utc_offset_minutes.unwrap_or(0);
        let mut params = [0u8; 128];
        let range = RangeDescriptor::by_clock(cosem::datetime_at(from, offset), cosem::datetime_at(to, offset))
            .to_selective_access(&mut params)
            .map_err(|e| MeterError::Protocol(format!("range descriptor: {e}")))?;
        encode_access(&range)
    }

    async fn profile_by_entry(
        &mut self,
        port: &mut Port,
        obis: Obis,
        meta: &ProfileMeta,
        from: i64,
        to: i64,
    ) -> Result<Vec<crate::meter::ProfileRow>, MeterError> {
        let entries = cosem::decode(&self.get(port, 7, obis, 7, None).await?)?
            .as_u64()
            .ok_or_else(|| MeterError::Protocol("entries_in_use is not a number".into()))?;
        let now = self.read_clock(port).await?.unix_seconds;
        // Entries are in capture order, newest last: count back from the meter's clock.
        let wanted = match (now, meta.capture_period_s) {
            (Some(now), p) if p > 0 => ((now - from).max(0) as u64 / u64::from(p)) + 2,
            _ => entries,
        };
        let first = entries.saturating_sub(wanted).saturating_add(1);
        // And stop near `to` rather than at the newest entry, so that a back-fill read in
        // pieces does not ask for everything up to now each time (one entry of margin for
        // a clock between two captures; rows outside the range are dropped by the caller).
        let last = match (now, meta.capture_period_s) {
            (Some(now), p) if p > 0 && now > to => {
                let newer = (now - to) as u64 / u64::from(p);
                entries.saturating_sub(newer.saturating_sub(1)).max(first)
            }
            _ => 0,
        };
        let mut params = [0u8; 64];
        let sa = EntryDescriptor::entries(u32::try_from(first).unwrap_or(1), u32::try_from(last).unwrap_or(0))
            .to_selective_access(&mut params)
            .map_err(|e| MeterError::Protocol(format!("entry descriptor: {e}")))?;
        let bytes = self.get(port, 7, obis, 2, Some(encode_access(&sa)?)).await?;
        cosem::profile_rows(&cosem::decode(&bytes)?, &meta.kinds, self.settings.utc_offset_minutes)
    }

    async fn profile_meta(&mut self, port: &mut Port, obis: Obis) -> Result<std::sync::Arc<ProfileMeta>, MeterError> {
        if let Some((_, m)) = self.profiles.iter().find(|(o, _)| *o == obis) {
            return Ok(std::sync::Arc::clone(m));
        }
        let captures = cosem::capture_objects_of(&cosem::decode(&self.get(port, 7, obis, 3, None).await?)?)?;
        let capture_period_s = cosem::decode(&self.get(port, 7, obis, 4, None).await?)?
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0);
        let mut kinds = Vec::new();
        for c in captures {
            let name = format!("{}/{}/{}", c.class_id, cosem::obis_text(c.logical_name), c.attribute_index);
            let kind = match (c.class_id, c.attribute_index) {
                (8, 2) => ColumnKind::Clock,
                (1, 2) if c.logical_name.c() == 96 && c.logical_name.d() == 10 => ColumnKind::Status,
                (3 | 4, 2) => {
                    let (scaler, unit) = self.scaler_unit(port, c.class_id, c.logical_name).await?;
                    ColumnKind::Value { scaler, column: ProfileColumn { name, unit: Some(unit) } }
                }
                _ => ColumnKind::Value { scaler: 0, column: ProfileColumn { name, unit: None } },
            };
            kinds.push(kind);
        }
        let meta = std::sync::Arc::new(ProfileMeta { kinds: kinds.into_boxed_slice(), capture_period_s });
        self.profiles.push((obis, std::sync::Arc::clone(&meta)));
        self.profiles.shrink_to_fit();
        Ok(meta)
    }

    async fn scaler_unit(&mut self, port: &mut Port, class: u16, obis: Obis) -> Result<(i8, String), MeterError> {
        if let Some((_, s, u)) = self.scalers.iter().find(|(o, _, _)| *o == obis) {
            return Ok((*s, u.clone()));
        }
        let (scaler, unit) = cosem::scaler_unit_of(&cosem::decode(&self.get(port, class, obis, 3, None).await?)?)?;
        let unit = cosem::unit_symbol(unit);
        self.scalers.push((obis, scaler, unit.clone()));
        self.scalers.shrink_to_fit();
        Ok((scaler, unit))
    }

    /// Release the association and close the link: RLRQ over the wrapper, DISC on HDLC.
    pub async fn close(&mut self, port: &mut Port) {
        // Releasing the HDLC connection releases the association it carries (IEC
        // 62056-5-3: an AA ends with its supporting layer), so on HDLC the DISC alone does
        // it: one exchange fewer per collection job. Over the wrapper the TCP connection
        // stays up for the other logical devices behind it: RLRQ.
        let on_hdlc = matches!(&self.transport, Transport::Hdlc(h) if h.is_connected());
        if let Some(mut session) = self.session.take() {
            if !on_hdlc && session.state() == SessionState::Associated {
                let mut req = vec![0u8; 256];
                if let Ok(n) = session.release_request(&mut req) {
                    let _ = self.exchange(port, req.get(..n).unwrap_or(&[])).await;
                }
            }
        }
        if let Transport::Hdlc(h) = &mut self.transport {
            h.disconnect(port).await;
        }
        // No session spends counter values any more: another user may take the counter.
        self.counter_lock = None;
    }

    /// Forget the association and link state (after the port was reopened).
    pub fn reset(&mut self) {
        self.session = None;
        if let Transport::Hdlc(h) = &mut self.transport {
            h.reset();
        }
    }

    /// GET one attribute, returning its encoded value.
    pub async fn get(
        &mut self,
        port: &mut Port,
        class: u16,
        obis: Obis,
        attr: i8,
        access: Option<(u8, Vec<u8>)>,
    ) -> Result<Vec<u8>, MeterError> {
        match self.call(port, Call::Get { class, obis, attr, access }).await? {
            Answer::Value(v) => Ok(v),
            Answer::Done => Err(MeterError::Protocol("GET answered without a value".into())),
        }
    }

    /// Run a call on an open association; when an association that was reused turns out
    /// to be gone (the meter closed it after an idle time), associate again once.
    async fn call(&mut self, port: &mut Port, call: Call) -> Result<Answer, MeterError> {
        if self.session_port != Some(port.id()) {
            // The link was reopened (by another meter's driver on the same port, or by
            // the channel): whatever this driver had open is gone with the old stream.
            self.reset();
        }
        let reused = self.is_associated();
        if !reused {
            self.associate(port).await?;
        }
        match self.call_once(port, &call).await {
            Err(MeterError::LinkClosed(why)) if reused => {
                tracing::debug!(meter = %self.settings.meter, %why, "association gone; associating again");
                self.reset();
                if port.is_closed() {
                    port.reopen().await?;
                }
                self.associate(port).await?;
                self.call_once(port, &call).await
            }
            other => other,
        }
    }

    async fn call_once(&mut self, port: &mut Port, call: &Call) -> Result<Answer, MeterError> {
        // In the future's state, not on the heap: this runs for every request.
        let mut req = [0u8; 2048];
        let n = {
            let session = self.session.as_deref_mut().ok_or_else(|| MeterError::Protocol("not associated".into()))?;
            match call {
                Call::Get { class, obis, attr, access } => {
                    let sa = match access {
                        Some((selector, params)) => Some(SelectiveAccess {
                            selector: *selector,
                            parameters: Data::from_bytes_in(params)
                                .map_err(|e| MeterError::Protocol(format!("selector: {e}")))?,
                        }),
                        None => None,
                    };
                    session.get_request(AttributeDescriptor::new(*class, *obis, *attr), sa, &mut req)
                }
                Call::GetList { items } => {
                    let mut list = Vec::with_capacity(items.len());
                    for (class, obis, attr, access) in items {
                        let access = match access {
                            Some((selector, params)) => Some(SelectiveAccess {
                                selector: *selector,
                                parameters: Data::from_bytes_in(params)
                                    .map_err(|e| MeterError::Protocol(format!("selector: {e}")))?,
                            }),
                            None => None,
                        };
                        list.push(AttributeDescriptorWithSelection {
                            descriptor: AttributeDescriptor::new(*class, *obis, *attr),
                            access,
                        });
                    }
                    session.get_request_with_list(&list, &mut req)
                }
                Call::Set { class, obis, attr, value } => session.set_request(
                    AttributeDescriptor::new(*class, *obis, *attr),
                    None,
                    Data::OctetString(value),
                    &mut req,
                ),
                Call::Action { class, obis, method } => session.action_request(
                    MethodDescriptor::new(*class, *obis, *method),
                    Some(Data::Integer(0)),
                    &mut req,
                ),
            }
            .map_err(|e| MeterError::Protocol(format!("building the request: {e}")))?
        };
        // Formatted only when an error message needs it: this runs for every request.
        let what = Describe(call);
        let mut answer = self.exchange(port, req.get(..n).unwrap_or(&[])).await?;
        let mut collected: Vec<u8> = Vec::new();
        let mut expected_block = 1u32;
        loop {
            let session = self.session.as_deref_mut().ok_or_else(|| MeterError::Protocol("not associated".into()))?;
            let mut plain = vec![0u8; answer.len() + 64];
            let response = session.handle_response(&answer, &mut plain).map_err(|e| {
                MeterError::Protocol(format!(
                    "{what}: undecodable or unexpected answer ({e}); an answer to another request?"
                ))
            })?;
            match response {
                Response::Data(value) => {
                    let mut out = Vec::with_capacity(answer.len());
                    value.encode(&mut out).map_err(|e| MeterError::Protocol(format!("{what}: {e}")))?;
                    return Ok(Answer::Value(out));
                }
                // Encoded as a datablock transfer of the same answer would carry it.
                Response::DataList(list) => {
                    let mut out = Vec::with_capacity(answer.len());
                    list.encode(&mut out).map_err(|e| MeterError::Protocol(format!("{what}: {e}")))?;
                    return Ok(Answer::Value(out));
                }
                // "Try again later" is not a refusal: retried like a timeout.
                Response::DataError(e @ DataAccessResult::TemporaryFailure) => {
                    return Err(MeterError::Unreachable(format!("{what}: {e:?}")))
                }
                Response::DataError(e) => return Err(MeterError::Refused(format!("{what}: {e:?}"))),
                Response::Ok => return Ok(Answer::Done),
                Response::ActionResult { result, .. } if result.is_success() => return Ok(Answer::Done),
                Response::ActionResult { result, .. } => {
                    return Err(MeterError::Refused(format!("{what}: {result:?}")))
                }
                Response::Block { last, number, data } => {
                    if number != expected_block {
                        return Err(MeterError::Protocol(format!(
                            "{what}: block {number} where {expected_block} was due"
                        )));
                    }
                    if collected.len() + data.len() > MAX_VALUE {
                        return Err(MeterError::Protocol(format!("{what}: value larger than {MAX_VALUE} bytes")));
                    }
                    collected.extend_from_slice(data);
                    if last {
                        return Ok(Answer::Value(collected));
                    }
                    expected_block += 1;
                    let n = session
                        .get_next_block_request(number, &mut req)
                        .map_err(|e| MeterError::Protocol(format!("{what}: {e}")))?;
                    answer = self.exchange(port, req.get(..n).unwrap_or(&[])).await?;
                }
                Response::Exception(e) => {
                    // An exception to a request on an open association most often means
                    // the meter has dropped the association (idle timeout).
                    if matches!(e.service_error, ServiceError::OperationNotPossible) {
                        self.session = None;
                        return Err(MeterError::LinkClosed(format!(
                            "{what}: the meter no longer holds the association"
                        )));
                    }
                    return Err(MeterError::Refused(format!(
                        "{what}: exception {:?}/{:?}",
                        e.state_error, e.service_error
                    )));
                }
                other => return Err(MeterError::Protocol(format!("{what}: unexpected answer {other:?}"))),
            }
        }
    }

    /// Send one APDU over the transport and return the answer APDU. A transport failure
    /// leaves the association in an unknown state, so it is dropped.
    async fn exchange(&mut self, port: &mut Port, apdu: &[u8]) -> Result<Vec<u8>, MeterError> {
        if let Some(session) = self.session.as_ref().filter(|_| self.settings.auth == AuthKind::HlsGmac) {
            // Every ciphered APDU spends a counter value: reserve before sending. Only
            // ciphered sessions touch the store: a public or LLS session of the same
            // meter must never write over the ciphered one's reservation.
            self.reservation.ensure(&self.counters, &self.settings.meter, session.invocation_counter(), 2)?;
        }
        let result = match &mut self.transport {
            Transport::Wrapper(w) => w.exchange(port, apdu).await,
            Transport::Hdlc(h) => h.exchange(port, apdu).await,
        };
        if result.is_err() {
            self.session = None;
            if let Transport::Hdlc(h) = &mut self.transport {
                h.reset();
            }
        }
        result
    }
}

/// An attribute and its selective access (selector, encoded parameters).
type Wanted = (u16, Obis, i8, Option<(u8, Vec<u8>)>);

enum Call {
    Get { class: u16, obis: Obis, attr: i8, access: Option<(u8, Vec<u8>)> },
    GetList { items: Vec<Wanted> },
    Set { class: u16, obis: Obis, attr: i8, value: Vec<u8> },
    Action { class: u16, obis: Obis, method: i8 },
}

/// A [`Call`] as text, formatted on demand.
struct Describe<'a>(&'a Call);

impl std::fmt::Display for Describe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.describe())
    }
}

impl Call {
    fn describe(&self) -> String {
        match self {
            Call::Get { class, obis, attr, .. } => format!("GET {class}/{}/{attr}", cosem::obis_text(*obis)),
            Call::GetList { items } => {
                let names: Vec<String> =
                    items.iter().map(|(c, o, a, _)| format!("{c}/{}/{a}", cosem::obis_text(*o))).collect();
                format!("GET-WITH-LIST {}", names.join(", "))
            }
            Call::Set { class, obis, attr, .. } => format!("SET {class}/{}/{attr}", cosem::obis_text(*obis)),
            Call::Action { class, obis, method } => format!("ACTION {class}/{}/{method}", cosem::obis_text(*obis)),
        }
    }
}

/// The rows in `[from, to]` as a [`LoadProfile`] (a meter may answer a range with a row
/// on each side of it).
fn profile_of(obis: Obis, meta: &ProfileMeta, rows: Vec<crate::meter::ProfileRow>, from: i64, to: i64) -> LoadProfile {
    let rows = rows.into_iter().filter(|r| r.unix_seconds.is_none_or(|t| t >= from && t <= to)).collect();
    LoadProfile { obis: cosem::obis_text(obis), capture_period_s: meta.capture_period_s, columns: meta.columns(), rows }
}

fn encode_access(sa: &SelectiveAccess<'_>) -> Result<(u8, Vec<u8>), MeterError> {
    let mut params = Vec::new();
    sa.parameters.encode(&mut params).map_err(|e| MeterError::Protocol(format!("selector: {e}")))?;
    Ok((sa.selector, params))
}
