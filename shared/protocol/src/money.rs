use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// The largest single amount accepted, in minor units (10^12: ten billion major units). Large
/// enough for any retail basket, small enough that sums of many never overflow an `i64`.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000;

/// ISO 4217 codes accepted, with their number of minor-unit digits.
const CURRENCIES: &[(&str, u8)] = &[
    ("AUD", 2),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CNY", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("INR", 2),
    ("JPY", 0),
    ("KRW", 0),
    ("MXN", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("PLN", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("USD", 2),
    ("ZAR", 2),
];

/// A validated ISO 4217 currency code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    /// Parses an upper-case ISO 4217 code from the table of accepted currencies.
    pub fn parse(code: &str) -> Result<Self, ValidationError> {
        Currency::all()
            .find(|known| known.as_str() == code)
            .ok_or_else(|| ValidationError::UnknownCurrency(code.to_owned()))
    }

    /// Every accepted currency, in code order.
    pub fn all() -> impl Iterator<Item = Currency> {
        CURRENCIES.iter().map(|(code, _)| {
            let b = code.as_bytes();
            Currency([b[0], b[1], b[2]])
        })
    }

    /// The three-letter code.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("currency codes are ASCII")
    }

    /// Digits after the decimal point in this currency's minor unit.
    pub fn minor_digits(&self) -> u8 {
        CURRENCIES
            .iter()
            .find(|(c, _)| *c == self.as_str())
            .map(|(_, d)| *d)
            .unwrap_or(2)
    }

    /// Formats an amount in minor units for people: `1234` EUR is `12.34 EUR`.
    pub fn format(&self, amount_minor: i64) -> String {
        let digits = u32::from(self.minor_digits());
        if digits == 0 {
            return format!("{amount_minor} {}", self.as_str());
        }
        let scale = 10i64.pow(digits);
        let sign = if amount_minor < 0 { "-" } else { "" };
        let abs = amount_minor.unsigned_abs();
        let scale = scale as u64;
        format!(
            "{sign}{}.{:0width$} {}",
            abs / scale,
            abs % scale,
            self.as_str(),
            width = digits as usize
        )
    }
}

impl TryFrom<String> for Currency {
    type Error = ValidationError;
    fn try_from(code: String) -> Result<Self, Self::Error> {
        Currency::parse(&code)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.as_str().to_owned()
    }
}

impl std::fmt::Display for Currency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Validates an amount that arrived as a JSON number: it must be an integer from 1 to
/// [`MAX_AMOUNT_MINOR`]. Zero, negative, fractional and overflowing amounts are all refused with the
/// value echoed back, so that a cash register bug is visible in its own logs.
pub fn validate_amount(raw: &serde_json::Value) -> Result<i64, ValidationError> {
    let refuse = || ValidationError::Amount {
        got: raw.to_string(),
        max: MAX_AMOUNT_MINOR,
    };
    match raw.as_i64() {
        Some(v) if (1..=MAX_AMOUNT_MINOR).contains(&v) => Ok(v),
        _ => Err(refuse()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn amounts() {
        fn check(raw: serde_json::Value, expected: Option<i64>) {
            assert_eq!(validate_amount(&raw).ok(), expected, "{raw}");
        }
        check(json!(1), Some(1));
        check(json!(1999), Some(1999));
        check(json!(MAX_AMOUNT_MINOR), Some(MAX_AMOUNT_MINOR));
        check(json!(0), None);
        check(json!(-5), None);
        check(json!(MAX_AMOUNT_MINOR + 1), None);
        check(json!(u64::MAX), None);
        check(serde_json::from_str("1e30").unwrap(), None);
        check(json!(12.5), None);
        check(json!("100"), None);
        check(json!(null), None);
    }

    #[test]
    fn currencies() {
        assert_eq!(Currency::parse("EUR").unwrap().as_str(), "EUR");
        assert!(Currency::parse("eur").is_err());
        assert!(Currency::parse("XXX").is_err());
        assert!(Currency::parse("").is_err());
        let eur = Currency::parse("EUR").unwrap();
        assert_eq!(eur.format(1234), "12.34 EUR");
        assert_eq!(eur.format(-5), "-0.05 EUR");
        assert_eq!(Currency::parse("JPY").unwrap().format(500), "500 JPY");
        let parsed: Currency = serde_json::from_str("\"USD\"").unwrap();
        assert_eq!(parsed.to_string(), "USD");
        assert!(serde_json::from_str::<Currency>("\"ABC\"").is_err());
    }
}
