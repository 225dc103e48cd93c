//! Container processes: the binary that stands in for an image, run in the pod's network
//! namespace and in a mount namespace of its own with the pod's volumes bind-mounted at their
//! `mountPath`s.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use anyhow::bail;
use tokio::process::{Child, Command};

use super::network;
use crate::child;

/// Everything needed to start one container process.
#[derive(Clone, Debug)]
pub(crate) struct Launch {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) mounts: Vec<Mount>,
    pub(crate) working_dir: Option<PathBuf>,
    /// The pod's network namespace; none for `hostNetwork` pods.
    pub(crate) network: Option<Arc<OwnedFd>>,
    /// stdout and stderr, appended across restarts.
    pub(crate) log_path: PathBuf,
}

/// A host directory or file made visible at `target` inside the container's mount namespace.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Mount {
    pub(crate) source: PathBuf,
    pub(crate) target: PathBuf,
    pub(crate) read_only: bool,
}

/// The binary an image stands for: the last segment of the repository path, without tag or
/// digest (`ghcr.io/atelier/atelier-inference:0.1.0` → `atelier-inference`).
pub(crate) fn image_binary_name(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last_segment = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last_segment.split(':').next().unwrap_or(last_segment)
}

/// The executable for a container and the arguments that precede `args`. Without `command`
/// that is the image's binary; with one, `command[0]` is looked up by file name in the bin dir
/// (the "image"), then as a host path or on the host's PATH (e.g. `/bin/sh`).
pub(crate) fn resolve_program(
    bin_dir: &Path,
    image_binary: &Path,
    command: &[String],
) -> anyhow::Result<(PathBuf, Vec<String>)> {
    let Some((first, rest)) = command.split_first() else {
        return Ok((image_binary.to_path_buf(), Vec::new()));
    };
    let file_name = Path::new(first).file_name().unwrap_or_default();
    let in_image = bin_dir.join(file_name);
    if in_image.is_file() {
        return Ok((in_image, rest.to_vec()));
    }
    if first.contains('/') {
        if Path::new(first).is_file() {
            return Ok((PathBuf::from(first), rest.to_vec()));
        }
    } else if let Some(found) = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(first))
        .find(|path| path.is_file())
    {
        return Ok((found, rest.to_vec()));
    }
    bail!(
        "executable {first:?} not found in {} nor on the host",
        bin_dir.display()
    )
}

