//! The strict JSON reader (`stages::validate::parse_strict`): any bytes are read or refused with
//! our error, never a panic; whatever it accepts is JSON that serde reads the same.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = callgate::stages::validate::parse_strict(data, 16) {
        let again: serde_json::Value = serde_json::from_slice(data).expect("accepted, so JSON");
        assert_eq!(value, again);
    }
});
