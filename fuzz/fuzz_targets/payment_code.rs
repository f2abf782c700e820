//! A payment code as a scanner reads it: parsing and checking never panic, and a code that
//! checks against a key was signed with it; a genuine code with fuzzed times passes exactly when
//! its window says so.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let wallet = paycode::Wallet::from_seed("fuzz", [7; 32]).expect("a fixed seed");
    let validity = paycode::Validity {
        window_ms: 60_000,
        clock_skew_ms: 5_000,
    };
    if let Some((times, nonce)) = data.split_first_chunk::<16>() {
        // A genuine code issued and checked at fuzzed times.
        let issued_at_ms = u64::from_le_bytes(times[..8].try_into().expect("8 bytes"));
        let now_ms = u64::from_le_bytes(times[8..].try_into().expect("8 bytes"));
        let mut n = [0u8; paycode::NONCE_LEN];
        for (slot, byte) in n.iter_mut().zip(nonce) {
            *slot = *byte;
        }
        let text = wallet.issue_code_with_nonce(issued_at_ms, n);
        let code = paycode::SignedCode::parse(&text).expect("a genuine code parses");
        let in_window = issued_at_ms <= now_ms.saturating_add(validity.clock_skew_ms)
            && now_ms
                <= issued_at_ms
                    .saturating_add(validity.window_ms)
                    .saturating_add(validity.clock_skew_ms);
        assert_eq!(
            code.verify(&wallet.verifying_key(), now_ms, validity).is_ok(),
            in_window
        );
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(code) = paycode::SignedCode::parse(text) else {
        return;
    };
    for now_ms in [0, code.issued_at_ms, u64::MAX] {
        // Random bytes never carry the fixed wallet's signature.
        assert!(code.verify(&wallet.verifying_key(), now_ms, validity).is_err());
    }
    let _ = code.nonce_hex();
});
