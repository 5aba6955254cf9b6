//! One DLMS association: a dlms-cosem-rs `Server` bound to one meter and one client SAP.
//!
//! Links (wrapper, HDLC) create one per (connection, meter, client SAP) when the client
//! first speaks, and drop it when the connection or the HDLC link goes away. What must
//! outlive an association (the invocation counters) lives in the meter.

use std::sync::Arc;

use dlms_cosem_rs::acse::{
    Aare, Aarq, ApplicationContext, AssociationResult, AuthMechanism, Diagnostic, UserDiagnostic,
};
use dlms_cosem_rs::codec::{Decode, Encode};
use dlms_cosem_rs::security::{
    KeyRing, RandomSource, RustCryptoProvider, Secret, SecurityPolicy, SecuritySuite, SystemTitle,
};
use dlms_cosem_rs::server::{Server, ServerConfig, ServerState};
use dlms_cosem_rs::xdlms::Conformance;
use rand::RngCore;

use crate::config::SimAuth;
use crate::cosem::{Client, MeterStore, DLMS_N};
use crate::meter::{Activity, Fleet};

/// The public client's SAP.
pub const PUBLIC_SAP: u16 = 0x10;
/// The management client's SAP.
pub const MANAGEMENT_SAP: u16 = 0x01;
/// The largest APDU the simulated meters accept, and propose.
pub const MAX_PDU: u16 = 1024;

/// Challenges come from the OS: HLS with a predictable challenge would let a recorded
/// reply authenticate, and the simulator should not teach a head-end bad habits.
#[derive(Debug, Clone, Copy)]
pub struct OsRandom;

impl RandomSource for OsRandom {
    fn fill(&self, out: &mut [u8]) -> dlms_cosem_rs::codec::Result<()> {
        rand::rngs::OsRng
            .try_fill_bytes(out)
            .map_err(|_| dlms_cosem_rs::codec::Error::new(dlms_cosem_rs::codec::ErrorKind::Unsupported, 0))
    }
}

type DlmsServer = Server<MeterStore, RustCryptoProvider<OsRandom>, DLMS_N>;

/// One open association.
pub struct Association {
    fleet: Arc<Fleet>,
    meter: usize,
    client: Client,
    server: Box<DlmsServer>,
    out: Box<[u8]>,
}

impl Association {
    /// An association of `sap` with meter `meter`, or `None` for a SAP the meter does not
    /// serve (links then stay silent, or answer DM on HDLC).
    pub(crate) fn new(fleet: &Arc<Fleet>, meter: usize, sap: u16) -> Option<Self> {
        let client = match sap {
            PUBLIC_SAP => Client::Public,
            MANAGEMENT_SAP => Client::Management,
            _ => return None,
        };
        let m = fleet.meters.get(meter)?;
        let mut config = ServerConfig {
            system_title: Some(SystemTitle::new(m.system_title)),
            max_pdu_size: MAX_PDU,
            ..ServerConfig::default()
        };
        if m.faults().no_multiple_references {
            config.conformance = config.conformance.difference(Conformance::MULTIPLE_REFERENCES);
        }
        let mut keys = KeyRing::default();
        let (server_ic, peer) = {
            let st = m.lock();
            (st.server_ic, st.mgmt_peer)
        };
        if client == Client::Management {
            match &m.spec.auth {
                SimAuth::None => {}
                SimAuth::Lls { password } => {
                    config.mechanism = AuthMechanism::Low;
                    config.password = Secret::new(password.as_bytes()).ok();
                }
                SimAuth::HlsGmac { guek, gak } => {
                    config.mechanism = AuthMechanism::HighGmac;
                    config.security = SecurityPolicy::authenticated_encrypted(SecuritySuite::Suite0);
                    // Never reuse a nonce: carry on from the last counter this process used.
                    config.invocation_counter = server_ic;
                    keys = KeyRing::new(*guek, *gak);
                }
            }
        }
        let store = MeterStore::new(Arc::clone(fleet), meter, client);
        let mut server = Box::new(Server::new(config, store, RustCryptoProvider::with_rng(keys, OsRandom)));
        if let (Client::Management, Some((title, highest))) = (client, peer) {
            // The head-end's counter must keep rising across associations, as on a real
            // meter; 0.0.43.1.0.255 tells it where to resume.
            server.resume_replay_window(SystemTitle::new(title), highest);
        }
        Some(Self { fleet: Arc::clone(fleet), meter, client, server, out: vec![0; DLMS_N + 512].into_boxed_slice() })
    }

