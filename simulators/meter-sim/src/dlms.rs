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
use dlms_cosem_rs::server::{Server, ServerConfig};
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
            Ok(n) => self.out.get(..n).map(<[u8]>::to_vec),
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
