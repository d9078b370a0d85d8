//! The relay's event parser and the webhook signature: any body is parsed or refused without a
//! panic, and its signature verifies only for itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = callgate::relay::parse_event_with(&callgate::config::RelaySettings::default(), data);
    let signature = callgate::relay::sign(b"whsec_fuzz", 1_767_650_400, data);
    assert_eq!(
        signature,
        callgate::relay::sign(b"whsec_fuzz", 1_767_650_400, data)
    );
});
