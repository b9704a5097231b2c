//! Images without a registry: `--image-map PREFIX=DIR` names the host folder of binaries that
//! stands in for an image, `--entrypoint PREFIX=BINARY` the binary that is its entrypoint.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};

#[derive(Debug, Clone, Default)]
pub struct Images {
    dirs: Vec<(String, PathBuf)>,
    entrypoints: Vec<(String, String)>,
}

fn split(s: &str) -> Result<(String, String)> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("{s:?}: expected IMAGE_PREFIX=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

fn longest<'a, T>(entries: &'a [(String, T)], image: &str) -> Option<&'a T> {
    entries
        .iter()
        .filter(|(p, _)| image.starts_with(p.as_str()))
        .max_by_key(|(p, _)| p.len())
        .map(|(_, v)| v)
}

impl Images {
    pub fn new(maps: &[String], entrypoints: &[String]) -> Result<Images> {
        Ok(Images {
            dirs: maps
                .iter()
                .map(|m| split(m).map(|(k, v)| (k, PathBuf::from(v))))
                .collect::<Result<_>>()?,
            entrypoints: entrypoints
                .iter()
                .map(|e| split(e))
                .collect::<Result<_>>()?,
        })
    }

    /// The host folder of an image (longest matching prefix of the full reference).
    pub fn dir(&self, image: &str) -> Option<&Path> {
        longest(&self.dirs, image).map(PathBuf::as_path)
    }

    /// The entrypoint binary of an image, when one is configured.
    pub fn entrypoint(&self, image: &str) -> Option<&str> {
        longest(&self.entrypoints, image).map(String::as_str)
    }
}

/// The host program for a container's `command[0]`: a path that exists on the host as is;
/// otherwise its file name looked up in `search` (the image's folder first, then PATH).
pub fn find_program(program: &str, search: &[PathBuf]) -> Option<PathBuf> {
    let p = Path::new(program);
    if p.is_absolute() && p.is_file() {
        return Some(p.to_path_buf());
    }
    let name = p.file_name()?;
    search.iter().map(|d| d.join(name)).find(|c| c.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins() {
        let i = Images::new(
            &[
                "ghcr.io/x/=/a".into(),
                "ghcr.io/x/rlt-operator=/b".into(),
                "busybox=/bin".into(),
            ],
            &["ghcr.io/x/rlt-operator=rlt-operator".into()],
        )
        .unwrap();
        assert_eq!(i.dir("ghcr.io/x/rlt-operator:0.1.0"), Some(Path::new("/b")));
        assert_eq!(i.dir("ghcr.io/x/rlt-trainer:0.1.0"), Some(Path::new("/a")));
        assert_eq!(i.dir("busybox:1.36"), Some(Path::new("/bin")));
        assert_eq!(i.dir("alpine"), None);
        assert_eq!(
            i.entrypoint("ghcr.io/x/rlt-operator:0.1.0"),
            Some("rlt-operator")
        );
        assert_eq!(i.entrypoint("ghcr.io/x/rlt-trainer:0.1.0"), None);
        assert!(Images::new(&["nope".into()], &[]).is_err());
    }

    #[test]
    fn programs_resolve_on_the_host_or_by_name() {
        let bin = vec![PathBuf::from("/bin"), PathBuf::from("/usr/bin")];
        assert!(find_program("sh", &bin).is_some());
        assert!(find_program("/bin/sh", &[]).is_some());
        assert_eq!(
            find_program("/opt/image/bin/sh", &bin),
            find_program("sh", &bin)
        );
        assert_eq!(find_program("no-such-binary-here", &bin), None);
    }
}