/// Starts the process as the leader of a new process group, killed with the kubelet.
pub(crate) fn spawn(launch: &Launch) -> io::Result<Child> {
    create_mountpoints(&launch.mounts)?;
    if let Some(parent) = launch.log_path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&launch.log_path)?;
    let mut command = Command::new(&launch.program);
    command
        .args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(name, value)| (name, value)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(true);
    child::die_with_parent(command.as_std_mut(), libc::SIGKILL);
    let mut mounts = launch
        .mounts
        .iter()
        .map(|mount| {
            Ok(BindMount {
                source: c_path(&mount.source)?,
                source_fd_path: [0; FD_PATH_LEN],
                target: c_path(&mount.target)?,
                read_only: mount.read_only,
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    let working_dir = launch.working_dir.as_deref().map(c_path).transpose()?;
    // The closure owns a reference, so the descriptor stays open until the exec.
    let pod_network = launch.network.clone();
    // SAFETY: the closure only makes system calls on memory prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            if let Some(namespace) = &pod_network {
                network::join(namespace.as_raw_fd())?;
            }
            enter_container_view(&mut mounts, working_dir.as_ref())
        });
    }
    command.spawn()
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Mountpoints must exist before a bind mount; they are created on the host (outside any
/// volume), as a directory or an empty file to match the source.
fn create_mountpoints(mounts: &[Mount]) -> io::Result<()> {
    for mount in mounts {
        if mount.source.is_dir() {
            std::fs::create_dir_all(&mount.target)?;
        } else if !mount.target.exists() {
            if let Some(parent) = mount.target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::File::create(&mount.target)?;
        }
    }
    Ok(())
}

/// One volume to bind into the container, with the memory the forked child needs prepared
/// (it may not allocate).
struct BindMount {
    source: CString,
    /// `/proc/self/fd/<n>` of the descriptor the child opens `source` at, NUL-terminated.
    source_fd_path: [u8; FD_PATH_LEN],
    target: CString,
    read_only: bool,
}

const FD_PATH_LEN: usize = 32;

/// Writes `/proc/self/fd/<fd>` and a NUL into `buffer` without allocating.
fn write_fd_path(buffer: &mut [u8; FD_PATH_LEN], fd: libc::c_int) {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buffer[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let (mut n, mut count) = (fd.unsigned_abs(), 0);
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..count {
        buffer[PREFIX.len() + i] = digits[count - 1 - i];
    }
    buffer[PREFIX.len() + count] = 0;
}

/// Runs in the forked child before exec: a private mount namespace with the volumes bound in,
/// then the working directory (after the mounts, since it may lie inside one).
///
/// Every source is opened before the first mount and bound through its descriptor: an earlier
/// mount (an emptyDir at /tmp) may hide the host path of a later source (a volume the kubelet
/// keeps under $TMPDIR), as a real kubelet's /var/lib/kubelet never is. The descriptors are
/// opened after `unshare`, so that they refer to this namespace's mounts (a bind from another
/// mount namespace is refused).
fn enter_container_view(mounts: &mut [BindMount], working_dir: Option<&CString>) -> io::Result<()> {
    fn check(result: libc::c_int) -> io::Result<()> {
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
    let none = std::ptr::null::<libc::c_char>();
    if !mounts.is_empty() {
        // SAFETY: plain system calls with NUL-terminated strings that outlive them.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Keep our mounts from propagating back to the host's namespace.
            check(libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for mount in mounts.iter_mut() {
                let fd = libc::open(mount.source.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                write_fd_path(&mut mount.source_fd_path, fd);
            }
            for mount in mounts.iter() {
                check(libc::mount(
                    mount.source_fd_path.as_ptr().cast(),
                    mount.target.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                if mount.read_only {
                    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
                    check(libc::mount(
                        none,
                        mount.target.as_ptr(),
                        none,
                        flags,
                        std::ptr::null(),
                    ))?;
                }
            }
        }
    }
    if let Some(dir) = working_dir {
        // SAFETY: as above.
        check(unsafe { libc::chdir(dir.as_ptr()) })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_paths_are_written_without_allocating() {
        let mut buffer = [0xff; FD_PATH_LEN];
        for (fd, path) in [
            (0, "/proc/self/fd/0"),
            (7, "/proc/self/fd/7"),
            (1234, "/proc/self/fd/1234"),
        ] {
            write_fd_path(&mut buffer, fd);
            let written = std::ffi::CStr::from_bytes_until_nul(&buffer).unwrap();
            assert_eq!(written.to_str().unwrap(), path);
        }
    }

    #[test]
    fn image_names_map_to_binaries() {
        assert_eq!(
            image_binary_name("ghcr.io/atelier/atelier-inference:0.1.0"),
            "atelier-inference"
        );
        assert_eq!(
            image_binary_name("localhost:5000/test-http-server"),
            "test-http-server"
        );
        assert_eq!(
            image_binary_name("atelier-operator@sha256:abcd"),
            "atelier-operator"
        );
        assert_eq!(image_binary_name("registry:5000/a/b:tag@sha256:ff"), "b");
    }

    #[test]
    fn commands_resolve_in_the_bin_dir_then_on_the_host() {
        let bin_dir = tempfile::tempdir().unwrap();
        let image = bin_dir.path().join("server");
        std::fs::write(&image, "").unwrap();
        let (program, leading) = resolve_program(bin_dir.path(), &image, &[]).unwrap();
        assert_eq!((program, leading), (image.clone(), vec![]));
        let command = ["/usr/local/bin/server".to_string(), "serve".into()];
        let (program, leading) = resolve_program(bin_dir.path(), &image, &command).unwrap();
        assert_eq!((program, leading), (image, vec!["serve".to_string()]));
        let (program, _) = resolve_program(bin_dir.path(), Path::new("x"), &["sh".into()]).unwrap();
        assert!(program.ends_with("sh"));
        assert!(
            resolve_program(
                bin_dir.path(),
                Path::new("x"),
                &["/nonexistent/tool".into()]
            )
            .is_err()
        );
    }
}
