//! Associations: AARQ/AARE (none, LLS, HLS-GMAC suite 0 with its passes 3 and 4), and
//! the invocation counter resynchronised from the meter's counter object when it refuses ours.

use dlms_cosem_rs::acse::AuthMechanism;
use dlms_cosem_rs::client::{AssociationStep, ClientConfig, ClientSession};
use dlms_cosem_rs::security::{KeyRing, RustCryptoProvider, Secret, SecurityPolicy, SecuritySuite, SystemTitle};
use dlms_cosem_rs::xdlms::ServiceError;

use super::counter::Reservation;
use super::{cosem, DlmsMeter, OsRandom, Session, PUBLIC_CLIENT};
use crate::config::AuthKind;
use crate::link::Port;
use crate::meter::MeterError;

impl DlmsMeter {
    fn new_session(&mut self) -> Result<Session, MeterError> {
        let s = &self.settings;
        let keys = s.keys.clone().unwrap_or_default();
        let mut config = ClientConfig { client_sap: s.client_sap, max_pdu_size: s.max_pdu_size, ..Default::default() };
        let mut ring = KeyRing::default();
        match s.auth {
            AuthKind::None => {}
            AuthKind::Lls => {
                let pw = keys
                    .password
                    .as_deref()
                    .ok_or_else(|| MeterError::Storage("LLS needs a password in the key file".into()))?;
                config.mechanism = AuthMechanism::Low;
                config.password =
                    Some(Secret::new(pw).map_err(|_| MeterError::Storage("LLS password longer than 64 bytes".into()))?);
            }
            AuthKind::HlsGmac => {
                let (Some(guek), Some(gak), Some(title)) = (keys.guek, keys.gak, keys.client_system_title) else {
                    return Err(MeterError::Storage(
                        "HLS-GMAC needs guek, gak and client_system_title in the key file".into(),
                    ));
                };
                config.mechanism = AuthMechanism::HighGmac;
                config.system_title = Some(SystemTitle::new(title));
                config.security = SecurityPolicy::authenticated_encrypted(SecuritySuite::Suite0);
                ring = KeyRing::new(guek, gak);
                if self.counter_lock.is_none() {
                    self.counter_lock = Some(self.counters.lock(&s.meter)?);
                }
                let start = self.counters.load(&s.meter)?;
                config.invocation_counter = start;
                self.reservation = Reservation { reserved: start };
            }
        }
        Ok(ClientSession::new(config, RustCryptoProvider::with_rng(ring, OsRandom)))
    }

    /// Open an association (and the HDLC link under it when needed). On an
    /// invocation-counter error, resynchronise from the meter's counter object and try once more.
    pub(super) async fn associate(&mut self, port: &mut Port) -> Result<(), MeterError> {
        match self.associate_once(port).await {
            Err(AssociateError::CounterStale) if self.settings.auth == AuthKind::HlsGmac => {
                let expected = Box::pin(self.read_counter_publicly(port)).await?;
                let current = self.counters.load(&self.settings.meter)?;
                // Only ever forward: backwards would reuse nonces under the same key. Meters
                // differ in whether the object holds the last value received or the next
                // one expected; resuming after `expected` is right for both (at worst one
                // value is skipped).
                let resume = current.max(expected);
                self.counters.reserve(&self.settings.meter, resume)?;
                tracing::warn!(meter = %self.settings.meter, "invocation counter resynchronised from the meter");
                self.associate_once(port).await.map_err(AssociateError::into_meter_error)
            }
            other => other.map_err(AssociateError::into_meter_error),
        }
    }

    async fn associate_once(&mut self, port: &mut Port) -> Result<(), AssociateError> {
        self.session = None;
        let mut session = self.new_session()?;
        let mut req = vec![0u8; 1024];
        if self.settings.auth == AuthKind::HlsGmac {
            self.reservation.ensure(&self.counters, &self.settings.meter, session.invocation_counter(), 3)?;
        }
        let n = session.associate_request(&mut req).map_err(|e| MeterError::Protocol(format!("AARQ: {e}")))?;
        let answer = self.exchange(port, req.get(..n).unwrap_or(&[])).await?;
        let step = session.handle_associate_response(&answer).map_err(|e| {
            MeterError::AssociationRefused(format!("AARE not accepted ({e}): wrong keys, or not a DLMS answer"))
        })?;
        match step {
            AssociationStep::Established => {}
            AssociationStep::HlsReplyRequired => {
                let n =
                    session.hls_reply_request(&mut req).map_err(|e| MeterError::Protocol(format!("HLS reply: {e}")))?;
                let answer = self.exchange(port, req.get(..n).unwrap_or(&[])).await?;
                match session.handle_hls_reply_response(&answer) {
                    Ok(AssociationStep::Established) => {}
                    Ok(other) => {
                        return Err(
                            MeterError::AssociationRefused(format!("HLS authentication failed: {other:?}")).into()
                        )
                    }
                    Err(e) => {
                        return Err(MeterError::AssociationRefused(format!(
                            "HLS authentication failed ({e}): the meter does not hold our keys, or we do not hold its"
                        ))
                        .into())
                    }
                }
            }
            AssociationStep::Rejected { result, diagnostic } => {
                return Err(MeterError::AssociationRefused(format!("{result:?}, {diagnostic:?}")).into())
            }
            AssociationStep::Exception(e) if e.service_error == ServiceError::InvocationCounterError => {
                return Err(AssociateError::CounterStale)
            }
            AssociationStep::Exception(e) => {
                return Err(MeterError::AssociationRefused(format!(
                    "exception {:?}/{:?}",
                    e.state_error, e.service_error
                ))
                .into())
            }
        }
        self.session = Some(Box::new(session));
        self.session_port = Some(port.id());
        Ok(())
    }

    /// Read the invocation counter object over the public client.
    async fn read_counter_publicly(&mut self, port: &mut Port) -> Result<u32, MeterError> {
        let mut settings = self.settings.clone();
        settings.client_sap = PUBLIC_CLIENT;
        settings.auth = AuthKind::None;
        settings.keys = None;
        // A meter holds one HDLC connection: leave ours before the public client opens its own.
        self.close(port).await;
        let mut public = DlmsMeter::new(settings, self.counters.clone());
        let result = public.get(port, 1, cosem::INVOCATION_COUNTER, 2, None).await;
        public.close(port).await;
        let value = cosem::decode(&result?)?
            .as_u64()
            .ok_or_else(|| MeterError::Protocol("invocation counter object is not a number".into()))?;
        u32::try_from(value).map_err(|_| MeterError::Protocol("invocation counter out of range".into()))
    }
}

enum AssociateError {
    CounterStale,
    Meter(MeterError),
}

impl From<MeterError> for AssociateError {
    fn from(e: MeterError) -> Self {
        Self::Meter(e)
    }
}

impl AssociateError {
    fn into_meter_error(self) -> MeterError {
        match self {
            Self::CounterStale => MeterError::AssociationRefused("invocation counter rejected by the meter".into()),
            Self::Meter(e) => e,
        }
    }
}
