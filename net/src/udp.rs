//! UDP sockets for QUIC with kernel buffers big enough for bulk transfers.
//!
//! Linux gives a UDP socket about 208 KiB of receive buffer by default. A QUIC receiver
//! that is busy decrypting for a moment (an agent in the middle of an SSH session, a
//! gateway serving thousands of tunnels on its one socket) overflows that at a few hundred
//! MiB/s; the kernel drops datagrams (`RcvbufErrors` in /proc/net/snmp), the sender's
//! congestion controller halves its rate, and quinn's MTU discovery takes the losses for a
//! black hole and falls back to 1200-byte packets for good. Asking for several MiB, as
//! other QUIC stacks do, avoids all three.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

/// Buffer size asked for in each direction.
pub const BUFFER_BYTES: usize = 8 << 20;

/// Binds a UDP socket and enlarges its kernel buffers. Privileged processes (agents run as
/// root on devices) get [`BUFFER_BYTES`] regardless of `net.core.rmem_max`; others get as
/// much as that limit allows. Failing to enlarge is not an error: the socket still works.
pub fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    enlarge_buffers(&socket);
    Ok(socket)
}

/// Enlarges both kernel buffers of `socket` as far as allowed; returns the receive buffer
/// the kernel granted (bytes it accounts for, which is twice what was asked on Linux).
pub fn enlarge_buffers(socket: &UdpSocket) -> usize {
    let fd = socket.as_raw_fd();
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if set_int(fd, force, BUFFER_BYTES).is_err() {
            let _ = set_int(fd, plain, BUFFER_BYTES);
        }
    }
    get_int(fd, libc::SO_RCVBUF).unwrap_or(0)
}

#[allow(unsafe_code)]
fn set_int(fd: libc::c_int, opt: libc::c_int, value: usize) -> std::io::Result<()> {
    let v = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is an open socket owned by the caller for the duration of the call, and
    // the option value points at a live c_int of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[allow(unsafe_code)]
fn get_int(fd: libc::c_int, opt: libc::c_int) -> std::io::Result<usize> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as in `set_int`; `v` and `len` are live for the call and sized as declared.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(usize::try_from(v).unwrap_or(0))
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running_as_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .map(|v| v.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false)
    }

    #[test]
    fn buffers_grow_beyond_the_default() {
        let s = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        // Untouched, the kernel reports its default (212,992 on Debian). Asking for more
        // gets at least rmem_max doubled (the kernel accounts twice what was granted), so
        // the reported size is above the default even without privilege; root gets
        // BUFFER_BYTES doubled.
        let untouched = UdpSocket::bind("127.0.0.1:0").unwrap();
        let default = get_int(untouched.as_raw_fd(), libc::SO_RCVBUF).unwrap();
        let got = get_int(s.as_raw_fd(), libc::SO_RCVBUF).unwrap();
        assert!(got > default, "receive buffer {got}, default {default}");
        if running_as_root() {
            assert!(got >= 2 * BUFFER_BYTES, "root got {got}");
        }
        s.send_to(b"x", s.local_addr().unwrap()).unwrap();
        let mut b = [0u8; 4];
        assert_eq!(s.recv(&mut b).unwrap(), 1);
    }
}
