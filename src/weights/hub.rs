//! Checkpoint downloads: torchvision's published files by name, or any URL. A download goes to a
//! temporary file beside its destination, is hashed as it arrives, and is renamed into place
//! only when complete and verified (full SHA-256, or torch.hub's 8-hex prefix from the file
//! name), so a failed, cut or mismatched download leaves nothing behind. Where the network is
//! closed the error names the file, its URL, where to put it and the `detectd weights fetch`
//! command.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A checkpoint torchvision publishes.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// Short name used on the command line.
    pub id: &'static str,
    /// Other names accepted for it (the short forms).
    pub aliases: &'static [&'static str],
    pub file: &'static str,
    pub what: &'static str,
    /// The eps torchvision runs the file's FrozenBatchNorm2d with, where it is not the 0.0
    /// of the COCO_V1 weights (torchvision overwrites eps only for those).
    pub frozen_bn_eps: Option<f64>,
}

const BASE_URL: &str = "https://download.pytorch.org/models/";

pub const PUBLISHED: [Published; 8] = [
    Published {
        id: "fasterrcnn-v1",
        aliases: &["v1"],
        file: "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
        what: "Faster R-CNN ResNet-50-FPN v1, COCO (box AP 37.0)",
        frozen_bn_eps: None,
    },
    Published {
        id: "fasterrcnn-v2",
        aliases: &["v2"],
        file: "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth",
        what: "Faster R-CNN ResNet-50-FPN v2, COCO (box AP 46.7)",
        frozen_bn_eps: None,
    },
    Published {
        id: "maskrcnn-v1",
        aliases: &[],
        file: "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
        what: "Mask R-CNN ResNet-50-FPN v1, COCO (box AP 37.9, mask AP 34.6)",
        frozen_bn_eps: None,
    },
    Published {
        id: "maskrcnn-v2",
        aliases: &[],
        file: "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
        what: "Mask R-CNN ResNet-50-FPN v2, COCO (box AP 47.4, mask AP 41.8)",
        frozen_bn_eps: None,
    },
    Published {
        id: "keypointrcnn",
        aliases: &[],
        file: "keypointrcnn_resnet50_fpn_coco-fc266e95.pth",
        what: "Keypoint R-CNN ResNet-50-FPN, COCO person keypoints (box AP 54.6, keypoint AP 65.0)",
        frozen_bn_eps: None,
    },
    Published {
        id: "keypointrcnn-legacy",
        aliases: &[],
        file: "keypointrcnn_resnet50_fpn_coco-9f466800.pth",
        what: "Keypoint R-CNN ResNet-50-FPN, legacy COCO weights (box AP 50.6, keypoint AP 61.1)",
        frozen_bn_eps: Some(1e-5),
    },
    Published {
        id: "resnet50-v1",
        aliases: &[],
        file: "resnet50-0676ba61.pth",
        what: "ResNet-50 IMAGENET1K_V1 (acc@1 76.1), preset v1",
        frozen_bn_eps: None,
    },
    Published {
        id: "resnet50-v2",
        aliases: &[],
        file: "resnet50-11ad3fa6.pth",
        what: "ResNet-50 IMAGENET1K_V2 (acc@1 80.9), preset v2",
        frozen_bn_eps: None,
    },
];

impl Published {
    pub fn url(&self) -> String {
        format!("{BASE_URL}{}", self.file)
    }

    /// The download and its check: the hash prefix torch.hub reads from the file name.
    pub fn source(&self) -> Source {
        Source {
            url: self.url(),
            file: self.file.into(),
            sha256: hash_in_file_name(self.file),
        }
    }
}

/// The FrozenBatchNorm eps torchvision uses for `source` when it names a published checkpoint
/// (by name, or a path ending in its file name) that does not run with 0.0.
pub fn frozen_bn_eps_of(source: &str) -> Option<f64> {
    let file = Path::new(source).file_name()?.to_str()?;
    find(source).or_else(|| find(file))?.frozen_bn_eps
}

