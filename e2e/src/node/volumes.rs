//! A pod's volumes as host folders: ConfigMaps, Secrets, downward API and projected volumes
//! written under the pod's folder; emptyDirs as plain folders; claims as their bound
//! PersistentVolume's host path; hostPaths as they are.
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, PersistentVolume,
    PersistentVolumeClaim, Secret, Volume,
};
use kube::api::Api;
use kube::Client;

use super::env::{self, FieldCtx};
use super::kubeapi::is_not_found;

/// A projected service-account token file, rewritten when it is refreshed.
#[derive(Debug, Clone)]
pub struct TokenFile {
    pub path: PathBuf,
    pub audiences: Vec<String>,
    pub expiration_seconds: i64,
}

/// The host folder of each volume, by volume name.
#[derive(Debug, Clone, Default)]
pub struct Volumes {
    pub dirs: BTreeMap<String, PathBuf>,
    pub tokens: Vec<TokenFile>,
}

/// A relative path that stays inside its folder.
fn inside(base: &Path, rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    if p.components().any(|c| !matches!(c, Component::Normal(_))) {
        bail!("path {rel:?} must be relative and must not contain '..'");
    }
    Ok(base.join(p))
}

fn write_file(base: &Path, rel: &str, content: &[u8]) -> Result<()> {
    let path = inside(base, rel)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, content).with_context(|| format!("write {}", path.display()))
}

/// Writes `data` (key -> content) as files: the `items` chosen, or every key.
fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    what: &str,
) -> Result<()> {
    match items {
        Some(items) => {
            for it in items {
                let content = data
                    .get(&it.key)
                    .ok_or_else(|| anyhow!("{what}: no key {:?}", it.key))?;
                write_file(dir, &it.path, content)?;
            }
        }
        None => {
            for (k, v) in data {
                write_file(dir, k, v)?;
            }
        }
    }
    Ok(())
}

