//! `tsh proxy ssh`'s data path: stdin -> stream and stream -> stdout, for OpenSSH's
//! ProxyCommand. Bulk transfers through a ProxyCommand are bound by the per-packet cost of
//! the extra hop (OpenSSH writes one 32 KiB packet per pipe write, on a machine whose cores
//! are busy with ciphers), so this path avoids every avoidable wake-up: pipes grown to
//! 1 MiB, stdin and stdout driven by the runtime's poller instead of helper threads when
//! they are pipes or sockets, and large buffers.
#![allow(unsafe_code)] // fcntl/read/write on the process's own stdin and stdout

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use edgeport_net::BoxedStream;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::term;

const BUF: usize = 256 * 1024;

/// A descriptor we borrow for the whole process (stdin/stdout): never closed here.
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Whether `fd` is a pipe or a socket (pollable), as opposed to a file or a terminal.
fn pollable(fd: RawFd) -> bool {
    // SAFETY: fstat writes one stat struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0
            && matches!(st.st_mode & libc::S_IFMT, libc::S_IFIFO | libc::S_IFSOCK)
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain flag manipulation on a descriptor that stays open.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// stdin or stdout registered with the runtime, if it can be.
fn async_fd(fd: RawFd) -> Option<AsyncFd<Fd>> {
    if !pollable(fd) || set_nonblocking(fd).is_err() {
        return None;
    }
    // SAFETY: stdin/stdout stay open for the life of the process, which outlives this.
    unsafe { AsyncFd::register(Fd(fd)).ok() }
}

async fn read_async(fd: &AsyncFd<Fd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|f| term::read_fd(f.get_ref().0, buf)) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

async fn write_async(fd: &AsyncFd<Fd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        let res = guard.try_io(|f| {
            // SAFETY: data is valid for data.len() bytes.
            let n = unsafe {
                libc::write(
                    f.get_ref().0,
                    data.as_ptr() as *const libc::c_void,
                    data.len(),
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match res {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// Copies until the stream ends (or stdout goes away).
pub async fn stdio(stream: BoxedStream) {
    term::grow_pipe(0);
    term::grow_pipe(1);
    let (mut rd, mut wr) = tokio::io::split(stream);
    let stdin = async_fd(0);
    let stdout = async_fd(1);

    let up = async {
        let mut buf = vec![0u8; BUF];
        match &stdin {
            Some(fd) => loop {
                match read_async(fd, &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if wr.write_all(&buf[..n]).await.is_err() || wr.flush().await.is_err() {
                            return;
                        }
                    }
                }
            },
            None => {
                // A file or a terminal: read it on a helper thread.
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; BUF];
                    while let Ok(n) = term::read_fd(0, &mut buf) {
                        if n == 0 || tx.blocking_send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                });
                while let Some(chunk) = rx.recv().await {
                    if wr.write_all(&chunk).await.is_err() || wr.flush().await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = wr.shutdown().await;
        // Keep going until the other direction ends.
        std::future::pending::<()>().await;
    };
    let down = async {
        let mut buf = vec![0u8; BUF];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let ok = match &stdout {
                        Some(fd) => write_async(fd, &buf[..n]).await.is_ok(),
                        None => term::write_fd(1, &buf[..n]).is_ok(),
                    };
                    if !ok {
                        return;
                    }
                }
            }
        }
    };
    let device_ended = {
        tokio::pin!(up);
        tokio::select! {
            _ = &mut up => false,
            _ = down => true,
        }
    };
    if device_ended {
        drop(stdout);
        linger(stdin.as_ref()).await;
    }
}

/// How long `tsh proxy ssh` waits for OpenSSH to go once the other end is gone.
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// The end of a ProxyCommand whose other end is gone (the device closed the session, or the
/// gateway refused the dial): closes our end of OpenSSH's stdout pipe, so that it reads
/// what it was sent (a refusal, a disconnect message) and then end of file, and keeps
/// reading its writes until it closes stdin (at most [`LINGER`]). Exiting at once would
/// make OpenSSH's next write fail with "Broken pipe" before it reads the server's last
/// words.
async fn linger(stdin: Option<&AsyncFd<Fd>>) {
    release_stdout();
    let Some(fd) = stdin else { return };
    let drain = async {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = read_async(fd, &mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// [`linger`] before `tsh proxy ssh` exits on an error of its own (a refused dial).
pub async fn linger_on_error() {
    let stdin = async_fd(0);
    linger(stdin.as_ref()).await;
}

/// Points fd 1 at /dev/null: the pipe to OpenSSH loses its last writer.
fn release_stdout() {
    // SAFETY: open/dup2/close on descriptors this process owns; fd 1 stays valid.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::close(null);
        }
    }
}
