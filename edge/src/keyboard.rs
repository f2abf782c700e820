//! HID code scanners in keyboard-wedge mode, read through evdev (`/dev/input/by-id/...-event-kbd`).
//! The device is grabbed exclusively, so a scanned code is typed into the terminal only, never
//! into a console or another program; key presses become characters by a US layout (what
//! scanners send by default), Enter ends a code.

use std::{os::fd::AsFd as _, path::Path, time::Instant};

use evdev::{raw_stream::RawDevice, EventSummary, InputEvent, KeyCode};

use crate::{codes::ByteDevice, error::SourceError, frames::wait_readable};

/// Keys that type a character: the key, the character, the character with shift.
const KEYS: &[(KeyCode, u8, u8)] = &[
    (KeyCode::KEY_1, b'1', b'!'),
    (KeyCode::KEY_2, b'2', b'@'),
    (KeyCode::KEY_3, b'3', b'#'),
    (KeyCode::KEY_4, b'4', b'$'),
    (KeyCode::KEY_5, b'5', b'%'),
    (KeyCode::KEY_6, b'6', b'^'),
    (KeyCode::KEY_7, b'7', b'&'),
    (KeyCode::KEY_8, b'8', b'*'),
    (KeyCode::KEY_9, b'9', b'('),
    (KeyCode::KEY_0, b'0', b')'),
    (KeyCode::KEY_MINUS, b'-', b'_'),
    (KeyCode::KEY_EQUAL, b'=', b'+'),
    (KeyCode::KEY_LEFTBRACE, b'[', b'{'),
    (KeyCode::KEY_RIGHTBRACE, b']', b'}'),
    (KeyCode::KEY_BACKSLASH, b'\\', b'|'),
    (KeyCode::KEY_SEMICOLON, b';', b':'),
    (KeyCode::KEY_APOSTROPHE, b'\'', b'"'),
    (KeyCode::KEY_GRAVE, b'`', b'~'),
    (KeyCode::KEY_COMMA, b',', b'<'),
    (KeyCode::KEY_DOT, b'.', b'>'),
    (KeyCode::KEY_SLASH, b'/', b'?'),
    (KeyCode::KEY_SPACE, b' ', b' '),
    (KeyCode::KEY_KP0, b'0', b'0'),
    (KeyCode::KEY_KP1, b'1', b'1'),
    (KeyCode::KEY_KP2, b'2', b'2'),
    (KeyCode::KEY_KP3, b'3', b'3'),
    (KeyCode::KEY_KP4, b'4', b'4'),
    (KeyCode::KEY_KP5, b'5', b'5'),
    (KeyCode::KEY_KP6, b'6', b'6'),
    (KeyCode::KEY_KP7, b'7', b'7'),
    (KeyCode::KEY_KP8, b'8', b'8'),
    (KeyCode::KEY_KP9, b'9', b'9'),
    (KeyCode::KEY_KPDOT, b'.', b'.'),
    (KeyCode::KEY_KPMINUS, b'-', b'-'),
    (KeyCode::KEY_KPPLUS, b'+', b'+'),
    (KeyCode::KEY_KPASTERISK, b'*', b'*'),
    (KeyCode::KEY_KPSLASH, b'/', b'/'),
];

/// Letter keys, `a` to `z`: shift and caps lock make them capitals.
const LETTERS: [(KeyCode, u8); 26] = [
    (KeyCode::KEY_A, b'a'),
    (KeyCode::KEY_B, b'b'),
    (KeyCode::KEY_C, b'c'),
    (KeyCode::KEY_D, b'd'),
    (KeyCode::KEY_E, b'e'),
    (KeyCode::KEY_F, b'f'),
    (KeyCode::KEY_G, b'g'),
    (KeyCode::KEY_H, b'h'),
    (KeyCode::KEY_I, b'i'),
    (KeyCode::KEY_J, b'j'),
    (KeyCode::KEY_K, b'k'),
    (KeyCode::KEY_L, b'l'),
    (KeyCode::KEY_M, b'm'),
    (KeyCode::KEY_N, b'n'),
    (KeyCode::KEY_O, b'o'),
    (KeyCode::KEY_P, b'p'),
    (KeyCode::KEY_Q, b'q'),
    (KeyCode::KEY_R, b'r'),
    (KeyCode::KEY_S, b's'),
    (KeyCode::KEY_T, b't'),
    (KeyCode::KEY_U, b'u'),
    (KeyCode::KEY_V, b'v'),
    (KeyCode::KEY_W, b'w'),
    (KeyCode::KEY_X, b'x'),
    (KeyCode::KEY_Y, b'y'),
    (KeyCode::KEY_Z, b'z'),
];

