//! Generated Rust bindings of the `proto/` API, plus the descriptor set that server reflection serves.
#![allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]

/// The memory-service API (`memory.v1`).
pub mod memory {
    /// Version 1 of the memory-service API.
    pub mod v1 {
        tonic::include_proto!("memory.v1");
    }
}

/// The runtime-service API (`runtime.v1`).
pub mod runtime {
    /// Version 1 of the runtime-service API.
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
    }
}

/// vLLM's gRPC engine protocol (`vllm.grpc.engine`), the dialect runtime-service also serves.
pub mod vllm {
    /// The gRPC side of vLLM.
    pub mod grpc {
        /// `vllm.grpc.engine.VllmEngine` and its messages.
        pub mod engine {
            tonic::include_proto!("vllm.grpc.engine");
        }
    }
}

/// Messages shared by the Shepherd Model Gateway's engine protocols (`smg.grpc.common`).
pub mod smg {
    /// The gateway's gRPC protocols.
    pub mod grpc {
        /// Tokenizer chunks, KV events and the other shared messages.
        pub mod common {
            tonic::include_proto!("smg.grpc.common");
        }
    }
}

/// Encoded `google.protobuf.FileDescriptorSet` of `memory.v1` (and what it imports), for
/// memory-service's reflection.
pub const MEMORY_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("memory");

/// Encoded `google.protobuf.FileDescriptorSet` of `runtime.v1` (and what it imports), for
/// runtime-service's reflection.
pub const RUNTIME_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("runtime");

/// Encoded `google.protobuf.FileDescriptorSet` of `vllm.grpc.engine` (and `smg.grpc.common`, which
/// it imports), for runtime-service's reflection of its engine dialect.
pub const VLLM_ENGINE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("vllm_engine");
