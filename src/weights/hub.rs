//! The published torchvision checkpoints: fetched on first use into a cache and verified the
//! way `torch.hub` does, by the SHA-256 prefix in the file name. Where the network is closed
//! the error names each file, its URL and where to put it.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A checkpoint torchvision publishes.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// Short name used on the command line.
    pub id: &'static str,
    pub file: &'static str,
    pub what: &'static str,
}

const BASE_URL: &str = "https://download.pytorch.org/models/";

pub const PUBLISHED: [Published; 4] = [
    Published {
        id: "fasterrcnn-v1",
        file: "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
        what: "Faster R-CNN ResNet-50-FPN v1, COCO (box AP 37.0)",
    },
    Published {
        id: "fasterrcnn-v2",
        file: "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth",
        what: "Faster R-CNN ResNet-50-FPN v2, COCO (box AP 46.7)",
    },
    Published {
        id: "resnet50-v1",
        file: "resnet50-0676ba61.pth",
        what: "ResNet-50 IMAGENET1K_V1 (acc@1 76.1), preset v1",
    },
    Published {
        id: "resnet50-v2",
        file: "resnet50-11ad3fa6.pth",
        what: "ResNet-50 IMAGENET1K_V2 (acc@1 80.9), preset v2",
    },
];

impl Published {
    pub fn url(&self) -> String {
        format!("{BASE_URL}{}", self.file)
    }

    /// The hex digits after the last '-' of the file name: the start of its SHA-256.
    fn hash_prefix(&self) -> &'static str {
        let stem = self.file.trim_end_matches(".pth");
        stem.rsplit('-').next().unwrap_or(stem)
    }
}

pub fn find(id: &str) -> Option<Published> {
    PUBLISHED
        .iter()
        .copied()
        .find(|p| p.id == id || p.file == id)
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "{file}: cannot fetch {url} ({reason}); download it where you can and put it at {dest}"
    )]
    Unavailable {
        file: String,
        url: String,
        dest: PathBuf,
        reason: String,
    },
    #[error("{file}: SHA-256 {actual} does not start with {expected}; the file at {dest} is not the published one")]
    Hash {
        file: String,
        dest: PathBuf,
        expected: String,
        actual: String,
    },
}

/// `$DETECTD_CACHE_DIR`, else `$XDG_CACHE_HOME/detectd`, else `~/.cache/detectd`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DETECTD_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("detectd")
}

fn sha256_hex(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn verify(p: &Published, path: &Path) -> Result<(), FetchError> {
    let actual = sha256_hex(path).map_err(|e| unavailable(p, path, e.to_string()))?;
    if actual.starts_with(p.hash_prefix()) {
        Ok(())
    } else {
        Err(FetchError::Hash {
            file: p.file.into(),
            dest: path.into(),
            expected: p.hash_prefix().into(),
            actual,
        })
    }
}

fn unavailable(p: &Published, dest: &Path, reason: String) -> FetchError {
    FetchError::Unavailable {
        file: p.file.into(),
        url: p.url(),
        dest: dest.into(),
        reason,
    }
}

/// The verified local path of `p`, downloading it into `dir` if it is not there yet.
pub fn ensure(p: &Published, dir: &Path) -> Result<PathBuf, FetchError> {
    let dest = dir.join(p.file);
    if dest.exists() {
        verify(p, &dest)?;
        return Ok(dest);
    }
    std::fs::create_dir_all(dir).map_err(|e| unavailable(p, &dest, e.to_string()))?;
    let partial = dest.with_extension("pth.partial");
    download(&p.url(), &partial).map_err(|reason| unavailable(p, &dest, reason))?;
    verify(p, &partial).inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })?;
    std::fs::rename(&partial, &dest).map_err(|e| unavailable(p, &dest, e.to_string()))?;
    Ok(dest)
}

/// Ensures every file in `wanted`; one error that lists each file that could not be had.
pub fn ensure_all(wanted: &[Published], dir: &Path) -> Result<Vec<PathBuf>, String> {
    let results: Vec<_> = wanted.iter().map(|p| ensure(p, dir)).collect();
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| format!("  - {e}")))
        .collect();
    if errors.is_empty() {
        Ok(results.into_iter().filter_map(Result::ok).collect())
    } else {
        Err(format!(
            "published weights are missing from {}:\n{}",
            dir.display(),
            errors.join("\n")
        ))
    }
}

fn download(url: &str, to: &Path) -> Result<(), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(std::time::Duration::from_secs(10)))
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| e.to_string())?;
    let mut reader = response.into_body().into_reader();
    let mut file = std::fs::File::create(to).map_err(|e| e.to_string())?;
    std::io::copy(&mut reader, &mut file).map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_prefixes_come_from_file_names() {
        assert_eq!(
            find("fasterrcnn-v1").map(|p| p.hash_prefix()),
            Some("258fb6c6")
        );
        assert_eq!(
            find("resnet50-11ad3fa6.pth").map(|p| p.hash_prefix()),
            Some("11ad3fa6")
        );
    }

    #[test]
    fn a_wrong_file_in_the_cache_is_refused() {
        let dir = std::env::temp_dir().join(format!("detectd-hub-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = find("resnet50-v2").unwrap();
        std::fs::write(dir.join(p.file), b"not the weights").unwrap();
        let err = ensure(&p, &dir).unwrap_err().to_string();
        assert!(err.contains("does not start with 11ad3fa6"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
