//! The server's websocket reader: the request's payload chunks decoded into messages by
//! actix-http's codec (the same frame parser and checks as actix-ws's `MessageStream`),
//! into a buffer reserved at each frame's full size.
//!
//! Why not actix-ws's stream: it grows its buffer chunk by chunk as a frame arrives, and
//! starts a fresh buffer whenever the previous frame is still referenced, so a 256 KiB
//! `message_cache` chunk call was copied several times over while it grew (a relayed
//! 64 MiB payload is 256 of them each way). Here the header that starts a frame sizes the
//! buffer once: each byte is copied into it once, and unmasked there by the codec.
//! Everything else is as before: text must be UTF-8, a malformed frame or a payload error
//! ends the stream after it is reported, the codec's `max_size` is the configured frame limit (behind
//! [`super::limits::FrameSizeGuard`], which refuses an oversized header before any of
//! its payload is read).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_codec::Decoder;
use actix_web::error::PayloadError;
use actix_ws::{Message, ProtocolError};
use awc::ws::{Codec, Frame};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::Stream;

use crate::wsframe::{header_len, payload_len, MAX_HEADER};

/// Decodes a websocket request payload into messages (see the module docs).
pub struct InboundFrames<S> {
    payload: S,
    buf: BytesMut,
    codec: Codec,
    /// The largest frame accepted (its payload), which also caps a reservation.
    max_size: usize,
    /// The payload ended or failed: what is buffered is still decoded, nothing is read.
    ended: bool,
}

impl<S> InboundFrames<S> {
    /// Reads `payload`, accepting frames of at most `max_size` payload bytes.
    pub fn new(payload: S, max_size: usize) -> Self {
        InboundFrames {
            payload,
            buf: BytesMut::new(),
            codec: Codec::new().max_size(max_size),
            max_size,
            ended: false,
        }
    }

    /// Appends a chunk, first reserving room for the whole frame it continues or starts.
    fn append(&mut self, chunk: &[u8]) {
        if let Some(total) = frame_len(&self.buf, chunk) {
            let total = total.min(self.max_size.saturating_add(MAX_HEADER));
            self.buf.reserve(total.saturating_sub(self.buf.len()).max(chunk.len()));
        }
        self.buf.extend_from_slice(chunk);
    }
}

/// The full length (header and payload) of the frame starting at the front of `buf`
/// followed by `next`, once its whole header is there.
fn frame_len(buf: &[u8], next: &[u8]) -> Option<usize> {
    let mut header = [0u8; MAX_HEADER];
    let mut have = 0;
    for (slot, byte) in header.iter_mut().zip(buf.iter().chain(next)) {
        *slot = *byte;
        have += 1;
    }
    if have < 2 {
        return None;
    }
    let len = header_len(header[1]);
    if have < len {
        return None;
    }
    usize::try_from(payload_len(&header[..len])).ok()?.checked_add(len)
}

