//! Compiles `proto/**/*.proto` with protox (pure Rust, so a fresh machine needs no `protoc`) and
//! writes each API's encoded descriptor set to `OUT_DIR` for server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "memory/v1/memory.proto",
    "runtime/v1/runtime.proto",
    // The engine dialect runtime-service also serves (third-party, see the file's header); it
    // imports smg/grpc/common/common.proto, which protox finds under the same root.
    "vllm/grpc/engine/vllm_engine.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(env::var("OUT_DIR")?);

    // `compile_fds` does not emit rerun hints itself, so name every input here.
    for proto in PROTOS.iter().chain(&["smg/grpc/common/common.proto"]) {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }

    // Each server's reflection serves its own API only, so each gets a descriptor set of its own
    // (with the well-known types it imports). `compile_fds` ignores `file_descriptor_set_path`:
    // the sets are written here.
    for (proto, name) in [(PROTOS[0], "memory"), (PROTOS[1], "runtime"), (PROTOS[2], "vllm_engine")] {
        let own = protox::compile([proto], [&root])?;
        fs::write(out.join(format!("{name}.bin")), own.encode_to_vec())?;
    }
    let fds = protox::compile(PROTOS, [&root])?;

    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