    /// Handle one APDU. `None` means say nothing: a malformed APDU, or nothing to answer.
    pub fn handle(&mut self, apdu: &[u8]) -> Option<Vec<u8>> {
        let meter = self.fleet.meters.get(self.meter)?;
        if apdu.first() == Some(&0x60) && meter.faults().refuse_association {
            self.server.reset();
            return self.refuse(apdu);
        }
        let result = self.server.handle(apdu, &mut self.out);
        if self.client == Client::Management {
            let mut st = meter.lock();
            st.server_ic = st.server_ic.max(self.server.invocation_counter());
            if let (Some(owner), Some(highest)) = (self.server.replay_owner(), self.server.peer_invocation_counter()) {
                st.mgmt_peer = Some((owner.0, highest));
            }
        }
        match result {
            Ok(0) => None,
            Ok(n) => {
                let mut answer = self.out.get(..n).map(<[u8]>::to_vec)?;
                if self.server.state() == ServerState::AwaitingHlsReply {
                    // dlms-cosem-rs 0.1.0 accepts an HLS AARQ with diagnostic null; the
                    // standard says authentication-required (14), which is what tells a
                    // client to send pass 3. Gurux, for one, skips it otherwise.
                    mark_authentication_required(&mut answer);
                }
                Some(answer)
            }
            Err(e) => {
                tracing::debug!(meter = %meter.spec.id, error = ?e, "unanswerable APDU");
                None
            }
        }
    }

    /// The `refuse_association` fault: an AARE rejected-permanent, no reason given.
    fn refuse(&self, apdu: &[u8]) -> Option<Vec<u8>> {
        let meter = self.fleet.meters.get(self.meter)?;
        let aarq = Aarq::from_bytes(apdu).ok()?;
        let context = aarq.application_context.unwrap_or(ApplicationContext::LogicalName);
        let aare = Aare {
            application_context: Some(context),
            result: AssociationResult::RejectedPermanent,
            diagnostic: Diagnostic::User(UserDiagnostic::NoReasonGiven),
            responding_ap_title: Some(&meter.system_title),
            ..Aare::default()
        };
        let mut out = Vec::new();
        aare.encode(&mut out).ok()?;
        let sap = if self.client == Client::Public { 0x10 } else { 0x01 };
        let diagnostic = UserDiagnostic::NoReasonGiven.as_u8();
        meter.record(&self.fleet, Activity::AssociationRefused { sap, diagnostic });
        Some(out)
    }
}

/// In an AARE, set the acse-service-user diagnostic to authentication-required (14).
/// Walks the top-level BER elements so nothing but that one byte can change.
fn mark_authentication_required(aare: &mut [u8]) {
    /// A BER length at `at`: (value, bytes used).
    fn length(b: &[u8], at: usize) -> Option<(usize, usize)> {
        match *b.get(at)? {
            n @ 0..=0x7F => Some((usize::from(n), 1)),
            0x81 => Some((usize::from(*b.get(at + 1)?), 2)),
            0x82 => Some(((usize::from(*b.get(at + 1)?) << 8) | usize::from(*b.get(at + 2)?), 3)),
            _ => None,
        }
    }
    if aare.first() != Some(&0x61) {
        return;
    }
    let Some((_, used)) = length(aare, 1) else { return };
    let mut at = 1 + used;
    while at < aare.len() {
        let tag = aare[at];
        let Some((len, used)) = length(aare, at + 1) else { return };
        let body = at + 1 + used;
        // result-source-diagnostic: A3 05 { A1 03 { 02 01 <diagnostic> } } (acse-service-user).
        if tag == 0xA3 && len == 5 && aare.get(body..body + 4) == Some(&[0xA1, 0x03, 0x02, 0x01]) {
            if let Some(d) = aare.get_mut(body + 4) {
                *d = 0x0E;
            }
            return;
        }
        at = body + len;
    }
}

#[cfg(test)]
mod aare_tests {
    use super::mark_authentication_required;

    #[test]
    fn the_hls_aare_says_authentication_required() {
        let mut aare = vec![
            0x61, 0x1D, 0xA1, 0x09, 0x06, 0x07, 0x60, 0x85, 0x74, 0x05, 0x08, 0x01, 0x03, 0xA2, 0x03, 0x02, 0x01, 0x00,
            0xA3, 0x05, 0xA1, 0x03, 0x02, 0x01, 0x00, 0x88, 0x02, 0x07, 0x80,
        ];
        let before = aare.clone();
        mark_authentication_required(&mut aare);
        assert_eq!(aare[24], 0x0E);
        assert_eq!(aare.iter().zip(&before).filter(|(a, b)| a != b).count(), 1, "only the diagnostic changed");
        // Not an AARE, or truncated: untouched, no panic.
        let mut other = vec![0xC4, 0x01, 0xA3, 0x05];
        mark_authentication_required(&mut other);
        assert_eq!(other, vec![0xC4, 0x01, 0xA3, 0x05]);
        let mut short = vec![0x61, 0x81];
        mark_authentication_required(&mut short);
    }
}
