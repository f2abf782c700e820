//! A payment code as a scanner reads it: parsing and checking never panic, and a code that
//! checks against a key was signed with it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(code) = paycode::SignedCode::parse(text) else {
        return;
    };
    let wallet = paycode::Wallet::from_seed("fuzz", [7; 32]).expect("a fixed seed");
    let validity = paycode::Validity {
        window_ms: 60_000,
        clock_skew_ms: 5_000,
    };
    for now_ms in [0, code.issued_at_ms, u64::MAX] {
        // Random bytes never carry the fixed wallet's signature.
        assert!(code.verify(&wallet.verifying_key(), now_ms, validity).is_err());
    }
    let _ = code.nonce_hex();
});
