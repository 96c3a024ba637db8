//! The local terminal: is it one, how big is it, and raw mode for interactive sessions
//! (restored on drop, so an error never leaves the user's shell in raw mode).
#![allow(unsafe_code)] // termios/ioctl on the process's own descriptors

use std::io::Write;

/// Whether `fd` is a terminal.
pub fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty takes any integer and returns 0/1.
    unsafe { libc::isatty(fd) == 1 }
}

/// (cols, rows, px_width, px_height) of the terminal on `fd`, if it is one.
pub fn size(fd: i32) -> Option<(u32, u32, u32, u32)> {
    // SAFETY: zeroed winsize is valid; TIOCGWINSZ writes one winsize.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0).then_some((
        ws.ws_col as u32,
        ws.ws_row as u32,
        ws.ws_xpixel as u32,
        ws.ws_ypixel as u32,
    ))
}

/// Puts a terminal in raw mode until dropped.
pub struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    pub fn enter(fd: i32) -> std::io::Result<Self> {
        // SAFETY: zeroed termios is valid for tcgetattr to fill.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let saved = t;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut t) };
        if unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, &t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `enter` on the same descriptor.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSADRAIN, &self.saved);
        }
    }
}

/// Reads one line from the terminal without echo (password prompts).
pub fn read_secret(prompt: &str) -> std::io::Result<String> {
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|_| {
            std::io::Error::other("no terminal to ask for the password on: use --password-stdin")
        })?;
    use std::os::fd::AsRawFd;
    let fd = tty.as_raw_fd();
    let mut w = &tty;
    w.write_all(prompt.as_bytes())?;
    w.flush()?;
    // SAFETY: as in RawMode, on the tty we just opened.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    let have = unsafe { libc::tcgetattr(fd, &mut t) } == 0;
    let saved = t;
    if have {
        t.c_lflag &= !libc::ECHO;
        t.c_lflag |= libc::ECHONL;
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
    }
    let mut line = String::new();
    let res = std::io::BufRead::read_line(&mut std::io::BufReader::new(&tty), &mut line);
    if have {
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    }
    res?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// Writes all of `data` to a raw descriptor (stdout/stderr) without Rust's line buffering,
/// retrying on EINTR/EAGAIN.
pub fn write_fd(fd: i32, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        // SAFETY: data is valid for data.len() bytes.
        let n = unsafe { libc::write(fd, data.as_ptr() as *const libc::c_void, data.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 1000) };
                    continue;
                }
                _ => return Err(e),
            }
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// Reads from a raw descriptor (stdin) into `buf`, retrying on EINTR.
pub fn read_fd(fd: i32, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: buf is valid for buf.len() bytes of writes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Grows the pipe on `fd` (if it is one) to 1 MiB. A ProxyCommand talks to OpenSSH through
/// pipes whose default 64 KiB capacity forces a wake-up and a context switch every 32 KiB
/// packet; a larger pipe lets both sides move bulk data in large batches.
pub fn grow_pipe(fd: i32) {
    // SAFETY: fstat writes one stat struct; fcntl(F_SETPIPE_SZ) takes an int.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFIFO {
            libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20);
        }
    }
}
