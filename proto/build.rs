//! Compiles `proto/**/*.proto` with protox (pure Rust, so a fresh machine needs no `protoc`) and
//! writes the encoded descriptor set to `OUT_DIR` for server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &["memory/v1/memory.proto", "runtime/v1/runtime.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(env::var("OUT_DIR")?);

    // `compile_fds` does not emit rerun hints itself, so name every input here.
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }

    let fds = protox::compile(PROTOS, [&root])?;
    // `compile_fds` ignores `file_descriptor_set_path`, so the set reflection serves is written here.
    fs::write(out.join("descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
