//! Pod volumes as host directories, and the container mounts that bind them in.
//!
//! emptyDir → a directory of the pod; persistentVolumeClaim → the bound PV's `hostPath` or
//! `local` path; hostPath as is; configMap, secret, downwardAPI and projected volumes → files
//! written once at pod start (later changes of their sources are not propagated).

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use k8s_openapi::api::core::v1::{
    Container, DownwardAPIVolumeFile, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod,
    Volume,
};
use kube::{Api, Client, ResourceExt};

use super::env::{References, field_value};
use super::identity::request_token;
use super::process::Mount;

/// Resolves every volume of the pod to a host path, writing file-backed volumes under
/// `pod_dir/volumes`.
pub(crate) async fn prepare(
    client: &Client,
    pod: &Pod,
    pod_ip: &str,
    pod_dir: &Path,
) -> anyhow::Result<HashMap<String, PathBuf>> {
    let namespace = pod.namespace().unwrap_or_default();
    let references = References::new(client, &namespace);
    let mut paths = HashMap::new();
    for volume in pod
        .spec
        .iter()
        .flat_map(|spec| spec.volumes.iter().flatten())
    {
        let dir = pod_dir.join("volumes").join(&volume.name);
        let path = prepare_volume(client, &references, pod, pod_ip, volume, &dir)
            .await
            .with_context(|| format!("volume {:?}", volume.name))?;
        paths.insert(volume.name.clone(), path);
    }
    Ok(paths)
}

async fn prepare_volume(
    client: &Client,
    references: &References,
    pod: &Pod,
    pod_ip: &str,
    volume: &Volume,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    if volume.empty_dir.is_some() {
        std::fs::create_dir_all(dir)?;
        return Ok(dir.to_path_buf());
    }
    if let Some(host_path) = &volume.host_path {
        let path = PathBuf::from(&host_path.path);
        if matches!(host_path.type_.as_deref(), Some("DirectoryOrCreate")) {
            std::fs::create_dir_all(&path)?;
        }
        return Ok(path);
    }
    if let Some(claim) = &volume.persistent_volume_claim {
        return claim_path(
            client,
            &pod.namespace().unwrap_or_default(),
            &claim.claim_name,
        )
        .await;
    }
    // The remaining kinds are files written into a fresh directory.
    let mut files = BTreeMap::new();
    if let Some(source) = &volume.config_map {
        let data = references.config_map(&source.name).await?;
        add_keys(
            &mut files,
            data,
            source.items.as_deref(),
            &source.name,
            source.optional,
        )?;
    } else if let Some(source) = &volume.secret {
        let name = source.secret_name.clone().unwrap_or_default();
        let data = references.secret(&name).await?;
        add_keys(
            &mut files,
            data,
            source.items.as_deref(),
            &name,
            source.optional,
        )?;
    } else if let Some(source) = &volume.downward_api {
        add_downward_api(&mut files, pod, pod_ip, source.items.as_deref())?;
    } else if let Some(projected) = &volume.projected {
        for source in projected.sources.iter().flatten() {
            if let Some(token) = &source.service_account_token {
                let audiences = token.audience.iter().cloned().collect();
                let value = request_token(client, pod, audiences, token.expiration_seconds).await?;
                files.insert(token.path.clone(), value.into_bytes());
            } else if let Some(config_map) = &source.config_map {
                let data = references.config_map(&config_map.name).await?;
                add_keys(
                    &mut files,
                    data,
                    config_map.items.as_deref(),
                    &config_map.name,
                    config_map.optional,
                )?;
            } else if let Some(secret) = &source.secret {
                let data = references.secret(&secret.name).await?;
                add_keys(
                    &mut files,
                    data,
                    secret.items.as_deref(),
                    &secret.name,
                    secret.optional,
                )?;
            } else if let Some(downward_api) = &source.downward_api {
                add_downward_api(&mut files, pod, pod_ip, downward_api.items.as_deref())?;
            } else {
                bail!("unsupported projected volume source");
            }
        }
    } else {
        bail!(
            "unsupported volume type (supported: emptyDir, hostPath, persistentVolumeClaim, configMap, secret, downwardAPI, projected)"
        );
    }
    write_files(dir, &files)?;
    Ok(dir.to_path_buf())
}

/// The directory of the PV bound to the claim; an error while it is not bound yet.
async fn claim_path(client: &Client, namespace: &str, claim_name: &str) -> anyhow::Result<PathBuf> {
    let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
        .get(claim_name)
        .await
        .with_context(|| format!("reading PersistentVolumeClaim {namespace}/{claim_name}"))?;
    let phase = claim
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref());
    let volume_name = claim
        .spec
        .as_ref()
        .and_then(|spec| spec.volume_name.as_deref());
    let (Some("Bound"), Some(volume_name)) = (phase, volume_name) else {
        bail!("PersistentVolumeClaim {namespace}/{claim_name} is not bound yet");
    };
    let volume = Api::<PersistentVolume>::all(client.clone())
        .get(volume_name)
        .await
        .with_context(|| format!("reading PersistentVolume {volume_name}"))?;
    let spec = volume.spec.unwrap_or_default();
    spec.host_path
        .map(|source| source.path)
        .or(spec.local.map(|source| source.path))
        .map(PathBuf::from)
        .ok_or_else(|| {
            anyhow!("PersistentVolume {volume_name} has neither hostPath nor local path")
        })
}

