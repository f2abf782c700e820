//! Identifiers as types of their own: a payment id cannot be passed where an account id is
//! expected, nor a nonce where an order id is. On the wire each is the plain string it wraps
//! (`#[serde(transparent)]`), so messages are unchanged. Each reads as a `&str` (`Deref`), so
//! code that only looks at one needs no change; making one from a string is explicit (`From`).

use std::{borrow::Borrow, fmt, ops::Deref};

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                $name(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                $name(id.to_owned())
            }
        }

        impl From<&String> for $name {
            fn from(id: &String) -> Self {
                $name(id.clone())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

id_type!(
    /// A payment: `<store id>:<order id>` ([`crate::payment_id`]), the idempotency key of its
    /// transfer in the ledger.
    PaymentId
);
id_type!(
    /// A customer's, a store's (its merchant account) or the issuer's account in the ledger.
    AccountId
);
id_type!(
    /// A store: its hub, its terminals and its merchant account.
    StoreId
);
id_type!(
    /// A checkout terminal within its store.
    TerminalId
);
id_type!(
    /// The cash register's order id, unique within its store.
    OrderId
);
id_type!(
    /// The single-use nonce of a payment code or token: what the hub and the cloud tell
    /// attempts apart by.
    CodeNonce
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_its_plain_string_on_the_wire() {
        let id = PaymentId::from("store-1:o-1");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"store-1:o-1\"");
        let back: PaymentId = serde_json::from_str("\"store-1:o-1\"").unwrap();
        assert_eq!(back, id);
        assert_eq!(back, "store-1:o-1");
        assert_eq!(&*back, "store-1:o-1");
        assert_eq!(back.to_string(), "store-1:o-1");
    }
}
