//! Pseudo-terminals for interactive sessions: `openpty(3)` from libc (no extra crate), the
//! client's terminal modes applied to the slave, and an async, shareable master side.
#![allow(unsafe_code)] // termios and ioctl calls; each block says why it is sound

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use russh::Pty;
use tokio::io::unix::AsyncFd;

/// What the client asked for in its `pty-req`.
#[derive(Clone, Debug)]
pub struct PtyRequest {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
    pub px_width: u32,
    pub px_height: u32,
    pub modes: Vec<(Pty, u32)>,
}

fn winsize(cols: u32, rows: u32, px: u32, py: u32) -> libc::winsize {
    let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
    libc::winsize {
        ws_row: clamp(rows),
        ws_col: clamp(cols),
        ws_xpixel: clamp(px),
        ws_ypixel: clamp(py),
    }
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no pointers involved.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a pty pair sized and moded as requested: (master, slave). Both are close-on-exec;
/// the slave reaches the child through stdio duplication, which clears the flag.
pub fn open(req: &PtyRequest) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let ws = winsize(req.cols, req.rows, req.px_width, req.px_height);
    // SAFETY: openpty writes two descriptors into the provided ints; the name and termios
    // pointers may be null; `ws` lives across the call.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded, so both are fresh descriptors owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    set_cloexec(master.as_raw_fd())?;
    set_cloexec(slave.as_raw_fd())?;
    apply_modes(slave.as_raw_fd(), &req.modes);
    Ok((master, slave))
}

/// Opens a terminal as asked, for a session: its master side, shareable between the
/// session's tasks, and the slave for the program.
pub fn open_shared(req: &PtyRequest) -> io::Result<(Arc<PtyMaster>, OwnedFd)> {
    let (master, slave) = open(req)?;
    Ok((Arc::new(PtyMaster::new(master)?), slave))
}