/// Adds a Secret's or ConfigMap's keys as files: all of them, or the listed `items`.
fn add_keys(
    files: &mut BTreeMap<String, Vec<u8>>,
    data: Option<BTreeMap<String, Vec<u8>>>,
    items: Option<&[KeyToPath]>,
    name: &str,
    optional: Option<bool>,
) -> anyhow::Result<()> {
    let Some(mut data) = data else {
        return if optional == Some(true) {
            Ok(())
        } else {
            Err(anyhow!("{name:?} not found"))
        };
    };
    match items {
        None => files.extend(data),
        Some(items) => {
            for item in items {
                match data.remove(&item.key) {
                    Some(value) => {
                        files.insert(item.path.clone(), value);
                    }
                    None if optional == Some(true) => {}
                    None => bail!("key {:?} not found in {name:?}", item.key),
                }
            }
        }
    }
    Ok(())
}

fn add_downward_api(
    files: &mut BTreeMap<String, Vec<u8>>,
    pod: &Pod,
    pod_ip: &str,
    items: Option<&[DownwardAPIVolumeFile]>,
) -> anyhow::Result<()> {
    for item in items.unwrap_or_default() {
        let field = item
            .field_ref
            .as_ref()
            .ok_or_else(|| anyhow!("downwardAPI {:?}: only fieldRef is supported", item.path))?;
        files.insert(
            item.path.clone(),
            field_value(pod, &field.field_path, pod_ip)?.into_bytes(),
        );
    }
    Ok(())
}

/// Replaces `dir`'s content with `files` (relative paths, which must stay inside `dir`).
fn write_files(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    for (relative, content) in files {
        let relative = Path::new(relative);
        if !relative
            .components()
            .all(|component| matches!(component, Component::Normal(_)))
        {
            bail!("file path {relative:?} must be relative and stay inside the volume");
        }
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, content)?;
    }
    Ok(())
}

/// The container's `volumeMounts` as bind mounts (with `subPath` inside the volume).
pub(crate) fn container_mounts(
    container: &Container,
    volumes: &HashMap<String, PathBuf>,
) -> anyhow::Result<Vec<Mount>> {
    let mut mounts = Vec::new();
    for volume_mount in container.volume_mounts.iter().flatten() {
        let volume = volumes.get(&volume_mount.name).ok_or_else(|| {
            anyhow!(
                "volumeMount {:?} names no volume of the pod",
                volume_mount.name
            )
        })?;
        let source = match volume_mount
            .sub_path
            .as_deref()
            .filter(|sub_path| !sub_path.is_empty())
        {
            Some(sub_path) => {
                let source = volume.join(sub_path);
                if !source.exists() {
                    std::fs::create_dir_all(&source)?;
                }
                source
            }
            None => volume.clone(),
        };
        mounts.push(Mount {
            source,
            target: PathBuf::from(&volume_mount.mount_path),
            read_only: volume_mount.read_only == Some(true),
        });
    }
    // Parents before children, so nested mounts land on top.
    mounts.sort_by_key(|mount| mount.target.components().count());
    Ok(mounts)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::VolumeMount;

    use super::*;

    #[test]
    fn files_are_written_and_must_stay_inside_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("v");
        let files = BTreeMap::from([
            ("a".to_string(), b"1".to_vec()),
            ("sub/b".to_string(), b"2".to_vec()),
        ]);
        write_files(&volume, &files).unwrap();
        assert_eq!(std::fs::read(volume.join("sub/b")).unwrap(), b"2");
        let escaping = BTreeMap::from([("../x".to_string(), Vec::new())]);
        assert!(write_files(&volume, &escaping).is_err());
    }

    #[test]
    fn selected_keys_and_optional_sources() {
        let mut files = BTreeMap::new();
        let data = BTreeMap::from([
            ("k".to_string(), b"v".to_vec()),
            ("other".to_string(), Vec::new()),
        ]);
        let items = [KeyToPath {
            key: "k".into(),
            path: "renamed".into(),
            mode: None,
        }];
        add_keys(&mut files, Some(data), Some(&items), "cm", None).unwrap();
        assert_eq!(
            files,
            BTreeMap::from([("renamed".to_string(), b"v".to_vec())])
        );
        assert!(add_keys(&mut files, None, None, "missing", Some(true)).is_ok());
        assert!(add_keys(&mut files, None, None, "missing", None).is_err());
    }

    #[test]
    fn mounts_follow_volume_mounts_parents_first() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = HashMap::from([("data".to_string(), dir.path().to_path_buf())]);
        let container = Container {
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "data".into(),
                    mount_path: "/data/inner".into(),
                    sub_path: Some("x".into()),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
                VolumeMount {
                    name: "data".into(),
                    mount_path: "/data".into(),
                    ..VolumeMount::default()
                },
            ]),
            ..Container::default()
        };
        let mounts = container_mounts(&container, &volumes).unwrap();
        assert_eq!(mounts[0].target, Path::new("/data"));
        assert!(!mounts[0].read_only);
        assert_eq!(mounts[1].source, dir.path().join("x"));
        assert!(mounts[1].read_only);
        assert!(dir.path().join("x").is_dir());
    }
}
