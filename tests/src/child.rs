//! Child processes that never outlive the test process, and signals to process groups.

use std::io;

use libc::c_int;
use tokio::process::Command;

/// Makes the child receive `signal` when the thread that spawned it ends (PR_SET_PDEATHSIG),
/// which covers a panicking or killed test process. Spawn only from threads that live as long
/// as the child should: a runtime's worker thread or a dedicated thread, never a blocking-pool
/// thread, which tokio ends when it idles.
pub(crate) fn die_with_parent(command: &mut Command, signal: c_int) {
    // SAFETY: getpid before the fork; in the child only async-signal-safe calls (prctl,
    // getppid, _exit) run.
    let parent = unsafe { libc::getpid() };
    unsafe {
        command.pre_exec(move || {
            let unused: libc::c_ulong = 0;
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                signal as libc::c_ulong,
                unused,
                unused,
                unused,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl; then nobody would signal us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Sends `signal` to the process group led by `pid` (children are started as group leaders,
/// so shells and their children go too).
pub(crate) fn signal_group(pid: u32, signal: c_int) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(-pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `signal` to one process.
pub(crate) fn signal_process(pid: u32, signal: c_int) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether a process with this id exists (signal 0 checks without sending).
pub(crate) fn process_exists(pid: u32) -> bool {
    match signal_process(pid, 0) {
        Ok(()) => true,
        Err(error) => error.raw_os_error() == Some(libc::EPERM),
    }
}
