//! The fuzz binaries link libtorch through detectd, whose own build script puts the libtorch
//! run path only into detectd's binaries; add the same one here (LIBTORCH comes from
//! ../.cargo/config.toml), so the targets start without LD_LIBRARY_PATH.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(root) = std::env::var("LIBTORCH") {
        let lib = PathBuf::from(root).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
