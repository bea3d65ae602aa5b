//! Bakes the libtorch library folder into the binary's run path, so `detectd` starts without
//! LD_LIBRARY_PATH. The folder is the one torch-sys linked against (LIBTORCH, from
//! .cargo/config.toml or the environment).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(root) = std::env::var("LIBTORCH") {
        let lib = PathBuf::from(root).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