/// A published checkpoint by its name, an alias or its file name.
pub fn find(name: &str) -> Option<Published> {
    PUBLISHED
        .iter()
        .copied()
        .find(|p| p.id == name || p.file == name || p.aliases.contains(&name))
}

/// What to download and the SHA-256 (full or a prefix, lowercase hex) it must have.
#[derive(Debug, Clone)]
pub struct Source {
    pub url: String,
    pub file: String,
    pub sha256: Option<String>,
}

impl Source {
    /// Any URL; the file name is its last path segment. Without `sha256`, torch.hub's
    /// `name-<hex8>.ext` convention still gives a prefix to check.
    pub fn from_url(url: &str, sha256: Option<&str>) -> Result<Source, FetchError> {
        let path = url.split(['?', '#']).next().unwrap_or(url);
        let file = path
            .rsplit('/')
            .next()
            .filter(|f| !f.is_empty() && !path.ends_with("://"))
            .ok_or_else(|| FetchError::Invalid(format!("{url}: no file name in the URL")))?;
        let sha256 = match sha256 {
            Some(h) => Some(parse_sha256(h)?),
            None => hash_in_file_name(file),
        };
        Ok(Source {
            url: url.into(),
            file: file.into(),
            sha256,
        })
    }
}

/// `--sha256`: the full hash (64 hex digits) or a prefix of at least 8.
pub fn parse_sha256(hex: &str) -> Result<String, FetchError> {
    let hex = hex.trim().to_ascii_lowercase();
    if (8..=64).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(FetchError::Invalid(format!(
            "--sha256 {hex:?}: give 8 to 64 hex digits (the full SHA-256 or its start)"
        )))
    }
}

