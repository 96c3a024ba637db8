//! Reading and writing Edgeport frames on async byte streams (the frame format itself, and
//! the encoder and decoder, live in `edgeport_proto::frame`).

use edgeport_proto::frame::{decode, encode, FrameError, MAX_FRAME_LEN};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads one frame. A clean end of stream before the first byte is [`FrameError::Closed`].
pub async fn read_frame<T, R>(r: &mut R) -> Result<T, FrameError>
where
    T: Serialize + DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Closed
            } else {
                FrameError::Truncated
            });
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    decode(&body)
}

/// Writes one frame and flushes it.
pub async fn write_frame<T, W>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let buf = encode(msg)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        A { x: u32, s: String },
        B(Vec<u8>),
    }

    #[tokio::test]
    async fn truncated_and_unknown_variant() {
        let buf = encode(&Msg::A {
            x: 1,
            s: "abc".into(),
        })
        .unwrap();
        let mut short = &buf[..buf.len() - 1];
        assert!(matches!(
            read_frame::<Msg, _>(&mut short).await,
            Err(FrameError::Truncated)
        ));
        let mut empty: &[u8] = &[];
        assert!(matches!(
            read_frame::<Msg, _>(&mut empty).await,
            Err(FrameError::Closed)
        ));
        // Variant index 9 does not exist.
        let mut bad: &[u8] = &[0, 0, 0, 1, 9];
        assert!(matches!(
            read_frame::<Msg, _>(&mut bad).await,
            Err(FrameError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn written_frames_read_back() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Msg::B(vec![1, 2, 3])).await.unwrap();
        write_frame(
            &mut buf,
            &Msg::A {
                x: 9,
                s: "z".into(),
            },
        )
        .await
        .unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame::<Msg, _>(&mut r).await.unwrap(),
            Msg::B(vec![1, 2, 3])
        );
        assert_eq!(
            read_frame::<Msg, _>(&mut r).await.unwrap(),
            Msg::A {
                x: 9,
                s: "z".into()
            }
        );
        assert!(matches!(
            read_frame::<Msg, _>(&mut r).await,
            Err(FrameError::Closed)
        ));
    }
}
