//! A `tokio_util` codec over the frame format, for code that reads frames through a
//! `FramedRead`/`FramedWrite` (cancel-safe: a half-read frame stays in the buffer).
//!
//! Decoding is the same as [`crate::frame::split_frame`] plus [`crate::frame::decode`]: a
//! length above [`MAX_FRAME_LEN`] is refused before anything is buffered for it.

use std::marker::PhantomData;

use bytes::{Buf, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{decode, encode, FrameError, MAX_FRAME_LEN};

/// Decodes frames into `In` and encodes `Out` as frames.
pub struct FrameCodec<In, Out> {
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    pub fn new() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new()
    }
}

impl<In: Serialize + DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        if src.len() < 4 {
            src.reserve(4 - src.len());
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(len));
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let body = src.split_to(len);
        decode(&body).map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match self.decode(src)? {
            Some(msg) => Ok(Some(msg)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated),
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, msg: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        dst.extend_from_slice(&encode(&msg)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize, Clone)]
    enum Msg {
        A { x: u32, s: String },
        B(Vec<u8>),
    }

    #[test]
    fn a_frame_split_anywhere_decodes_once_whole() {
        let mut codec = FrameCodec::<Msg, Msg>::new();
        let mut wire = BytesMut::new();
        let m = Msg::A {
            x: 5,
            s: "van-42".into(),
        };
        codec.encode(m.clone(), &mut wire).unwrap();
        codec.encode(Msg::B(vec![7; 300]), &mut wire).unwrap();
        let wire = wire.freeze();
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(msg) = codec.decode(&mut buf).unwrap() {
                got.push(msg);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(msg) = codec.decode(&mut buf).unwrap() {
                got.push(msg);
            }
            assert_eq!(got, vec![m.clone(), Msg::B(vec![7; 300])], "cut at {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn oversized_truncated_and_malformed_are_errors() {
        let mut codec = FrameCodec::<Msg, Msg>::new();
        let mut big = BytesMut::from(&((MAX_FRAME_LEN + 1) as u32).to_be_bytes()[..]);
        assert!(matches!(
            codec.decode(&mut big),
            Err(FrameError::TooLarge(_))
        ));
        let mut half = BytesMut::from(&[0u8, 0, 0, 9, 1][..]);
        assert!(matches!(
            codec.decode_eof(&mut half),
            Err(FrameError::Truncated)
        ));
        let mut bad = BytesMut::from(&[0u8, 0, 0, 1, 9][..]);
        assert!(matches!(
            codec.decode(&mut bad),
            Err(FrameError::Malformed(_))
        ));
        let mut empty = BytesMut::new();
        assert!(codec.decode_eof(&mut empty).unwrap().is_none());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut codec = FrameCodec::<Msg, Msg>::new();
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }
}
