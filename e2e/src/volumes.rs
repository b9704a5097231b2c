//! The local e2e cluster's volume provisioner (`rlt-e2e-volumes`), working as the external
//! provisioners of real clusters do: it installs a default StorageClass that binds when the
//! first consumer is scheduled (`WaitForFirstConsumer`, as kind's local-path class and the
//! clouds' default classes do), and gives each claim the PV controller hands to it (the
//! `volume.kubernetes.io/storage-provisioner` annotation, set once the scheduler has picked a
//! node) a hostPath PersistentVolume under `<dir>/<pv>`, pre-bound to it (claimRef), which the
//! PV controller then binds. So a pod waits in the scheduler's binding step for its volume,
//! with no `FailedScheduling` on the way. The folder is world-writable, as kind's local-path
//! provisioner makes its folders: the kubelet applies no `fsGroup` to hostPath volumes, so
//! the stage pods (non-root) could not write a root-owned one. Volumes it made that are
//! released are deleted with their folder.
use std::path::{Path, PathBuf};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeSpec,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use std::collections::BTreeMap;

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn is_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists")
}

pub const LABEL: &str = "rlt.dev/e2e-provisioner";
/// The provisioner's name, as its StorageClass names it and the PV controller hands claims to it.
pub const PROVISIONER: &str = "rlt.dev/e2e-volumes";
/// The cluster's default StorageClass.
pub const CLASS: &str = "rlt-e2e-local";
const HANDED_TO: &str = "volume.kubernetes.io/storage-provisioner";

/// The default class: binding waits for the first consumer's node, as on kind and the clouds.
pub fn storage_class() -> StorageClass {
    StorageClass {
        metadata: ObjectMeta {
            name: Some(CLASS.into()),
            annotations: Some(BTreeMap::from([(
                "storageclass.kubernetes.io/is-default-class".to_string(),
                "true".to_string(),
            )])),
            ..Default::default()
        },
        provisioner: PROVISIONER.into(),
        reclaim_policy: Some("Delete".into()),
        volume_binding_mode: Some("WaitForFirstConsumer".into()),
        ..Default::default()
    }
}

pub fn pv_name(pvc: &PersistentVolumeClaim) -> String {
    format!("pvc-{}", pvc.metadata.uid.as_deref().unwrap_or_default())
}

fn wants_volume(pvc: &PersistentVolumeClaim) -> bool {
    let phase = pvc.status.as_ref().and_then(|s| s.phase.as_deref());
    let handed_to = pvc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(HANDED_TO));
    pvc.metadata.deletion_timestamp.is_none()
        && handed_to.map(String::as_str) == Some(PROVISIONER)
        && matches!(phase, None | Some("Pending"))
        && pvc
            .spec
            .as_ref()
            .is_some_and(|s| s.volume_name.as_deref().unwrap_or_default().is_empty())
}