/// The hex digits after the last '-' of a torch.hub file name (`resnet50-11ad3fa6.pth`).
fn hash_in_file_name(file: &str) -> Option<String> {
    let stem = file.split('.').next().unwrap_or(file);
    let (_, hex) = stem.rsplit_once('-')?;
    (hex.len() >= 8 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_ascii_lowercase())
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{file}: cannot fetch {url} ({reason}); {hint}")]
    Unavailable {
        file: String,
        url: String,
        reason: String,
        hint: String,
    },
    #[error("{file}: SHA-256 {actual} does not match {expected}; {what}")]
    Hash {
        file: String,
        expected: String,
        actual: String,
        what: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// `$DETECTD_CACHE`, else `$DETECTD_CACHE_DIR`, else `$XDG_CACHE_HOME/detectd`, else
/// `~/.cache/detectd`.
pub fn default_cache_dir() -> PathBuf {
    for var in ["DETECTD_CACHE", "DETECTD_CACHE_DIR"] {
        if let Some(d) = std::env::var_os(var).filter(|d| !d.is_empty()) {
            return PathBuf::from(d);
        }
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("detectd")
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

/// Checks an existing file against the source's hash (a file with no known hash passes).
pub fn verify(src: &Source, path: &Path) -> Result<(), FetchError> {
    let Some(expected) = &src.sha256 else {
        return Ok(());
    };
    let actual =
        sha256_file(path).map_err(|e| FetchError::Invalid(format!("{}: {e}", path.display())))?;
    if actual.starts_with(expected.as_str()) {
        Ok(())
    } else {
        Err(FetchError::Hash {
            file: src.file.clone(),
            expected: expected.clone(),
            actual,
            what: format!("the file at {} is not the published one", path.display()),
        })
    }
}

/// Downloads `src` to `dest`, verified; returns the SHA-256 of what was written.
pub fn fetch(src: &Source, dest: &Path) -> Result<String, FetchError> {
    let unavailable = |reason: String| FetchError::Unavailable {
        file: src.file.clone(),
        url: src.url.clone(),
        reason,
        hint: format!("download it where you can and put it at {}", dest.display()),
    };
    let dir = dest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
    remove_stale_partials(dir, &src.file);
    // Removed when dropped, so every early return below leaves nothing in `dir`; locked while
    // it is written, so that a later fetch can tell a live download from a killed one's.
    let mut partial = tempfile::Builder::new()
        .prefix(&partial_prefix(&src.file))
        .suffix(PARTIAL)
        .tempfile_in(dir)
        .map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
    partial
        .as_file()
        .try_lock()
        .map_err(|e| unavailable(format!("lock {}: {e}", partial.path().display())))?;
    let actual = download(&src.url, partial.as_file_mut()).map_err(unavailable)?;
    if let Some(expected) = &src.sha256 {
        if !actual.starts_with(expected.as_str()) {
            return Err(FetchError::Hash {
                file: src.file.clone(),
                expected: expected.clone(),
                actual,
                what: format!("the download from {} was discarded", src.url),
            });
        }
    }
    partial
        .persist(dest)
        .map_err(|e| unavailable(format!("{}: {}", dest.display(), e.error)))?;
    Ok(actual)
}

const PARTIAL: &str = ".partial";

fn partial_prefix(file: &str) -> String {
    format!(".{file}.")
}

/// Removes what killed downloads of `file` left in `dir`: partial files that no live fetch
/// holds locked.
fn remove_stale_partials(dir: &Path, file: &str) {
    let prefix = partial_prefix(file);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(&prefix) && name.ends_with(PARTIAL)) {
            continue;
        }
        let path = entry.path();
        let unlocked = std::fs::File::open(&path).is_ok_and(|f| f.try_lock().is_ok());
        if unlocked && std::fs::remove_file(&path).is_ok() {
            tracing::info!(path = %path.display(), "removed a partial download left by a stopped fetch");
        }
    }
}

/// The verified local path of `p`, downloading it into `dir` if it is not there yet.
pub fn ensure(p: &Published, dir: &Path) -> Result<PathBuf, FetchError> {
    let dest = dir.join(p.file);
    let src = p.source();
    if dest.exists() {
        verify(&src, &dest)?;
        return Ok(dest);
    }
    fetch(&src, &dest).map_err(|e| match e {
        FetchError::Unavailable {
            file, url, reason, ..
        } => FetchError::Unavailable {
            hint: fetch_hint(p, dir, &dest),
            file,
            url,
            reason,
        },
        other => other,
    })?;
    Ok(dest)
}

/// A model's source as the server and the CLI take it: a file, a published name (fetched into
/// `dir` if needed), or an http(s) URL with a SHA-256 (`sha256`, or torch.hub's hash in the
/// file name), fetched into `dir` and verified.
pub fn resolve(source: &str, sha256: Option<&str>, dir: &Path) -> Result<PathBuf, String> {
    let path = PathBuf::from(source);
    if path.exists() {
        return Ok(path);
    }
    if let Some(p) = find(source) {
        return ensure(&p, dir).map_err(|e| e.to_string());
    }
    if !(source.starts_with("http://") || source.starts_with("https://")) {
        return Err(format!(
            "weights {source}: no such file, nor a published name (see `detectd weights list`), nor an http(s) URL"
        ));
    }
    let src = Source::from_url(source, sha256).map_err(|e| e.to_string())?;
    if src.sha256.is_none() {
        return Err(format!(
            "{source}: a URL needs its sha256 (or torch.hub's name-<hash>.ext file name)"
        ));
    }
    let dest = dir.join(&src.file);
    if dest.exists() && verify(&src, &dest).is_ok() {
        return Ok(dest);
    }
    fetch(&src, &dest).map_err(|e| e.to_string())?;
    Ok(dest)
}

/// The command that fetches `p` into `dir`, and where to put the file by hand.
fn fetch_hint(p: &Published, dir: &Path, dest: &Path) -> String {
    let cache = if dir == default_cache_dir() {
        String::new()
    } else {
        format!(" --cache-dir {}", dir.display())
    };
    // The shortest name: the v1/v2 for the detectors.
    let name = p.aliases.first().copied().unwrap_or(p.id);
    format!(
        "run `detectd weights fetch {name}{cache}` where the network is open, or download it \
         elsewhere and put it at {}",
        dest.display()
    )
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

/// A progress bar on stderr when it is a terminal; hidden otherwise (logs, pipes, tests).
fn progress(len: Option<u64>) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar =
        indicatif::ProgressBar::with_draw_target(len, indicatif::ProgressDrawTarget::stderr());
    let template = "{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} {eta}";
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

/// Seconds a download may wait for a connection, its headers or any one read:
/// `DETECTD_DOWNLOAD_TIMEOUT_S`, 30 by default.
fn read_timeout() -> std::time::Duration {
    let seconds = std::env::var("DETECTD_DOWNLOAD_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(30);
    std::time::Duration::from_secs(seconds)
}

/// Streams `url` into `to`, hashing as it goes; a body shorter than its Content-Length is an
/// error even where the transport does not call it one.
fn download(url: &str, to: &mut std::fs::File) -> Result<String, String> {
    // A server that accepts and then stalls must not hang start-up: every read has a limit
    // (the whole download has none, since checkpoints are hundreds of MB on slow links).
    let limit = Some(read_timeout());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(limit)
        .timeout_recv_response(limit)
        .timeout_per_read(limit)
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| e.to_string())?;
    let declared = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bar = progress(declared);
    let mut reader = bar.wrap_read(response.into_body().into_reader());
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        total += n as u64;
    }
    bar.finish_and_clear();
    if let Some(len) = declared.filter(|&len| len != total) {
        return Err(format!("transfer cut short: {total} of {len} bytes"));
    }
    to.sync_all().map_err(|e| e.to_string())?;
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_prefixes_come_from_file_names() {
        assert_eq!(
            find("fasterrcnn-v1").and_then(|p| p.source().sha256),
            Some("258fb6c6".into())
        );
        assert_eq!(
            find("resnet50-11ad3fa6.pth").and_then(|p| p.source().sha256),
            Some("11ad3fa6".into())
        );
        assert_eq!(find("v2").map(|p| p.id), Some("fasterrcnn-v2"));
        assert_eq!(frozen_bn_eps_of("keypointrcnn-legacy"), Some(1e-5));
        assert_eq!(
            frozen_bn_eps_of("/m/keypointrcnn_resnet50_fpn_coco-9f466800.pth"),
            Some(1e-5)
        );
        assert_eq!(frozen_bn_eps_of("keypointrcnn"), None);
    }

    #[test]
    fn urls_give_file_names_and_hashes() {
        let s = Source::from_url("http://h/x/model-0123abcd.pth?download=1", None).unwrap();
        assert_eq!(
            (s.file.as_str(), s.sha256.as_deref()),
            ("model-0123abcd.pth", Some("0123abcd"))
        );
        let s = Source::from_url("http://h/plain.pth", Some("ABCDEF0123")).unwrap();
        assert_eq!(s.sha256.as_deref(), Some("abcdef0123"));
        assert!(Source::from_url("http://h/plain.pth", None)
            .unwrap()
            .sha256
            .is_none());
        assert!(Source::from_url("http://h/", None).is_err());
        assert!(parse_sha256("xyz12345").is_err());
        assert!(parse_sha256("abc").is_err());
    }

    #[test]
    fn the_offline_hint_names_the_fetch_command() {
        let p = find("fasterrcnn-v1").unwrap();
        let dir = Path::new("/elsewhere");
        let hint = fetch_hint(&p, dir, &dir.join(p.file));
        assert!(
            hint.contains("`detectd weights fetch v1 --cache-dir /elsewhere`"),
            "{hint}"
        );
        assert!(hint.contains("/elsewhere/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"));
    }

    #[test]
    fn a_wrong_file_in_the_cache_is_refused() {
        let dir = std::env::temp_dir().join(format!("detectd-hub-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = find("resnet50-v2").unwrap();
        std::fs::write(dir.join(p.file), b"not the weights").unwrap();
        let err = ensure(&p, &dir).unwrap_err().to_string();
        assert!(err.contains("does not match 11ad3fa6"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