/// Turns key events into the characters they type: a plain state machine (shift held, caps lock
/// on), fed one event at a time.
#[derive(Debug, Default)]
pub struct Keymap {
    left_shift: bool,
    right_shift: bool,
    caps_lock: bool,
}

impl Keymap {
    /// Takes one input event; the character it types (`\n` for Enter), if any. Key releases,
    /// other event types and keys that type nothing give none.
    pub fn feed(&mut self, event: InputEvent) -> Option<u8> {
        let EventSummary::Key(_, key, value) = event.destructure() else {
            return None;
        };
        // 0: released, 1: pressed, 2: held (auto-repeat, which types again).
        let pressed = value != 0;
        match key {
            KeyCode::KEY_LEFTSHIFT => self.left_shift = pressed,
            KeyCode::KEY_RIGHTSHIFT => self.right_shift = pressed,
            KeyCode::KEY_CAPSLOCK if value == 1 => self.caps_lock = !self.caps_lock,
            _ if !pressed => {}
            KeyCode::KEY_ENTER | KeyCode::KEY_KPENTER => return Some(b'\n'),
            _ => {
                let shift = self.left_shift || self.right_shift;
                if let Some((_, letter)) = LETTERS.iter().find(|(k, _)| *k == key) {
                    return Some(match shift != self.caps_lock {
                        true => letter.to_ascii_uppercase(),
                        false => *letter,
                    });
                }
                if let Some((_, plain, shifted)) = KEYS.iter().find(|(k, _, _)| *k == key) {
                    return Some(if shift { *shifted } else { *plain });
                }
            }
        }
        None
    }
}

/// An open, grabbed keyboard-wedge scanner.
pub struct EvdevScanner {
    device: RawDevice,
    keymap: Keymap,
    what: String,
}

impl EvdevScanner {
    /// Opens the event device at `path` and grabs it: its keys reach this process only.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let what = format!("scanner {}", path.display());
        let mut device = RawDevice::open(path).map_err(|e| SourceError::unavailable(&what, e))?;
        if !device
            .supported_keys()
            .is_some_and(|keys| keys.contains(KeyCode::KEY_ENTER))
        {
            return Err(SourceError::unusable(
                &what,
                "not a keyboard (it has no Enter key)",
            ));
        }
        device.grab().map_err(|e| {
            SourceError::unusable(&what, format!("cannot grab it (another program has?): {e}"))
        })?;
        let fd = device.as_fd();
        let flags = rustix::fs::fcntl_getfl(fd)
            .and_then(|flags| rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK))
            .map_err(|e| SourceError::unusable(&what, std::io::Error::from(e)));
        flags?;
        Ok(EvdevScanner {
            device,
            keymap: Keymap::default(),
            what,
        })
    }
}

