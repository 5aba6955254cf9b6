//! Random and mutated bytes into every decoder of link input we own: each answers with a
//! value or an error, never a panic, and the stream decoders always make progress.

use dlms_cosem_rs::transport::hdlc::Framer;
use headend::dlms::cosem::{self, ColumnKind};
use headend::dlms::hdlc::{extract_frame, Extracted};
use headend::dlms::wrapper::{next_wpdu, Next};
use headend::meter::ProfileColumn;
use proptest::prelude::*;

/// A valid UA frame from meter 1/17 to client 16, to mutate and to find behind noise.
fn ua() -> Vec<u8> {
    use dlms_cosem_rs::codec::{Encode, SliceWriter};
    use dlms_cosem_rs::transport::hdlc::{Address, Control, Frame};
    let f = Frame::control_only(Address::client(16), Address::server(1, 17), Control::Ua);
    let mut out = vec![0u8; f.encoded_len()];
    let mut w = SliceWriter::new(&mut out);
    f.encode(&mut w).expect("encodes");
    out
}

/// Drain a buffer through the frame finder; returns the frames found.
fn drain_hdlc(mut buf: Vec<u8>) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    let mut framer = Framer::new();
    // Every step either removes bytes or asks for more: the loop cannot spin.
    for _ in 0..buf.len() + 2 {
        match extract_frame(&mut framer, &buf) {
            Extracted::Frame { drain, bytes } => {
                assert!(drain > 0 && drain <= buf.len(), "a frame drains part of the buffer");
                found.push(bytes);
                buf.drain(..drain);
            }
            Extracted::Need { discard } if discard > 0 => {
                buf.drain(..discard.min(buf.len()));
            }
            Extracted::Need { .. } => return found,
        }
    }
    found
}

fn drain_wrapper(mut buf: Vec<u8>) {
    for _ in 0..buf.len() + 2 {
        match next_wpdu(&buf) {
            Next::Pdu { used, .. } => {
                assert!(used >= 8 && used <= buf.len());
                buf.drain(..used);
            }
            Next::Garbage { skip } => {
                assert!(skip > 0, "garbage always makes progress");
                buf.drain(..skip.min(buf.len()));
            }
            Next::NeedMore => return,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn hdlc_frame_finder(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        drain_hdlc(bytes);
    }

    #[test]
    fn a_valid_frame_is_found_behind_noise_and_broken_frames(
        pos in 0usize..9,
        val in any::<u8>(),
        prefix in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let good = ua();
        let mut broken = good.clone();
        if let Some(b) = broken.get_mut(pos) {
            *b = val;
        }
        let mut buf = prefix;
        buf.extend_from_slice(&broken);
        buf.extend_from_slice(&good);
        let found = drain_hdlc(buf);
        prop_assert_eq!(found.last(), Some(&good));
    }

    #[test]
    fn wrapper_stream(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        drain_wrapper(bytes);
    }

    #[test]
    fn axdr_values_and_cosem_helpers(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(d) = cosem::decode(&bytes) {
            let _ = cosem::clock_of(&d, Some(480));
            let _ = cosem::scaler_unit_of(&d);
            let _ = cosem::capture_objects_of(&d);
            let _ = cosem::text_of(&d);
            let _ = cosem::scaled(&d, 3);
            let kinds = [
                ColumnKind::Clock,
                ColumnKind::Status,
                ColumnKind::Value { scaler: -2, column: ProfileColumn { name: "v".into(), unit: None } },
            ];
            let _ = cosem::profile_rows(&d, &kinds, None);
        }
    }

    #[test]
    fn timestamps(text in "\\PC{0,40}") {
        let _ = headend::time::parse_rfc3339_ms(&text);
    }

    #[test]
    fn timestamps_near_valid(y in 0u32..10000, mo in 0u32..99, d in 0u32..99, h in 0u32..99, mi in 0u32..99, off in 0u32..99) {
        let text = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:00+{off:02}:00");
        let _ = headend::time::parse_rfc3339_ms(&text);
    }

    #[test]
    fn config_text(text in "\\PC{0,200}") {
        if let Ok(cfg) = headend::config::SiteConfig::parse(&text) {
            let _ = cfg.problems();
        }
    }
}
