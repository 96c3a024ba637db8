//! A test hook that proves the gateway cannot read SSH sessions: with `EDGEPORT_SPLICE_DUMP=DIR`
//! set when the gateway starts, every byte it splices for a session is appended to
//! `DIR/SESSION.c2s` (client to device) and `DIR/SESSION.s2c` (device to client). The end-to-end
//! test then searches those files for the command and its output, and must not find them.
//! Never set it in production: it writes ciphertext only, but lots of it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The environment variable that turns the hook on.
pub const ENV: &str = "EDGEPORT_SPLICE_DUMP";

/// Reads the hook's directory from the environment, once, at start.
pub fn from_env() -> Option<PathBuf> {
    std::env::var_os(ENV).map(PathBuf::from)
}

/// A stream whose reads are also appended to a file (the direction this side sends).
pub struct Tapped<S> {
    inner: S,
    sink: Option<File>,
}

impl<S> Tapped<S> {
    /// Wraps `inner`; if the file cannot be made, logs it and relays without a copy.
    pub fn new(inner: S, dir: &Path, name: &str) -> Self {
        let path = dir.join(name);
        let sink = match File::options().create(true).append(true).open(&path) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("splice dump {}: {e}", path.display());
                None
            }
        };
        Self { inner, sink }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tapped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let fresh = &buf.filled()[before..];
            if let Some(f) = self.sink.as_mut() {
                if f.write_all(fresh).is_err() {
                    self.sink = None;
                }
            }
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tapped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
