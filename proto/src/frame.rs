//! Length-prefixed postcard frames (DESIGN section 4): a 4-byte big-endian length, at most
//! [`MAX_FRAME_LEN`], then the postcard encoding of one message. Oversized, truncated or
//! undecodable frames are errors; nothing here panics or allocates more than the limit.

use serde::{de::DeserializeOwned, Serialize};

/// Largest frame body accepted or sent: 64 KiB.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is larger than the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("connection closed")]
    Closed,
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let buf = postcard::to_extend(msg, vec![0u8; 4])?;
    finish(buf)
}

fn finish(mut buf: Vec<u8>) -> Result<Vec<u8>, FrameError> {
    // `buf` holds 4 placeholder bytes followed by the body.
    let body_len = buf.len().saturating_sub(4);
    if body_len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(body_len));
    }
    let len = (body_len as u32).to_be_bytes();
    buf[..4].copy_from_slice(&len);
    Ok(buf)
}

/// Decodes one frame body (without the length prefix). Only the canonical encoding of a
/// message is taken, so that two different byte strings never decode to the same message:
/// trailing bytes are an error, and so is any other non-canonical form postcard would accept
/// (an integer's varint padded with `0x80` continuation bytes, found by fuzzing), checked by
/// encoding the message again. Frames carry control messages, headers and RPCs, never bulk
/// data, so the second encoding costs little.
pub fn decode<T: Serialize + DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(body.len()));
    }
    let (msg, rest) = postcard::take_from_bytes(body)?;
    let bad = || FrameError::Malformed(postcard::Error::DeserializeBadEncoding);
    if !rest.is_empty() {
        return Err(bad());
    }
    let again = postcard::to_allocvec(&msg).map_err(|_| bad())?;
    if again != body {
        return Err(bad());
    }
    Ok(msg)
}

/// Splits one complete frame off the front of `buf`: `Ok(None)` when more bytes are needed.
pub fn split_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((&buf[4..4 + len], 4 + len)))
}

/// Room left in a frame for the items of a list: the rest of the message (enum tags, other
/// fields, length prefixes) gets the difference.
pub const LIST_BUDGET: usize = MAX_FRAME_LEN - 8 * 1024;

/// Splits `items` into runs whose postcard encodings total at most [`LIST_BUDGET`] bytes, so
/// that each run fits in one frame. Every run holds at least one item; an item that cannot be
/// encoded counts as too large and travels alone (sending it reports the error).
pub fn chunk_by_size<T: Serialize>(items: Vec<T>) -> Vec<Vec<T>> {
    chunk_within(items, LIST_BUDGET)
}

/// [`chunk_by_size`] with runs of at most `budget` encoded bytes (for a frame that carries
/// something else besides the list).
pub fn chunk_within<T: Serialize>(items: Vec<T>, budget: usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut cur = Vec::new();
    let mut size = 0usize;
    for item in items {
        let n = postcard::to_allocvec(&item)
            .map(|v| v.len())
            .unwrap_or(budget);
        if !cur.is_empty() && size + n > budget {
            out.push(std::mem::take(&mut cur));
            size = 0;
        }
        size += n;
        cur.push(item);
    }
    if !cur.is_empty() || out.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        A { x: u32, s: String },
        B(Vec<u8>),
    }

    #[test]
    fn roundtrip() {
        let m = Msg::A {
            x: 7,
            s: "hi".into(),
        };
        let buf = encode(&m).unwrap();
        let (body, used) = split_frame(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(decode::<Msg>(body).unwrap(), m);
    }

    #[test]
    fn oversized_is_refused_both_ways() {
        let m = Msg::B(vec![0; MAX_FRAME_LEN + 1]);
        assert!(matches!(encode(&m), Err(FrameError::TooLarge(_))));
        let mut hdr = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
        hdr.extend_from_slice(&[0; 8]);
        assert!(matches!(split_frame(&hdr), Err(FrameError::TooLarge(_))));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = split_frame(&data);
            let _ = decode::<Msg>(&data);
        }

        #[test]
        fn encode_decode_roundtrip(x in any::<u32>(), s in ".{0,64}", b in proptest::collection::vec(any::<u8>(), 0..256)) {
            for m in [Msg::A { x, s: s.clone() }, Msg::B(b.clone())] {
                let buf = encode(&m).unwrap();
                let (body, _) = split_frame(&buf).unwrap().unwrap();
                prop_assert_eq!(decode::<Msg>(body).unwrap(), m);
            }
        }
    }

    #[test]
    fn chunks_fit_in_frames() {
        let items: Vec<String> = (0..5000)
            .map(|i| format!("device-{i:05}-{}", "x".repeat(40)))
            .collect();
        let chunks = chunk_by_size(items.clone());
        assert!(chunks.len() > 1);
        for c in &chunks {
            assert!(
                encode(c).is_ok(),
                "a chunk of {} items does not fit",
                c.len()
            );
        }
        assert_eq!(chunks.concat(), items);
        assert_eq!(
            chunk_by_size(Vec::<String>::new()),
            vec![Vec::<String>::new()]
        );
    }
}