fn config_map_bytes(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

fn secret_bytes(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

async fn get_opt<K>(api: &Api<K>, name: &str) -> Result<Option<K>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get(name).await {
        Ok(o) => Ok(Some(o)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn downward_files(dir: &Path, items: &[DownwardAPIVolumeFile], ctx: &FieldCtx) -> Result<()> {
    let containers = ctx.pod.spec.as_ref().map(|s| &s.containers);
    for it in items {
        let value = if let Some(f) = &it.field_ref {
            env::field_value(ctx, &f.field_path)?
        } else if let Some(r) = &it.resource_field_ref {
            let c = containers.and_then(|cs| {
                cs.iter()
                    .find(|c| Some(&c.name) == r.container_name.as_ref())
                    .or(cs.first())
            });
            env::resource_value(
                ctx,
                c.and_then(|c| c.resources.as_ref()),
                &r.resource,
                r.divisor.as_ref().map(|d| d.0.as_str()),
            )?
        } else {
            continue;
        };
        write_file(dir, &it.path, value.as_bytes())?;
    }
    Ok(())
}

/// Materializes every volume of the pod under `pod_dir/volumes`. Fails (to be retried) while
/// a referenced object is missing or a claim is not bound yet.
pub async fn prepare(client: &Client, ctx: &FieldCtx<'_>, pod_dir: &Path) -> Result<Volumes> {
    let ns = ctx.pod.metadata.namespace.clone().unwrap_or_default();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let mut out = Volumes::default();
    let volumes: &[Volume] = ctx
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or_default();
    for v in volumes {
        let dir = pod_dir.join("volumes").join(&v.name);
        let fail = |e: anyhow::Error| {
            e.context(format!("MountVolume.SetUp failed for volume {:?}", v.name))
        };
        let host = async {
            if let Some(src) = &v.config_map {
                std::fs::create_dir_all(&dir)?;
                match get_opt(&cms, &src.name).await? {
                    Some(cm) => write_keys(
                        &dir,
                        &config_map_bytes(&cm),
                        src.items.as_ref(),
                        &format!("configmap {:?}", src.name),
                    )?,
                    None if src.optional == Some(true) => {}
                    None => bail!("configmap {:?} not found", src.name),
                }
                Ok(dir.clone())
            } else if let Some(src) = &v.secret {
                std::fs::create_dir_all(&dir)?;
                let name = src.secret_name.clone().unwrap_or_default();
                match get_opt(&secrets, &name).await? {
                    Some(s) => write_keys(
                        &dir,
                        &secret_bytes(&s),
                        src.items.as_ref(),
                        &format!("secret {name:?}"),
                    )?,
                    None if src.optional == Some(true) => {}
                    None => bail!("secret {name:?} not found"),
                }
                Ok(dir.clone())
            } else if v.empty_dir.is_some() {
                std::fs::create_dir_all(&dir)?;
                Ok(dir.clone())
            } else if let Some(src) = &v.persistent_volume_claim {
                let pvc = get_opt(&pvcs, &src.claim_name).await?.ok_or_else(|| {
                    anyhow!("persistentvolumeclaim {:?} not found", src.claim_name)
                })?;
                let phase = pvc.status.as_ref().and_then(|s| s.phase.clone());
                let pv_name = pvc.spec.as_ref().and_then(|s| s.volume_name.clone());
                let (Some("Bound"), Some(pv_name)) = (phase.as_deref(), pv_name) else {
                    bail!(
                        "persistentvolumeclaim {:?} is not bound yet",
                        src.claim_name
                    );
                };
                let pv = get_opt(&pvs, &pv_name)
                    .await?
                    .ok_or_else(|| anyhow!("persistentvolume {pv_name:?} not found"))?;
                let spec = pv.spec.unwrap_or_default();
                let path = spec
                    .host_path
                    .map(|h| h.path)
                    .or(spec.local.map(|l| l.path))
                    .ok_or_else(|| {
                        anyhow!("persistentvolume {pv_name:?} is neither hostPath nor local")
                    })?;
                std::fs::create_dir_all(&path)?;
                Ok(PathBuf::from(path))
            } else if let Some(src) = &v.host_path {
                if matches!(src.type_.as_deref(), Some("DirectoryOrCreate")) {
                    std::fs::create_dir_all(&src.path)?;
                }
                Ok(PathBuf::from(&src.path))
            } else if let Some(src) = &v.downward_api {
                std::fs::create_dir_all(&dir)?;
                downward_files(&dir, src.items.as_deref().unwrap_or_default(), ctx)?;
                Ok(dir.clone())
            } else if let Some(src) = &v.projected {
                std::fs::create_dir_all(&dir)?;
                for s in src.sources.iter().flatten() {
                    if let Some(c) = &s.config_map {
                        match get_opt(&cms, &c.name).await? {
                            Some(cm) => write_keys(
                                &dir,
                                &config_map_bytes(&cm),
                                c.items.as_ref(),
                                &format!("configmap {:?}", c.name),
                            )?,
                            None if c.optional == Some(true) => {}
                            None => bail!("configmap {:?} not found", c.name),
                        }
                    }
                    if let Some(c) = &s.secret {
                        let name = c.name.clone();
                        match get_opt(&secrets, &name).await? {
                            Some(sec) => write_keys(
                                &dir,
                                &secret_bytes(&sec),
                                c.items.as_ref(),
                                &format!("secret {name:?}"),
                            )?,
                            None if c.optional == Some(true) => {}
                            None => bail!("secret {name:?} not found"),
                        }
                    }
                    if let Some(d) = &s.downward_api {
                        downward_files(&dir, d.items.as_deref().unwrap_or_default(), ctx)?;
                    }
                    if let Some(t) = &s.service_account_token {
                        let file = TokenFile {
                            path: inside(&dir, &t.path)?,
                            audiences: t.audience.clone().into_iter().collect(),
                            expiration_seconds: t.expiration_seconds.unwrap_or(3607),
                        };
                        let token = super::token::request(
                            client,
                            ctx.pod,
                            file.audiences.clone(),
                            file.expiration_seconds,
                        )
                        .await?;
                        if let Some(parent) = file.path.parent() {
                            std::fs::create_dir_all(parent)?;
                        }
                        super::token::write_atomic(&file.path, token.as_bytes())?;
                        out.tokens.push(file);
                    }
                }
                Ok(dir.clone())
            } else {
                bail!("unsupported volume type (rlt-e2e-node plays configMap, secret, emptyDir, persistentVolumeClaim, hostPath, downwardAPI, projected)")
            }
        };
        let host = host.await.map_err(fail)?;
        out.dirs.insert(v.name.clone(), host);
    }
    Ok(out)
}

/// (mountPath, host path) of each of a container's volume mounts, `subPath` and
/// `subPathExpr` (expanded with the container's env) applied; missing sub-folders created.
pub fn mounts(
    c: &Container,
    volumes: &Volumes,
    env: &[(String, String)],
) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let base = volumes
            .dirs
            .get(&m.name)
            .ok_or_else(|| anyhow!("volumeMount {:?}: no volume of that name", m.name))?;
        let sub = match (&m.sub_path, &m.sub_path_expr) {
            (Some(s), _) if !s.is_empty() => Some(s.clone()),
            (_, Some(e)) if !e.is_empty() => {
                Some(env::expand_all(std::slice::from_ref(e), env).remove(0))
            }
            _ => None,
        };
        let host = match sub {
            Some(s) => {
                let p = inside(base, &s)?;
                if !p.exists() {
                    std::fs::create_dir_all(&p)?;
                }
                p
            }
            None => base.clone(),
        };
        out.push((m.mount_path.clone(), host));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::VolumeMount;

    #[test]
    fn mounts_apply_sub_paths() {
        let tmp = std::env::temp_dir().join(format!("rlt-e2e-node-vol-{}", std::process::id()));
        let vols = Volumes {
            dirs: BTreeMap::from([("ws".to_string(), tmp.clone())]),
            tokens: vec![],
        };
        let c = Container {
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "ws".into(),
                    mount_path: "/workspace".into(),
                    ..Default::default()
                },
                VolumeMount {
                    name: "ws".into(),
                    mount_path: "/data".into(),
                    sub_path_expr: Some("runs/$(RUN)".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let env = vec![("RUN".to_string(), "r1".to_string())];
        let m = mounts(&c, &vols, &env).unwrap();
        assert_eq!(m[0], ("/workspace".to_string(), tmp.clone()));
        assert_eq!(m[1], ("/data".to_string(), tmp.join("runs/r1")));
        assert!(tmp.join("runs/r1").is_dir());
        std::fs::remove_dir_all(&tmp).unwrap();
        assert!(inside(Path::new("/x"), "../etc").is_err());
        assert!(inside(Path::new("/x"), "/etc").is_err());
    }
}
