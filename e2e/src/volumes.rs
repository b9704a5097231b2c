//! A static volume provisioner for the local e2e cluster (`rlt-e2e-volumes`): every unbound,
//! pending PersistentVolumeClaim gets a hostPath PersistentVolume under `<dir>/<pv>`,
//! pre-bound to it (claimRef), which the PV controller then binds. The folder is
//! world-writable, as kind's local-path provisioner makes its folders: the kubelet applies no
//! `fsGroup` to hostPath volumes, so the stage pods (non-root) could not write a root-owned
//! one. Volumes it made that are released are deleted with their folder.
use std::path::{Path, PathBuf};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeSpec,
};
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

pub fn pv_name(pvc: &PersistentVolumeClaim) -> String {
    format!("pvc-{}", pvc.metadata.uid.as_deref().unwrap_or_default())
}

fn wants_volume(pvc: &PersistentVolumeClaim) -> bool {
    let phase = pvc.status.as_ref().and_then(|s| s.phase.as_deref());
    pvc.metadata.deletion_timestamp.is_none()
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
                "rlt-e2e-volumes".to_string(),
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
        let pvc = PersistentVolumeClaim {
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
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(wants_volume(&pvc));
        let pv = volume_for(&pvc, Path::new("/state/volumes"));
        let spec = pv.spec.unwrap();
        assert_eq!(pv.metadata.name.as_deref(), Some("pvc-u1"));
        assert_eq!(spec.capacity.unwrap()["storage"].0, "5Gi");
        assert_eq!(spec.storage_class_name.as_deref(), Some(""));
        assert_eq!(spec.host_path.unwrap().path, "/state/volumes/pvc-u1");
        let claim = spec.claim_ref.unwrap();
        assert_eq!(
            (claim.name.as_deref(), claim.uid.as_deref()),
            (Some("ws"), Some("u1"))
        );
    }
}
