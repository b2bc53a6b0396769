//! Identifiers: random object/session ids, and (being written) the parsing and formatting
//! of client and service ids.

use rand::Rng;

/// The alphabet of Python's `shortuuid`: digits and letters without the look-alikes
/// `0 1 I O l`. Ids we mint look like the Python client's, which keeps logs and traces
/// from mixed deployments readable.
const ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// Length of a Python `shortuuid.uuid()` (22 chars, about 128 bits).
pub const RANDOM_ID_LEN: usize = 22;

/// A fresh random id for sessions, object ids and client ids (22 chars, ~128 bits).
///
/// Session ids double as capabilities (only the peer that knows one can call back into
/// it), so they come from the OS-seeded thread RNG, never from a counter.
pub fn random_id() -> String {
    let mut rng = rand::rng();
    (0..RANDOM_ID_LEN).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_are_shortuuid_shaped() {
        let a = random_id();
        assert_eq!(a.len(), RANDOM_ID_LEN);
        assert!(a.bytes().all(|b| ALPHABET.contains(&b)));
        assert_ne!(a, random_id());
    }
}
