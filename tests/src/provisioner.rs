//! A local volume provisioner: PersistentVolumes backed by directories for the claims of
//! StorageClasses whose provisioner is [`PROVISIONER_NAME`] (the default class `local`
//! among them). The real PV controller binds claim and volume; this deletes a released
//! volume's directory when its reclaim policy says Delete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeSpec,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

pub const PROVISIONER_NAME: &str = "atelier.dev/local";
pub const STORAGE_CLASS: &str = "local";
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// Creates (or updates) the default StorageClass `local`: Immediate binding, Delete reclaim.
pub async fn ensure_storage_class(client: &Client) -> anyhow::Result<()> {
    let class = StorageClass {
        metadata: ObjectMeta {
            name: Some(STORAGE_CLASS.into()),
            annotations: Some(BTreeMap::from([(
                "storageclass.kubernetes.io/is-default-class".to_string(),
                "true".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        provisioner: PROVISIONER_NAME.into(),
        reclaim_policy: Some("Delete".into()),
        volume_binding_mode: Some("Immediate".into()),
        ..StorageClass::default()
    };
    Api::<StorageClass>::all(client.clone())
        .patch(
            STORAGE_CLASS,
            &PatchParams::apply("atelier-provisioner").force(),
            &Patch::Apply(&class),
        )
        .await
        .context("creating the local StorageClass")?;
    Ok(())
}

/// The directory on this machine that holds the data of `claim` in `namespace`: the local path
/// of the PersistentVolume bound to it.
pub async fn claim_dir(client: &Client, namespace: &str, claim: &str) -> anyhow::Result<PathBuf> {
    let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
        .get(claim)
        .await?;
    let volume_name = claim
        .spec
        .and_then(|s| s.volume_name)
        .context("the claim is not bound")?;
    let spec = Api::<PersistentVolume>::all(client.clone())
        .get(&volume_name)
        .await?
        .spec
        .context("PersistentVolume without spec")?;
    spec.host_path
        .map(|h| h.path)
        .or(spec.local.map(|l| l.path))
        .map(PathBuf::from)
        .context("PersistentVolume without a local path")
}

/// Provisions and reclaims volumes under `root` until the watch ends (it retries errors).
pub async fn run(client: Client, root: PathBuf) {
    let claims = watcher(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .applied_objects()
    .for_each(|claim| {
        let client = client.clone();
        let root = root.clone();
        async move {
            if let Ok(claim) = claim
                && let Err(error) = provision(&client, &root, &claim).await
            {
                tracing::warn!(
                    "provisioning for claim {}/{}: {error:#}",
                    claim.namespace().unwrap_or_default(),
                    claim.name_any()
                );
            }
        }
    });
    let volumes = watcher(
        Api::<PersistentVolume>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .applied_objects()
    .for_each(|volume| {
        let client = client.clone();
        let root = root.clone();
        async move {
            if let Ok(volume) = volume
                && let Err(error) = reclaim(&client, &root, &volume).await
            {
                tracing::warn!("reclaiming volume {}: {error:#}", volume.name_any());
            }
        }
    });
    futures::join!(claims, volumes);
}

/// Creates the directory and a PV pre-bound to the claim, if the claim is pending and of one
/// of our classes.
async fn provision(
    client: &Client,
    root: &Path,
    claim: &PersistentVolumeClaim,
) -> anyhow::Result<()> {
    let spec = claim.spec.clone().unwrap_or_default();
    let pending = claim
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        == Some("Pending");
    let class_name = spec
        .storage_class_name
        .as_deref()
        .filter(|name| !name.is_empty());
    let (Some(class_name), true, None) = (class_name, pending, spec.volume_name.as_deref()) else {
        return Ok(());
    };
    let Some(class) = Api::<StorageClass>::all(client.clone())
        .get_opt(class_name)
        .await?
    else {
        return Ok(());
    };
    let waits_for_consumer = class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
    if class.provisioner != PROVISIONER_NAME
        || (waits_for_consumer && !claim.annotations().contains_key(SELECTED_NODE))
    {
        return Ok(());
    }
    let uid = claim.uid().unwrap_or_default();
    let name = format!("pvc-{uid}");
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    if volumes.get_opt(&name).await?.is_some() {
        return Ok(());
    }
    let namespace = claim.namespace().unwrap_or_default();
    let dir = root.join(format!("{namespace}_{}_{uid}", claim.name_any()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let size = spec
        .resources
        .and_then(|resources| resources.requests)
        .and_then(|requests| requests.get("storage").cloned())
        .unwrap_or_else(|| Quantity("1Gi".into()));
    let volume = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            annotations: Some(BTreeMap::from([(
                PROVISIONED_BY.to_string(),
                PROVISIONER_NAME.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([("storage".to_string(), size)])),
            access_modes: spec.access_modes.or(Some(vec!["ReadWriteOnce".into()])),
            volume_mode: spec.volume_mode,
            storage_class_name: Some(class_name.to_string()),
            persistent_volume_reclaim_policy: Some(
                class.reclaim_policy.unwrap_or_else(|| "Delete".into()),
            ),
            host_path: Some(HostPathVolumeSource {
                path: dir.to_string_lossy().into_owned(),
                type_: Some("Directory".into()),
            }),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(namespace),
                name: Some(claim.name_any()),
                uid: Some(uid),
                ..ObjectReference::default()
            }),
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    };
    match volumes.create(&PostParams::default(), &volume).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(error) => Err(error).with_context(|| format!("creating PersistentVolume {name}")),
    }
}

/// Removes a released volume of ours whose reclaim policy is Delete: its directory (only
/// inside `root`), then the object.
async fn reclaim(client: &Client, root: &Path, volume: &PersistentVolume) -> anyhow::Result<()> {
    let ours =
        volume.annotations().get(PROVISIONED_BY).map(String::as_str) == Some(PROVISIONER_NAME);
    let released = volume
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        == Some("Released");
    let spec = volume.spec.clone().unwrap_or_default();
    let deletes = spec.persistent_volume_reclaim_policy.as_deref() == Some("Delete");
    if !(ours && released && deletes) || volume.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    if let Some(path) = spec.host_path.map(|source| PathBuf::from(source.path))
        && path.starts_with(root)
        && path.exists()
    {
        std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    match Api::<PersistentVolume>::all(client.clone())
        .delete(&volume.name_any(), &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error.into()),
    }
}