/// The volume for a claim (pure).
pub fn volume_for(pvc: &PersistentVolumeClaim, volumes_dir: &Path) -> PersistentVolume {
    let spec = pvc.spec.clone().unwrap_or_default();
    let name = pv_name(pvc);
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage").cloned())
        .unwrap_or_else(|| Quantity("1Gi".into()));
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([(LABEL.to_string(), "true".to_string())])),
            annotations: Some(BTreeMap::from([(
                "pv.kubernetes.io/provisioned-by".to_string(),
                PROVISIONER.to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([("storage".to_string(), size)])),
            access_modes: spec.access_modes.clone(),
            storage_class_name: Some(spec.storage_class_name.clone().unwrap_or_default()),
            volume_mode: spec.volume_mode.clone(),
            persistent_volume_reclaim_policy: Some("Delete".into()),
            host_path: Some(HostPathVolumeSource {
                path: volumes_dir.join(&name).display().to_string(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: pvc.metadata.namespace.clone(),
                name: pvc.metadata.name.clone(),
                uid: pvc.metadata.uid.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn provision(api: &Api<PersistentVolume>, pvc: &PersistentVolumeClaim, volumes_dir: &Path) {
    let pv = volume_for(pvc, volumes_dir);
    let name = pv.metadata.name.clone().unwrap_or_default();
    let dir = volumes_dir.join(&name);
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)))
    {
        tracing::warn!("volume {}: {e}", dir.display());
    }
    match api.create(&PostParams::default(), &pv).await {
        Ok(_) => tracing::info!(
            claim = %format!("{}/{}", pvc.metadata.namespace.as_deref().unwrap_or_default(), pvc.metadata.name.as_deref().unwrap_or_default()),
            volume = %name,
            "provisioned"
        ),
        Err(e) if is_already_exists(&e) => {}
        Err(e) => tracing::warn!(volume = %name, "provision: {e}"),
    }
}

async fn reclaim(api: &Api<PersistentVolume>, pv: &PersistentVolume) {
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
    if !matches!(phase, Some("Released") | Some("Failed"))
        || pv.metadata.deletion_timestamp.is_some()
    {
        return;
    }
    let name = pv.metadata.name.clone().unwrap_or_default();
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => tracing::info!(volume = %name, "released volume deleted"),
        Err(e) if is_not_found(&e) => {}
        Err(e) => {
            tracing::warn!(volume = %name, "delete: {e}");
            return;
        }
    }
    if let Some(path) = pv
        .spec
        .as_ref()
        .and_then(|s| s.host_path.as_ref())
        .map(|h| PathBuf::from(&h.path))
    {
        let _ = std::fs::remove_dir_all(path);
    }
}

/// Installs the default StorageClass (once; an existing one is kept).
pub async fn install_class(client: &Client) -> kube::Result<()> {
    let classes: Api<StorageClass> = Api::all(client.clone());
    match classes
        .create(&PostParams::default(), &storage_class())
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_already_exists(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Runs until dropped.
pub async fn run(client: Client, volumes_dir: PathBuf) {
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let claims = watcher::watcher(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .for_each(|ev| {
        let pvs = pvs.clone();
        let dir = volumes_dir.clone();
        async move {
            match ev {
                Ok(Event::Apply(pvc)) | Ok(Event::InitApply(pvc)) if wants_volume(&pvc) => {
                    provision(&pvs, &pvc, &dir).await
                }
                Err(e) => tracing::warn!("claims watch: {e}"),
                _ => {}
            }
        }
    });
    let released = watcher::watcher(
        pvs.clone(),
        watcher::Config::default().labels(&format!("{LABEL}=true")),
    )
    .default_backoff()
    .for_each(|ev| {
        let pvs = pvs.clone();
        async move {
            match ev {
                Ok(Event::Apply(pv)) | Ok(Event::InitApply(pv)) => reclaim(&pvs, &pv).await,
                Err(e) => tracing::warn!("volumes watch: {e}"),
                _ => {}
            }
        }
    });
    tokio::join!(claims, released);
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PersistentVolumeClaimSpec, VolumeResourceRequirements};

    #[test]
    fn volume_matches_the_claim() {
        let mut pvc = PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("ws".into()),
                namespace: Some("ns".into()),
                uid: Some("u1".into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteMany".into()]),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        Quantity("5Gi".into()),
                    )])),
                    ..Default::default()
                }),
                storage_class_name: Some(CLASS.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        // Not before the PV controller hands it over (after the scheduler picked a node).
        assert!(!wants_volume(&pvc));
        pvc.metadata.annotations = Some(BTreeMap::from([(
            HANDED_TO.to_string(),
            "someone-else".to_string(),
        )]));
        assert!(!wants_volume(&pvc));
        pvc.metadata.annotations = Some(BTreeMap::from([(
            HANDED_TO.to_string(),
            PROVISIONER.to_string(),
        )]));
        assert!(wants_volume(&pvc));
        let pv = volume_for(&pvc, Path::new("/state/volumes"));
        let spec = pv.spec.unwrap();
        assert_eq!(pv.metadata.name.as_deref(), Some("pvc-u1"));
        assert_eq!(spec.capacity.unwrap()["storage"].0, "5Gi");
        assert_eq!(spec.storage_class_name.as_deref(), Some(CLASS));
        assert_eq!(spec.host_path.unwrap().path, "/state/volumes/pvc-u1");
        let claim = spec.claim_ref.unwrap();
        assert_eq!(
            (claim.name.as_deref(), claim.uid.as_deref()),
            (Some("ws"), Some("u1"))
        );
    }
}