/// A decoded frame as the message actix-ws would have made of it.
fn message(frame: Frame) -> Result<Message, ProtocolError> {
    Ok(match frame {
        Frame::Text(bytes) => ByteString::try_from(bytes)
            .map(Message::Text)
            .map_err(|e| ProtocolError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?,
        Frame::Binary(bytes) => Message::Binary(bytes),
        Frame::Ping(bytes) => Message::Ping(bytes),
        Frame::Pong(bytes) => Message::Pong(bytes),
        Frame::Close(reason) => Message::Close(reason),
        Frame::Continuation(item) => Message::Continuation(item),
    })
}

impl<S> Stream for InboundFrames<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Message, ProtocolError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.codec.decode(&mut this.buf) {
                Ok(Some(frame)) => return Poll::Ready(Some(message(frame))),
                Ok(None) => {}
                Err(e) => {
                    // What follows a malformed frame cannot be framed: nothing more is read.
                    this.ended = true;
                    this.buf = BytesMut::new();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.payload).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => this.append(&chunk),
                Poll::Ready(Some(Err(e))) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(ProtocolError::Io(io::Error::other(e)))));
                }
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_codec::Encoder;
    use futures_util::{stream, StreamExt};

    /// Frames as a client writes them (masked), cut into chunks of `chunk` bytes.
    fn chunks(messages: Vec<awc::ws::Message>, chunk: usize) -> Vec<Result<Bytes, PayloadError>> {
        let mut codec = Codec::new().client_mode();
        let mut wire = BytesMut::new();
        for m in messages {
            codec.encode(m, &mut wire).unwrap();
        }
        wire.chunks(chunk.max(1)).map(|c| Ok(Bytes::copy_from_slice(c))).collect()
    }

    async fn read_all(input: Vec<Result<Bytes, PayloadError>>, max: usize) -> Vec<Result<Message, String>> {
        InboundFrames::new(stream::iter(input), max).map(|r| r.map_err(|e| e.to_string())).collect().await
    }

    #[actix_rt::test]
    async fn frames_decode_the_same_however_the_payload_is_cut() {
        use awc::ws::Message as Out;
        let big = Bytes::from((0..300_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let sent = || {
            vec![
                Out::Text("{\"type\":\"ping\"}".into()),
                Out::Binary(big.clone()),
                Out::Ping(Bytes::from_static(b"p")),
                Out::Binary(Bytes::from(vec![1; 126])),
                Out::Binary(Bytes::new()),
                Out::Binary(Bytes::from(vec![2; 70_000])),
            ]
        };
        for chunk in [1, 2, 3, 7, 100, 4096, 65_536, 1 << 20] {
            let got = read_all(chunks(sent(), chunk), 1 << 20).await;
            assert_eq!(got.len(), 6, "chunk {chunk}");
            assert!(matches!(&got[0], Ok(Message::Text(t)) if t == "{\"type\":\"ping\"}"));
            assert!(matches!(&got[1], Ok(Message::Binary(b)) if *b == big), "chunk {chunk}: unmasked, whole");
            assert!(matches!(&got[2], Ok(Message::Ping(p)) if &p[..] == b"p"));
            assert!(matches!(&got[3], Ok(Message::Binary(b)) if b.len() == 126 && b.iter().all(|x| *x == 1)));
            assert!(matches!(&got[4], Ok(Message::Binary(b)) if b.is_empty()));
            assert!(
                matches!(&got[5], Ok(Message::Binary(b)) if b.len() == 70_000 && b.iter().all(|x| *x == 2))
            );
        }
    }

    #[actix_rt::test]
    async fn a_frame_is_assembled_in_one_buffer_of_its_size() {
        let input = chunks(vec![awc::ws::Message::Binary(Bytes::from(vec![9; 256 * 1024]))], 16 * 1024);
        let mut frames = InboundFrames::new(stream::iter(input), 1 << 20);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // The first chunk holds the header: the buffer is sized for the whole frame then.
        let first = Pin::new(&mut frames.payload).poll_next(&mut cx);
        let Poll::Ready(Some(Ok(first))) = first else { panic!("a chunk") };
        frames.append(&first);
        assert!(frames.buf.capacity() >= 256 * 1024 + 8, "reserved {}", frames.buf.capacity());
        let at = frames.buf.as_ptr();
        let got = frames.next().await.unwrap().unwrap();
        assert!(matches!(&got, Message::Binary(b) if b.len() == 256 * 1024 && b.as_ptr() > at));
        assert!(
            matches!(&got, Message::Binary(b) if b.as_ptr() as usize - at as usize <= MAX_HEADER),
            "no regrowth"
        );
        // A declared length near u64::MAX reserves no more than the largest frame accepted.
        let mut frames = InboundFrames::new(stream::iter(Vec::<Result<Bytes, PayloadError>>::new()), 1000);
        frames.append(&[0x82, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert!(frames.buf.capacity() < 4096, "reserved {}", frames.buf.capacity());
    }

    #[actix_rt::test]
    async fn bad_input_is_an_error_not_a_panic() {
        // Invalid UTF-8 text, an unmasked client frame, a bad opcode, an oversized frame
        // (once whole: the size guard in front refuses its header earlier), a payload
        // error: each is reported, and ends the stream.
        let mut bad_text = BytesMut::new();
        Codec::new().client_mode().encode(awc::ws::Message::Text("ok".into()), &mut bad_text).unwrap();
        let n = bad_text.len();
        // "ok" is the last two bytes, masked with the key's first two (the 4 before them).
        let invalid = [0xff ^ bad_text[n - 6], 0xfe ^ bad_text[n - 5]];
        bad_text[n - 2..].copy_from_slice(&invalid);
        let cases: Vec<(Vec<Result<Bytes, PayloadError>>, &str)> = vec![
            (vec![Ok(bad_text.freeze())], "utf-8"),
            (vec![Ok(Bytes::from_static(&[0x82, 0x01, 0x00]))], "unmasked"),
            (vec![Ok(Bytes::from_static(&[0x83, 0x80, 0, 0, 0, 0]))], "bad opcode"),
            (chunks(vec![awc::ws::Message::Binary(Bytes::from(vec![0; 2000]))], 64), "too big"),
            (vec![Err(PayloadError::Overflow)], "payload error"),
        ];
        for (input, what) in cases {
            let got = read_all(input, 1000).await;
            assert!(matches!(got.last(), Some(Err(_))), "{what}: {got:?}");
        }
    }
}
