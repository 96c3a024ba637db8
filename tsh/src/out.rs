//! Command output on stdout that behaves like a Unix tool's when the reader goes away.
//!
//! `println!` panics when stdout is a pipe whose reader has exited (`tctl devices ls | head
//! -1`, `tsh ls | true`): Rust ignores SIGPIPE, so the write fails with EPIPE and `println!`
//! turns that into a panic and exit status 101. Every line of command output goes through
//! [`write_stdout`] (the [`outln!`](crate::outln) and [`out!`](crate::out) macros) instead:
//! a closed pipe ends the program at once, quietly, with **status 0** (the reader took what it
//! wanted; `set -o pipefail` scripts keep working, as with ripgrep). Any other write error
//! (a full disk, `>/dev/full`) is one line on stderr and status 1.

use std::io::{self, Write};

/// Writes formatted text to stdout; see the module documentation for what a failure does.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    let result = {
        let mut out = io::stdout().lock();
        out.write_fmt(args)
    };
    if let Err(e) = result {
        exit_on_write_error(&e);
    }
}

/// Writes bytes to stdout and flushes them (recordings, streamed text).
pub fn write_stdout_bytes(bytes: &[u8]) {
    let result = {
        let mut out = io::stdout().lock();
        out.write_all(bytes).and_then(|()| out.flush())
    };
    if let Err(e) = result {
        exit_on_write_error(&e);
    }
}

/// What a failed write to stdout means for the process: it ends.
fn exit_on_write_error(e: &io::Error) -> ! {
    if is_broken_pipe(e) {
        std::process::exit(0);
    }
    eprintln!("error: cannot write to standard output: {e}");
    std::process::exit(1)
}

/// Whether an error says the reading end of stdout is gone.
pub fn is_broken_pipe(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

/// `println!` for command output: a closed pipe is a quiet exit, not a panic.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::out::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for command output: a closed pipe is a quiet exit, not a panic.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write_stdout(format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_epipe_counts_as_a_closed_pipe() {
        assert!(is_broken_pipe(&io::Error::from_raw_os_error(libc::EPIPE)));
        assert!(!is_broken_pipe(&io::Error::from_raw_os_error(libc::ENOSPC)));
    }
}