impl ByteDevice for EvdevScanner {
    fn read(&mut self, deadline: Instant, out: &mut Vec<u8>) -> Result<(), SourceError> {
        let readable = wait_readable(self.device.as_fd(), deadline)
            .map_err(|e| SourceError::stopped(&self.what, e))?;
        if !readable {
            return Ok(());
        }
        match self.device.fetch_events() {
            Ok(events) => {
                let keymap = &mut self.keymap;
                out.extend(events.filter_map(|event| keymap.feed(event)));
                Ok(())
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            // ENODEV: unplugged.
            Err(error) => Err(SourceError::stopped(&self.what, error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use evdev::EventType;

    use super::*;

    fn key(code: KeyCode, value: i32) -> InputEvent {
        InputEvent::new(EventType::KEY.0, code.0, value)
    }

    fn tap(code: KeyCode) -> [InputEvent; 2] {
        [key(code, 1), key(code, 0)]
    }

    fn check(events: &[InputEvent], expected: &str) {
        let mut keymap = Keymap::default();
        let typed: Vec<u8> = events.iter().filter_map(|e| keymap.feed(*e)).collect();
        assert_eq!(String::from_utf8(typed).unwrap(), expected);
    }

    #[test]
    fn key_events_type_what_a_us_keyboard_types() {
        use KeyCode as K;
        let syn = InputEvent::new(EventType::SYNCHRONIZATION.0, 0, 0);
        let scan = InputEvent::new(EventType::MISC.0, 4, 0x70004);
        // "F" (shift held), "p", then "." and Enter; sync and scan-code events between keys.
        let mut events = vec![key(K::KEY_LEFTSHIFT, 1), scan, key(K::KEY_F, 1), syn];
        events.extend([key(K::KEY_F, 0), key(K::KEY_LEFTSHIFT, 0), syn]);
        events.extend(tap(K::KEY_P));
        events.extend(tap(K::KEY_DOT));
        events.extend(tap(K::KEY_ENTER));
        check(&events, "Fp.\n");
        // Shifted punctuation with the right shift; a release ends it.
        let mut events = vec![key(K::KEY_RIGHTSHIFT, 1)];
        events.extend(tap(K::KEY_MINUS));
        events.extend(tap(K::KEY_1));
        events.push(key(K::KEY_RIGHTSHIFT, 0));
        events.extend(tap(K::KEY_MINUS));
        events.extend(tap(K::KEY_EQUAL));
        check(&events, "_!-=");
        // Caps lock makes letters capitals (shift lowers them again), not digits.
        let mut events = tap(K::KEY_CAPSLOCK).to_vec();
        events.extend(tap(K::KEY_A));
        events.extend(tap(K::KEY_2));
        events.push(key(K::KEY_LEFTSHIFT, 1));
        events.extend(tap(K::KEY_B));
        events.push(key(K::KEY_LEFTSHIFT, 0));
        events.extend(tap(K::KEY_CAPSLOCK));
        events.extend(tap(K::KEY_C));
        check(&events, "A2bc");
        // Keypad digits and its Enter; an auto-repeat types again.
        let mut events = tap(K::KEY_KP7).to_vec();
        events.extend([key(K::KEY_KP0, 1), key(K::KEY_KP0, 2), key(K::KEY_KP0, 0)]);
        events.extend(tap(K::KEY_KPENTER));
        check(&events, "700\n");
        // Keys that type nothing (F1, Ctrl, arrows) type nothing.
        let mut events = tap(K::KEY_F1).to_vec();
        events.extend(tap(K::KEY_LEFTCTRL));
        events.extend(tap(K::KEY_UP));
        check(&events, "");
    }

    #[test]
    fn every_base64url_character_of_a_code_can_be_typed() {
        // What a payment code is made of: FPAY1.<base64url>.<base64url>.
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.";
        let mut typable = std::collections::BTreeSet::new();
        for (_, c) in LETTERS {
            typable.insert(c);
            typable.insert(c.to_ascii_uppercase());
        }
        for (_, plain, shifted) in KEYS {
            typable.insert(*plain);
            typable.insert(*shifted);
        }
        for c in alphabet.bytes() {
            assert!(typable.contains(&c), "{}", c as char);
        }
    }

    #[test]
    fn a_missing_or_wrong_device_is_named() {
        let error = EvdevScanner::open(Path::new("/dev/input/event-missing"))
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            "scanner /dev/input/event-missing cannot be opened: No such file or directory (os error 2)"
        );
        // Not an event device at all: the driver refuses evdev's questions.
        let error = EvdevScanner::open(Path::new("/dev/null")).err().unwrap();
        assert!(
            error.to_string().starts_with("scanner /dev/null "),
            "{error}"
        );
    }
}
