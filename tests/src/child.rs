//! Child processes that never outlive the test process, and signals to process groups.

use std::io;
use std::process::{ChildStdout, Command};
use std::sync::mpsc;
use std::thread::JoinHandle;

use libc::c_int;

/// Makes the child receive `signal` when the thread that spawned it ends (PR_SET_PDEATHSIG),
/// which covers a panicking or killed test process. Spawn only from threads that live as long
/// as the child should: a runtime's worker thread or a dedicated thread, never a blocking-pool
/// thread, which tokio ends when it idles.
pub(crate) fn die_with_parent(command: &mut Command, signal: c_int) {
    use std::os::unix::process::CommandExt;
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

/// A process a test starts (an operator, an API server): it ends when the value is dropped or
/// [`killed`](TestProcess::kill), and with the test process. Its parent is a thread of its own
/// that waits for the process, so the death signal does not fire when the test thread that
/// started it ends while other tests still use the process.
pub struct TestProcess {
    pid: u32,
    stop: Option<mpsc::Sender<()>>,
    parent: Option<JoinHandle<()>>,
}

impl TestProcess {
    /// Starts `command`; returns its stdout too when the command pipes it.
    pub fn spawn(mut command: Command) -> io::Result<(Self, Option<ChildStdout>)> {
        die_with_parent(&mut command, libc::SIGKILL);
        let (started, spawned) = mpsc::channel();
        let (stop, stopped) = mpsc::channel::<()>();
        let parent = std::thread::Builder::new()
            .name("atelier-test-process".into())
            .spawn(move || match command.spawn() {
                Ok(mut child) => {
                    let _ = started.send(Ok((child.id(), child.stdout.take())));
                    // Returns when told to stop or when the TestProcess is dropped.
                    let _ = stopped.recv();
                    let _ = child.kill();
                    let _ = child.wait();
                }
                Err(error) => {
                    let _ = started.send(Err(error));
                }
            })?;
        let (pid, stdout) = spawned
            .recv()
            .map_err(|_| io::Error::other("the process's parent thread died"))??;
        Ok((
            Self {
                pid,
                stop: Some(stop),
                parent: Some(parent),
            },
            stdout,
        ))
    }

    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Kills the process at once (SIGKILL), as a crash or a lost node would, and reaps it.
    pub fn kill(&mut self) {
        drop(self.stop.take());
        if let Some(parent) = self.parent.take() {
            let _ = parent.join();
        }
    }
}

impl Drop for TestProcess {
    fn drop(&mut self) {
        self.kill();
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
