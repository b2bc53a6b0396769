//! The websocket frame header (RFC 6455 §5.2), one way of writing and reading it for the
//! client's codec, the server's response body, its reader and its frame-size guard.
//!
//! Only the header: payloads stay with their writers, which place them without copying
//! when they can (a client's rope parts, a server's large pieces).

/// Longest header: 2 bytes, an 8-byte extended length, a 4-byte masking key.
pub(crate) const MAX_HEADER: usize = 14;

/// Text frame opcode.
pub(crate) const OP_TEXT: u8 = 0x1;
/// Binary frame opcode.
pub(crate) const OP_BINARY: u8 = 0x2;
/// Close frame opcode.
pub(crate) const OP_CLOSE: u8 = 0x8;
/// Pong frame opcode.
pub(crate) const OP_PONG: u8 = 0xA;

/// The header of a final (FIN) frame.
pub(crate) struct Header {
    bytes: [u8; MAX_HEADER],
    len: usize,
}

impl Header {
    /// A final frame of `opcode` carrying `payload_len` bytes, in the shortest length form,
    /// masked with `mask` when given (clients must mask, servers must not).
    pub(crate) fn new(opcode: u8, payload_len: usize, mask: Option<[u8; 4]>) -> Self {
        let mut bytes = [0u8; MAX_HEADER];
        bytes[0] = 0x80 | opcode;
        let masked = if mask.is_some() { 0x80 } else { 0 };
        let mut len = match payload_len {
            0..=125 => {
                bytes[1] = masked | payload_len as u8;
                2
            }
            126..=0xffff => {
                bytes[1] = masked | 126;
                bytes[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
                4
            }
            _ => {
                bytes[1] = masked | 127;
                bytes[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
                10
            }
        };
        if let Some(key) = mask {
            bytes[len..len + 4].copy_from_slice(&key);
            len += 4;
        }
        Header { bytes, len }
    }

    /// The encoded header.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Length of a frame header given its second byte: 2, plus 2 or 8 bytes of extended
/// length, plus 4 bytes of masking key when the mask bit is set.
pub(crate) fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
}

/// The payload length a frame header declares (`header` holds at least the length bytes).
pub(crate) fn payload_len(header: &[u8]) -> u64 {
    let b1 = header.get(1).copied().unwrap_or(0);
    match b1 & 0x7f {
        126 => header.get(2..4).map_or(0, |b| u64::from(u16::from_be_bytes([b[0], b[1]]))),
        127 => header.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_be_bytes),
        n => u64::from(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_read_back_at_every_length_form_masked_or_not() {
        for len in [0, 1, 125, 126, 0xffff, 0x1_0000, 70_000] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let h = Header::new(OP_BINARY, len, mask);
                let bytes = h.as_bytes();
                assert_eq!(bytes[0], 0x82, "final binary frame");
                assert_eq!(header_len(bytes[1]), bytes.len(), "len {len} mask {mask:?}");
                assert_eq!(payload_len(bytes), len as u64);
                if let Some(key) = mask {
                    assert_eq!(&bytes[bytes.len() - 4..], key);
                }
            }
        }
    }
}