/// Applies the RFC 4254 terminal modes we understand; unknown ones are ignored, as sshd does.
fn apply_modes(fd: RawFd, modes: &[(Pty, u32)]) {
    if modes.is_empty() {
        return;
    }
    // SAFETY: zeroed termios is a valid value for tcgetattr to overwrite.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a valid terminal descriptor and `t` a valid out-pointer.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return;
    }
    for (mode, value) in modes {
        let v = *value;
        let cc = |t: &mut libc::termios, idx: usize| t.c_cc[idx] = v as libc::cc_t;
        let flag = |field: &mut libc::tcflag_t, bit: libc::tcflag_t| {
            if v != 0 {
                *field |= bit
            } else {
                *field &= !bit
            }
        };
        match mode {
            Pty::VINTR => cc(&mut t, libc::VINTR),
            Pty::VQUIT => cc(&mut t, libc::VQUIT),
            Pty::VERASE => cc(&mut t, libc::VERASE),
            Pty::VKILL => cc(&mut t, libc::VKILL),
            Pty::VEOF => cc(&mut t, libc::VEOF),
            Pty::VEOL => cc(&mut t, libc::VEOL),
            Pty::VEOL2 => cc(&mut t, libc::VEOL2),
            Pty::VSTART => cc(&mut t, libc::VSTART),
            Pty::VSTOP => cc(&mut t, libc::VSTOP),
            Pty::VSUSP => cc(&mut t, libc::VSUSP),
            Pty::VREPRINT => cc(&mut t, libc::VREPRINT),
            Pty::VWERASE => cc(&mut t, libc::VWERASE),
            Pty::VLNEXT => cc(&mut t, libc::VLNEXT),
            Pty::VDISCARD => cc(&mut t, libc::VDISCARD),
            Pty::IGNPAR => flag(&mut t.c_iflag, libc::IGNPAR),
            Pty::PARMRK => flag(&mut t.c_iflag, libc::PARMRK),
            Pty::INPCK => flag(&mut t.c_iflag, libc::INPCK),
            Pty::ISTRIP => flag(&mut t.c_iflag, libc::ISTRIP),
            Pty::INLCR => flag(&mut t.c_iflag, libc::INLCR),
            Pty::IGNCR => flag(&mut t.c_iflag, libc::IGNCR),
            Pty::ICRNL => flag(&mut t.c_iflag, libc::ICRNL),
            Pty::IXON => flag(&mut t.c_iflag, libc::IXON),
            Pty::IXANY => flag(&mut t.c_iflag, libc::IXANY),
            Pty::IXOFF => flag(&mut t.c_iflag, libc::IXOFF),
            Pty::IMAXBEL => flag(&mut t.c_iflag, libc::IMAXBEL),
            Pty::IUTF8 => flag(&mut t.c_iflag, libc::IUTF8),
            Pty::ISIG => flag(&mut t.c_lflag, libc::ISIG),
            Pty::ICANON => flag(&mut t.c_lflag, libc::ICANON),
            Pty::ECHO => flag(&mut t.c_lflag, libc::ECHO),
            Pty::ECHOE => flag(&mut t.c_lflag, libc::ECHOE),
            Pty::ECHOK => flag(&mut t.c_lflag, libc::ECHOK),
            Pty::ECHONL => flag(&mut t.c_lflag, libc::ECHONL),
            Pty::NOFLSH => flag(&mut t.c_lflag, libc::NOFLSH),
            Pty::TOSTOP => flag(&mut t.c_lflag, libc::TOSTOP),
            Pty::IEXTEN => flag(&mut t.c_lflag, libc::IEXTEN),
            Pty::ECHOCTL => flag(&mut t.c_lflag, libc::ECHOCTL),
            Pty::ECHOKE => flag(&mut t.c_lflag, libc::ECHOKE),
            Pty::PENDIN => flag(&mut t.c_lflag, libc::PENDIN),
            Pty::OPOST => flag(&mut t.c_oflag, libc::OPOST),
            Pty::ONLCR => flag(&mut t.c_oflag, libc::ONLCR),
            Pty::OCRNL => flag(&mut t.c_oflag, libc::OCRNL),
            Pty::ONOCR => flag(&mut t.c_oflag, libc::ONOCR),
            Pty::ONLRET => flag(&mut t.c_oflag, libc::ONLRET),
            Pty::CS7 if v != 0 => t.c_cflag = (t.c_cflag & !libc::CSIZE) | libc::CS7,
            Pty::CS8 if v != 0 => t.c_cflag = (t.c_cflag & !libc::CSIZE) | libc::CS8,
            Pty::PARENB => flag(&mut t.c_cflag, libc::PARENB),
            Pty::PARODD => flag(&mut t.c_cflag, libc::PARODD),
            _ => {}
        }
    }
    // SAFETY: fd is a valid terminal descriptor and `t` a fully initialised termios.
    unsafe {
        libc::tcsetattr(fd, libc::TCSANOW, &t);
    }
}

/// The master side of a pty, readable and writable from several tasks at once.
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    pub fn new(master: OwnedFd) -> io::Result<Self> {
        let raw = master.as_raw_fd();
        // SAFETY: plain fcntl flag manipulation on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(raw, libc::F_GETFL);
            if flags < 0 || libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: `master` is an OwnedFd, so the descriptor stays open and is not reused
        // for as long as the AsyncFd (which owns it) lives.
        let fd = unsafe { AsyncFd::register(master)? };
        Ok(Self { fd })
    }

    /// Reads output. `Ok(0)` once every slave descriptor is closed (Linux reports EIO then).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|fd| {
                // SAFETY: buf is valid for buf.len() bytes of writes.
                let n = unsafe {
                    libc::read(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data` (the terminal's input).
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            let res = guard.try_io(|fd| {
                // SAFETY: data is valid for data.len() bytes of reads.
                let n = unsafe {
                    libc::write(
                        fd.as_raw_fd(),
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
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Tells the terminal (and so its foreground processes, by SIGWINCH) its new size.
    pub fn resize(&self, cols: u32, rows: u32, px: u32, py: u32) -> io::Result<()> {
        let ws = winsize(cols, rows, px, py);
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
        let r = unsafe { libc::ioctl(self.fd.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The terminal's foreground process group, where signals from the client go.
    pub fn foreground_group(&self) -> Option<i32> {
        // SAFETY: tcgetpgrp takes a descriptor and returns a pid or -1.
        let pg = unsafe { libc::tcgetpgrp(self.fd.as_fd().as_raw_fd()) };
        (pg > 0).then_some(pg)
    }
}
