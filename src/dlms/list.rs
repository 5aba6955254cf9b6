//! GET-with-list (IEC 62056-5-3, conformance bit `multiple-references`): the clock and a
//! profile sub-range in one request instead of two, for a collection job's first step.
//! A meter that did not agree to multiple references, or refuses the list, is read with
//! separate GETs from then on: nothing here depends on a feature only some meters have.

use dlms_cosem_rs::codec::Decode;
use dlms_cosem_rs::xdlms::{Conformance, GetDataResult, List};

use super::{cosem, profile_of, Call, DlmsMeter, ProfileMeta};
use crate::link::Port;
use crate::meter::{LoadProfile, MeterClock, MeterError};
use dlms_cosem_rs::obis::Obis;

impl DlmsMeter {
    /// The meter's clock and its profile rows in `[from, to]`: in one GET-with-list when
    /// the profile's description is known and the association agreed to multiple
    /// references, otherwise in separate requests. A clock that could not be read is
    /// returned beside the rows (collection goes on without it); a link failure is an error.
    pub async fn read_clock_and_profile(
        &mut self,
        port: &mut Port,
        obis: Obis,
        from: i64,
        to: i64,
    ) -> Result<(Result<MeterClock, MeterError>, LoadProfile), MeterError> {
        let meta = self.profiles.iter().find(|(o, _)| *o == obis).map(|(_, m)| std::sync::Arc::clone(m));
        if let (Some(meta), false) = (meta, self.list_refused) {
            if let Some(both) = self.clock_and_rows(port, obis, &meta, from, to).await? {
                return Ok(both);
            }
        }
        let clock = match self.read_clock(port).await {
            Err(e) if e.is_link_failure() => return Err(e),
            c => c,
        };
        Ok((clock, self.read_profile(port, obis, from, to).await?))
    }

    /// One GET-with-list; `None` when the meter will not do it (then never asked again).
    async fn clock_and_rows(
        &mut self,
        port: &mut Port,
        obis: Obis,
        meta: &ProfileMeta,
        from: i64,
        to: i64,
    ) -> Result<Option<(Result<MeterClock, MeterError>, LoadProfile)>, MeterError> {
        if self.session_port != Some(port.id()) {
            // Opened on a stream that is gone (see `call`).
            self.reset();
        }
        if !self.is_associated() {
            self.associate(port).await?;
        }
        if !self.agreed_to_lists() {
            self.list_refused = true;
            return Ok(None);
        }
        let items = vec![(8, cosem::CLOCK, 2, None), (7, obis, 2, Some(self.range_access(from, to)?))];
        let bytes = match self.call(port, Call::GetList { items }).await {
            Ok(super::Answer::Value(v)) => v,
            Ok(super::Answer::Done) => {
                return Err(MeterError::Protocol("GET-WITH-LIST answered without values".into()))
            }
            // A meter that agreed to lists and still refuses this one: separate GETs.
            Err(MeterError::Refused(why)) => {
                tracing::debug!(meter = %self.settings.meter, %why, "GET-with-list refused; separate requests from now on");
                self.list_refused = true;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let list = List::<GetDataResult<'_>>::from_bytes(&bytes)
            .map_err(|e| MeterError::Protocol(format!("GET-WITH-LIST answer: {e}")))?;
        let mut results = list.iter();
        let (Some(clock), Some(buffer), None) = (results.next(), results.next(), results.next()) else {
            return Err(MeterError::Protocol(format!("GET-WITH-LIST: {} results for 2 attributes", list.len())));
        };
        let bad = |e: dlms_cosem_rs::Error| MeterError::Protocol(format!("GET-WITH-LIST answer: {e}"));
        let clock = match clock.map_err(bad)? {
            GetDataResult::Data(d) => cosem::clock_of(&d, self.settings.utc_offset_minutes),
            GetDataResult::Error(e) => Err(MeterError::Refused(format!("GET 8/0.0.1.0.0.255/2: {e:?}"))),
        };
        let rows = match buffer.map_err(bad)? {
            GetDataResult::Data(d) => cosem::profile_rows(&d, &meta.kinds, self.settings.utc_offset_minutes)?,
            // Range access refused (the by-entry path) or a temporary failure: the
            // profile on its own, as without lists.
            GetDataResult::Error(_) => return Ok(Some((clock, self.read_profile(port, obis, from, to).await?))),
        };
        Ok(Some((clock, profile_of(obis, meta, rows, from, to))))
    }

    /// The open association agreed to multiple references (and GET, selective access).
    fn agreed_to_lists(&self) -> bool {
        let wanted = Conformance::GET | Conformance::MULTIPLE_REFERENCES | Conformance::SELECTIVE_ACCESS;
        self.session.as_deref().and_then(|s| s.negotiated()).is_some_and(|n| n.negotiated_conformance.contains(wanted))
    }
}
