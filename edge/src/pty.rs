//! Pseudo-terminals (openpty(3)) for `kubectl exec -t` and for process-runtime containers with
//! `tty: true`: the master stays with edgecore (output, input, window size), the slave becomes
//! the process's stdin, stdout and stderr and its controlling terminal.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;

/// A pseudo-terminal pair: `(master, slave)`.
///
/// # Errors
/// The system has no pseudo-terminal left (`ENOENT`, `EMFILE`, …).
pub fn open() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut master = -1;
    let mut slave = -1;
    // SAFETY: openpty writes two descriptors it opened into the pointers given.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) })
}

/// Sets the terminal's window size in columns and rows (`TIOCSWINSZ`; the foreground process
/// group gets `SIGWINCH`), as a remote-command resize message asks.
pub fn set_window(master: &impl AsRawFd, width: u16, height: u16) {
    let size = libc::winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer; the descriptor is a pty master.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
}

/// The slave as the three standard streams of a command: `(stdin, stdout, stderr)`.
///
/// # Errors
/// `dup` failed (out of descriptors).
pub fn stdio(slave: &OwnedFd) -> std::io::Result<(Stdio, Stdio, Stdio)> {
    let dup = || slave.try_clone().map(Stdio::from);
    Ok((dup()?, dup()?, dup()?))
}

/// Makes the spawned process a session leader whose controlling terminal is its stdin (the
/// slave), dying with edgecore. For `pre_exec`: only async-signal-safe calls.
///
/// # Errors
/// `setsid` or `TIOCSCTTY` failed; the spawn then fails with that error.
pub fn become_session_leader() -> std::io::Result<()> {
    // SAFETY: setsid, ioctl and prctl are async-signal-safe and touch no Rust state.
    unsafe {
        if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    Ok(())
}
