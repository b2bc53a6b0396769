//! The client's websocket codec: actix-http's for reading and for control frames, our own
//! for writing RPC packages.
//!
//! Why not actix-http's encoder for packages too: it takes one contiguous payload, and
//! a `message_cache` chunk call is a [`Rope`] whose 256 KiB chunk is a slice of the
//! caller's array (hypha-core `msgpack::Rope`). Flattening it first meant copying every
//! chunk twice on its way out (into a fresh 256 KiB buffer, then into the socket buffer),
//! and faulting in the fresh buffers' pages. Here each part is copied once, straight into
//! the socket's write buffer, and masked there, as RFC 6455 §5.3 requires of a client.
//!
//! The frame written is what actix-http writes for a `Message::Binary`: one final frame
//! (no fragmentation: the stock servers accept fragments, but nothing needs them),
//! the shortest length form, a fresh random masking key per frame.

use actix_codec::{Decoder, Encoder};
use actix_ws::ProtocolError;
use awc::ws::{Codec, Frame, Message};
use bytes::BytesMut;
use hypha_core::msgpack::Rope;

use crate::wsframe::{Header, MAX_HEADER, OP_BINARY};

use super::connection::Outgoing;

/// [`Codec`] in client mode, with packages written from their parts.
pub struct ClientCodec {
    inner: Codec,
}

impl ClientCodec {
    /// Wraps the codec awc's handshake configured (client mode, the frame size limit).
    pub fn new(inner: Codec) -> Self {
        Self { inner }
    }
}

impl Decoder for ClientCodec {
    type Item = Frame;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        self.inner.decode(src)
    }
}

/// The handshake's frames (auth text, pongs).
impl Encoder<Message> for ClientCodec {
    type Error = ProtocolError;

    fn encode(&mut self, item: Message, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        self.inner.encode(item, dst)
    }
}

impl Encoder<Outgoing> for ClientCodec {
    type Error = ProtocolError;

    fn encode(&mut self, item: Outgoing, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        match item {
            Outgoing::Binary(rope) => {
                write_binary(&rope, rand::random(), dst);
                Ok(())
            }
            Outgoing::Text(t) => self.inner.encode(Message::Text(t.into()), dst),
            Outgoing::Pong(p) => self.inner.encode(Message::Pong(p), dst),
            Outgoing::Close(r) => self.inner.encode(Message::Close(Some(r)), dst),
        }
    }
}

/// Appends one final, masked binary frame holding `rope`'s bytes.
fn write_binary(rope: &Rope, key: [u8; 4], dst: &mut BytesMut) {
    let len = rope.len();
    dst.reserve(MAX_HEADER + len);
    dst.extend_from_slice(Header::new(OP_BINARY, len, Some(key)).as_bytes());
    let mut offset = 0;
    for part in rope.parts() {
        let at = dst.len();
        dst.extend_from_slice(part);
        mask(&mut dst[at..], key, offset);
        offset += part.len();
    }
}

/// XORs `buf` with the masking key, `buf[0]` being byte `offset` of the payload (RFC 6455
/// §5.3: payload byte `i` is XORed with `key[i % 4]`). Eight bytes at a time; the
/// compiler vectorizes the loop.
fn mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let phase = offset % 4;
    let rotated: [u8; 4] = std::array::from_fn(|i| key[(i + phase) % 4]);
    let word = u64::from_ne_bytes([
        rotated[0], rotated[1], rotated[2], rotated[3], rotated[0], rotated[1], rotated[2], rotated[3],
    ]);
    let mut words = buf.chunks_exact_mut(8);
    for w in &mut words {
        let masked = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) ^ word;
        w.copy_from_slice(&masked.to_ne_bytes());
    }
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= rotated[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use hypha_core::Value;

    /// A rope holding one msgpack `bin` per size, as the encoder writes a call: the
    /// payloads of at least [`Rope::SHARE_MIN`] bytes are parts of their own.
    fn rope(sizes: &[usize]) -> (Rope, Bytes) {
        let mut rope = Rope::new();
        for (n, &size) in sizes.iter().enumerate() {
            let part: Vec<u8> = (0..size).map(|i| (i * 31 + n * 7) as u8).collect();
            rope.put_value(&Value::Bytes(Bytes::from(part))).unwrap();
        }
        let whole = rope.clone().into_bytes();
        (rope, whole)
    }

    /// What a server reads: actix-http's own codec in server mode.
    fn read_back(buf: &mut BytesMut) -> Frame {
        Codec::new().max_size(64 << 20).decode(buf).expect("a valid frame").expect("a whole frame")
    }

    #[test]
    fn a_rope_frame_reads_back_as_its_bytes_at_every_length_form() {
        // Encoded lengths (a bin of n bytes takes n + 2, n + 3 from 256, n + 5 from 64 KiB):
        // 0, 3, 125 (the last 7-bit length), 126 (the first 16-bit one), 65,537 in two
        // parts, 65,535 (the last 16-bit one), 65,536 (the first 64-bit one), five parts.
        for sizes in [
            &[][..],
            &[1],
            &[123],
            &[120, 2],
            &[3, 65_529],
            &[65_532],
            &[65_533],
            &[5, 300_001, 7, 262_144, 1],
        ] {
            let (rope, whole) = rope(sizes);
            let rope_parts = rope.parts().count();
            let mut buf = BytesMut::new();
            ClientCodec::new(Codec::new().client_mode()).encode(Outgoing::Binary(rope), &mut buf).unwrap();
            assert!(sizes.len() < 3 || rope_parts > 3, "the big payloads are parts of their own");
            assert_eq!(read_back(&mut buf), Frame::Binary(whole), "payloads {sizes:?}");
            assert!(buf.is_empty(), "one frame, nothing after it");
        }
    }

    #[test]
    fn each_frame_gets_its_own_masking_key() {
        let (rope, _) = rope(&[64]);
        let mut a = BytesMut::new();
        let mut b = BytesMut::new();
        let mut codec = ClientCodec::new(Codec::new().client_mode());
        codec.encode(Outgoing::Binary(rope.clone()), &mut a).unwrap();
        codec.encode(Outgoing::Binary(rope), &mut b).unwrap();
        assert_eq!(a[1], 0x80 | 66, "masked, short length (a 64-byte bin is 66 bytes)");
        assert_ne!(a[2..6], b[2..6], "a fresh key per frame");
    }

    #[test]
    fn masking_at_any_offset_matches_the_rfc_definition() {
        let key = [0x6d, 0xb6, 0xb2, 0x80];
        for offset in 0..9 {
            for len in 0..40 {
                let data: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
                let mut got = data.clone();
                mask(&mut got, key, offset);
                let want: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ key[(i + offset) % 4]).collect();
                assert_eq!(got, want, "offset {offset}, len {len}");
            }
        }
    }

    #[test]
    fn control_messages_still_go_through_actix_http() {
        let mut buf = BytesMut::new();
        let mut codec = ClientCodec::new(Codec::new().client_mode());
        codec.encode(Outgoing::Text("{\"type\":\"ping\"}".into()), &mut buf).unwrap();
        codec.encode(Outgoing::Pong(Bytes::from_static(b"p")), &mut buf).unwrap();
        assert_eq!(read_back(&mut buf), Frame::Text(Bytes::from_static(b"{\"type\":\"ping\"}")));
        assert_eq!(read_back(&mut buf), Frame::Pong(Bytes::from_static(b"p")));
    }
}
